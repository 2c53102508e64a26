"""Local paths and object stores (s3://, gs://) behind one small API, through pyarrow filesystems.

Writes are atomic: a reader sees the old object or the new one, never half of one (temp + rename
locally; on object stores a PUT is atomic, and we write a temp key and move it for the same shape).

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS,
an instance role), never from a URI: a URI is printed, logged, kept in the store's grid and handed to every
worker, so one that carries a secret (``s3://KEY:SECRET@bucket``, ``?secret_key=``) is refused, and the
refusal shows it with the secret masked (``redact``).
"""
from __future__ import annotations

import os
import re
import uuid

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "gcs")
# pyarrow's URI options that carry secrets (S3FileSystem.from_uri / GcsFileSystem.from_uri)
SECRET_PARAMS = ("access_key", "secret_key", "session_token", "access_token")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@?#]*)@")
_SECRET_PARAM = re.compile(r"([?&](?:" + "|".join(SECRET_PARAMS) + r")=)[^&#]*", re.IGNORECASE)


class StorageError(ValueError):
    """A storage URI that cannot be used; the message names it."""


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


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths are made absolute."""
    if not is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    check_no_credentials(uri)
    scheme = uri.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise StorageError(f"{uri}: unsupported storage scheme {scheme!r} (use a local path, s3:// or gs://)")
    if scheme == "s3" and "allow_delayed_open" not in uri:
        # small objects in one PUT instead of a multipart upload (fewer requests; moto mishandles multipart)
        uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with long texts
        raise StorageError(f"{uri}: cannot open storage ({str(e).splitlines()[0]})") from None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes, *, before_commit=None) -> None:
    """``before_commit``: called with the temp copy written, before it takes the name (a test hook)."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    if before_commit is not None:
        before_commit()
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(tmp, path)
    else:
        fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dir(uri: str) -> list[str]:
    """Base names directly inside a directory ([] when it does not exist)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def delete(uri: str) -> None:
    """Deletes a file or a directory tree; missing is fine."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
