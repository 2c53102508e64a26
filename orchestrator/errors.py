"""The grid's error; the user-facing base, ``UserError``, lives in core/errors.py (every layer raises it)."""
from __future__ import annotations

from core.errors import EXIT_USER_ERROR, UserError

__all__ = ["EXIT_USER_ERROR", "GridError", "UserError"]


class GridError(UserError):
    """The grid file is unreadable or invalid."""
