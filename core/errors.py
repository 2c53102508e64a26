"""The project's user-facing error: bad input (grid, data, arguments, storage, model, a sweep another driver holds).

Every layer raises ``UserError`` (or a subclass naming its domain); the CLI turns it into exactly one line on
stderr and exit code 2, no traceback (docs/reference.md "Exit codes"). The message names the file, the field and
the problem: ``grid.yaml: methods.lora.rank[2]: must be >= 1``. A ``ValueError`` so that code validating values
may catch it with the rest.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input; ``str(e)`` is the one line the user sees."""

    exit_code = EXIT_USER_ERROR

    @classmethod
    def at(cls, file: str, field: str | None, problem: str) -> "UserError":
        """``<file>: <field>: <problem>`` (field left out when the problem is the whole file)."""
        return cls(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")

    def one_line(self) -> str:
        return one_line(self)


def one_line(e: BaseException | str, limit: int | None = None) -> str:
    """An error (or a message) as one line: its whitespace runs collapsed to single spaces (tracebacks, multi-line
    library messages), an empty message named by the exception's type, cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or (type(e).__name__ if isinstance(e, BaseException) else "")
    return text[:limit]
