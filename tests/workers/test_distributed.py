"""workers/distributed.py and workers/zero_checkpoint.py: one contrastive batch over 2 ranks (gloo, CPU) equals
the single-process batch.

- the math in plain torch.distributed: global loss and averaged parameter gradients equal the single-process
  ones, with and without the gradient cache, for full fine-tuning and LoRA, sharded and (uneven batch) whole;
- the DeepSpeed engine (DS_ACCELERATOR=cpu, ZeRO 2 and 3): one SGD step with lr 1 moves every parameter by
  exactly minus the single-process gradient (AdamW would hide a wrong gradient scale: its first steps are
  scale-free); with bf16 autocast, every gradient is reduced in fp32;
- the DeepSpeed checkpoint (ZeRO 2 and 3, with and without CPU optimizer offload, parameters the ranks do not
  divide): the full tensors saved, read by rank 0 alone and sent, set back into a fresh engine (of the other
  stage too), and its next steps equal the uninterrupted engine's;
- the DeepSpeed trial (ZeRO 2 full fine-tuning, ZeRO 3 LoRA, gradient cache on): killed after a few steps and
  resumed from its checkpoint (rank 1 cannot reach it; on disk, past a damaged newest one), its rows, FLOP and
  eval loss equal a single-process run_trial's.

Ranks are spawned processes; they get the tiny model and data through the fixtures' paths and write results
as safetensors (nothing unpickled here).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os

import pytest
import torch

import fsio as storage
from workers import checkpoint
from core.events import TrialEvent
from core.spec import TrialSpec

TAU = 0.025
FP32 = contextlib.nullcontext
BF16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)  # a one-device bf16 trial's (steps.autocast_for)
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
CASES = {"full": {}, "lora": {"lora_rank": 4}}
# (pairs, gradient-cache chunk): 12 pairs split 6 + 6 (chunks 2: three per rank; 4: 4 + 2); 7 pairs do not split
# evenly, so every rank computes the whole batch
BATCHES = [(12, None), (12, 2), (12, 4), (7, None), (7, 3)]
BUDGET = 6.5e9  # ~11 steps of full fine-tuning at 16 pairs a step (test_trial.py)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------
# helpers shared by the test process and the ranks


def load(model_dir, method):
    from transformers import AutoModel, AutoTokenizer

    from workers.methods import select_trainable

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    torch.manual_seed(0)  # LoRA's initialisation
    model = select_trainable(model, method, lora_targets=LORA_TARGETS, **CASES[method])
    if method == "lora":  # B starts at 0, which leaves A without gradient: give the adapters weights
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return tokenizer, model.train()


def make_batch(tokenizer, pairs_file, n):
    from workers.pair_batches import collate
    from workers.pair_files import make_encoder, pad_id_of

    with open(pairs_file) as f:
        pairs = [json.loads(next(f)) for _ in range(n)]
    encode = make_encoder(tokenizer, 75)
    return collate(encode([p["query"] for p in pairs]), encode([p["pos"][0] for p in pairs]), pad_id_of(tokenizer), 0)


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def spawn(target, world, *args):
    import torch.multiprocessing as mp

    from raykit import free_port

    mp.start_processes(target, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)


def refuse_storage(prefix: str) -> None:
    """From now on in this process (a spawned rank), storage under ``prefix`` raises, whatever asks for it: every
    function of fsio given such a URI, and workers/checkpoint.py's load."""
    import inspect

    import fsio
    from workers import checkpoint as ckpt

    def refusing(fn):
        def call(*args, **kwargs):
            if any(isinstance(a, str) and a.startswith(prefix) for a in (*args, *kwargs.values())):
                raise PermissionError(f"this rank may not touch {prefix}")
            return fn(*args, **kwargs)
        return call

    for name, fn in vars(fsio).items():
        if inspect.isfunction(fn) and fn.__module__ == fsio.__name__:
            setattr(fsio, name, refusing(fn))
    ckpt.load = refusing(ckpt.load)


def _rank1_blind(rank, world, port, spec, checkpoint_uri, events):
    """run_local's rank (workers.distributed._local_main), except that rank 1 cannot reach the checkpoints."""
    from workers import distributed

    if rank == 1:
        refuse_storage(checkpoint_uri)
    distributed._local_main(rank, world, port, spec, checkpoint_uri, events)


# --------------------------------------------------------------------------------------------------------
# pure parts: the split of a batch, the engine config, the placement


def test_shard_splits_even_batches_and_keeps_uneven_ones_whole(tiny_model, pairs_file):
    from transformers import AutoTokenizer

    from workers.distributed import _whole, gather_rows, shard

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = make_batch(tokenizer, pairs_file, 12)
    parts = [shard(batch, r, 3) for r in range(3)]
    for r, (part, gather, owned) in enumerate(parts):
        assert len(part) == 4 and gather is gather_rows and owned == part.real_tokens
        rows = slice(4 * r, 4 * r + 4)
        assert part.q_ids.shape[1] == int(batch.q_mask[rows].sum(1).max())  # trimmed to its own longest
        torch.testing.assert_close(part.q_ids, batch.q_ids[rows, :part.q_ids.shape[1]])
        assert part.q_mask.sum() == batch.q_mask[rows].sum() and part.d_mask.sum() == batch.d_mask[rows].sum()
    assert sum(owned for _, _, owned in parts) == batch.real_tokens
    # 12 pairs over 5 ranks: whole on every rank, rank 0 owns the tokens
    whole = [shard(batch, r, 5) for r in range(5)]
    assert all(part is batch and gather is _whole for part, gather, _ in whole)
    assert [owned for _, _, owned in whole] == [batch.real_tokens, 0, 0, 0, 0]


def test_deepspeed_config_default_and_override(tmp_path):
    from core.spec import DeepSpeedConfigError
    from workers.distributed import deepspeed_config, read_override

    config = deepspeed_config(world=4, micro_batch=256, bf16=True)
    assert config["zero_optimization"] == {"stage": 2}
    assert config["train_batch_size"] == 1024 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's own default (1.0) would clip: the recipe does not
    assert config["managed_gradient_accumulation"] is False
    # bf16 matmuls, no module's gradients reduced in bf16 (test_deepspeed_step_is_the_single_process_gradient)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "torch_autocast" not in deepspeed_config(world=4, micro_batch=256, bf16=False)
    # an override merges key by key: stage 3 with CPU optimizer offload keeps the rest
    override = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(override))
    for ref in (json.dumps(override), str(path)):
        merged = deepspeed_config(world=2, micro_batch=8, bf16=False, override=read_override(ref))
        assert merged["zero_optimization"] == override["zero_optimization"]
        assert merged["gradient_clipping"] == 0.0 and merged["train_batch_size"] == 16
    assert read_override(None) == {}
    # what the trial computes is not an override's to change
    for bad in ({"optimizer": {"type": "SGD"}}, {"gradient_clipping": 1.0}, {"bf16": {"enabled": True}},
                {"communication_data_type": "bf16"}):  # gradients reduce in fp32 (parity with one device)
        path.write_text(json.dumps(bad))
        with pytest.raises(DeepSpeedConfigError, match=f"deepspeed_config.{next(iter(bad))}"):
            read_override(str(path))
        with pytest.raises(DeepSpeedConfigError, match=f"deepspeed_config.{next(iter(bad))}"):
            read_override(json.dumps(bad))  # inline: the same check the grid runs at its edge (core.spec)
    path.write_text("[1, 2]")
    with pytest.raises(DeepSpeedConfigError, match="JSON object"):
        read_override(str(path))
    with pytest.raises(DeepSpeedConfigError, match="not JSON"):
        read_override("{stage: 3")
    # a runtime knob: how the engine runs does not change the trial's id
    spec = TrialSpec(model="m", method="full", budget_flops=1e9, train_data="d")
    other = TrialSpec(model="m", method="full", budget_flops=1e9, train_data="d", deepspeed_config=json.dumps(override))
    assert spec.identity() == other.identity()
    assert TrialSpec.from_dict(other.to_dict()) == other


def test_placement_one_bundle_per_rank():
    from orchestrator.trainable import rank_bundles, trial_ranks
    from orchestrator.tuning import trial_placement

    trial = {"resources": {"CPU": 16, "GPU": 4}, "deepspeed_gpus": 4}
    assert trial_ranks(trial) == 4 and rank_bundles(trial["resources"], 4) == [{"CPU": 4.0, "GPU": 1.0}] * 4
    placement = trial_placement({"trial": trial})
    assert placement.bundles == [{"CPU": 4.0, "GPU": 1.0}] * 4 and placement.strategy == "STRICT_PACK"
    single = {"resources": {"CPU": 4, "GPU": 0.25}, "deepspeed_gpus": 0}
    assert trial_ranks(single) == 0 and trial_placement({"trial": single}).bundles == [{"CPU": 4, "GPU": 0.25}]
    assert trial_ranks({"resources": {"CPU": 2}, "deepspeed_gpus": 0, "cpu_ranks": 2}) == 2


# --------------------------------------------------------------------------------------------------------
# the math, plain torch.distributed


def _math_rank(rank, world, port, model_dir, pairs_file, out_dir):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from distkit import average_gradients, contrastive_backward_sharded

    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for method in CASES:
        tokenizer, model = load(model_dir, method)
        params = [p for p in model.parameters() if p.requires_grad]
        for n, chunk in BATCHES:
            key = f"{method}.{n}.{chunk}"
            loss, owned = contrastive_backward_sharded(model, make_batch(tokenizer, pairs_file, n), TAU, chunk, FP32)
            out |= {f"{key}.local.{name}": p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
            average_gradients(params)
            out[f"{key}.loss"] = torch.tensor([loss, owned], dtype=torch.float64)
            out |= {f"{key}.grad.{name}": g for name, g in grads(model).items()}
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns gloo ranks
@pytest.mark.timeout(300)
def test_sharded_loss_and_gradients_equal_single_process(tiny_model, pairs_file, tmp_path):
    from safetensors.torch import load_file

    from workers.loss import contrastive_backward

    spawn(_math_rank, 2, tiny_model, pairs_file, str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for method in CASES:
        tokenizer, model = load(tiny_model, method)
        for n, chunk in BATCHES:
            key = f"{method}.{n}.{chunk}"
            batch = make_batch(tokenizer, pairs_file, n)
            loss = contrastive_backward(model, batch, TAU, None, FP32)
            ref = grads(model)
            for r in ranks:
                assert r[f"{key}.loss"][0].item() == pytest.approx(loss, abs=1e-5), key
                for name in ref:  # every rank holds the averaged gradient
                    torch.testing.assert_close(r[f"{key}.grad.{name}"], ref[name], atol=1e-5, rtol=1e-4,
                                               msg=f"{key} {name}")
            # the ranks' tokens sum to the batch's: each real token counted once
            assert sum(int(r[f"{key}.loss"][1]) for r in ranks) == batch.real_tokens
            if n % 2 == 0:
                # sharded: one rank's gradient alone is not the batch's (so the comparison above can fail), and the
                # plain mean of the ranks' is: the gather's backward counts each rank once (no k times, no 1/k)
                local = [{name: r[f"{key}.local.{name}"] for name in ref} for r in ranks]
                assert max((local[0][name] - ref[name]).abs().max().item() for name in ref) > 1e-3
                for name in ref:
                    torch.testing.assert_close((local[0][name] + local[1][name]) / 2, ref[name], atol=1e-5, rtol=1e-4)
            assert any(g.abs().max() > 1e-4 for g in ref.values())


# --------------------------------------------------------------------------------------------------------
# the DeepSpeed engine: gradient scale through engine.backward and ZeRO's reduction


def _engine_rank(rank, world, port, model_dir, pairs_file, out_dir):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import save_file

    from distkit import EngineAutocast, average_gradients, contrastive_backward_sharded, watch_reductions
    from workers.distributed import deepspeed_config, shard
    from workers.loss import contrastive_backward

    _init(rank, world, port)
    reductions = watch_reductions()  # before DeepSpeed's backend starts
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    out = {}
    # bf16 autocast: the ranks' own gradients (a plain model, the same shards, autocast as the engine's) averaged in
    # fp32, what DeepSpeed's step must be
    tokenizer, model = load(model_dir, "full")
    contrastive_backward_sharded(EngineAutocast(model), make_batch(tokenizer, pairs_file, 12), TAU, None, FP32)
    average_gradients([p for p in model.parameters() if p.requires_grad])
    out |= {f"bf16.mean.{n}": g for n, g in grads(model).items()}
    for stage, chunk, bf16 in [(2, None, False), (2, 2, False), (3, None, False), (3, 2, False),
                               (2, None, True), (3, None, True)]:
        tokenizer, model = load(model_dir, "full")
        batch = make_batch(tokenizer, pairs_file, 12)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        config = deepspeed_config(world=world, micro_batch=6, bf16=bf16,
                                  override={"zero_optimization": {"stage": stage}})
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=config)
        part, gather, _ = shard(batch, rank, world)

        def full(p):  # ZeRO-3 partitions the module's parameters; ZeRO-2 keeps them whole
            return (safe_get_full_fp32_param(p) if stage == 3 else p.detach()).clone()

        before = {n: full(p) for n, p in engine.module.named_parameters()}
        reductions.clear()
        # the engine's own autocast when bf16 (torch_autocast), as in run_deepspeed_trial
        loss = contrastive_backward(engine, part, TAU, chunk, FP32, gather=gather, backward=engine.backward)
        engine.step()
        key = f"{stage}.bf16" if bf16 else f"{stage}.{chunk}"
        # what backward and step reduced: (bits of the float dtype, elements) a reduction
        out[f"{key}.reduced"] = torch.tensor([[torch.finfo(d).bits, n] for d, n in reductions], dtype=torch.int64)
        out[f"{key}.loss"] = torch.tensor([loss])
        out |= {f"{key}.step.{n}": before[n] - full(p) for n, p in engine.module.named_parameters()}
        engine.destroy()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "engine.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_step_is_the_single_process_gradient(tiny_model, pairs_file, tmp_path):
    """fp32: the step is the single-process gradient. bf16 autocast (ZeRO 2 and 3): every gradient reduced in fp32
    (DeepSpeed's default reduces nn.Linear's in bf16), so the step is the ranks' own gradients averaged in fp32, to
    float rounding; the loss is the single-process one."""
    from safetensors.torch import load_file

    from workers.loss import contrastive_backward

    spawn(_engine_rank, 2, tiny_model, pairs_file, str(tmp_path))
    got = load_file(tmp_path / "engine.safetensors")
    tokenizer, model = load(tiny_model, "full")
    loss = contrastive_backward(model, make_batch(tokenizer, pairs_file, 12), TAU, None, FP32)
    ref = grads(model)
    for stage in (2, 3):
        for chunk in (None, 2):
            key = f"{stage}.{chunk}"
            assert got[f"{key}.loss"].item() == pytest.approx(loss, abs=1e-5), key
            for name, g in ref.items():  # SGD, lr 1: the step is the gradient
                torch.testing.assert_close(got[f"{key}.step.{name}"], g, atol=1e-5, rtol=1e-4, msg=f"{key} {name}")
    tokenizer, model = load(tiny_model, "full")
    bf16_loss = contrastive_backward(model, make_batch(tokenizer, pairs_file, 12), TAU, None, BF16)
    bf16_ref = grads(model)
    n_params = sum(g.numel() for g in bf16_ref.values())
    for stage in (2, 3):
        key = f"{stage}.bf16"
        bits, elements = got[f"{key}.reduced"].unbind(1)
        assert set(bits.tolist()) <= {32, 64}, f"ZeRO-{stage} reduced in {sorted(set(bits.tolist()))} bits"
        assert elements[bits == 32].sum() >= n_params  # every gradient went through a reduction seen here
        assert got[f"{key}.loss"].item() == pytest.approx(bf16_loss, abs=1e-5), key
        for name, g in bf16_ref.items():
            step, mean = got[f"{key}.step.{name}"], got[f"bf16.mean.{name}"]
            # to lr-1 SGD's rounding (measured: 1e-6); a bf16 reduction misses by up to 2^-9 of the gradient (0.09)
            torch.testing.assert_close(step, mean, atol=4e-6, rtol=1e-5, msg=f"{key} {name}")
            # the single process's to bf16 rounding (measured: 0.6%; distkit.EngineAutocast says why not closer)
            assert (step - g).norm() <= 2e-2 * g.norm(), (key, name)


# --------------------------------------------------------------------------------------------------------
# the DeepSpeed checkpoint: full tensors out, this rank's partitions back in, whatever the stage


def _read_rank(rank, world, port, root):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from workers.zero_checkpoint import read

    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    if rank == 1:
        refuse_storage(root)
    out = {}
    restored, skipped = read(os.path.join(root, "ckpt"), rank, cpu)
    out |= {f"got.{k}": restored.take(k) for k in sorted(restored.meta)}
    out["state"] = torch.tensor(list(json.dumps([restored.state, skipped]).encode()), dtype=torch.uint8)
    assert read(os.path.join(root, "none"), rank, cpu) == (None, [])
    if rank == 0:
        refuse_storage(os.path.join(root, "ckpt"))
    try:
        read(os.path.join(root, "ckpt"), rank, cpu)
    except (PermissionError, RuntimeError) as e:  # rank 0's own error; the others': rank 0 could not read
        out["error"] = torch.tensor(list(f"{type(e).__name__}: {e}".encode()), dtype=torch.uint8)
    save_file(out, os.path.join(root, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns gloo ranks
@pytest.mark.timeout(120)
def test_checkpoint_is_read_by_rank_0_alone_and_sent(tmp_path):
    """Rank 1 cannot reach storage; it gets rank 0's checkpoint (past the damaged newest: the one before it, and
    what was skipped), its tensors whole in their dtypes; no checkpoint: None everywhere; rank 0 failing to read
    fails every rank, not a hang."""
    from safetensors.torch import load_file

    uri = str(tmp_path / "ckpt")
    saved = {"param.w": torch.randn(3, 5), "exp_avg.w": torch.randn(3, 5).to(torch.bfloat16),
             "rng.cpu": torch.stack([torch.get_rng_state()] * 2), "n": torch.arange(4)}
    checkpoint.save(uri, 1, saved, {"progress": {"step": 1}, "adam_step": 1})
    checkpoint.save(uri, 2, {k: v + 1 for k, v in saved.items()}, {"progress": {"step": 2}, "adam_step": 2})
    latest = (tmp_path / "ckpt" / "LATEST").read_text().strip()
    (tmp_path / "ckpt" / latest / "state.json").write_text("{")  # the newest damaged
    spawn(_read_rank, 2, str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    states = [json.loads(bytes(r["state"].tolist())) for r in ranks]
    assert states[0] == states[1] and states[0][0]["adam_step"] == 1
    assert len(states[0][1]) == 1 and "unreadable" in states[0][1][0]
    for r in ranks:
        assert sorted(k.removeprefix("got.") for k in r if k.startswith("got.")) == sorted(saved)
        for k, v in saved.items():
            assert r[f"got.{k}"].dtype == v.dtype and torch.equal(r[f"got.{k}"], v), k
    errors = [bytes(r["error"].tolist()).decode() for r in ranks]
    assert errors[0].startswith("PermissionError")
    assert errors[1].startswith("RuntimeError: rank 0 could not read") and "PermissionError" in errors[1]

OFFLOAD = {"offload_optimizer": {"device": "cpu"}}  # DeepSpeedCPUAdam
ZERO = [  # (the engine that saves, the engine that restores)
    ({"stage": 2}, {"stage": 3}),
    ({"stage": 3, "stage3_param_persistence_threshold": 0}, {"stage": 2}),  # ZeRO-3's module copy partitioned
    ({"stage": 2, **OFFLOAD}, {"stage": 2, **OFFLOAD}),
    ({"stage": 3, **OFFLOAD}, {"stage": 3, **OFFLOAD}),
    ({"stage": 2, **OFFLOAD}, {"stage": 3, **OFFLOAD}),
]


def _toy() -> torch.nn.Module:
    """Parameters of 15, 3, 3 and 1 elements: 2 ranks do not divide them, so ZeRO-3 pads its partitions."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model[0].bias.requires_grad_(False)  # frozen: not in the checkpoint, the model gives it again
    return model


def _checkpoint_rank(rank, world, port, root):
    import time

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from workers.distributed import _optimizer, deepspeed_config
    from workers.steps import Progress
    from workers.zero_checkpoint import ADAM_MOMENTS, adam_step, read, restore, save

    _init(rank, world, port)
    if rank == 1:
        refuse_storage(root)  # restores from what rank 0 reads
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cpu = torch.device("cpu")
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=data), torch.randn(8, 1, generator=data)  # 4 rows a rank

    def engine(zero):
        model = _toy()
        config = deepspeed_config(world=world, micro_batch=4, bf16=False, override={"zero_optimization": zero})
        optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], 0.05, 0.1, config, cpu)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    def train(e, steps) -> list[float]:
        losses = []
        for _ in range(steps):
            loss = ((e(x[4 * rank:4 * rank + 4]) - y[4 * rank:4 * rank + 4]) ** 2).mean()
            e.backward(loss)
            e.step()
            losses.append(loss.item())
        return losses

    def full_state(e) -> dict[str, torch.Tensor]:  # collectives: every rank
        out = {}
        for name, p in e.module.named_parameters():
            if p.requires_grad:
                out[f"param.{name}"] = safe_get_full_fp32_param(p).clone()
                out |= {f"{k}.{name}": safe_get_full_optimizer_state(p, k).clone() for k in ADAM_MOMENTS}
        return out

    out = {}
    for i, (zero, other) in enumerate(ZERO):
        uri = os.path.join(root, str(i))
        ref = engine(zero)
        train(ref, 2)
        save(ref, uri, Progress(step=2), time.perf_counter(), rank, cpu)
        saved = full_state(ref)
        ref_losses = train(ref, 2)
        ref_after = full_state(ref)
        ref.destroy()
        resumed = engine(other)
        progress = restore(resumed, read(uri, rank, cpu)[0], rank)
        restored = full_state(resumed)
        losses = train(resumed, 2)
        after = full_state(resumed)
        out[f"{i}.steps"] = torch.tensor([progress.step, adam_step(resumed)])
        resumed.destroy()
        out[f"{i}.loss"] = torch.tensor([ref_losses, losses])
        for key in saved:
            out |= {f"{i}.saved.{key}": saved[key], f"{i}.restored.{key}": restored[key],
                    f"{i}.ref_after.{key}": ref_after[key], f"{i}.after.{key}": after[key]}
    save_file(out, os.path.join(root, f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_checkpoint_restores_the_full_state_across_stages(tmp_path):
    from safetensors.torch import load_file

    spawn(_checkpoint_rank, 2, str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    trainable = ["0.weight", "2.weight", "2.bias"]
    for i in range(len(ZERO)):
        tensors, state = checkpoint.load(str(tmp_path / str(i)))
        # the full tensors of the trainable parameters (not the frozen one), AdamW's step, each rank's RNG
        assert sorted(tensors) == sorted([f"{k}.{n}" for k in ("param", "exp_avg", "exp_avg_sq") for n in trainable]
                                         + ["rng.cpu"])
        assert tensors["param.0.weight"].shape == (3, 5) and tensors["rng.cpu"].shape[0] == 2
        assert state["adam_step"] == 2 and state["progress"]["step"] == 2
        for r in ranks:
            assert r[f"{i}.steps"].tolist() == [2, 4], i  # AdamW's count went on from the saved one
            for key in tensors:
                if key.startswith("rng."):
                    continue
                # set back exactly, on every rank; the next two steps (forwards read the module's copy, updates the
                # master and moments) are the uninterrupted engine's
                assert torch.equal(r[f"{i}.restored.{key}"], tensors[key]), (i, key)
                assert torch.equal(r[f"{i}.saved.{key}"], tensors[key]), (i, key)
                same(r[f"{i}.after.{key}"], r[f"{i}.ref_after.{key}"], ZERO[i])
                assert not torch.equal(r[f"{i}.after.{key}"], tensors[key])  # the steps moved it
            same(r[f"{i}.loss"][1], r[f"{i}.loss"][0], ZERO[i])


def same(got, want, engines) -> None:
    """torch's AdamW resumes bitwise. DeepSpeedCPUAdam to float rounding: it keeps beta^t as a float32 running
    product, recomputed with pow when its step count jumps, as on resume (csrc/includes/cpu_adam.h,
    IncrementStep); measured: 9e-7 after two steps of lr 0.05, about 2e-5 of a step (a wrong step count, or
    moments lost, moves a parameter by a good part of a step)."""
    if "offload_optimizer" in engines[0]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    else:
        assert torch.equal(got, want), engines


# --------------------------------------------------------------------------------------------------------
# the DeepSpeed trial: killed, resumed, equal to the single-process trial


class Stop(Exception):
    pass


def upsert(rows) -> list[dict]:
    return [r for _, r in sorted({r["step"]: r for r in rows}.items())]


@pytest.fixture
def s3(moto_s3):
    """``s3://ckpt`` on the session's moto server (tests/conftest.py); the ranks inherit its env."""
    moto_s3.client().create_bucket(Bucket="ckpt")
    return "s3://ckpt"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage,method,store", [(2, "full", "s3"), (3, "lora", "local")])
def test_deepspeed_trial_resumes_and_equals_single_process(tiny_model, pairs_file, eval_file, tmp_path, request,
                                                           monkeypatch, stage, method, store):
    """ZeRO 2 keeps its checkpoints in S3, ZeRO 3 on disk. The resumed run's rank 1 cannot reach them: rank 0
    reads and sends. On disk, the newest checkpoint is damaged before the resume: rank 0 falls back to the one
    before it, and so does every rank."""
    from workers import distributed
    from workers.distributed import run_local
    from workers.trial import run_trial

    spec = TrialSpec(model=tiny_model, method=method, budget_flops=BUDGET, train_data=str(pairs_file),
                     eval_data=str(eval_file), batch_size=16, precision="fp32", eval_pairs=32, num_threads=1,
                     chunk_size=4, checkpoint_every_s=0.0, **CASES[method],
                     deepspeed_config=json.dumps({"zero_optimization": {"stage": stage}}))
    uri = request.getfixturevalue("s3") + f"/{tmp_path.name}" if store == "s3" else str(tmp_path / "ckpt")
    first: list[dict] = []

    def kill_at_step_3(event):
        first.append(event)
        if event.step >= 3:
            raise Stop  # run_local kills the ranks (SIGKILL): a crash mid-trial

    with pytest.raises(Stop):
        run_local(spec, 2, checkpoint_uri=uri, report=kill_at_step_3, timeout_s=600)
    # the killed run's checkpoint: the common format, the trainable parameters' full tensors (LoRA: the adapters)
    tensors, state = checkpoint.load(uri)
    assert not state["progress"]["done"] and state["adam_step"] == state["progress"]["step"] >= 2
    params = {k.removeprefix("param.") for k in tensors if k.startswith("param.")}
    tokenizer, model = load(tiny_model, method)
    assert params == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(tensors[f"param.{n}"].shape == p.shape for n, p in model.named_parameters() if n in params)
    newest = state["progress"]["step"]
    if store == "local":  # every file of the newest checkpoint cut in half
        latest = (tmp_path / "ckpt" / "LATEST").read_text().strip()
        for f in (p for p in (tmp_path / "ckpt" / latest).rglob("*") if p.is_file()):
            f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    second: list[dict] = []
    with monkeypatch.context() as m:
        m.setattr(distributed, "_local_main", _rank1_blind)  # spawned by reference: the ranks run _rank1_blind
        row = run_local(spec, 2, checkpoint_uri=uri, report=second.append, timeout_s=600)

    ref_events: list[TrialEvent] = []
    ref = run_trial(spec, report=ref_events.append)

    # the second run resumed from a DeepSpeed checkpoint after step c >= 2 (saved before the kill at step 3; on
    # disk, the one before the damaged newest): its first event restates the history 1..c, then its own step c + 1
    history = [r["step"] for r in second[0].rows]
    c = history[-2]
    assert second[0].restart and history == list(range(1, c + 2)) and 1 <= c < ref["steps"]
    if store == "local":  # checkpoints every step: the previous one is a step older; the trial's reason says so
        assert c == newest - 1 and "unreadable" in row["reason"] and f"resumed from step {c}" in row["reason"]
    else:
        assert c == newest >= 2 and not row["reason"]
    rows = upsert([r for e in first + second for r in e.rows])
    ref_rows = upsert([r for e in ref_events for r in e.rows])
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for got, want in zip(rows, ref_rows):
        assert got["tokens"] == want["tokens"] and got["flops"] == want["flops"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    # the budget: global, the ranks' tokens summed
    assert row["flops"] == ref["flops"] and row["tokens"] == ref["tokens"] and row["steps"] == ref["steps"]
    assert 0.97 * BUDGET <= row["flops"] <= BUDGET
    assert row["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert row["hardware_flops"] > row["flops"]  # recomputation: checkpointing and the gradient cache
    # rank 0 reported, once: one done event; the done marker (no tensors) replaced the checkpoints
    assert sum(e.done for e in second) == 1 and second[-1].done and second[-1].trial == row
    tensors, state = checkpoint.load(uri)
    assert state["progress"]["done"] and not tensors
    assert len([n for n in storage.list_dir(uri) if n.startswith("step-")]) == 1


# --------------------------------------------------------------------------------------------------------
# inside one Tune trial: rank 0 in the trial's process reports, rank 1 is an actor in its placement group


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tune_trial_runs_deepspeed_ranks_and_reports_once(tiny_model, pairs_file, tmp_path):
    """Two trials one after the other in a reused trial actor (the driver's reuse_actors): the second starts a
    fresh process group and DeepSpeed engine in the process the first one used."""
    import tempfile

    import ray
    from ray import tune

    from orchestrator.trainable import run_tune_trial
    from orchestrator.tuning import trial_placement
    from workers.trial import run_trial

    # ZeRO 2, the default; an event per step (report_every_s 0), so the two runs' events compare whatever their speed
    spec = TrialSpec(model=tiny_model, method="full", budget_flops=BUDGET / 2, train_data=str(pairs_file),
                     batch_size=16, precision="fp32", num_threads=1, chunk_size=4, report_every_s=0.0)
    configs = [{"trial_id": name, "spec": spec.to_dict(), "checkpoint_uri": str(tmp_path / name),
                "resources": {"CPU": 2}, "deepspeed_gpus": 0, "cpu_ranks": 2} for name in ("a", "b")]
    results: dict[str, list[TrialEvent]] = {"a": [], "b": []}

    class Collect(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            results[trial.config["trial"]["trial_id"]].append(TrialEvent.from_dict(result))

    ray_dir = tempfile.mkdtemp(prefix="rp-ds-", dir="/tmp")  # unix socket paths must stay short
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=ray_dir, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        grid = tune.Tuner(tune.with_resources(run_tune_trial, trial_placement),
                          param_space={"trial": tune.grid_search(configs)},
                          tune_config=tune.TuneConfig(reuse_actors=True),
                          run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0,
                                                    callbacks=[Collect()])).fit()
        assert not grid.errors, grid.errors
    finally:
        ray.shutdown()
    assert trial_placement({"trial": configs[0]}).bundles == [{"CPU": 1.0}, {"CPU": 1.0}]

    ref_events: list[TrialEvent] = []
    ref = run_trial(spec, report=ref_events.append)
    ref_rows = upsert([r for e in ref_events for r in e.rows])
    for name, got in results.items():
        # rank 0 alone reported, each step once, one final event
        assert [r.step for r in got] == [e.step for e in ref_events], name
        assert [r.done for r in got].count(True) == 1 and got[-1].done
        assert {r.ranks for r in got} == {2}  # made by DeepSpeed on two ranks
        row = got[-1].trial
        assert row["flops"] == ref["flops"] and row["steps"] == ref["steps"] and row["node_id"]
        rows = upsert([r for e in got for r in e.rows])
        for a, b in zip(rows, ref_rows, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), (name, a["step"])


def test_each_rank_takes_its_own_gpu_and_the_backend_follows_the_accelerator():
    """GPU-path decisions checked on CPU: rank k of a trial uses cuda:k (LOCAL_RANK), not cuda:0 for all; a CPU
    accelerator on a GPU box (DS_ACCELERATOR=cpu) is gloo, never nccl; no GPU is gloo on the CPU."""
    from workers.distributed import rank_device

    assert rank_device(3, "", cuda_available=True) == ("cuda:3", "nccl")
    assert rank_device(1, "cuda", cuda_available=True) == ("cuda:1", "nccl")
    assert rank_device(1, "cpu", cuda_available=True) == ("cpu", "gloo")
    assert rank_device(0, "", cuda_available=False) == ("cpu", "gloo")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_deepspeed_trial_equals_single_process_for_other_families(family, pairs_file, eval_file, tmp_path):
    """The DeepSpeed recipe is family-generic: a Llama-shaped (GQA, SwiGLU, RMSNorm) and a Qwen3-shaped (q/k norms,
    head_dim != hidden/heads) model train on 2 CPU ranks (gloo, ZeRO 2) exactly as on one process."""
    from support import build_family_checkpoint, build_tokenizer, make_pairs

    from workers.distributed import run_local
    from workers.trial import run_trial

    texts = [p["query"] + " " + p["pos"][0] for p in make_pairs(500, seed=3)]
    model = build_family_checkpoint(tmp_path / family, family, build_tokenizer(tmp_path / "tok", texts))
    spec = TrialSpec(model=model, method="lora", lora_rank=4, budget_flops=2e9, train_data=str(pairs_file),
                     eval_data=str(eval_file), batch_size=16, precision="fp32", eval_pairs=32, num_threads=1,
                     lr=1e-3, pooling="last")
    ranks: list[dict] = []
    row = run_local(spec, 2, report=ranks.append, timeout_s=600)
    single: list[dict] = []
    ref = run_trial(spec, report=single.append)
    assert (row["steps"], row["tokens"], row["flops"]) == (ref["steps"], ref["tokens"], ref["flops"]) and ref["steps"] >= 3
    got = upsert([r for e in ranks for r in e.rows])
    want = upsert([r for e in single for r in e.rows])
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-5), g["step"]
    assert row["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert row["ndcg_at_10"] == pytest.approx(ref["ndcg_at_10"], abs=1e-6)


def test_local_ranks_use_the_gpus_a_machine_has(monkeypatch):
    """run_local's ranks: the CPU accelerator only where there is no GPU (the GPU check's ZeRO rows once trained a
    1.4B model on an H200 box's CPU because every local rank was told DS_ACCELERATOR=cpu)."""
    import queue as q

    from workers import distributed

    seen = []
    monkeypatch.setattr(distributed, "run_rank", lambda *a, **k: seen.append(os.environ.get("DS_ACCELERATOR")))
    for cuda, expected in ((True, None), (False, "cpu")):
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        distributed._local_main(0, 1, 0, {}, None, q.Queue())
        assert seen[-1] == expected
