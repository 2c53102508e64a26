"""A catalogue of bad input (docs/reference.md exit codes): malformed grids, data files, arguments and storage
URIs. Each one gives exit code 2 and exactly one line on stderr naming the file, the field (where there is one)
and the problem; no traceback; nothing on stdout; nothing written to the store (its directory never appears); and,
for everything the grid or the arguments already tell, no Ray started (the driver's ``ray_session`` is replaced
by a tripwire, and ``ray`` must not have been imported by the failed command).

In-process through ``orchestrator.cli.main`` (fast); ``test_no_traceback_for_real`` runs some of them as real
subprocesses to prove the "no traceback" and "no Ray process" parts outside pytest's capture.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator import cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"  # must never be echoed


class Ctx:
    """Builds the files of one case under ``root``: grids on the tiny model and the fixture data, data files."""

    def __init__(self, root, tiny_model, pairs_file, eval_file):
        self.root, self.tiny_model, self.pairs_file, self.eval_file = root, tiny_model, pairs_file, eval_file
        self.store = str(root / "store")

    def grid_dict(self, **sections) -> dict:
        grid = {"name": "bad", "models": [self.tiny_model], "methods": {"bias": {}}, "budgets": [5.0e9],
                "data": {"train": self.pairs_file, "eval": self.eval_file}, "train": {"batch_size": 16},
                "plan": {"min_steps": 3}}
        grid.update(sections)
        return {k: v for k, v in grid.items() if v is not ...}  # `key=...` drops a key

    def grid(self, filename: str = "grid.yaml", **sections) -> str:
        return self.text(filename, yaml.safe_dump(self.grid_dict(**sections), sort_keys=False))

    def train(self, **data) -> str:
        """A grid whose data.train (and optionally eval) is replaced."""
        return self.grid(data={"train": data.pop("train"), **data})

    def text(self, name: str, text: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return str(path)

    def model(self, name: str, config: dict | str | None) -> str:
        """A model directory with ``config`` as its config.json (a str: written as is; None: none at all)."""
        path = self.root / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return str(path)

    def folder(self, name: str) -> str:
        (self.root / name).mkdir()
        return str(self.root / name)

    def parquet(self, name: str, table: dict) -> str:
        path = self.root / name
        pq.write_table(pa.table(table), path)
        return str(path)


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]  # -> argv (without --storage; added unless the case sets its own)
    expect: tuple[str, ...]  # substrings of the one line: the file, the field, the problem
    starts_no_ray: bool = True  # the grid or the arguments tell: no Ray may start
    forbid: tuple[str, ...] = field(default_factory=tuple)  # substrings that must not appear (secrets)


def neox(**over) -> dict:
    return {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 256, "vocab_size": 512, "repurpose_pretrain_lr": 1e-3, **over}


BAD_LINES = "\n".join(["not json", '{"query": 1}', '{"pos": ["x"]}', "[1, 2]", '{"query": "q", "pos": []}'] * 4)

CASES = [
    # --- the grid file itself ----------------------------------------------------------------------------------
    Case("grid-missing", lambda c: ["submit", str(c.root / "nope.yaml")],
         ("nope.yaml", "cannot read the grid file", "No such file")),
    Case("grid-is-a-directory", lambda c: ["plan", str(c.root)], ("cannot read the grid file", "directory")),
    Case("grid-not-yaml", lambda c: ["submit", c.text("g.yaml", "name: [unclosed\nmodels: {")],
         ("g.yaml", "line", "invalid YAML")),
    Case("grid-not-utf8", lambda c: ["submit", c.text("g.yaml", b"name: \xff\xfe\x00bad\n")],
         ("g.yaml", "cannot read the grid file")),
    Case("grid-empty-file", lambda c: ["plan", c.text("g.yaml", "")], ("g.yaml", "must be a YAML mapping")),
    Case("grid-a-list", lambda c: ["submit", c.text("g.yaml", "- name: x\n")], ("g.yaml", "must be a YAML mapping")),
    # --- keys and types ----------------------------------------------------------------------------------------
    Case("unknown-top-key", lambda c: ["submit", c.grid(budget=[1e9])],
         ("grid.yaml", "budget", "unknown key", "did you mean budgets")),
    Case("unknown-train-key", lambda c: ["submit", c.grid(train={"learning_rate": 1e-4})],
         ("grid.yaml", "train.learning_rate", "unknown key")),
    Case("unknown-method", lambda c: ["submit", c.grid(methods={"prefix": {}})],
         ("grid.yaml", "methods.prefix", "unknown method")),
    Case("no-method", lambda c: ["plan", c.grid(methods={})], ("grid.yaml", "methods", "at least one")),
    Case("hyperparameter-on-wrong-method", lambda c: ["submit", c.grid(methods={"bias": {"rank": [8]}})],
         ("grid.yaml", "methods.bias.rank", "hyperparameter of lora, not bias")),
    Case("budget-not-a-number", lambda c: ["submit", c.grid(budgets=["lots"])],
         ("grid.yaml", "budgets[0]", "must be a number")),
    Case("models-not-strings", lambda c: ["plan", c.grid(models=[{"name": "x"}])],
         ("grid.yaml", "models[0]", "must be a string")),
    Case("checkpointing-not-bool", lambda c: ["submit", c.grid(train={"gradient_checkpointing": "yes"})],
         ("grid.yaml", "train.gradient_checkpointing", "true or false")),
    Case("precision-unknown", lambda c: ["submit", c.grid(train={"precision": "fp8"})],
         ("grid.yaml", "train.precision", "must be one of")),
    Case("data-missing-section", lambda c: ["submit", c.grid(data=...)], ("grid.yaml", "data", "required")),
    # --- out of range ------------------------------------------------------------------------------------------
    Case("budget-negative", lambda c: ["submit", c.grid(budgets=[-1.0e9])], ("grid.yaml", "budgets[0]", "> 0")),
    Case("budget-infinite", lambda c: ["plan", c.grid(budgets=[float("inf")])], ("grid.yaml", "budgets[0]", "finite")),
    Case("lora-rank-zero", lambda c: ["submit", c.grid(methods={"lora": {"rank": [8, 0]}})],
         ("grid.yaml", "methods.lora.rank[1]", ">= 1")),
    Case("freeze-fraction-above-1", lambda c: ["submit", c.grid(methods={"freeze": {"trainable_fraction": 1.5}})],
         ("grid.yaml", "methods.freeze.trainable_fraction[0]", "<= 1")),
    Case("batch-size-1", lambda c: ["submit", c.grid(train={"batch_size": 1})],
         ("grid.yaml", "train.batch_size", ">= 2")),
    Case("duplicate-budget", lambda c: ["submit", c.grid(budgets=[1e9, 1e9])],
         ("grid.yaml", "budgets", "listed twice")),
    Case("eval-every-without-eval", lambda c: ["submit", c.grid(data={"train": c.pairs_file},
                                                                 run={"eval_every": 5})],
         ("grid.yaml", "run.eval_every", "needs data.eval")),
    # --- unsafe names ------------------------------------------------------------------------------------------
    Case("name-path-traversal", lambda c: ["submit", c.grid(name="../../etc")],
         ("grid.yaml", "name", "must match")),
    Case("name-with-slash", lambda c: ["submit", c.grid(name="a/b")], ("grid.yaml", "name", "must match")),
    Case("name-uppercase", lambda c: ["plan", c.grid(name="Paper")], ("grid.yaml", "name", "must match")),
    Case("name-option-traversal", lambda c: ["submit", c.grid(), "--name", "../x"],
         ("--name", "is not a sweep name")),
    # --- model paths -------------------------------------------------------------------------------------------
    Case("model-path-missing", lambda c: ["submit", c.grid(models=[str(c.root / "no-model")])],
         ("grid.yaml", "models[0]")),
    Case("model-without-config", lambda c: ["submit", c.grid(models=[c.model("m", None)])],
         ("grid.yaml", "models[0]", "no config.json")),
    Case("model-unsupported-family", lambda c: ["submit", c.grid(models=[c.model("m", neox(model_type="mamba"))])],
         ("grid.yaml", "models[0]", "mamba")),
    Case("model-config-not-json", lambda c: ["submit", c.grid(models=[c.model("m", "{oops")])],
         ("grid.yaml", "models[0]", "config")),
    Case("lr-auto-unknown", lambda c: ["submit", c.grid(
        models=[c.model("m", {k: v for k, v in neox().items() if k != "repurpose_pretrain_lr"})])],
         ("grid.yaml", "train.lr", "auto")),
    # --- data files --------------------------------------------------------------------------------------------
    Case("data-path-missing", lambda c: ["submit", c.train(train=str(c.root / "nope.jsonl"))],
         ("grid.yaml", "data.train", "no file matches")),
    Case("eval-path-missing", lambda c: ["submit", c.train(train=c.pairs_file, eval=str(c.root / "no-eval.jsonl"))],
         ("grid.yaml", "data.eval", "no file matches")),
    Case("data-empty-file", lambda c: ["submit", c.train(train=c.text("empty.jsonl", ""))],
         ("empty.jsonl", "data.train", "no usable pairs")),
    Case("data-only-bad-lines", lambda c: ["submit", c.train(train=c.text("bad.jsonl", BAD_LINES))],
         ("bad.jsonl", "data.train", "unusable")),
    Case("data-unsupported-type", lambda c: ["submit", c.train(train=c.text("pairs.csv", "query,pos\na,b\n"))],
         ("pairs.csv", "data.train", "unsupported file type")),
    Case("data-parquet-wrong-columns", lambda c: ["submit", c.train(train=c.parquet("p.parquet", {"q": ["a"]}))],
         ("p.parquet", "data.train", "no column")),
    Case("data-directory-without-data", lambda c: ["submit", c.train(train=c.folder("no-data-here"))],
         ("no-data-here", "data.train", "no .jsonl or .parquet")),
    Case("eval-empty-file", lambda c: ["submit", c.train(train=c.pairs_file, eval=c.text("e.jsonl", "\n\n"))],
         ("e.jsonl", "data.eval", "no usable pairs")),
    Case("data-uri-with-credentials", lambda c: ["submit", c.train(train=f"s3://AKIAEXAMPLE:{SECRET}@bucket/p.jsonl")],
         ("grid.yaml", "data.train", "credentials", "s3://***@bucket/p.jsonl"), forbid=(SECRET, "AKIAEXAMPLE")),
    Case("data-unsupported-scheme", lambda c: ["submit", c.train(train="ftp://host/p.jsonl")],
         ("grid.yaml", "data.train", "ftp://host/p.jsonl", "unsupported scheme 'ftp'")),
    # --- arguments ---------------------------------------------------------------------------------------------
    Case("unknown-command", lambda c: ["sweep", "x"], ("invalid choice",)),
    Case("submit-without-grid", lambda c: ["submit"], ("GRID.yaml",)),
    Case("recipe-budget-negative", lambda c: ["recipe", "x", "--budget", "-1"], ("--budget", "> 0")),
    Case("recipe-budget-nan", lambda c: ["recipe", "x", "--budget", "nan"], ("--budget", "> 0")),
    Case("plan-gpus-negative", lambda c: ["plan", c.grid(), "--gpus", "-2"], ("--gpus", "integer >= 0")),
    Case("resume-bad-name", lambda c: ["resume", "../etc"], ("NAME", "is not a sweep name")),
    # --- sweeps and storage ------------------------------------------------------------------------------------
    Case("resume-unknown-sweep", lambda c: ["resume", "nope"], ("nope", "no sweep named 'nope'")),
    Case("status-unknown-sweep", lambda c: ["status", "nope", "--json"], ("no sweep named 'nope'",)),
    Case("fit-unknown-sweep", lambda c: ["fit", "nope"], ("nope",)),
    Case("recipe-unknown-sweep", lambda c: ["recipe", "nope", "--budget", "1e18"], ("nope",)),
    Case("storage-unsupported-scheme", lambda c: ["submit", c.grid(), "--storage", "ftp://host/sweeps"],
         ("ftp://host/sweeps", "unsupported storage scheme")),
    Case("storage-credentials-userinfo", lambda c: ["submit", c.grid(), "--storage", f"s3://AKIAEXAMPLE:{SECRET}@b/s"],
         ("--storage", "s3://***@b/s", "credentials"), forbid=(SECRET, "AKIAEXAMPLE")),
    Case("storage-credentials-query", lambda c: ["status", "x", "--storage", f"s3://b/s?secret_key={SECRET}"],
         ("--storage", "secret_key=***", "credentials"), forbid=(SECRET,)),
    Case("storage-is-a-file", lambda c: ["submit", c.grid(), "--storage", c.text("a-file", "x")],
         ("a-file", "store")),
]


@pytest.fixture
def ctx(tmp_path, tiny_model, pairs_file, eval_file) -> Ctx:
    return Ctx(tmp_path, tiny_model, pairs_file, eval_file)


@pytest.fixture
def ray_tripwire(monkeypatch):
    """Replaces the driver's Ray start: a command that gets there fails the test."""
    import orchestrator.driver as driver

    def tripped(address):
        raise AssertionError(f"Ray was started (address={address!r}) for input that the grid or arguments tell is bad")

    monkeypatch.setattr(driver, "ray_session", tripped)


def argv_of(case: Case, c: Ctx) -> list[str]:
    argv = case.build(c)
    if "--storage" not in argv and argv and argv[0] in ("submit", "resume", "status", "fit", "recipe"):
        argv += ["--storage", c.store]
    return argv


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, ctx, capsys, ray_tripwire):
    ray_before = "ray" in sys.modules
    argv = argv_of(case, ctx)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    line = lines[0].replace(str(ctx.root), "<tmp>")  # the test's own path must not satisfy an expectation
    for part in case.expect:
        assert part in line, (part, line)
    for part in case.forbid:
        assert part not in line and part not in out, (part, line)
    assert "Traceback" not in err and out == ""
    assert not os.path.exists(ctx.store), os.listdir(ctx.store)  # nothing written
    if case.starts_no_ray and not ray_before:
        assert "ray" not in sys.modules, "the failed command imported ray"
    print(f"{case.id:32} {line}")


def test_the_catalogue_is_large():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# --- for real: subprocesses ----------------------------------------------------------------------------------
REAL = ["grid-not-utf8", "data-only-bad-lines", "storage-credentials-userinfo", "resume-unknown-sweep",
        "data-uri-with-credentials"]


@pytest.mark.parametrize("case_id", REAL)
def test_no_traceback_for_real(case_id, ctx):
    case = next(c for c in CASES if c.id == case_id)
    marker = f"bad-input-{os.getpid()}-{case_id}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REPURPOSE_STORAGE")}
    env.update(PYTHONPATH=REPO, REPURPOSE_TEST_RAY=marker, AWS_SECRET_ACCESS_KEY=SECRET)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv_of(case, ctx)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert all(part in line for part in case.expect), line
    assert "Traceback" not in proc.stderr and proc.stdout == "" and SECRET not in proc.stderr
    assert not os.path.exists(ctx.store)
    assert not any(_has_marker(pid, marker) for pid in os.listdir("/proc") if pid.isdigit())  # no Ray left


def _has_marker(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"REPURPOSE_TEST_RAY={marker}".encode() in f.read()
    except OSError:
        return False
