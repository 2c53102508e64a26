"""Benchmarks: the project against its peers, side by side, as ratios measured in the same run.

    python benchmarks/run.py [--quick] [--json]

- worker vs peer: training tokens/s of our trial on a Pythia-14m-shaped model against sentence-transformers
  (SentenceTransformerTrainer, MultipleNegativesSymmetricRankingLoss at scale 1/tau) fitting the same local
  checkpoint on the same pairs, batch and max length, same threads -> worker_vs_peer (goal >= 1.5).
- against the hardware: executed FLOP/s of our training step on a Pythia-70m-shaped model / the best matmul rate
  measured here (max over fp32 and bf16) -> peak_fraction (goal >= 0.5).
- driver: trivial trials through our driver (store, no Tune loggers) vs plain Ray Tune with its default loggers,
  same count -> driver_vs_tune (goal >= 2); real trials of ~30 s -> overhead_fraction = (trial wall - time in
  training steps) / trial wall (goal <= 0.02).
- store: metric rows/s written and read back.

With --json the last stdout line is one JSON object with the keys above. --quick finishes in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.events import TrialEvent  # noqa: E402
from core.models import PYTHIA_SHAPES  # noqa: E402

PYTHIA_14M, PYTHIA_70M = PYTHIA_SHAPES["14m"], PYTHIA_SHAPES["70m"]  # hidden, layers, heads
VOCAB = 50304  # Pythia's padded vocabulary: the embedding is as big as the real model's
TAU = 0.025


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- fixtures: data, tokenizer, models -----------------------------------------------------------------------
def prepare(root: str) -> dict:
    """Real pairs (stdlib docstrings, workers/suite/stdlib_pairs.py) and a BPE tokenizer trained on them."""
    from workers.suite.cache import demo_data
    from workers.suite.pretraining import train_tokenizer

    data = demo_data()
    texts = []
    with open(data["train"]) as f:
        for i, line in enumerate(f):
            if i >= 20000:
                break
            p = json.loads(line)
            texts += [p["query"], p["pos"][0]]
    tok_dir = os.path.join(root, "tokenizer")
    train_tokenizer(texts, vocab_size=8192).save_pretrained(tok_dir)
    return {"train": data["train"], "tokenizer": tok_dir}


def build_model(root: str, shape: tuple[int, int, int], tokenizer_dir: str) -> str:
    import shutil

    import torch
    from transformers import AutoModel, GPTNeoXConfig

    d, layers, heads = shape
    path = os.path.join(root, f"neox-{d}x{layers}")
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * d, rotary_pct=0.25, max_position_embeddings=2048, bos_token_id=0,
                        eos_token_id=0)
    cfg.repurpose_pretrain_lr = 1e-3
    AutoModel.from_config(cfg).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return path


# --- the hardware ------------------------------------------------------------------------------------------
def matmul_peak(seconds: float = 2.0) -> dict:
    """Best sustained square-matmul rate, fp32 and bf16 (this CPU has bf16 units: AVX512-BF16, no AMX: ~0.9 TFLOP/s
    bf16 on 2 cores, ~0.2 fp32)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (512, 1024, 2048, 4096):  # the best of several sizes: the peak must not be undersold
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 2:
                a @ b
                reps += 1
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
        out[f"matmul_{name}_tflops"] = best / 1e12
    out["peak_flops"] = max(out["matmul_fp32_tflops"], out["matmul_bf16_tflops"]) * 1e12
    return out


# --- our worker --------------------------------------------------------------------------------------------
def run_worker(model: str, train: str, *, batch: int, max_length: int, steps: int, method: str = "full") -> dict:
    """A real trial (workers/trial.py) sized to ``steps`` optimizer steps; tokens/s over its training steps."""
    from transformers import AutoTokenizer

    from workers.pair_files import measure_tokens_per_pair
    from core.flops import cost_per_token
    from core.methods import param_counts
    from core.models import ModelShape, read_config
    from core.spec import TrialSpec
    from workers.trial import run_trial

    tpp = measure_tokens_per_pair(train, AutoTokenizer.from_pretrained(model), max_length)
    n, n_tr = param_counts(ModelShape.from_config(read_config(model)), method)
    budget = cost_per_token(method, n, n_tr) * tpp * batch * steps
    spec = TrialSpec(model=model, method=method, budget_flops=budget, train_data=train, batch_size=batch,
                     max_length=max_length, planned_tokens_per_pair=tpp, checkpoint_every_s=1e9)
    row = run_trial(spec)
    return {"tokens": row["tokens"], "steps": row["steps"], "train_s": row["train_s"], "wall_s": row["wall_s"],
            "tokens_per_s": row["tokens"] / row["train_s"], "hardware_flops_per_s": row["hardware_flops"] / row["train_s"],
            "padding_fraction": row["padding_fraction"]}


# --- the peer: sentence-transformers -----------------------------------------------------------------------
def run_peer(model: str, train: str, *, batch: int, max_length: int, steps: int) -> dict:
    """sentence-transformers fitting the same checkpoint: mean pooling, symmetric MNRL at scale 1/tau, AdamW."""
    import logging

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesSymmetricRankingLoss
    from sentence_transformers.models import Pooling, Transformer

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    pairs = []
    with open(train) as f:
        for line in f:
            p = json.loads(line)
            pairs.append((p["query"], p["pos"][0]))
            if len(pairs) >= batch * steps:
                break
    body = Transformer(model, max_seq_length=max_length)
    if body.tokenizer.pad_token is None:
        body.tokenizer.pad_token = body.tokenizer.eos_token
    st = SentenceTransformer(modules=[body, Pooling(body.get_word_embedding_dimension(), "mean")], device="cpu")
    loss = MultipleNegativesSymmetricRankingLoss(st, scale=1 / TAU)
    data = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    out = tempfile.mkdtemp(prefix="st-")
    args = SentenceTransformerTrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, weight_decay=0.1,
        warmup_ratio=0.1, lr_scheduler_type="cosine", use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", dataloader_drop_last=True, seed=0, disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=data, loss=loss)
    result = trainer.train()
    tok = body.tokenizer
    real = sum(min(len(tok(q, add_special_tokens=False)["input_ids"]), max_length)
               + min(len(tok(d, add_special_tokens=False)["input_ids"]), max_length) for q, d in pairs)
    train_s = result.metrics["train_runtime"]
    return {"tokens": real, "train_s": train_s, "tokens_per_s": real / train_s, "threads": torch.get_num_threads()}


# --- the driver --------------------------------------------------------------------------------------------
def trivial_trainable(config: dict) -> None:
    """A trial that trains nothing: one metric row, then its final event."""
    from ray import tune

    row = {"step": 1, "tokens": 1, "flops": 1.0, "hardware_flops": 1.0, "train_loss": 1.0, "lr": 0.0, "wall_s": 0.0,
           "eval_loss": 1.0, "tokens_per_s": 0.0}
    trial = {"tokens": 1, "steps": 1, "flops": 1.0, "hardware_flops": 1.0, "eval_loss": 1.0, "train_loss": 1.0,
             "wall_s": 0.0, "train_s": 0.0}
    tune.report(TrialEvent(rows=(row,), done=True, trial=trial, step=1, tokens=1, flops=1.0, budget_flops=2.0).to_dict())


def plain_trivial(config: dict) -> None:
    from ray import tune

    tune.report({"loss": 1.0})


def driver_sweep(root: str, model: str, train: str, n: int, *, trainable=None, budgets=None, callbacks=(),
                 name: str = "bench") -> float:
    """Seconds for ``n`` trials through our driver (store, callbacks, no Tune loggers) on the running Ray."""
    from orchestrator.driver import merge_trials
    from orchestrator.grid import parse_grid
    from orchestrator.plan import plan_grid
    from orchestrator.store import Recorder, Store
    from orchestrator.tuning import run_tuner

    budgets = budgets or [1e12 * (1 + i / n) for i in range(n)]
    grid = parse_grid({"name": name, "models": [model], "methods": {"full": {}}, "budgets": budgets,
                       "data": {"train": train}, "train": {"batch_size": 64, "max_length": 64},
                       "plan": {"min_steps": 1, "tokens_per_pair": 40, "train_pairs": 10 ** 9},
                       "run": {"checkpoint_every_s": 1e9}}, source="bench grid")
    plan = plan_grid(grid)
    store = Store(os.path.join(root, "store"), name)
    recorder = Recorder(store, merge_trials({}, plan))
    kwargs = {"trainable": trainable} if trainable else {}
    t0 = time.perf_counter()
    run_tuner(list(plan.runnable), recorder, grid, store, callbacks=callbacks, **kwargs)
    return time.perf_counter() - t0


def plain_tune(root: str, n: int) -> float:
    from ray import tune

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"  # Tune as it comes: JSON, CSV, TensorBoard loggers
    try:
        t0 = time.perf_counter()
        tune.Tuner(plain_trivial, param_space={"i": tune.grid_search(list(range(n)))},
                   run_config=tune.RunConfig(storage_path=os.path.join(root, "plain"), verbose=0)).fit()
        return time.perf_counter() - t0
    finally:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"


class TrialClock:
    """Trial wall as the driver sees it: from Tune starting the trial to Tune completing it."""

    def __new__(cls):
        from ray.tune import Callback

        class Clock(Callback):
            def __init__(self):
                self.start, self.wall, self.started = {}, {}, {}

            def on_trial_start(self, iteration, trials, trial, **info):
                self.start[trial.trial_id] = time.perf_counter()
                self.started[trial.config["trial"]["trial_id"]] = self.start[trial.trial_id]

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.wall[trial.config["trial"]["trial_id"]] = time.perf_counter() - self.start[trial.trial_id]

        return Clock()


# --- the store ---------------------------------------------------------------------------------------------
def store_rows(root: str, trials: int, steps: int) -> dict:
    import pandas as pd

    from orchestrator.store import Recorder, Store

    store = Store(os.path.join(root, "store-bench"), "rows")
    rows = {f"t{i:05d}": {"trial_id": f"t{i:05d}", "sweep": "rows", "status": "running", "budget_flops": 1.0}
            for i in range(trials)}
    rec = Recorder(store, rows, flush_every_s=1e9)
    t0 = time.perf_counter()
    for tid in rows:
        for s in range(1, steps + 1, 100):
            rec.on_event(tid, TrialEvent(rows=[{"step": k, "tokens": k, "flops": 1.0 * k, "train_loss": 1.0, "lr": 1e-4,
                                                "wall_s": 0.1 * k, "eval_loss": None, "tokens_per_s": 1.0,
                                                "hardware_flops": 1.0} for k in range(s, s + 100)], step=s + 99))
        rec.flush()
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = len(pd.read_parquet(os.path.join(store.uri, "metrics")))
    read_s = time.perf_counter() - t0
    assert n == trials * steps, (n, trials * steps)
    return {"store_rows_per_s": n / write_s, "store_read_rows_per_s": n / read_s, "store_rows": n}


# --- main --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and trials (minutes)")
    ap.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    ap.add_argument("--only", choices=("worker", "hardware", "driver", "store"), action="append",
                    help="run only these parts (repeatable; default: all)")
    args = ap.parse_args(argv)
    q = args.quick
    parts = set(args.only or ("worker", "hardware", "driver", "store"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from workers.export import quiet_model_loading

    quiet_model_loading()  # as the CLI: no DeepSpeed accelerator line, no per-load progress bars
    import torch

    threads = torch.get_num_threads()
    root = tempfile.mkdtemp(prefix="repurpose-bench-")
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "threads": threads, "quick": q}
    log("preparing data, tokenizer, models")
    fx = prepare(root)
    m14 = build_model(root, PYTHIA_14M, fx["tokenizer"])
    m70 = build_model(root, PYTHIA_70M, fx["tokenizer"])

    batch, max_length, steps = 128, 75, 12 if q else 40
    if "worker" in parts:
        worker_vs_peer(out, m14, fx, batch, max_length, steps, threads)
    if "hardware" in parts:
        log("matmul peak")
        out.update(matmul_peak(2.0 if q else 6.0))
        log("peak fraction: 70m-shaped training step")
        big = run_worker(m70, fx["train"], batch=batch, max_length=max_length, steps=4 if q else 12)
        out.update(executed_flops_per_s=big["hardware_flops_per_s"],
                   peak_fraction=big["hardware_flops_per_s"] / out["peak_flops"])
    if "driver" in parts:
        driver_parts(out, root, m14, fx, q)
    if "store" in parts:
        log("store rows")
        out.update(store_rows(root, trials=20 if q else 100, steps=1000))
    report(out, args.json)
    return 0


def worker_vs_peer(out, m14, fx, batch, max_length, steps, threads):
    import torch

    log(f"worker vs peer: 14m-shaped, batch {batch}, max_length {max_length}, {steps} steps")
    ours = run_worker(m14, fx["train"], batch=batch, max_length=max_length, steps=steps)
    torch.set_num_threads(threads)
    peer = run_peer(m14, fx["train"], batch=batch, max_length=max_length, steps=steps)
    torch.set_num_threads(threads)
    out.update(worker_tokens_per_s=ours["tokens_per_s"], peer_tokens_per_s=peer["tokens_per_s"],
               worker_vs_peer=ours["tokens_per_s"] / peer["tokens_per_s"],
               worker_padding_fraction=ours["padding_fraction"])


def driver_parts(out, root, m14, fx, q):
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        n = 40 if q else 200
        log(f"driver: {n} trivial trials, ours vs plain Tune")
        ours_s = driver_sweep(root, m14, fx["train"], n, trainable=trivial_trainable)
        tune_s = plain_tune(root, n)
        out.update(driver_trials_per_s=n / ours_s, tune_baseline_trials_per_s=n / tune_s,
                   driver_vs_tune=tune_s / ours_s)

        # a sweep of 2 x as many real trials as run at once: the first on each actor pays the actor's cold
        # start (importing torch and transformers' model code, ~2.5 s), the rest run on reused actors
        slots = int(ray.cluster_resources().get("CPU", 1))
        k, trial_steps = (2 * slots, 60) if q else (4 * slots, 200)
        log(f"overhead: {k} real trials of {trial_steps} steps, {slots} at a time")
        clock = TrialClock()
        tpp = 40.0
        budget = 6 * 1_189_888 * tpp * 64 * trial_steps
        driver_sweep(root, m14, fx["train"], k, budgets=[budget * (1 + i / 100) for i in range(k)],
                     callbacks=[clock], name="overhead")
        import pandas as pd

        t = pd.read_parquet(os.path.join(root, "store", "overhead", "trials.parquet"))
        t = t.assign(wall=t.trial_id.map(clock.wall), start=t.trial_id.map(clock.started)).sort_values("start")
        t["overhead"] = (t.wall - t.train_s) / t.wall
        cold, warm = t.iloc[:slots], t.iloc[slots:]
        out.update(overhead_fraction=float(t.overhead.mean()), overhead_fraction_warm=float(warm.overhead.mean()),
                   overhead_fraction_cold=float(cold.overhead.mean()), overhead_trial_wall_s=float(t.wall.mean()))
    finally:
        ray.shutdown()


def report(out: dict, as_json: bool) -> None:
    goals = {"worker_vs_peer": (">=", 1.5), "peak_fraction": (">=", 0.5), "driver_vs_tune": (">=", 2.0),
             "overhead_fraction": ("<=", 0.02)}
    for key, (op, goal) in goals.items():
        if key not in out:
            continue
        ok = out[key] >= goal if op == ">=" else out[key] <= goal
        log(f"{key:>20} = {out[key]:.3f}   goal {op} {goal}   {'met' if ok else 'NOT met'}")
    for key in ("worker_tokens_per_s", "peer_tokens_per_s", "matmul_fp32_tflops", "matmul_bf16_tflops",
                "driver_trials_per_s", "tune_baseline_trials_per_s", "store_rows_per_s"):
        if key in out:
            log(f"{key:>26} = {out[key]:.4g}")
    if as_json:
        print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
