"""Storage URIs, pure: a local path, ``file://``, ``s3://`` or ``gs://`` — parse, join, redact, refuse secrets.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS,
an instance role), never from a URI: a URI is printed, logged, kept in the store's grid and handed to every
worker, so one that carries a secret (``s3://KEY:SECRET@bucket``, ``?secret_key=``) is refused, and the
refusal shows it with the secret masked (``redact``). I/O on a URI is the fsio package's.
"""
from __future__ import annotations

import os
import re

from core.errors import UserError

SCHEMES = ("s3", "gs", "gcs")
# pyarrow's URI options that carry secrets (S3FileSystem.from_uri / GcsFileSystem.from_uri)
SECRET_PARAMS = ("access_key", "secret_key", "session_token", "access_token")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@?#]*)@")
_SECRET_PARAM = re.compile(r"([?&](?:" + "|".join(SECRET_PARAMS) + r")=)[^&#]*", re.IGNORECASE)


class StorageError(UserError):
    """A storage URI that cannot be used; the message names it (redacted)."""


def redact(uri: str) -> str:
    """``uri`` with any credentials in it masked: ``s3://***@bucket/x``, ``?secret_key=***``."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", str(uri)))


def check_no_credentials(uri: str) -> str:
    """``uri`` itself, or a StorageError (showing it redacted) when it carries credentials."""
    if redact(uri) != uri:
        raise StorageError(f"{redact(uri)}: credentials in a URI are refused (a URI is printed, logged and "
                           "stored): give them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "GOOGLE_APPLICATION_CREDENTIALS) or through the machine's role")
    return uri


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def scheme(uri: str) -> str | None:
    """``s3`` for ``s3://b/k``; None for a local path or ``file://``."""
    return uri.split("://", 1)[0] if is_remote(uri) else None


def local_path(uri: str) -> str:
    """An absolute path for a local path or ``file://`` URI."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def absolute(uri: str) -> str:
    """A URI as another process reads it: remote ones as they are, local ones absolute (Ray Tune runs each trial in
    its own working directory, where ``./sweeps`` is somewhere else)."""
    return uri if is_remote(uri) else local_path(uri)


def checked(uri: str) -> str:
    """A remote URI the storage layer can open: no credentials, a known scheme (StorageError otherwise)."""
    check_no_credentials(uri)
    if scheme(uri) not in SCHEMES:
        raise StorageError(f"{uri}: unsupported storage scheme {scheme(uri)!r} (use a local path, s3:// or gs://)")
    return uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])
