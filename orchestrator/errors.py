"""The project's user-facing error: bad input (grid, data, arguments, storage, model).

The CLI turns it into exactly one line on stderr and exit code 2, no traceback (shared/CONTRACTS.md). The
message names the file, the field and the problem: ``grid.yaml: methods.lora.rank[2]: must be >= 1``.
Errors of lower layers that mean the same thing (``workers.models.ModelConfigError``,
``workers.data.DataError``) are recognised by ``as_user_error`` without importing anything heavy.
"""
from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input; ``str(e)`` is the one line the user sees."""

    exit_code = EXIT_USER_ERROR

    @classmethod
    def at(cls, file: str, field: str | None, problem: str) -> "UserError":
        """``<file>: <field>: <problem>`` (field left out when the problem is the whole file)."""
        return cls(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")


class GridError(UserError):
    """The grid file is unreadable or invalid."""


# Lower-layer errors that are user errors, by module and class name. Looked up in sys.modules only: if the
# module was never imported, the exception cannot be one of its classes (and the driver stays light).
_FOREIGN_USER_ERRORS = (("workers.models", "ModelConfigError"), ("workers.data", "DataError"),
                        ("workers.storage", "StorageError"), ("workers.suite", "SuiteError"),
                        ("analysis.load", "StoreError"), ("analysis.fit", "FitError"))


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as a UserError if it is one (or a known lower-layer equivalent), else None."""
    if isinstance(exc, UserError):
        return exc
    for module, name in _FOREIGN_USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return UserError(" ".join(str(exc).split()))  # one line, whatever the lower layer wrote
    return None
