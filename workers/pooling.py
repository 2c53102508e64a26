"""Pooling: a sequence's hidden states -> one vector, three ways (the grid's ``pooling`` axis; docs/study.md,
"Where this project departs").

- ``mean``: the mean over real tokens (the study's; the authors divided by the padded length, we by the real one).
- ``last``: the hidden state of the last real token, which is the EOS the data path appends to every text
  (``append_eos``; Qwen3-Embedding, E5-Mistral): under causal attention only the last position sees the whole text.
- ``weighted_mean``: SGPT's position-weighted mean (Muennighoff 2022): w_i = i / sum_j j over the real tokens,
  i = 1..n, so later tokens, which have seen more context, count more.

Batches are right-padded throughout (workers/pair_batches.py pads after the text): real tokens sit at positions
0..n-1 of each row, which is what ``last`` and ``weighted_mean`` index by, and what the gradient cache's trim of a
sub-batch to its longest sequence assumes (``assert_right_padded``). None of these is a matmul, so pooling does not
change the hardware FLOP count (core/flops.py).
"""
from __future__ import annotations

from typing import Callable

import torch

POOLINGS = ("mean", "last", "weighted_mean")  # core.spec.POOLINGS, in the same order


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, T, D) hidden states, (B, T) right-padded mask -> (B, D) fp32, not normalised."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    if pooling == "mean":
        return (hidden * m).sum(dim=1).float() / lengths.float()
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths.squeeze(1) - 1].float()  # (B, D): position n - 1, the appended EOS
    if pooling == "weighted_mean":
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device).unsqueeze(0) * mask  # (B, T): 1..n, 0
        w = positions.float() / positions.sum(dim=1, keepdim=True).clamp(min=1).float()  # sums to 1 per row
        return (hidden.float() * w.unsqueeze(-1)).sum(dim=1)
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")


def assert_right_padded(mask: torch.Tensor) -> None:
    """Every row's real tokens come first: the mask never rises again after a 0 (left padding would make the
    sub-batch trim cut real tokens and ``last`` pool a pad)."""
    if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("batch is not right-padded: a real token follows padding")


def append_eos(ids: list[int], eos_id: int, max_length: int) -> list[int]:
    """``last`` pooling's input: the text's tokens, cut to ``max_length - 1``, then the EOS (truncate the text,
    never the EOS). An EOS the tokenizer already put at the end is not doubled."""
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return list(ids[: max_length - 1]) + [eos_id]


def with_eos(encode: Callable[[list[str]], list[list[int]]], eos_id: int,
             max_length: int) -> Callable[[list[str]], list[list[int]]]:
    """An encoder (texts -> token ids, truncated to ``max_length``: workers.pair_files.make_encoder) whose every text
    ends in the EOS, for ``pooling == "last"``."""
    return lambda texts: [append_eos(ids, eos_id, max_length) for ids in encode(texts)]


def eos_id_of(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("pooling 'last' appends the tokenizer's EOS, and this tokenizer has none")
    return int(eos)
