"""A trial's memory on its device, estimated before it runs: pure arithmetic (no torch), so the planner sizes trials
(GPU share, DeepSpeed, gradient checkpointing) and the trial picks its chunk from the same model.

What a trial holds (workers/steps.py loads every weight in fp32 and trains with bf16 autocast and AdamW):

- weights: every parameter, embeddings included, 4 bytes (ZeRO-3: sharded over the ranks);
- autocast's bf16 copies: a Linear run under autocast saves its bf16 weight for backward, 2 bytes per block
  parameter for each forward alive in the graph — one with the gradient cache, two (the queries' and the documents')
  when the whole batch runs in one pass; an upper bound, frozen blocks below the trained ones save none;
- gradients, 4 bytes per trainable parameter, and AdamW's two fp32 moments, 8 (ZeRO-2 and -3: sharded);
- activations, per token of every block that backward reaches: the tensors its matmuls, norms and activation
  function save, in bf16 (2 bytes each) — Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", Sec. 4.1) count 34·h bytes per token and layer for a GPT block with dropout; ours has no
  dropout and any MLP width, and eager attention (the CPU path) adds the score and probability matrices
  (2·heads·T values per token), which SDPA on a GPU does not keep. With gradient checkpointing each block keeps only
  its input (the fp32 residual stream, 4·h bytes) and one block at a time holds its full set while recomputed;
- DeepSpeed ZeRO's own buffers (``zero_buffers``): an fp32 master copy of this rank's partition of the trainable
  parameters (ZeRO 1, 2 and 3 keep one even when the weights are fp32 already: runtime/zero/stage_1_and_2.py,
  ``single_partition_of_fp32_groups``, a clone), and under ZeRO 1/2 the contiguous gradient bucket of
  ``reduce_bucket_size`` elements in the gradients' dtype (fp32 here), allocated whole whatever the model's size:
  DeepSpeed's default 5e8 elements is 2 GB (``setup_buckets``; a second one with ``overlap_comm``, off by default
  for ZeRO 1/2). The updated partitions are all-gathered into the flat parameter buffer in place (runtime/utils.py
  ``all_gather_dp_groups``, ``allgather_bucket_size`` only sets the number of calls): no buffer of its own;
- a fixed overhead: the CUDA context, cuBLAS workspaces and the allocator's slack (~1 GiB on an H100);
- a margin of 10 % for fragmentation.

The gradient cache (workers/loss.py) embeds the batch in chunks of ``chunk`` pairs, so activations scale with the
chunk, not the batch: ``choose`` takes the largest chunk that fits, and turns checkpointing on only when not even
``MIN_CHUNK`` pairs fit without it (checkpointing costs a third forward per chunk; a smaller chunk costs nothing
but smaller kernels).

Checkpoints: trainable weights and AdamW's state (12 bytes per trainable parameter); ``checkpoint_interval_s``
spaces saves so that writing them costs at most ``CHECKPOINT_OVERHEAD`` of the trial's time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from core import methods
from core.models import ModelShape

GIB = 1 << 30
OVERHEAD_BYTES = 1 * GIB
MARGIN = 1.10
ZERO3_MAX_LIVE_PARAMETERS = 10**9
ZERO_REDUCE_BUCKET_ELEMENTS = 5 * 10**8  # DeepSpeed's default reduce_bucket_size (runtime/zero/config.py)
MIN_CHUNK = 16  # pairs: 2 x 16 x 75 = 2,400 tokens per matmul, enough rows to keep a GPU's tensor cores busy
# checkpoints: an object store takes a few hundred MB/s from one writer; saves may cost 5 % of the trial's time
WRITE_BYTES_PER_S = 250e6
CHECKPOINT_OVERHEAD = 0.05


@dataclass(frozen=True)
class Footprint:
    """Bytes one device holds for a trial (see the module's docstring); ``per_pair``: activations of one pair
    (query and document at ``max_length``) without checkpointing, ``per_pair_checkpointed`` with it."""

    weights: int
    weight_copies: int
    gradients: int
    optimizer: int
    per_pair: int
    per_pair_checkpointed: int
    overhead: int = OVERHEAD_BYTES
    zero_buffers: int = 0  # DeepSpeed ZeRO's master partition and gradient bucket (``zero_buffer_bytes``)

    @property
    def static(self) -> int:
        """Everything but the activations."""
        return self.weights + self.weight_copies + self.gradients + self.optimizer + self.zero_buffers + self.overhead

    def total(self, chunk: int, checkpointing: bool, one_pass: bool = False) -> int:
        """Peak bytes with ``chunk`` pairs' activations. ``one_pass``: the whole batch in one graph (no gradient
        cache), where the query forward and the document forward each hold their own bf16 weight copies."""
        per_pair = self.per_pair_checkpointed if checkpointing else self.per_pair
        copies = self.weight_copies if one_pass else 0
        return math.ceil(round((self.static + copies + chunk * per_pair) * MARGIN, 6))  # 840 x 1.1 = 924, not 925


def footprint(shape: ModelShape, method: str, max_length: int, *, lora_rank: int | None = None,
              trainable_fraction: float | None = None, lora_targets: tuple[str, ...] | None = None,
              eager_attention: bool = False, shards: int = 1, zero_stage: int = 0,
              overhead: int = OVERHEAD_BYTES, tokens_per_pair: float | None = None,
              reduce_bucket_elements: int = ZERO_REDUCE_BUCKET_ELEMENTS) -> Footprint:
    """The trial's footprint on one device. ``shards``/``zero_stage``: a DeepSpeed trial over ``shards`` ranks
    (stage 2 shards gradients and AdamW's state, stage 3 the weights too; each rank embeds its share of the batch,
    which ``chunk`` counts). Activations: padded, every text at ``max_length`` (the worst case: a random batch's
    documents are padded to about that); packed (workers/packing.py), ``tokens_per_pair`` real tokens a pair (the
    planner's measure; rows carry no padding but their tails, ~1 %)."""
    n, n_tr = methods.param_counts(shape, method, lora_rank, trainable_fraction, lora_targets)
    n_all = n + shape.vocab * shape.hidden  # the input embedding (AutoModel loads no LM head)
    weight_shards = shards if zero_stage >= 3 else 1
    state_shards = shards if zero_stage >= 2 else 1
    reached = shape.layers - methods.get(method).first_trained_block(shape.layers, trainable_fraction)
    per_token = activation_bytes_per_token(shape, max_length, eager_attention)
    # outside the blocks: the final norm's input (LayerNorm) or input and output (RMSNorm), fp32
    outside = (4 if shape.family == "gpt_neox" else 8) * shape.hidden
    per_token_ckpt = 4 * shape.hidden * reached + per_token + outside  # block inputs (fp32), one block recomputed
    tokens = min(tokens_per_pair, 2 * max_length) if tokens_per_pair else 2 * max_length
    # ZeRO-3 gathers each block's weights for its forward and backward, in fp32 (workers/distributed.py keeps
    # autocast's bf16 tag off them, so that gradients reduce in fp32): up to stage3_max_live_parameters (DeepSpeed's
    # default 1e9) live at once
    gathered = 4 * min(n_all, ZERO3_MAX_LIVE_PARAMETERS) if zero_stage >= 3 and shards > 1 else 0
    return Footprint(
        weights=4 * n_all // weight_shards + gathered,
        weight_copies=2 * n // weight_shards,
        gradients=4 * n_tr // state_shards,
        optimizer=8 * n_tr // state_shards,
        per_pair=math.ceil(tokens * (per_token * reached + outside)),
        per_pair_checkpointed=math.ceil(tokens * per_token_ckpt),
        overhead=overhead,
        zero_buffers=zero_buffer_bytes(n_tr, shards, zero_stage, reduce_bucket_elements),
    )


def zero_buffer_bytes(n_trainable: int, shards: int, zero_stage: int,
                      reduce_bucket_elements: int = ZERO_REDUCE_BUCKET_ELEMENTS) -> int:
    """What a DeepSpeed ZeRO rank allocates beyond the model, its gradients and AdamW's state (the module's
    docstring): the fp32 master partition, 4 bytes per trainable parameter over the ranks (its share rounded up:
    DeepSpeed pads the flat buffer to split evenly), and under ZeRO 1/2 the 4-byte gradient bucket of
    ``reduce_bucket_elements``. None without ZeRO (``zero_stage`` 0)."""
    if zero_stage < 1:
        return 0
    master = 4 * math.ceil(n_trainable / max(shards, 1))
    bucket = 4 * reduce_bucket_elements if zero_stage in (1, 2) else 0
    return master + bucket


def activation_bytes_per_token(shape: ModelShape, seq_len: int, eager_attention: bool) -> int:
    """Bytes one block saves for backward per token, as torch's autograd saves them under bf16 autocast (counted
    with ``saved_tensors_hooks`` per family: tests/workers/test_memory_plan.py):

    - every Linear its own bf16 copy of its input (autocast casts per op: Llama's q, k and v projections save three
      copies of the normed input, GPT-NeoX's fused qkv one), 2 bytes per input feature;
    - attention: Q, K and V at every head (grouped K/V are repeated first), bf16; eager attention (the CPU path) also
      the scores in fp32 and the probabilities in bf16 (6 bytes per head and key), which SDPA does not keep;
    - the MLP's activation: its input (GELU), or gate, up and activation outputs (gated MLPs), bf16;
    - norms, fp32: LayerNorm its input (GPT-NeoX's two read the same one, with a parallel residual), RMSNorm its input
      and its normalised output, per norm (Gemma has four a block; Qwen3, Gemma 3 and OLMo 2 also norm Q and K).

    For Pythia-1b (h = a = 2048, I = 8192) that is 8h + 8a + 4I = 32·h bytes per token and block plus the scores,
    against Korthikanti et al.'s 34·h for a GPT block with dropout."""
    h, a, kv = shape.hidden, shape.attn_width, shape.kv * shape.hd
    gated = shape.family != "gpt_neox"  # every other family here has a gated MLP (SwiGLU / GeGLU)
    linear_inputs = 2 * sum(i for i, _, _ in shape.linears().values())
    scores = 10 if shape.family == "gemma2" else 6  # Gemma 2 soft-caps its logits (tanh): one more fp32 copy
    attention = 2 * 3 * a + (scores * shape.heads * seq_len if eager_attention else 0)
    mlp = 2 * shape.intermediate * (3 if gated else 1)
    if shape.family == "gpt_neox":
        norms = 4 * h * (1 if shape.parallel_residual else 2)
    else:
        norms = 8 * h * (4 if shape.family in ("gemma2", "gemma3_text") else 2)
        if shape.family in ("qwen3", "gemma3_text", "olmo2"):
            norms += 8 * (a + kv)
    return linear_inputs + attention + mlp + norms


def choose(fp: Footprint, budget: float, batch: int, checkpointing: bool | str = "auto"
           ) -> tuple[bool, int] | None:
    """(checkpointing, chunk in pairs) for a device budget of ``budget`` bytes: the largest chunk (a power of
    two, or the whole batch) that fits; checkpointing as asked, or under "auto" only when not even
    ``min(MIN_CHUNK, batch)`` pairs fit without it. None: nothing fits (not even one pair with checkpointing)."""
    options = (False, True) if checkpointing == "auto" else (bool(checkpointing),)
    for ckpt in options:
        chunk = largest_chunk(fp, budget, batch, ckpt)
        if chunk and (chunk >= min(MIN_CHUNK, batch) or ckpt == options[-1]):
            return ckpt, chunk
    return None


def fits_one_pass(fp: Footprint, budget: float, batch: int, checkpointing: bool = False) -> bool:
    """Whether the whole batch runs as one forward and backward in ``budget`` bytes (no gradient cache: each
    embedding's graph alive at once, with its own bf16 weight copies). Then the step recomputes nothing: the
    gradient cache's extra no-grad forward (a third of a full fine-tuning step's FLOP) is saved."""
    return fp.total(batch, checkpointing, one_pass=True) <= budget


def largest_chunk(fp: Footprint, budget: float, batch: int, checkpointing: bool) -> int:
    """The largest chunk that fits ``budget``: the batch itself (one pass, ``fits_one_pass``), else a power of two
    below it (0: not one pair)."""
    if fits_one_pass(fp, budget, batch, checkpointing):
        return batch
    per_pair = fp.per_pair_checkpointed if checkpointing else fp.per_pair
    room = budget / MARGIN - fp.static
    if room < per_pair:
        return 0
    fit = min(int(room // per_pair), batch - 1)
    return 2 ** int(math.log2(fit)) if fit >= 1 else 0


def checkpoint_bytes(n_trainable: int) -> int:
    """A checkpoint's tensors: the trainable weights and AdamW's two moments, fp32."""
    return 12 * n_trainable


def checkpoint_interval_s(nbytes: int, floor_s: float) -> float:
    """Seconds between checkpoints: ``floor_s`` (the grid's ``run.checkpoint_every_s``), or more, so that writing
    ``nbytes`` at ``WRITE_BYTES_PER_S`` takes at most ``CHECKPOINT_OVERHEAD`` of the time (a 12 GB checkpoint, 1B
    full fine-tuning: a 48 s write, every 16 min)."""
    return max(floor_s, nbytes / WRITE_BYTES_PER_S / CHECKPOINT_OVERHEAD)
