"""`repurpose export` of a trial trained with bidirectional attention (``train.attention: bidirectional``).

The folder carries workers/st_bidirectional.py as ``modeling_bidirectional.py``, named in config.json's auto_map:
``SentenceTransformer(DIR, trust_remote_code=True)`` in a fresh, offline interpreter must embed the eval texts in
padded batches as the trial did (its backbone made bidirectional by workers/packing.py ``make_bidirectional``, one
text at a time), for GPT-NeoX and two RoPE families built tiny from configs, with no repurpose module imported
there; and the same texts embedded causally must differ (else the test could not tell the two apart). Without
``trust_remote_code=True`` the folder does not load (rather than load as the family's causal model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from core.store import model_uri
from orchestrator.cli import main
from support import build_family_checkpoint
from workers.pair_files import load_eval_pairs
from workers.packing import make_bidirectional
from workers.weights import save_trained

sys.path.insert(0, os.path.dirname(__file__))
from test_export import trial_embeddings, write_store  # noqa: E402 -- the causal export test's helpers

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # trains and exports tiny models

REPURPOSE = ("core", "workers", "orchestrator", "analysis", "fsio")  # the project's top-level modules


def trained(path: str, seed: int = 0):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def encode_offline(folder: str, texts: list[str], home: str) -> tuple[torch.Tensor, list[str]]:
    """The folder's embeddings in a fresh interpreter, offline, and the repurpose modules it imported."""
    code = ("import json, sys\nfrom sentence_transformers import SentenceTransformer\n"
            f"st = SentenceTransformer({folder!r}, device='cpu', trust_remote_code=True)\n"
            f"e = st.encode({texts!r}, batch_size=16)\n"
            f"mods = sorted(m for m in sys.modules if m.split('.')[0] in {REPURPOSE!r})\n"
            "print(json.dumps({'e': e.tolist(), 'mods': mods}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": home}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(folder))
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return torch.tensor(out["e"]), out["mods"]


@pytest.mark.parametrize("family,pooling", [("gpt_neox", "mean"), ("llama", "mean"), ("qwen2", "last")])
def test_bidirectional_export_embeds_as_the_trial(tiny_model, tmp_path, eval_file, family, pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    base = build_family_checkpoint(tmp_path / family, family, AutoTokenizer.from_pretrained(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(base)  # the trial's: the family's tokenizer class may differ
    model = trained(base)
    sweep = write_store(tmp_path, [{"trial_id": "t1", "model": base, "method": "full", "pooling": pooling,
                                    "attention": "bidirectional", "eval_loss": 1.0}])
    save_trained(model, "full", model_uri(sweep, "t1"), base_model=base)
    out = tmp_path / "out"
    assert main(["export", "sw", "--trial", "t1", "--out", str(out), "--storage", str(tmp_path)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].startswith("modeling_bidirectional.Bidirectional")
    assert config["model_type"] == f"bidirectional_{family}"
    assert (out / "modeling_bidirectional.py").is_file() and "trust_remote_code=True" in (out / "README.md").read_text()

    texts = [t for p in load_eval_pairs(eval_file, 12) for t in p]
    got, imported = encode_offline(str(out), texts, str(tmp_path / "hf-home"))
    assert imported == []  # the folder loads without repurpose
    causal = trial_embeddings(model, tokenizer, texts, pooling)
    want = trial_embeddings(make_bidirectional(trained(base)), tokenizer, texts, pooling)
    cos = (F.normalize(got, dim=1) * want).sum(1)
    assert cos.min().item() >= 0.9999, (family, cos.min().item())
    # in this process too, where the export already loaded the module once (from its temporary folder): a second
    # folder's copy must attend bidirectionally as well
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True, trust_remote_code=True)
    again = st.encode(texts, convert_to_tensor=True, batch_size=16)
    assert (F.normalize(again, dim=1) * want).sum(1).min().item() >= 0.9999
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # never the family's causal model instead
        SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert (F.normalize(got, dim=1) * causal).sum(1).min().item() < 0.999  # causal embeds otherwise
