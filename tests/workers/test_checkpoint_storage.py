"""Checkpoints of any size on every backend: fsio writes the final key directly on S3 (a PUT, or a
multipart upload aborted on failure), never a temp key moved by a CopyObject, which S3 refuses above 5 GiB (here
a moto server with a 1 MiB cap plays S3); workers/checkpoint.py streams tensors out one at a time and reads each
one straight into its own storage (host memory measured in a subprocess); the files are safetensors'."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fsio as storage
from workers import checkpoint

ROOT = Path(__file__).resolve().parents[2]
COPY_CAP_BYTES = 1 << 20  # stands for S3's 5 GiB CopyObject limit
MIB = 1 << 20


# --- S3: a moto server whose CopyObject refuses sources above COPY_CAP_BYTES -------------------------------
@pytest.fixture
def s3(moto_s3, monkeypatch, request):
    """(a fresh prefix ``s3://ckpt/<test>``, a boto3 client) on the session's moto server (tests/conftest.py),
    whose CopyObject refuses sources above COPY_CAP_BYTES for this test."""
    from moto.s3.exceptions import S3ClientError
    from moto.s3.models import S3Backend

    original = S3Backend.copy_object

    def capped_copy(self, src_key, *args, **kwargs):
        if src_key.size > COPY_CAP_BYTES:  # S3's words for a CopyObject above 5 GiB
            raise S3ClientError("InvalidRequest", "The specified copy source is larger than the maximum "
                                f"allowable size for a copy source: {COPY_CAP_BYTES}")
        return original(self, src_key, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "copy_object", capped_copy)
    # moto's (and S3's) smallest part: multipart sooner (raising=False: the test also runs on the old fsio)
    monkeypatch.setattr(storage, "S3_PART_BYTES", 5 * MIB, raising=False)
    client = moto_s3.client()
    client.create_bucket(Bucket="ckpt")
    name = request.node.name.replace("[", "-").rstrip("]")
    return f"s3://ckpt/{name}", client


def keys(client, prefix: str) -> dict[str, int]:
    """{key: size} below ``s3://ckpt/<prefix>``, less the directory markers (``a/``) pyarrow's delete_dir
    leaves for the parent."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="ckpt", Prefix=prefix.removeprefix("s3://ckpt/"))
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}


def open_uploads(client) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket="ckpt").get("Uploads", [])]


@pytest.fixture
def store(request, tmp_path):
    """A checkpoint location on each backend: (uri, names of what is stored below it)."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), lambda: {str(p.relative_to(tmp_path / "ckpt")): p.stat().st_size
                                                 for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    uri, client = request.getfixturevalue("s3")
    return uri, lambda: {k.removeprefix(uri.removeprefix("s3://ckpt/") + "/"): v for k, v in keys(client, uri).items()}


BACKENDS = pytest.mark.parametrize("store", ["local", "s3"], indirect=True)


def test_a_temp_key_moved_into_place_fails_above_the_copy_cap(s3):
    """The old write (temp key + move): the move is a CopyObject, refused above the cap, and the temp key stays."""
    uri, client = s3
    fs, path = storage.resolve(uri + "/tensors.safetensors")
    tmp = path.rsplit("/", 1)[0] + "/.tmp-0-tensors.safetensors"
    with fs.open_output_stream(tmp) as f:
        f.write(os.urandom(2 * COPY_CAP_BYTES))
    with pytest.raises(OSError, match="larger than the maximum allowable size"):
        fs.move(tmp, path)
    assert list(keys(client, uri)) == [tmp.removeprefix("ckpt/")]


def test_checkpoint_above_the_copy_cap_saves_and_loads_on_s3(s3):
    uri, client = s3
    tensors = {f"w{i}": torch.randn(MIB) for i in range(3)} | {"b": torch.randn(1000, dtype=torch.bfloat16)}
    for step in (1, 2, 3):
        checkpoint.save(uri, step, tensors | {"step": torch.tensor(step)}, {"step": step})
    got, state = checkpoint.load(uri)
    assert state == {"step": 3} and got.keys() == tensors.keys() | {"step"}
    assert all(torch.equal(got[k], v) for k, v in tensors.items()) and got["step"].item() == 3
    stored = keys(client, uri)
    prefix = uri.removeprefix("s3://ckpt/")
    assert stored[f"{prefix}/step-00000003/tensors.safetensors"] > 12 * COPY_CAP_BYTES  # multipart, 3 parts
    assert {k.split("/")[1] for k in stored} == {"LATEST", "step-00000002", "step-00000003"}
    assert not [k for k in stored if ".tmp-" in k] and not open_uploads(client)
    # what is stored is safetensors' format
    from safetensors.torch import load as st_load

    blob = client.get_object(Bucket="ckpt", Key=f"{prefix}/step-00000003/tensors.safetensors")["Body"].read()
    assert torch.equal(st_load(blob)["w1"], tensors["w1"])


@pytest.mark.parametrize("size", [0, 1, 5 * MIB - 1, 5 * MIB, 12 * MIB + 123])
def test_write_bytes_round_trips_on_s3_one_put_or_multipart(s3, size):
    uri, client = s3
    data = os.urandom(size)
    storage.write_bytes(uri + "/blob", data)
    assert storage.read_bytes(uri + "/blob") == data
    assert list(keys(client, uri)) == [uri.removeprefix("s3://ckpt/") + "/blob"] and not open_uploads(client)


def test_a_stream_written_in_pieces_round_trips_on_s3(s3):
    """Writes smaller and larger than a part, numpy arrays and bytes alike."""
    uri, _ = s3
    pieces = [os.urandom(n) for n in (10, 3 * MIB, 7 * MIB + 5, 1, 11 * MIB)]
    with storage.open_write(uri + "/blob") as f:
        for p in pieces:
            f.write(torch.frombuffer(bytearray(p), dtype=torch.uint8).numpy() if len(p) > 1 else p)
    assert storage.read_bytes(uri + "/blob") == b"".join(pieces)


@BACKENDS
@pytest.mark.parametrize("written", [0, 1, 12 * MIB])
def test_a_write_that_fails_leaves_nothing_and_the_old_object_whole(store, written):
    uri, stored = store
    storage.write_bytes(uri + "/kept", b"old")
    for name in ("kept", "new"):
        with pytest.raises(RuntimeError, match="mid-write"):
            with storage.open_write(f"{uri}/{name}") as f:
                f.write(os.urandom(written))
                raise RuntimeError("mid-write")
    assert stored() == {"kept": 3} and storage.read_bytes(uri + "/kept") == b"old"


def test_a_failed_upload_is_aborted_and_says_where(s3, monkeypatch):
    """S3 refuses a part: a StorageError naming the object; the multipart upload is aborted, nothing stored."""
    uri, client = s3
    upload_part = storage._S3Upload._upload_part
    calls = []

    def second_part_fails(self, number, part):
        calls.append(number)
        if number == 2:
            self.client.upload_part(Bucket="no-such-bucket", Key="k", UploadId="x", PartNumber=1, Body=b"")
        return upload_part(self, number, part)

    monkeypatch.setattr(storage._S3Upload, "_upload_part", second_part_fails)
    with pytest.raises(storage.StorageError, match=rf"{uri}/blob: cannot write \(NoSuchBucket"):
        storage.write_bytes(uri + "/blob", os.urandom(16 * MIB))
    assert 2 in calls and not keys(client, uri) and not open_uploads(client)
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/x: cannot write"):
        storage.write_bytes("s3://no-such-bucket/x", b"1")


def test_gcs_writes_a_temp_object_and_moves_it(monkeypatch):
    """gs:// (no emulator here: pyarrow's in-memory filesystem stands in): the temp object is moved into place,
    and deleted when the write fails."""
    import pyarrow._fs

    mock = pyarrow._fs._MockFileSystem()
    monkeypatch.setattr(storage, "resolve", lambda uri: (mock, uri.removeprefix("gs://")))
    storage.write_bytes("gs://bkt/a/b", b"new")
    with pytest.raises(RuntimeError):
        with storage.open_write("gs://bkt/a/c") as f:
            f.write(b"half")
            raise RuntimeError
    assert storage.list_dir("gs://bkt/a") == ["b"] and storage.read_bytes("gs://bkt/a/b") == b"new"


# --- the format ----------------------------------------------------------------------------------------------
def layouts() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {"fp32": torch.randn(3, 5), "bf16": torch.randn(7, dtype=torch.bfloat16),
            "fp16": torch.randn(5, dtype=torch.float16), "int64": torch.arange(-3, 4), "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 3), "transposed": base.t(), "strided": base[::2, 1::3], "bool":
            torch.tensor([True, False, True]), "uint8": torch.arange(5, dtype=torch.uint8),
            "param": torch.nn.Parameter(torch.randn(2, 2))}


@BACKENDS
def test_every_dtype_and_layout_round_trips(store):
    uri, _ = store
    tensors = layouts()
    checkpoint.save(uri, 7, tensors, {"a": 1})
    got, state = checkpoint.load(uri)
    assert state == {"a": 1} and got.keys() == tensors.keys()
    for k, want in tensors.items():
        assert got[k].dtype == want.dtype and got[k].shape == want.shape and torch.equal(got[k], want), k


def test_the_file_is_safetensors_and_safetensors_files_load(tmp_path):
    """safetensors reads what ``write_tensors`` writes (tensor by tensor from the memory map too), and a file
    safetensors wrote (a checkpoint from before streaming, with ``__metadata__``) loads."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = layouts()
    path = tmp_path / "t.safetensors"
    with storage.open_write(str(path)) as f:
        checkpoint.write_tensors(f, tensors)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == tensors.keys() and torch.equal(f.get_tensor("bf16"), tensors["bf16"])
    assert all(torch.equal(v, tensors[k]) for k, v in load_file(str(path)).items())
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(theirs), metadata={"format": "pt"})
    assert all(torch.equal(v, tensors[k]) for k, v in checkpoint.read_tensors(str(theirs)).items())


@pytest.mark.parametrize("damage", ["truncated", "longer", "header", "gap", "json"])
def test_a_damaged_file_is_refused(tmp_path, damage):
    from safetensors import SafetensorError

    path = tmp_path / "t.safetensors"
    with storage.open_write(str(path)) as f:
        checkpoint.write_tensors(f, {"a": torch.randn(100), "b": torch.randn(10)})
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    if damage == "truncated":
        blob = blob[:-5]
    elif damage == "longer":
        blob += b"\0" * 4
    elif damage == "header":
        blob = (10 ** 9).to_bytes(8, "little") + blob[8:]
    elif damage == "json":
        blob = blob[:8] + b"[" + blob[9:]
    else:  # a header whose offsets leave a hole
        header = json.loads(blob[8:8 + n])
        header["b"]["data_offsets"] = [o + 4 for o in header["b"]["data_offsets"]]
        text = json.dumps(header).encode()
        blob = len(text).to_bytes(8, "little") + text + blob[8 + n:] + b"\0" * 4
    path.write_bytes(blob)
    with pytest.raises(SafetensorError):
        checkpoint.read_tensors(str(path))


# --- host memory: measured in a fresh interpreter --------------------------------------------------------------
N_TENSORS, TENSOR_BYTES = 8, 32 * MIB
MEMORY_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, {root!r})
    import torch
    import fsio
    from workers import checkpoint

    fsio.S3_PART_BYTES, fsio.S3_PARTS_IN_FLIGHT = {part_bytes}, {in_flight}
    uri, what = sys.argv[1], sys.argv[2]

    def reset_peak():  # Linux: "5" zeroes the peak resident set (VmHWM); else the peak so far is the baseline
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    def rss_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    checkpoint.save(uri + "/warm", 1, {{"x": torch.randn(1 << 20)}}, {{}})  # code, clients, threads: loaded
    checkpoint.load(uri + "/warm")
    if what == "save":
        tensors = {{f"w{{i}}": torch.randn({n_elems}) for i in range({n_tensors})}}
        reset_peak()
        base = rss_bytes()
        checkpoint.save(uri + "/big", 1, tensors, {{}})
        print(json.dumps({{"extra": peak_bytes() - base}}))
    else:
        reset_peak()
        base = rss_bytes()
        tensors, _ = checkpoint.load(uri + "/big")
        held = sum(t.numel() * t.element_size() for t in tensors.values())
        print(json.dumps({{"extra": peak_bytes() - base - held, "held": held}}))
""")


def probe(uri: str, what: str, env: dict | None = None, part_bytes: int = 8 * MIB, in_flight: int = 2) -> dict:
    code = MEMORY_PROBE.format(root=str(ROOT), part_bytes=part_bytes, in_flight=in_flight,
                               n_elems=TENSOR_BYTES // 4, n_tensors=N_TENSORS)
    out = subprocess.run([sys.executable, "-c", code, uri, what], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # measures a subprocess saving and loading a large checkpoint
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@BACKENDS
def test_save_and_load_hold_about_one_tensor_beside_the_checkpoint(store):
    """A save of 8 tensors of 32 MiB (256 MiB) needs less than one more tensor's worth of host memory (plus, on
    S3, the upload's parts in flight: 3 of 8 MiB here); a load, the tensors it returns plus its read buffer.
    Streaming: ~0 (local) and ~25 MiB (S3) extra to save, ~8 MiB to load; the one-shot code it replaces needed
    768 MiB to save (a clone, a serialised copy, ...) and 280 MiB beside the result to load."""
    uri, _ = store
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    parts = (2 + 1) * 8 * MIB if uri.startswith("s3://") else 0
    saved = probe(uri, "save", env)
    assert saved["extra"] < TENSOR_BYTES + parts, saved
    loaded = probe(uri, "load", env)
    assert loaded["held"] == N_TENSORS * TENSOR_BYTES and loaded["extra"] < TENSOR_BYTES, loaded
