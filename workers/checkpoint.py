"""A trial's checkpoint: safetensors for tensors, JSON for the rest. No pickle, so nothing unpickled.

Layout under the trial's checkpoint URI: ``step-00000012/{tensors.safetensors,state.json}`` and a
``LATEST`` file naming the newest complete one (written last, atomically): a crash mid-save leaves the
previous checkpoint in force.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workers import storage


def save(uri: str, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
    name = f"step-{step:08d}"
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    storage.write_bytes(storage.join(uri, name, "tensors.safetensors"), st_save(flat))
    storage.write_bytes(storage.join(uri, name, "state.json"), json.dumps(state).encode())
    storage.write_bytes(storage.join(uri, "LATEST"), name.encode())
    for old in storage.list_dir(uri):
        if old.startswith("step-") and old != name:
            storage.delete(storage.join(uri, old))


def load(uri: str | None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest complete checkpoint, or None when there is none."""
    if not uri or not storage.exists(storage.join(uri, "LATEST")):
        return None
    name = storage.read_bytes(storage.join(uri, "LATEST")).decode().strip()
    tensors = st_load(storage.read_bytes(storage.join(uri, name, "tensors.safetensors")))
    state = json.loads(storage.read_bytes(storage.join(uri, name, "state.json")))
    return tensors, state


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
