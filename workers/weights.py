"""A completed trial's trained weights, kept pickle-free under ``<sweep>/models/<trial_id>/`` (docs/reference.md).

What is kept is what trained, nothing of the base checkpoint that did not change:
- lora: peft's adapter weights (``get_peft_model_state_dict``) and the adapter's config as JSON;
- freeze: the trained blocks and the final norm; bias: the biases; full: the whole backbone — for these three,
  exactly the parameters with ``requires_grad`` (workers/methods.py's ``select_trainable`` set them), so a new
  family's or method's naming needs nothing here.
Tensors are kept in the dtype they trained in (fp32 master weights), so the model rebuilt from the base checkpoint
and them computes what the trained model computed.

Layout: ``manifest.json`` and ``weights-<sha256[:16]>.safetensors``. The weights file is named by its content and
written first; the manifest (method, tensor file, its size and sha256, the peft config) is written last and is the
only thing a reader trusts: a directory without its manifest is a save that did not finish (ignored by readers and
by ``stored_bytes``), and one whose weights file does not match its manifest is refused. Each file is written whole
by fsio (temp + rename locally, one PUT on object stores), so saving again (a trial resumed after it saved
but before the driver heard it was done) replaces the manifest atomically, then removes the weights it no longer
names: readers see the old save or the new one, never half of either.

torch, safetensors and peft are imported inside the functions that use them. The layout's names (``model_uri``,
the manifest's name) are core/store.py's, the byte count `status` shows is fsio.kept_weights_bytes.
"""
from __future__ import annotations

import enum
import json
import time

import fsio as storage
from core.errors import UserError
from core import methods
from core.hashing import content_hash
from core.store import MODEL_MANIFEST

MANIFEST = MODEL_MANIFEST
FORMAT = "repurpose-trained-weights/1"


class WeightsError(UserError):
    """Kept weights that are missing or unusable; the message names the directory."""


# --- save ---------------------------------------------------------------------------------------------------
def trained_tensors(model, method: str) -> tuple[dict, dict | None]:
    """({name: tensor} of what trained, peft config as a JSON-able dict for lora else None). CPU, contiguous."""
    if methods.get(method).adapters:
        from peft import get_peft_model_state_dict

        if not hasattr(model, "peft_config"):
            raise ValueError(f"method {method}: expected the peft model the trial trained (get_peft_model's wrapper)")
        tensors = get_peft_model_state_dict(model)  # adapter weights only, adapter name stripped from the keys
        config = _jsonable(model.peft_config["default"].to_dict())
    else:
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        config = None
    if not tensors:
        raise ValueError(f"method {method}: the model has no trained parameters to keep")
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, config


def save_trained(model, method: str, uri: str, *, base_model: str | None = None) -> dict:
    """Keeps ``model``'s trained weights at ``uri`` (``model_uri(sweep, trial_id)``); returns the manifest.

    ``base_model``: the checkpoint they apply to (recorded for a reader; ``load_trained`` takes it explicitly)."""
    from safetensors.torch import save

    tensors, peft_config = trained_tensors(model, method)
    blob = save(tensors, metadata={"format": FORMAT, "method": method})
    sha = content_hash(blob)
    name = f"weights-{sha[:16]}.safetensors"
    manifest = {"format": FORMAT, "method": method, "base_model": base_model, "file": name, "bytes": len(blob),
                "sha256": sha, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
                "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
                "peft_config": peft_config, "saved_at": time.time()}
    storage.write_bytes(storage.join(uri, name), blob)
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode())  # last: the commit
    for stale in storage.list_dir(uri):  # an earlier save's weights, no longer named; unfinished temp files stay
        if stale.startswith("weights-") and stale != name:
            storage.delete(storage.join(uri, stale))
    return manifest


def _jsonable(x):
    """peft's config dict as JSON: sets become sorted lists, enums their values (as peft's save_pretrained)."""
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(_jsonable(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --- read ---------------------------------------------------------------------------------------------------
def read_manifest(uri: str) -> dict | None:
    """The manifest of the weights kept at ``uri``, or None when there is no finished save there."""
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{storage.redact(path)}: not a weights manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{storage.redact(path)}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_tensors(uri: str, manifest: dict | None = None) -> dict:
    """The kept tensors, checked against the manifest (size and sha256)."""
    from safetensors.torch import load

    manifest = manifest or _required_manifest(uri)
    path = storage.join(uri, manifest["file"])
    if not storage.exists(path):
        raise WeightsError(f"{storage.redact(path)}: missing (the manifest names it)")
    blob = storage.read_bytes(path)
    if len(blob) != manifest["bytes"] or content_hash(blob) != manifest["sha256"]:
        raise WeightsError(f"{storage.redact(path)}: does not match its manifest (size or sha256)")
    return load(blob)


def _required_manifest(uri: str) -> dict:
    manifest = read_manifest(uri)
    if manifest is None:
        raise WeightsError(f"{storage.redact(uri)}: no kept weights (no {MANIFEST})")
    return manifest


def load_trained(base_model_path: str, uri: str, *, attn_implementation: str = "eager"):
    """The base checkpoint (``AutoModel``, fp32) with the weights kept at ``uri`` applied, LoRA merged: a plain
    transformers model that computes what the trained one did."""
    import torch
    from transformers import AutoModel

    manifest = _required_manifest(uri)
    tensors = read_tensors(uri, manifest)
    model = AutoModel.from_pretrained(base_model_path, attn_implementation=attn_implementation, dtype=torch.float32)
    if methods.get(manifest["method"]).adapters:
        return _merge_lora(model, tensors, manifest["peft_config"], uri)
    names = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise WeightsError(f"{storage.redact(uri)}: {len(unknown)} kept tensors are not parameters of "
                           f"{base_model_path} (first: {unknown[0]}): a different base model?")
    with torch.no_grad():
        for name, t in tensors.items():
            if names[name].shape != t.shape:
                raise WeightsError(f"{storage.redact(uri)}: {name} has shape {tuple(t.shape)}, {base_model_path}'s "
                                   f"is {tuple(names[name].shape)}: a different base model?")
            names[name].copy_(t)
    return model.eval()


def _merge_lora(model, tensors: dict, config: dict, uri: str):
    from peft import PeftConfig, set_peft_model_state_dict

    from workers.methods import peft_model as wrap

    config = PeftConfig.from_peft_type(**config)
    config.inference_mode = False
    peft_model = wrap(model, config)
    result = set_peft_model_state_dict(peft_model, tensors)
    if result.unexpected_keys:
        raise WeightsError(f"{storage.redact(uri)}: {len(result.unexpected_keys)} adapter tensors do not fit the "
                           f"base model (first: {result.unexpected_keys[0]})")
    return peft_model.merge_and_unload().eval()  # W + (alpha / r) B A folded into each targeted Linear


# --- sizes (for `status`) -----------------------------------------------------------------------------------
def stored_bytes(sweep: str) -> dict[str, int]:
    """{trial_id: bytes} of every finished save under ``<sweep>/models/`` (fsio.kept_weights_bytes)."""
    return storage.kept_weights_bytes(sweep)


def total_bytes(sweep: str) -> int:
    return sum(stored_bytes(sweep).values())
