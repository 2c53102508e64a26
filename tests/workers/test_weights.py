"""workers/weights.py: keep a trial's trained weights (safetensors + a JSON manifest) and rebuild the model.

Per method on the tiny GPT-NeoX (tests/conftest.py): what is kept is exactly what trained, and the base checkpoint
plus the kept weights (LoRA merged) computes what the trained model computes. Then the store's guarantees: a save
without its manifest is invisible, a damaged weights file is refused, a second save replaces the first whole.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from core.spec import LORA_TARGETS
from support import trained
from core.store import checkpoint_uri
from core.store import model_uri, model_uri_for_checkpoint
from workers.weights import (MANIFEST, WeightsError, load_trained, read_manifest,
                             read_tensors, save_trained, stored_bytes, total_bytes)

pytestmark = pytest.mark.usefixtures("one_thread")





def hidden(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 0], [8, 8, 120, 3, 0, 1, 2]])


@pytest.mark.parametrize("method", ["full", "freeze", "bias", "lora"])
def test_round_trip_computes_what_the_trained_model_computes(tiny_model, tmp_path, method):
    model = trained(tiny_model, method)
    uri = model_uri(str(tmp_path / "sweep"), "t1")
    manifest = save_trained(model, method, uri, base_model=tiny_model)
    assert manifest["method"] == method and manifest["base_model"] == tiny_model
    reloaded = load_trained(tiny_model, uri)
    assert type(reloaded).__name__ == "GPTNeoXModel"  # LoRA merged: a plain backbone, no peft wrapper
    torch.testing.assert_close(hidden(reloaded, IDS), hidden(model, IDS), atol=1e-5, rtol=1e-5)
    from transformers import AutoModel

    untouched = AutoModel.from_pretrained(tiny_model, attn_implementation="eager", dtype=torch.float32).eval()
    assert not torch.allclose(hidden(untouched, IDS), hidden(reloaded, IDS), atol=1e-3)  # the weights did apply


@pytest.mark.parametrize("method", ["full", "freeze", "bias", "lora"])
def test_keeps_exactly_what_trained(tiny_model, tmp_path, method):
    model = trained(tiny_model, method)
    uri = str(tmp_path / "m")
    manifest = save_trained(model, method, uri)
    names = set(read_tensors(uri))
    if method == "lora":
        assert names and all("lora_A" in n or "lora_B" in n for n in names)
        assert {n.split(".")[-3] for n in names} == set(LORA_TARGETS)  # every target module adapted
        assert manifest["peft_config"]["r"] == 4
        assert sorted(manifest["peft_config"]["target_modules"]) == sorted(LORA_TARGETS)
    else:
        assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "full":
        assert names == {n for n, _ in model.named_parameters()}  # the whole backbone, embedding included
    if method == "freeze":  # 4 layers, fraction 0.5: blocks 2 and 3 and the final norm
        assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"2", "3"}
        assert {"final_layer_norm.weight", "final_layer_norm.bias"} <= names
        assert not any(n.startswith(("embed_in", "layers.0.", "layers.1.")) for n in names)
    if method == "bias":
        assert all("bias" in n for n in names)
    files = os.listdir(uri)
    assert sorted(files) == sorted([MANIFEST, manifest["file"]])  # pickle-free: safetensors + JSON only
    assert manifest["file"].endswith(".safetensors")
    assert manifest["bytes"] == os.path.getsize(os.path.join(uri, manifest["file"]))


def test_only_a_save_with_its_manifest_counts(tiny_model, tmp_path):
    sweep = str(tmp_path / "sweep")
    model = trained(tiny_model, "bias")
    m = save_trained(model, "bias", model_uri(sweep, "done"))
    # a save killed before its manifest: weights written, no manifest
    save_trained(model, "bias", model_uri(sweep, "half"))
    os.remove(os.path.join(model_uri(sweep, "half"), MANIFEST))
    assert read_manifest(model_uri(sweep, "half")) is None
    with pytest.raises(WeightsError, match="no kept weights"):
        load_trained(tiny_model, model_uri(sweep, "half"))
    sizes = stored_bytes(sweep)
    assert sizes == {"done": m["bytes"] + os.path.getsize(os.path.join(model_uri(sweep, "done"), MANIFEST))}
    assert total_bytes(sweep) == sizes["done"]
    assert stored_bytes(str(tmp_path / "no-such-sweep")) == {}


def test_a_damaged_weights_file_is_refused(tiny_model, tmp_path):
    uri = str(tmp_path / "m")
    manifest = save_trained(trained(tiny_model, "bias"), "bias", uri)
    path = os.path.join(uri, manifest["file"])
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(WeightsError, match="does not match its manifest"):
        load_trained(tiny_model, uri)


def test_a_second_save_replaces_the_first_whole(tiny_model, tmp_path):
    uri = str(tmp_path / "m")
    first = save_trained(trained(tiny_model, "bias", seed=0), "bias", uri)
    model = trained(tiny_model, "bias", seed=1)
    second = save_trained(model, "bias", uri)
    assert first["file"] != second["file"]
    assert sorted(os.listdir(uri)) == sorted([MANIFEST, second["file"]])  # the first's weights removed
    assert json.load(open(os.path.join(uri, MANIFEST)))["sha256"] == second["sha256"]
    torch.testing.assert_close(hidden(load_trained(tiny_model, uri), IDS), hidden(model, IDS))


def test_weights_of_another_base_model_are_refused(tiny_model, tmp_path):
    from support import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), hidden=32, layers=2, heads=2)
    uri = str(tmp_path / "m")
    save_trained(trained(tiny_model, "freeze"), "freeze", uri)
    with pytest.raises(WeightsError, match="different base model"):
        load_trained(other, uri)


def test_stored_bytes_needs_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom workers.weights import stored_bytes\n"
            f"assert stored_bytes({str(tmp_path)!r}) == {{}}\n"
            "print(sorted(m for m in ('torch', 'peft', 'safetensors', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_model_uri_beside_the_trials_checkpoints():
    for sweep in ("/data/sweeps/s1", "s3://bucket/sweeps/s1"):
        assert model_uri_for_checkpoint(checkpoint_uri(sweep, "abc123")) == model_uri(sweep, "abc123") == \
            f"{sweep}/models/abc123"
    with pytest.raises(ValueError, match="not <sweep>/checkpoints/<trial_id>"):
        model_uri_for_checkpoint("/data/sweeps/s1/elsewhere/abc123")
