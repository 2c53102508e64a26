"""Local paths and object stores (s3://, gs://) behind one small API, through pyarrow filesystems: the project's
I/O layer, used by the driver's store writer, the workers (checkpoints, kept weights, the token cache) and the
analysis' readers. Its own package beside ``core`` (which stays free of pyarrow): URIs themselves (parsing,
credentials, redaction) are core/uris.py's, the store's layout core/store.py's. pyarrow is loaded when a
function first runs, so ``import fsio`` stays cheap for the light commands.

Writes are atomic: a reader sees the old object or the new one, never half of one (temp + rename locally; on object
stores a PUT is atomic, and we write a temp key and move it for the same shape). The lease's conditional writes
(create-if-absent, replace-if-unchanged) are at the end.
"""
from __future__ import annotations

import os
import uuid

from core.store import MODEL_MANIFEST, MODELS_DIR
from core.uris import SCHEMES, StorageError, check_no_credentials, checked, is_remote, join, local_path, redact

__all__ = ["SCHEMES", "StorageError", "check_no_credentials", "delete", "exists", "is_remote", "join", "list_dir",
           "read_bytes", "redact", "resolve", "write_bytes"]


def _pafs():
    import pyarrow.fs as pafs

    return pafs


def resolve(uri: str):
    """(pyarrow filesystem, path inside it). Local paths are made absolute; remote URIs are checked (no
    credentials, a known scheme) — the project's one place that turns a URI into a filesystem."""
    pafs = _pafs()
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    uri = checked(uri)
    if uri.startswith("s3://") and "allow_delayed_open" not in uri:
        # small objects in one PUT instead of a multipart upload (fewer requests; moto mishandles multipart)
        uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with long texts
        raise StorageError(f"{redact(uri)}: cannot open storage ({str(e).splitlines()[0]})") from None


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
    if isinstance(fs, _pafs().LocalFileSystem):
        os.replace(tmp, path)
    else:
        fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != _pafs().FileType.NotFound


def list_dir(uri: str) -> list[str]:
    """Base names directly inside a directory ([] when it does not exist)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(_pafs().FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def delete(uri: str) -> None:
    """Deletes a file or a directory tree; missing is fine."""
    fs, path = resolve(uri)
    kind = _pafs().FileType
    info = fs.get_file_info(path)
    if info.type == kind.Directory:
        fs.delete_dir(path)
    elif info.type == kind.File:
        fs.delete_file(path)


def file_sizes(uri: str) -> dict[str, int]:
    """{path relative to ``uri``: bytes} of every file below the directory ``uri`` ({} when it does not exist)."""
    pafs = _pafs()
    fs, path = resolve(uri)
    root = path.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(root):]: i.size or 0 for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(root)}


def arrow_schema(columns: tuple[tuple[str, str], ...]):
    """The pyarrow schema of one of core/store.py's tables."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in columns])


# --- conditional writes: the sweep lease (orchestrator/lease.py) ----------------------------------------------
# Two drivers must never both win. Local stores: a hard link of a complete temp file (link(2) fails if the name
# exists: the O_EXCL of a file that appears whole) and, for replace/delete, read-compare-act under an flock(2) on
# a sidecar ``.<name>.lock`` (never deleted: deleting a lock file re-opens the race it closes). A version is the
# file's (inode, mtime_ns, size): os.replace always brings a new inode. S3: ``If-None-Match: *`` on create and
# ``If-Match: <etag>`` on replace/delete (AWS since 2024; moto 5 implements both), via boto3 — pyarrow's S3
# filesystem exposes no preconditions. GCS: generation preconditions (``if_generation_match``, 0 = absent) via
# google-cloud-storage, imported only there.

def create_exclusive(uri: str, data: bytes) -> bool:
    """Writes ``data`` at ``uri`` only if nothing is there; True if this call created it."""
    if not is_remote(uri):
        return _local_create_exclusive(local_path(uri), data)
    if checked(uri).startswith("s3://"):
        return _s3_conditional(uri, "put", data=data, IfNoneMatch="*")
    return _gcs_conditional(uri, "put", data=data, generation=0)


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, version) of the object at ``uri``, or None when there is none; the version is what
    ``replace_if`` / ``delete_if`` compare against."""
    if not is_remote(uri):
        path = local_path(uri)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"{redact(uri)}: cannot read ({e.strerror})") from None
    if checked(uri).startswith("s3://"):
        return _s3_conditional(uri, "get")
    return _gcs_conditional(uri, "get")


def replace_if(uri: str, data: bytes, version: str) -> bool:
    """Replaces the object at ``uri`` with ``data`` only if it is still at ``version``; True if replaced."""
    if not is_remote(uri):
        return _local_if_version(local_path(uri), version, data)
    if checked(uri).startswith("s3://"):
        return _s3_conditional(uri, "put", data=data, IfMatch=version)
    return _gcs_conditional(uri, "put", data=data, generation=int(version))


def delete_if(uri: str, version: str) -> bool:
    """Deletes the object at ``uri`` only if it is still at ``version``; True if deleted."""
    if not is_remote(uri):
        return _local_if_version(local_path(uri), version, None)
    if checked(uri).startswith("s3://"):
        return _s3_conditional(uri, "delete", IfMatch=version)
    return _gcs_conditional(uri, "delete", generation=int(version))


def _local_create_exclusive(path: str, data: bytes) -> bool:
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and the name appears with its whole content
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise StorageError(f"{redact(path)}: cannot write ({e.strerror})") from None


def _local_if_version(path: str, version: str, data: bytes | None) -> bool:
    """Under the sidecar lock: if ``path`` is at ``version``, replace it with ``data`` (None: delete it)."""
    import fcntl

    parent, name = os.path.split(path)
    try:
        with open(os.path.join(parent, f".{name}.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
            current = read_versioned(path)
            if current is None or current[1] != version:
                return False
            if data is None:
                os.unlink(path)
                return True
            tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return True
    except OSError as e:
        raise StorageError(f"{redact(path)}: cannot write ({e.strerror})") from None


def _s3_client(uri: str):
    """(boto3 client, bucket, key) for ``s3://bucket/key[?endpoint_override=…&region=…&scheme=…]``; the endpoint
    and credentials otherwise come from the environment (AWS_ENDPOINT_URL_S3, AWS_*), as for pyarrow."""
    from urllib.parse import parse_qs, urlsplit

    import boto3

    parts = urlsplit(uri)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    kwargs = {}
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"]
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{query.get('scheme', 'https')}://{endpoint}"
    if "region" in query:
        kwargs["region_name"] = query["region"]
    return boto3.client("s3", **kwargs), parts.netloc, parts.path.lstrip("/")


def _s3_conditional(uri: str, op: str, data: bytes | None = None, **conditions):
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key = _s3_client(uri)
    try:
        if op == "get":
            response = client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), response["ETag"]
        if op == "put":
            client.put_object(Bucket=bucket, Key=key, Body=data, **conditions)
        else:
            client.delete_object(Bucket=bucket, Key=key, **conditions)
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404") or status == 404:
            return None if op == "get" else False
        # 412: the condition failed; 409 ConditionalRequestConflict: a concurrent conditional write won
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        raise StorageError(f"{redact(uri)}: cannot {op} ({code}: {e.response.get('Error', {}).get('Message')})") \
            from None
    except BotoCoreError as e:
        raise StorageError(f"{redact(uri)}: cannot {op} ({' '.join(str(e).split())[:200]})") from None


def _gcs_conditional(uri: str, op: str, data: bytes | None = None, generation: int | None = None):
    """GCS through google-cloud-storage (not a dependency: needed only for a lease on a gs:// store)."""
    try:
        from google.api_core import exceptions as gexc
        from google.cloud import storage as gcs
    except ImportError:
        raise StorageError(f"{redact(uri)}: the sweep lease on gs:// needs google-cloud-storage "
                           "(pip install google-cloud-storage)") from None
    bucket_name, _, name = uri.split("://", 1)[1].partition("/")
    bucket = gcs.Client().bucket(bucket_name)
    try:
        if op == "get":
            blob = bucket.get_blob(name)
            if blob is None:
                return None
            return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
        if op == "put":
            bucket.blob(name).upload_from_string(data, if_generation_match=generation)
        else:
            bucket.blob(name).delete(if_generation_match=generation)
        return True
    except gexc.NotFound:
        return None if op == "get" else False
    except gexc.PreconditionFailed:
        return False
    except gexc.GoogleAPIError as e:
        raise StorageError(f"{redact(uri)}: cannot {op} ({' '.join(str(e).split())[:200]})") from None


def kept_weights_bytes(sweep: str) -> dict[str, int]:
    """{trial_id: bytes} of every finished save under ``<sweep>/models/`` (one listing; `status` shows them)."""
    sizes, finished = {}, set()
    for rel, size in file_sizes(join(sweep, MODELS_DIR)).items():
        parts = rel.split("/")
        if len(parts) != 2 or parts[1].startswith(".tmp-"):
            continue
        finished.update([parts[0]] if parts[1] == MODEL_MANIFEST else [])
        sizes[parts[0]] = sizes.get(parts[0], 0) + size
    return {t: sizes[t] for t in sorted(finished)}
