"""A trial's checkpoint: safetensors for tensors, JSON for the rest. No pickle, so nothing unpickled.

Layout under the trial's checkpoint URI: ``step-00000012/{tensors.safetensors,state.json}`` and a
``LATEST`` file naming the newest complete one (written last, atomically): a crash mid-save leaves the
previous checkpoint in force. The previous complete checkpoint is kept beside the newest (unless the
caller has no use for it, as for a finished trial's marker), so one damaged after the fact (a truncated file,
a lost object) costs the steps since the one before it, not the trial: ``load`` falls back to it, then to
older ones, and says what it skipped.

Host memory: a save streams the tensors out one at a time (a GPU tensor passes through host memory alone; a
contiguous CPU one is written from its own memory), so it needs about one tensor's worth beside the model, not
the whole checkpoint twice over; a load reads each tensor straight into its own storage: one copy, no staging.
"""
from __future__ import annotations

import json
import math

import torch
from safetensors import SafetensorError

import fsio as storage
from core.errors import one_line

# safetensors' format (https://github.com/huggingface/safetensors#format): 8 bytes, little-endian, the header's
# length N; N bytes of JSON, {name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets into the data
# that follows, which the tensors cover with no gap) and an optional "__metadata__"; then the tensors' bytes,
# row-major, little-endian. safetensors refuses headers above 100 MB (MAX_HEADER_SIZE in its lib.rs).
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
          torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
          torch.uint8: "U8", torch.bool: "BOOL"}
BY_NAME = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
TENSORS_FILE = "tensors.safetensors"


def save(uri: str, step: int, tensors: dict[str, torch.Tensor], state: dict, *, keep_previous: bool = True) -> None:
    existing = [n for n in storage.list_dir(uri) if n.startswith("step-")]
    name = f"step-{step:08d}"
    if name in existing:  # a second save at one step (the done marker after a last checkpoint): a new folder,
        name += f".{sum(n.startswith(name) for n in existing)}"  # never a half-rewritten one
    previous = _latest(uri)
    with storage.open_write(storage.join(uri, name, TENSORS_FILE)) as f:
        write_tensors(f, tensors)
    storage.write_bytes(storage.join(uri, name, "state.json"), json.dumps(state).encode())
    storage.write_bytes(storage.join(uri, "LATEST"), name.encode())
    kept = {name, previous} if keep_previous else {name}
    for old in existing:
        if old not in kept:
            storage.delete(storage.join(uri, old))


def load(uri: str | None, *, skipped: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest readable checkpoint, or None when there is none. LATEST's first, then the others, newest
    first; each one that cannot be read is described in ``skipped`` (when given) and passed over."""
    if not uri:
        return None
    names = sorted((n for n in storage.list_dir(uri) if n.startswith("step-")), key=_order, reverse=True)
    latest = _latest(uri)
    for name in ([latest] if latest else []) + [n for n in names if n != latest]:
        try:
            state = json.loads(storage.read_bytes(storage.join(uri, name, "state.json")))  # small: first
            return read_tensors(storage.join(uri, name, TENSORS_FILE)), state
        except Exception as e:  # noqa: BLE001 -- truncated, missing or garbled: any of it means "not this one"
            if skipped is not None:
                problem = one_line(e, 120)
                skipped.append(f"checkpoint {name} unreadable ({type(e).__name__}: {problem})")
    return None


def write_tensors(f, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` in safetensors' format to the stream ``f``, one tensor at a time. Widest dtypes first (then
    by name, as safetensors orders them): the data starts 8-byte aligned, so each tensor's offset is a multiple
    of its element size."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in DTYPES:
            raise ValueError(f"checkpoint tensor {k!r}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[k] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad with spaces to 8 bytes, as safetensors does
    f.write(len(text).to_bytes(8, "little") + text)
    for k in order:
        f.write(_host_bytes(tensors[k]))


def _host_bytes(t: torch.Tensor):
    """The bytes of ``t`` as a (n_bytes,) uint8 array in host memory: ``t``'s own memory when it is a contiguous
    CPU tensor, else one host copy of this tensor alone (made contiguous on its device first)."""
    t = t.detach().contiguous().to("cpu")
    return t.reshape(-1).view(torch.uint8).numpy()


def read_tensors(uri: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, each read straight into its own storage. SafetensorError (safetensors' own,
    as its reader raises) when the file is not whole: truncated, extended, or a header that does not add up."""
    with storage.open_read(uri) as (f, size):
        n = int.from_bytes(_read_exact(f, bytearray(8)), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorError(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(_read_exact(f, bytearray(n)))
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
            end = 0
            for name, e in entries:
                begin, stop = e["data_offsets"]
                want = BY_NAME[e["dtype"]].itemsize * math.prod(e["shape"])
                if begin != end or stop - begin != want:
                    raise SafetensorError(f"tensor {name!r} at bytes {begin}..{stop}, expected {end}..{end + want}")
                end = stop
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not safetensors' JSON
            raise SafetensorError(f"header unreadable ({type(e).__name__}: {e})") from None
        if 8 + n + end != size:
            raise SafetensorError(f"tensors end at byte {8 + n + end} of a file of {size}")
        tensors = {}
        for name, e in entries:
            begin, stop = e["data_offsets"]
            data = _read_exact(f, torch.empty(stop - begin, dtype=torch.uint8))
            tensors[name] = data.view(BY_NAME[e["dtype"]]).reshape(e["shape"])
        return tensors


def _read_exact(f, out):
    """Fills ``out`` (a bytearray or a uint8 tensor) from ``f``; SafetensorError when the stream ends first."""
    view = memoryview(out.numpy() if torch.is_tensor(out) else out)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise SafetensorError(f"file ends {len(view) - got} bytes early")
        got += n
    return out


def _latest(uri: str) -> str | None:
    """The name LATEST holds (None: no LATEST, or an unreadable one)."""
    path = storage.join(uri, "LATEST")
    try:
        return storage.read_bytes(path).decode().strip() or None
    except (OSError, UnicodeDecodeError):  # missing (FileNotFoundError is an OSError) or garbled
        return None


def _order(name: str) -> tuple[int, int]:
    """step-00000012.1 -> (12, 1): by step, then by save at that step."""
    step, _, again = name.removeprefix("step-").partition(".")
    return int(step) if step.isdigit() else -1, int(again) if again.isdigit() else 0


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's per-parameter state as flat tensors, and its param groups (JSON-able)."""
    sd = optimizer.state_dict()
    tensors = {f"opt.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def trainer_tensors(trainable: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """A one-device trial's tensors (trainable parameters, AdamW's state, the RNG) and the JSON state they need
    (AdamW's param groups). Frozen weights are not saved: the model gives them again."""
    opt_tensors, groups = optimizer_tensors(optimizer)
    tensors = {f"param.{name}": p for name, p in trainable} | opt_tensors | {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, {"param_groups": groups}


def restore_trainer(restored: tuple[dict[str, torch.Tensor], dict], trainable: list[tuple[str, torch.nn.Parameter]],
                    optimizer: torch.optim.Optimizer) -> None:
    """Sets back what ``trainer_tensors`` saved."""
    tensors, state = restored
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(tensors[f"param.{name}"])
    load_optimizer(optimizer, tensors, state["param_groups"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
