"""The driver plans without torch or deepspeed (`repurpose demo` printed DeepSpeed's "Setting
accelerator to CPU"): `plan_grid(..., strict_data=True)` — what the driver runs before any trial — measures the
data with the model's tokenizer and counts the pairs in a fresh interpreter, which must end with neither torch,
transformers' torch side nor deepspeed loaded."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

CODE = """
import json, sys
from orchestrator.grid import load_grid
from orchestrator.plan import plan_grid
plan = plan_grid(load_grid(sys.argv[1]), strict_data=True)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed")
               or m == "transformers.modeling_utils" or ".modeling_" in m)
print(json.dumps({"heavy": heavy, "tokens_per_pair": list(plan.data.tokens_per_pair.values()),
                  "train_pairs": plan.data.train_pairs, "warnings": list(plan.warnings),
                  "trials": len(plan.trials)}))
"""


def test_plan_grid_imports_no_torch_transformers_models_or_deepspeed(tmp_path, tiny_model, pairs_file, eval_file):
    grid = {"name": "imports", "models": [tiny_model], "methods": {"full": {}, "lora": {"rank": [8]}},
            "budgets": [5.0e9], "data": {"train": pairs_file, "eval": eval_file},
            "train": {"batch_size": 16, "max_length": 32}, "plan": {"min_steps": 1, "sample_pairs": 64}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = subprocess.run([sys.executable, "-c", CODE, str(path)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    # and it really measured (strict: no fallback), with the model's tokenizer
    assert got["train_pairs"] == 2000 and got["warnings"] == [] and got["trials"] == 2
    assert len(got["tokens_per_pair"]) == 1 and 2 < got["tokens_per_pair"][0] <= 64
