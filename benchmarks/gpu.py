"""The GPU check: every training path on real Pythia shapes, one command, no network.

    python benchmarks/gpu.py            full: one H100/H200-class GPU, <= 8 minutes; JSON + a dated README table
    python benchmarks/gpu.py --smoke    the same paths with tiny shapes on CPU in seconds (CI: tests/benchmarks)

Paths (each a row; a failure or an OOM is a row with its reason, never the end of the run -- peft's harness):
- ``full-<size>``: full fine-tuning through ``workers.trial.run_trial`` (bf16, batch 1024, chunk auto: one pass
  where the batch fits), packed with the device's attention kernel (workers/attention.py: varlen FlashAttention on
  CUDA); MFU = the paper's FLOP / (train_s x the device's dense bf16 peak, core/devices.py), HFU = the hardware
  FLOP over the same; tokens/s, peak memory. ``-padded``: SDPA over padded texts; ``-mask``: packed rows under the
  block-diagonal mask (the previous packed path); ``-cache``: the gradient cache forced (chunk 256) against the one
  pass; ``-compiled``: ``train.compile: true`` (bucketed flat rows) against eager;
- ``lora-r128-1b``: LoRA r=128 at the 1b shape;
- ``zero2-<size>``, ``zero3-<size>``: DeepSpeed ZeRO-2/3 on one rank (``workers.distributed.run_local``);
- ``cache-<size>``: the 70m shape trained from the token cache (workers/token_cache.py ``CachedPairs``) through
  ``workers.loss.contrastive_backward``: the GPU's busy fraction = 1 - time waiting for a batch / wall;
- ``share-<size>-x<k>``: k trials of a small shape as separate processes (as Ray runs them) at ``device_share``
  1/k each, k = 1, 2, 4, 8: aggregate real tokens/s over the window all ran in, and its ratio to one trial alone
  (core/throughput.py's sharing table is filled from these).

A row whose MFU misses its target (``TARGETS``) gets a ``torch.profiler`` summary of two of its steps: the top
kernels by device time and the idle share of the device (1 - kernel time / wall).

Models are random weights from the Pythia configs (core/models.py ``read_config``: the real shapes, vocabulary
50,304), saved locally in bf16; the tokenizer is a byte-level BPE trained here on the synthetic pairs. Nothing
downloads. Each trial runs in this process one after another; ``torch.cuda.max_memory_allocated`` is reset
between them.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from core.errors import one_line  # noqa: E402

WORDS = ("river stone cloud lamp garden window forest engine silver paper candle bridge harbor violin mountain "
         "thunder copper meadow lantern orchard desert glacier compass falcon marble velvet canyon ember prism").split()

# (name, method, size, extra spec fields, optimizer steps): full mode, sized for <= 8 minutes on one H100
# packing "auto" (texts in rows without padding, workers/packing.py); the -padded rows measure what it recovers
# (name, method, size, extra spec fields, optimizer steps, attention kernel forced or None): packing "on" with the
# device's kernel unless named otherwise
ON = {"packing": "on", "compile": False}
FULL = (("full-160m", "full", "160m", ON, 40, None), ("full-160m-padded", "full", "160m", {"packing": "off"}, 40, None),
        ("full-160m-mask", "full", "160m", ON, 40, "mask"),
        ("full-160m-compiled", "full", "160m", {"packing": "on", "compile": True}, 60, None),
        ("full-410m", "full", "410m", ON, 20, None), ("full-410m-padded", "full", "410m", {"packing": "off"}, 20, None),
        ("full-1b", "full", "1b", ON, 10, None), ("full-1b-cache", "full", "1b", ON | {"chunk_size": 256}, 10, None),
        ("lora-r128-1b", "lora", "1b", ON | {"lora_rank": 128}, 10, None))
ZERO = (("zero2-1.4b", 2, "1.4b", 6), ("zero3-1.4b", 3, "1.4b", 6))
SHARE_SIZES, SHARE_COUNTS, SHARE_STEPS = ("70m",), (1, 2, 4, 8), 15
# MFU targets on one H100/H200 (paper FLOP over the dense bf16 peak); a miss is profiled
TARGETS = {"full-160m": 0.35, "full-410m": 0.45, "full-1b": 0.45, "lora-r128-1b": 0.40, "zero2-1.4b": 0.40}
SHARE_TARGET = 2.0  # 4 trials at 0.25: aggregate tokens/s over one trial alone
CACHE_SIZE, CACHE_STEPS = "70m", 30
# smoke: a 2-layer, 64-wide GPT-NeoX stands for every size; batch 16 through chunks of 4 (the gradient cache)
SMOKE_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
               "vocab_size": 512}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- fixtures: pairs, tokenizer, models ---------------------------------------------------------------------
def make_pairs(path: str, n: int, seed: int = 0) -> str:
    """BGE JSONL pairs with ~25 + ~25 tokens, like the stdlib pairs' lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(4, 20)))
            d = " ".join(rng.choices(WORDS, k=rng.randint(8, 60)))
            f.write(json.dumps({"query": q, "pos": [d], "neg": []}) + "\n")
    return path


def make_tokenizer(out: str, data: str, vocab: int) -> str:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(data) as f:
        for line in f:
            p = json.loads(line)
            texts += [p["query"], p["pos"][0]]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab, special_tokens=["<|endoftext|>", "<|padding|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(out)
    return out


def make_model(root: str, size: str, tokenizer: str, smoke: bool) -> str:
    """A random-weight GPT-NeoX of the Pythia size's shape (bf16 on disk), with the tokenizer beside it."""
    import torch
    from transformers import AutoModel, GPTNeoXConfig

    from core.models import read_config

    path = os.path.join(root, f"pythia-{size}")
    if os.path.isdir(path):
        return path
    cfg = dict(read_config(f"EleutherAI/pythia-{size}"))
    cfg.pop("model_type", None)
    lr = cfg.pop("repurpose_pretrain_lr", None)
    if smoke:
        cfg.update(SMOKE_SHAPE)
    config = GPTNeoXConfig(**cfg, max_position_embeddings=2048, rotary_pct=0.25, eos_token_id=0, bos_token_id=0)
    if lr is not None:
        config.repurpose_pretrain_lr = lr
    torch.manual_seed(0)
    # random init of a 2.8B model takes minutes on CPU threads and seconds on the GPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), path)
    return path


def budget_for(size: str, method: str, steps: int, batch: int, tokens_per_pair: float, smoke: bool,
               lora_rank: int | None = None) -> float:
    """A FLOP budget for about ``steps`` optimizer steps (core/flops.py's paper convention)."""
    from core.flops import cost_per_token
    from core.methods import param_counts
    from core.models import ModelShape, read_config

    cfg = dict(read_config(f"EleutherAI/pythia-{size}"))
    if smoke:
        cfg.update(SMOKE_SHAPE)
    n, n_tr = param_counts(ModelShape.from_config(cfg), method, lora_rank=lora_rank)
    return cost_per_token(method, n, n_tr) * tokens_per_pair * batch * (steps + 0.5)


# --- the paths ------------------------------------------------------------------------------------------------
def _cuda():
    import torch

    return torch.cuda.is_available()


def _peak():
    import torch

    from workers.device_peak import device_peak

    device = torch.device("cuda" if _cuda() else "cpu")
    return device_peak(device)


def _reset_memory() -> None:
    import torch

    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if _cuda() else None


def trial_row(name: str, row: dict, wall: float, peak: float | None) -> dict:
    """The trial's figures: MFU from the paper's FLOP, HFU from the hardware FLOP, both over the datasheet peak."""
    from core.devices import hfu, mfu

    train_s = row.get("train_s") or 0.0
    return {"path": name, "status": "ok", "steps": row.get("steps"), "tokens": row.get("tokens"),
            "train_s": train_s, "wall_s": wall, "tokens_per_s": row["tokens"] / train_s if train_s else None,
            "flops": row.get("flops"), "hardware_flops": row.get("hardware_flops"),
            "mfu": mfu(row.get("flops") or 0.0, train_s, peak), "hfu": hfu(row.get("hardware_flops") or 0.0, train_s, peak),
            "peak_memory_gb": _memory_gb(), "reason": row.get("reason")}


@contextlib.contextmanager
def forced_kernel(kernel: str | None):
    """Packed rows' attention kernel forced to ``kernel`` (workers/attention.py) for the trials run inside; None:
    the device's choice."""
    from workers import attention

    chosen = attention.choose
    if kernel:
        attention.choose = lambda *a, **k: kernel
    try:
        yield
    finally:
        attention.choose = chosen


def failed(name: str, e: BaseException) -> dict:
    oom = "out of memory" in str(e).lower()
    log(traceback.format_exc(limit=3))
    return {"path": name, "status": "oom" if oom else "failed", "reason": one_line(e, 300)}


def predicted_memory(spec) -> dict:
    """What the memory model (core/memory.py) expects of the trial on this device: the chunk and checkpointing the
    trial will choose (workers.steps.memory_plan, packed or not as the trial runs) and the peak they imply (with its
    margin and, on a GPU, 1 GiB overhead, so a little above what ``max_memory_allocated`` sees)."""
    import torch

    from core.models import model_shape
    from workers import steps
    from workers.packing import packs

    device = torch.device("cuda", torch.cuda.current_device()) if _cuda() else torch.device("cpu")
    shape = model_shape(spec.model)
    packing = packs(spec.packing, shape.family, device_type=device.type, n_params=shape.n_params())
    decided = steps.memory_plan(shape, spec, device, packing=packing)
    fp = steps.trial_footprint(shape, spec, device, packing=packing)
    return {"chunk": decided.chunk_size, "checkpointing": decided.gradient_checkpointing,
            "predicted_memory_gb": fp.total(decided.chunk_size, decided.gradient_checkpointing,
                                            one_pass=decided.chunk_size >= spec.batch_size) / 2 ** 30}


def run_single(name: str, spec, peak, kernel: str | None = None) -> dict:
    from workers.trial import run_trial

    _reset_memory()
    t0 = time.perf_counter()
    try:
        predicted = predicted_memory(spec)
        with forced_kernel(kernel):
            row = run_trial(spec)
            used = kernel_of(spec)
    except Exception as e:  # noqa: BLE001 -- a row, not the end of the run
        return failed(name, e)
    return trial_row(name, row, time.perf_counter() - t0, peak) | predicted | {"kernel": used}


def kernel_of(spec) -> str:
    """The attention a trial of ``spec`` runs here: ``padded`` or its packed kernel (workers/steps.py packer_for)."""
    import torch

    from core.models import model_shape
    from workers import steps
    from workers.packing import packs

    device = torch.device("cuda" if _cuda() else "cpu")
    shape = model_shape(spec.model)
    packing = packs(spec.packing, shape.family, device_type=device.type, n_params=shape.n_params())
    packer = steps.packer_for(shape, spec, device, packing)
    return packer.kernel if packer else "padded"


def profile_path(spec, kernel: str | None, steps_n: int = 2) -> dict:
    """``steps_n`` contrastive steps of the trial's setup under torch.profiler (after one warm-up step): the top
    kernels by device time (CPU time on a CPU) and the device's idle share, 1 - busy time / wall."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.models import model_shape
    from workers import steps
    from workers.loss import contrastive_backward
    from workers.packing import packs

    device = torch.device("cuda" if _cuda() else "cpu")
    tokenizer, model = steps.load(spec.model, device)
    shape = model_shape(spec.model)
    packing = packs(spec.packing, shape.family, device_type=device.type, n_params=shape.n_params())
    spec = steps.memory_plan(shape, spec, device, packing=packing)
    model = steps.prepare(model, spec).to(device).train()
    with forced_kernel(kernel):
        packer = steps.packer_for(shape, spec, device, packing)
    steps.use_packer(model, packer)
    autocast = steps.autocast_for(spec.precision, device)
    stream = steps.train_stream(spec, tokenizer)
    batches = [steps.to_device(b, device) for b, _ in zip(stream, range(steps_n + 1))]
    stream.close()

    def step(b):
        contrastive_backward(model, b, spec.temperature, spec.chunk_size, autocast, pooling=spec.pooling,
                             packing=packer)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(batches[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches[1:]:
            step(b)
    wall = time.perf_counter() - t0
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    busy_s = sum(getattr(e, attr) for e in events) / 1e6 if device.type == "cuda" else None
    return {"profile_top": [[e.key[:80], round(getattr(e, attr) / 1e3, 3)] for e in events[:8]],  # ms
            "profile_idle_share": None if busy_s is None else max(0.0, 1 - busy_s / wall),
            "profile_wall_s": wall}


def share_worker(args: dict) -> None:
    """One trial of a sharing measurement (a separate process, as Ray runs it): writes its tokens, train_s and the
    unix time it ended to ``args['out']``."""
    from core.spec import TrialSpec
    from workers.trial import run_trial

    spec = TrialSpec.from_dict(args["spec"])
    row = run_trial(spec)
    with open(args["out"], "w") as f:
        json.dump({"tokens": row["tokens"], "train_s": row["train_s"], "end": time.time(),
                   "hardware_flops": row["hardware_flops"]}, f)


def run_sharing(name: str, spec, k: int, root: str, alone: float | None) -> dict:
    """k trials at ``device_share`` 1/k each as k processes started together: aggregate real tokens/s over the
    window from the first's start of training to the last's end (a trial's training spans [end - train_s, end])."""
    import dataclasses

    spec = dataclasses.replace(spec, device_share=1.0 / k)
    outs = [os.path.join(root, f"{name}-{i}.json") for i in range(k)]
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, __file__, "--share-worker",
                                   json.dumps({"spec": spec.to_dict(), "out": out})], env=env, cwd=REPO)
                 for out in outs]
        codes = [p.wait(timeout=300) for p in procs]
        if any(codes):
            return {"path": name, "status": "failed", "reason": f"worker exit codes {codes}"}
        got = [json.load(open(out)) for out in outs]
    except Exception as e:  # noqa: BLE001
        for p in procs:  # a worker past the time limit ends with its row
            p.kill()
        return failed(name, e)
    start = min(g["end"] - g["train_s"] for g in got)
    window = max(g["end"] for g in got) - start
    overlap = min(g["end"] for g in got) - max(g["end"] - g["train_s"] for g in got)
    tokens = sum(g["tokens"] for g in got)
    rate = tokens / window if window > 0 else None
    return {"path": name, "status": "ok", "trials": k, "fraction": 1.0 / k, "tokens": tokens, "wall_s": window,
            "tokens_per_s": rate, "overlap_s": max(0.0, overlap),
            "vs_alone": rate / alone if rate and alone else (1.0 if k == 1 else None)}


def run_zero(name: str, spec, peak) -> dict:
    from workers.distributed import run_local

    t0 = time.perf_counter()
    try:
        row = run_local(spec, 1, timeout_s=600)
    except Exception as e:  # noqa: BLE001
        return failed(name, e)
    out = trial_row(name, row, time.perf_counter() - t0, peak)
    out["peak_memory_gb"] = None  # in the rank's process: not visible here
    return out


def run_adamw(name: str, size: str, smoke: bool, steps: int = 20) -> dict:
    """AdamW's step over a full fine-tune's parameters (the size's real tensors, random), foreach (what the trial
    uses) against fused (one kernel for all): seconds per step, median of ``steps`` after 3 warm-ups."""
    import statistics

    import torch

    from core.models import ModelShape, read_config

    try:
        device = torch.device("cuda" if _cuda() else "cpu")
        cfg = dict(read_config(f"EleutherAI/pythia-{size}"))
        if smoke:
            cfg.update(SMOKE_SHAPE)
        shape = ModelShape.from_config(cfg)
        shapes = [(shape.vocab, shape.hidden)] + [(b, a) for _ in range(shape.layers)
                                                   for a, b, _ in shape.linears().values()]
        times = {}
        for kind in ("foreach", "fused"):
            params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **{kind: True})
            took = []
            for k in range(steps + 3):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if k >= 3:
                    took.append(time.perf_counter() - t0)
            times[kind] = statistics.median(took)
            del params, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        return failed(name, e)
    return {"path": name, "status": "ok", "steps": steps, "foreach_s": times["foreach"], "fused_s": times["fused"],
            "reason": f"AdamW step: foreach {times['foreach'] * 1e3:.1f} ms, fused {times['fused'] * 1e3:.1f} ms "
                      f"({times['foreach'] / times['fused']:.2f}x)"}


def run_from_cache(name: str, model_dir: str, data: str, storage: str, *, batch: int, max_length: int,
                   steps: int, chunk: int | None) -> dict:
    """The model trained on batches from the token cache: step time vs time waiting for the next batch."""
    import torch
    from transformers import AutoModel

    from orchestrator import cache_build
    from workers import token_cache
    from workers.loss import contrastive_backward
    from workers.steps import autocast_for

    try:
        uri, manifest = cache_build.ensure(storage, train_uri=data, eval_uri=None, tokenizer_path=model_dir,
                                           max_length=max_length, log=lambda line: None)
        device = torch.device("cuda" if _cuda() else "cpu")
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast = autocast_for("bf16", device)
        stream = token_cache.CachedPairs(uri, batch, 0, 100.0)
        waited = busy = 0.0
        tokens, t_start, it = 0, time.perf_counter(), iter(stream)
        for k in range(steps):
            t0 = time.perf_counter()
            b = next(it)
            t1 = time.perf_counter()
            for key in ("q_ids", "q_mask", "d_ids", "d_mask"):
                setattr(b, key, getattr(b, key).to(device, non_blocking=True))
            contrastive_backward(model, b, 0.025, chunk, autocast)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k:  # the first step: allocator and kernel warm-up
                waited += t1 - t0
                busy += time.perf_counter() - t1
                tokens += b.real_tokens
        stream.close()
        wall = time.perf_counter() - t_start
    except Exception as e:  # noqa: BLE001
        return failed(name, e)
    return {"path": name, "status": "ok", "steps": steps, "tokens": tokens, "wall_s": wall,
            "busy_fraction": busy / (busy + waited) if busy + waited else None,
            "tokens_per_s": tokens / (busy + waited) if busy + waited else None,
            "cache_pairs": manifest["splits"]["train"]["pairs"], "peak_memory_gb": _memory_gb()}


# --- the run --------------------------------------------------------------------------------------------------
class Rows(list):
    """The rows so far, written to ``path`` after each one: a run cut short by its time limit keeps what it measured."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path:
            with open(self.path, "w") as f:
                json.dump({"partial": True, "rows": list(self)}, f, indent=1)


def without_ray() -> None:
    """A bare GPU machine may have no Ray: the token cache's shards are then built in this process, one after another
    (the same ``build_shard`` that Ray Data maps over the cluster's CPUs)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        from orchestrator import cache_build
        from workers import token_cache

        log("no Ray here: the token cache is built in this process")
        cache_build.run_tasks = lambda tasks, kwargs, address=None: (token_cache.build_shard(t, **kwargs)
                                                                     for t in tasks)


def run(smoke: bool, root: str, partial: str | None = None, only: tuple[str, ...] = ()) -> dict:
    """Every path (``only``: those whose name starts with one of these, for a second, shorter lease)."""
    import torch

    from core.spec import TrialSpec

    if smoke:
        torch.set_num_threads(1)
    batch, max_length = (16, 24) if smoke else (1024, 75)
    data = make_pairs(os.path.join(root, "train.jsonl"), 400 if smoke else 60000)
    tokenizer = make_tokenizer(os.path.join(root, "tokenizer"), data, 512 if smoke else 8192)
    tokens_per_pair = 30.0 if smoke else 45.0  # the synthetic pairs' real tokens (truncated), roughly
    peak, peak_source = _peak()
    log(f"device peak: {peak and peak / 1e12:.2f} TFLOP/s ({peak_source})")
    common = dict(train_data=data, batch_size=batch, max_length=max_length, precision="bf16",
                  report_every_s=60.0, checkpoint_every_s=1e9, eval_data=None)
    if smoke:
        common.update(chunk_size=4, num_threads=1, gradient_checkpointing=False)
    # full mode: chunk and checkpointing "auto", decided by the trial from the memory model (the row shows both)
    without_ray()
    rows = Rows(partial)
    # smoke: the flat path runs the per-text reference kernel (the CUDA varlen kernel's stand-in on a CPU)
    singles = FULL if not smoke else (("full-160m", "full", "160m", ON, 2, "segments"),
                                      ("full-160m-padded", "full", "160m", {"packing": "off"}, 2, None),
                                      ("full-160m-mask", "full", "160m", ON, 2, "mask"),
                                      ("full-160m-onepass", "full", "160m", ON | {"chunk_size": None}, 2, "segments"),
                                      ("lora-r128-1b", "lora", "1b", ON | {"lora_rank": 8}, 2, "segments"))
    def wanted(name: str) -> bool:
        return not only or name.startswith(only)

    if wanted("adamw-1b"):
        log("adamw ...")
        rows.append(run_adamw("adamw-1b", "1b", smoke, steps=3 if smoke else 20))
        log(f"  {rows[-1]}")
    specs = {}
    for name, method, size, extra, steps, kernel in singles:
        if not wanted(name):
            continue
        log(f"{name} ...")
        model = make_model(root, size, tokenizer, smoke)
        budget = budget_for(size, method, steps, batch, tokens_per_pair, smoke, extra.get("lora_rank"))
        specs[name] = (TrialSpec(model=model, method=method, budget_flops=budget, **(common | extra)), kernel)
        rows.append(run_single(name, *specs[name][:1], peak, kernel))
        log(f"  {rows[-1]}")
    zeros = ZERO if not smoke else (("zero2-1.4b", 2, "1.4b", 2), ("zero3-1.4b", 3, "1.4b", 2))
    for name, stage, size, steps in zeros:
        if not wanted(name):
            continue
        log(f"{name} ...")
        model = make_model(root, size, tokenizer, smoke)
        spec = TrialSpec(model=model, method="full", budget_flops=budget_for(size, "full", steps, batch,
                                                                             tokens_per_pair, smoke),
                         deepspeed_config=json.dumps({"zero_optimization": {"stage": stage}}), **common)
        rows.append(run_zero(name, spec, peak))
        log(f"  {rows[-1]}")
    if wanted(f"cache-{CACHE_SIZE}"):
        log(f"cache-{CACHE_SIZE} ...")
        model = make_model(root, CACHE_SIZE, tokenizer, smoke)
        _reset_memory()
        rows.append(run_from_cache(f"cache-{CACHE_SIZE}", model, data, os.path.join(root, "store"), batch=batch,
                                   max_length=max_length, steps=4 if smoke else CACHE_STEPS,
                                   chunk=4 if smoke else None))
        log(f"  {rows[-1]}")
    for size in SHARE_SIZES:
        alone = None
        for k in (SHARE_COUNTS if not smoke else (1, 2)):
            name = f"share-{size}-x{k}"
            if not wanted(name):
                continue
            log(f"{name} ...")
            model = make_model(root, size, tokenizer, smoke)
            steps = SHARE_STEPS if not smoke else 2
            spec = TrialSpec(model=model, method="full", budget_flops=budget_for(size, "full", steps, batch,
                                                                                 tokens_per_pair, smoke),
                             **(common | {"packing": "auto", "compile": False}))
            rows.append(run_sharing(name, spec, k, root, alone))
            alone = alone or rows[-1].get("tokens_per_s")
            log(f"  {rows[-1]}")
    # where a target is missed (smoke: the first row, so the profiler's path is exercised), what the profile shows
    for row in list(rows):
        target = TARGETS.get(row["path"])
        missed = target is not None and row.get("status") == "ok" and (row.get("mfu") or 0.0) < target
        if row["path"] in specs and (missed or (smoke and row["path"] == "full-160m")):
            log(f"profile {row['path']} ...")
            try:
                row.update(profile_path(*specs[row["path"]]))
            except Exception as e:  # noqa: BLE001
                row["profile_error"] = " ".join(str(e).split())[:200]
            row["target_mfu"] = target
    device = torch.cuda.get_device_name() if _cuda() else "cpu"
    return {"date": datetime.date.today().isoformat(), "smoke": smoke, "device": device, "peak_flops": peak,
            "peak_source": peak_source, "torch": torch.__version__, "batch_size": batch, "max_length": max_length,
            "rows": list(rows)}


def readme_table(out: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    peak = f(out["peak_flops"] and out["peak_flops"] / 1e12, ".2f")
    lines = [f"\n## GPU check, {out['date']} ({out['device']}, peak {peak}"
             f" TFLOP/s: {out['peak_source']})\n",
             "`python benchmarks/gpu.py`: random-weight Pythia shapes, batch 1024 x max length 75, bf16. MFU: the "
             "paper's FLOP, HFU: the hardware FLOP, both over the datasheet's dense bf16 peak.\n",
             "| path | status | kernel | steps | tokens/s | MFU (target) | HFU | peak memory GB | predicted GB (chunk, ckpt) "
             "| note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        note = r.get("reason") or ""
        if "busy_fraction" in r:
            note = f"GPU busy {f(r['busy_fraction'], '.2f')} of the loop"
        if "trials" in r:
            note = (f"{r['trials']} trials at {r['fraction']:g}: {f(r.get('vs_alone'), '.2f')}x one alone, "
                    f"{f(r.get('overlap_s'), '.0f')} s all running")
        if r.get("profile_top"):
            top = "; ".join(f"{k} {ms:.1f} ms" for k, ms in r["profile_top"][:3])
            note += f" profile: idle {f(r.get('profile_idle_share'), '.2f')}, top {top}"
        predicted = "-"
        if r.get("predicted_memory_gb") is not None:
            predicted = (f"{r['predicted_memory_gb']:.1f} ({r['chunk']}, "
                         f"{'ckpt' if r['checkpointing'] else 'no ckpt'})")
        target = f" ({r['target_mfu']:.2f})" if r.get("target_mfu") else ""
        lines.append(f"| {r['path']} | {r['status']} | {r.get('kernel') or '-'} | {r.get('steps') or '-'} "
                     f"| {f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('mfu'), '.3f')}{target} | {f(r.get('hfu'), '.3f')} "
                     f"| {f(r.get('peak_memory_gb'), '.1f')} | {predicted} | {note.strip()} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the GPU check")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, every path, in seconds (CI)")
    ap.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu.json or ./gpu-<date>.json)")
    ap.add_argument("--no-readme", action="store_true", help="full mode: do not append to benchmarks/README.md")
    ap.add_argument("--only", default="", metavar="A,B", help="only the paths whose names start with these")
    ap.add_argument("--share-worker", default=None, help=argparse.SUPPRESS)  # one trial of a sharing measurement
    args = ap.parse_args(argv)
    if args.share_worker:
        share_worker(json.loads(args.share_worker))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from workers.export import quiet_model_loading

    quiet_model_loading()  # as the CLI: no library noise the user did not ask for
    root = tempfile.mkdtemp(prefix="rpgpu")
    t0 = time.perf_counter()
    date = datetime.date.today().isoformat()
    path = args.out or (os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else
                        f"gpu-{date}{'-smoke' if args.smoke else ''}.json")
    try:
        out = run(args.smoke, root, partial=path, only=tuple(p for p in args.only.split(",") if p))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["wall_s"] = time.perf_counter() - t0
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    table = readme_table(out)
    print(table)
    if not args.smoke and not args.no_readme:
        with open(os.path.join(REPO, "benchmarks", "README.md"), "a") as f:
            f.write(table)
    log(f"wrote {path} in {out['wall_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in out["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
