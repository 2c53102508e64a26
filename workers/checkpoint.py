"""A trial's checkpoint: safetensors for tensors, JSON for the rest. No pickle, so nothing unpickled.

Layout under the trial's checkpoint URI: ``step-00000012/{tensors.safetensors,state.json}`` and a
``LATEST`` file naming the newest complete one (written last, atomically): a crash mid-save leaves the
previous checkpoint in force. The previous complete checkpoint is kept beside the newest (unless the
caller has no use for it, as for a finished trial's marker), so one damaged after the fact (a truncated file,
a lost object) costs the steps since the one before it, not the trial: ``load`` falls back to it, then to
older ones, and says what it skipped.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fsio as storage


def save(uri: str, step: int, tensors: dict[str, torch.Tensor], state: dict, *, keep_previous: bool = True) -> None:
    existing = [n for n in storage.list_dir(uri) if n.startswith("step-")]
    name = f"step-{step:08d}"
    if name in existing:  # a second save at one step (the done marker after a last checkpoint): a new folder,
        name += f".{sum(n.startswith(name) for n in existing)}"  # never a half-rewritten one
    previous = _latest(uri)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    storage.write_bytes(storage.join(uri, name, "tensors.safetensors"), st_save(flat))
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
            tensors = st_load(storage.read_bytes(storage.join(uri, name, "tensors.safetensors")))
            state = json.loads(storage.read_bytes(storage.join(uri, name, "state.json")))
            return tensors, state
        except Exception as e:  # noqa: BLE001 -- truncated, missing or garbled: any of it means "not this one"
            if skipped is not None:
                problem = " ".join(str(e).split())[:120]
                skipped.append(f"checkpoint {name} unreadable ({type(e).__name__}: {problem})")
    return None


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
