"""Local paths and object stores (s3://, gs://) behind one small API, through pyarrow filesystems: the project's
I/O layer, used by the driver's store writer, the workers (checkpoints, kept weights, the token cache) and the
analysis' readers. Its own package beside ``core`` (which stays free of pyarrow): URIs themselves (parsing,
credentials, redaction) are core/uris.py's, the store's layout core/store.py's. pyarrow is loaded when a
function first runs, so ``import fsio`` stays cheap for the light commands.

Writes are atomic: a reader sees the old object or the new one, never half of one, and a write that fails leaves
nothing behind (``open_write``). Locally: a temp file renamed into place. On S3 the final key is written directly:
a PutObject, or a multipart upload that only its CompleteMultipartUpload makes visible, aborted on failure. Not a
temp key moved into place: a move is a CopyObject, refused above 5 GiB, and a full fine-tune's checkpoint is
larger. Not pyarrow's S3 stream either: closing it completes the upload, also when the block around it raised,
and a partial object appears. On GCS a temp object moved into place (pyarrow's move is a rewrite, not capped).
The lease's conditional writes (create-if-absent, replace-if-unchanged) are at the end.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections import deque

from core.errors import one_line
from core.store import MODEL_MANIFEST, MODELS_DIR
from core.uris import SCHEMES, StorageError, check_no_credentials, checked, is_remote, join, local_path, redact

__all__ = ["SCHEMES", "StorageError", "check_no_credentials", "delete", "exists", "is_remote", "join", "list_dir",
           "open_read", "open_write", "read_bytes", "redact", "resolve", "write_bytes"]

# S3's multipart limits (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html): parts of 5 MiB to
# 5 GiB (the last one smaller), at most 10,000 of them. 32 MiB parts: objects up to 312 GiB (a 2.8B full
# fine-tune's checkpoint, fp32 weights and AdamW's two moments, is ~34 GB); with 4 parts uploading at once an
# upload holds at most 5 parts (160 MiB) of host memory.
S3_PART_BYTES = 32 << 20
S3_PARTS_IN_FLIGHT = 4
S3_MAX_PARTS = 10_000
# a sequential reader's buffer: small reads (a checkpoint's norm weights) come from it, not one GET each
READ_BUFFER_BYTES = 8 << 20


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
    """``data`` at ``uri``, atomically (``open_write``)."""
    with open_write(uri, before_commit=before_commit) as f:
        f.write(data)


@contextlib.contextmanager
def open_write(uri: str, *, before_commit=None):
    """A writable stream (``.write(bytes-like)``) whose content takes the name ``uri`` when the block ends
    cleanly; when it raises, nothing takes it and nothing is left behind (no temp file, no temp key, no partial
    object). ``before_commit``: called with everything written, before it takes the name (a test hook)."""
    if is_remote(uri) and checked(uri).startswith("s3://"):
        upload = None
        try:
            upload = _S3Upload(uri)
            yield upload
            upload.commit(before_commit)
        except BaseException as e:
            if upload is not None:
                upload.abort()
            if _is_boto_error(e):
                raise StorageError(f"{redact(uri)}: cannot write ({_boto_problem(e)})") from None
            raise
        return
    fs, path = resolve(uri)
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        with fs.open_output_stream(tmp, compression=None) as f:  # the bytes as given, unbuffered
            yield f
        if before_commit is not None:
            before_commit()
        if isinstance(fs, _pafs().LocalFileSystem):
            os.replace(tmp, path)
        else:  # GCS: a rewrite, any size
            fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to see
            fs.delete_file(tmp)
        raise


class _S3Upload:
    """A write to an S3 key: buffered into parts of S3_PART_BYTES; an object that fits one part goes as one
    PutObject at commit, a larger one as a multipart upload (S3_PARTS_IN_FLIGHT parts uploading at once, from a
    thread pool) that ``commit`` completes and ``abort`` aborts: until completed, no reader sees any of it."""

    def __init__(self, uri: str):
        self.uri = uri
        self.client, self.bucket, self.key = _s3_client(uri)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.done: list[dict] = []
        self.pending: deque = deque()
        self.pool = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while len(view):
            take = min(len(view), S3_PART_BYTES - len(self.buffer))
            self.buffer += view[:take]
            view = view[take:]
            if len(self.buffer) == S3_PART_BYTES:
                self._send()
        return n

    def _send(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                                 ChecksumAlgorithm="CRC32")["UploadId"]
            self.pool = ThreadPoolExecutor(S3_PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
        number = len(self.done) + len(self.pending) + 1
        if number > S3_MAX_PARTS:
            raise StorageError(f"{redact(self.uri)}: cannot write more than {S3_MAX_PARTS} parts of "
                               f"{S3_PART_BYTES >> 20} MiB to one object")
        if len(self.pending) >= S3_PARTS_IN_FLIGHT:  # bounded memory: wait for the oldest part
            self.done.append(self.pending.popleft().result())
        part, self.buffer = self.buffer, bytearray()
        self.pending.append(self.pool.submit(self._upload_part, number, part))

    def _upload_part(self, number: int, part: bytearray) -> dict:
        # each part with its CRC32, named again on completion (as boto3's s3transfer does)
        response = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                           PartNumber=number, Body=part, ChecksumAlgorithm="CRC32")
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": response["ChecksumCRC32"]}

    def commit(self, before_commit) -> None:
        if self.upload_id is None:
            if before_commit is not None:
                before_commit()
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
            return
        if self.buffer:
            self._send()
        while self.pending:
            self.done.append(self.pending.popleft().result())
        self.pool.shutdown()
        if before_commit is not None:
            before_commit()
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.done})

    def abort(self) -> None:
        """Drops what was uploaded. Best effort: if S3 cannot be reached now, the incomplete upload stays
        invisible (a bucket lifecycle rule, AbortIncompleteMultipartUpload, reclaims its storage)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        self.buffer = bytearray()


def _is_boto_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("botocore")


def _boto_problem(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if response:
        error = response.get("Error", {})
        return f"{error.get('Code')}: {error.get('Message')}"
    return one_line(e, 200)


def read_bytes(uri: str) -> bytes:
    """The object's bytes as stored (no decompression by extension, as ``open_write`` compresses none)."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:  # its size known: one buffer, not chunks joined
        return f.read()


@contextlib.contextmanager
def open_read(uri: str, *, buffer_bytes: int = READ_BUFFER_BYTES):
    """(stream, size in bytes) of the object at ``uri``, read front to back: ``stream.readinto(buffer)`` fills
    the caller's buffer in place (a read larger than the stream's buffer goes straight into it)."""
    import pyarrow as pa

    fs, path = resolve(uri)
    with fs.open_input_file(path) as raw:
        size = raw.size()
        with pa.BufferedInputStream(raw, buffer_bytes) as f:
            yield f, size


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
