"""Content keys: one hex digest of bytes, text or a JSON-able value, for everything named by what it holds (trial
ids, the token cache's key, the mini suite's cache keys, kept weights' files, the CPU's measured peak).

Each caller keeps the algorithm and length its keys have always had, because those keys are identities on disk
(a trial id, a cache directory): changing either would orphan what is stored under the old ones.
"""
from __future__ import annotations

import hashlib
import json


def content_hash(data: bytes | str, *, algorithm: str = "sha256", hex_chars: int | None = None) -> str:
    """The hex digest of ``data`` (text as UTF-8), its first ``hex_chars`` characters (None: all)."""
    blob = data.encode() if isinstance(data, str) else data
    return hashlib.new(algorithm, blob).hexdigest()[:hex_chars]


def canonical_json(value, *, compact: bool = True) -> str:
    """``value`` as JSON with sorted keys and no NaN; ``compact``: no spaces (``{"a":1}``), else json's default
    separators (``{"a": 1}``), the form the mini suite's keys were made with."""
    separators = (",", ":") if compact else None
    return json.dumps(value, sort_keys=True, separators=separators, allow_nan=False)


def json_hash(value, *, algorithm: str = "sha256", hex_chars: int | None = None, compact: bool = True) -> str:
    """``content_hash`` of ``canonical_json(value)``."""
    return content_hash(canonical_json(value, compact=compact), algorithm=algorithm, hex_chars=hex_chars)
