"""Fine-tuning methods, one record each: what the planner, the FLOP and memory arithmetic, the trial's identity, the
grid and the analysis know about a method. Nothing else compares a method's name; they read its record.

A method is defined by which parameters train (docs/study.md, "Grid"):

- full: every parameter;
- freeze: the last ceil(f * L) decoder blocks and the final norm (``f``: the trainable fraction);
- bias: every parameter named ``*bias*`` (GPT-NeoX's LayerNorm biases included; families without biases have
  nothing to train, and the planner skips them);
- lora: low-rank adapters of rank ``r`` on the block's Linears, the base model frozen.

The cost of a training token is the paper's convention (docs/study.md, "FLOP convention"): a forward costs 2·N per
token, a backward 2·N for the activations' gradients plus 2·N_tr for the weights' — except where the input
embedding is frozen and nothing below the first trained block needs a gradient, which the convention credits to
freeze (2·N + 4·N_tr) and not to LoRA or bias (4·N + 2·N_tr). N counts LoRA's adapters.

Adding a method is one ``Method`` registered here (``register``) plus the worker's selection of its trainable
parameters (workers/methods.py, keyed by the record's name). What the worker executes (core/flops.py's hardware
FLOPs) and holds (core/memory.py) follows from the record's fields below. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.models import ModelShape, lora_params, trained_blocks

# The TrialSpec fields (and store columns) a method's hyperparameter can take; every other method leaves them None.
HPARAM_FIELDS = ("lora_rank", "trainable_fraction")
# Which weights a backward computes gradients for, per trained block (core/flops.py's hardware FLOPs).
WEIGHT_GRADS = ("linears", "adapters", "none")


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Cost per real token = ``cost_n`` · N + ``cost_trainable`` · N_tr (the paper's convention). ``hparam``: the
    TrialSpec field of its hyperparameter (one of HPARAM_FIELDS, or None), listed under ``methods.<name>.<grid_key>``
    in the grid and shown as ``<symbol>=<value>`` (``r=8``, ``f=0.25``). ``trains``: which parameters train, for
    N_tr (``all``, ``last_blocks``, ``biases`` or ``adapters``); ``adapters``: the trained parameters are added
    low-rank adapters (rank = the hyperparameter) on the ``lora_targets`` Linears: they join N, are kept as
    peft's adapter state and merged into the base model to serve, and the trial takes LoRA's knobs (alpha,
    dropout, targets)."""

    name: str
    cost_n: float
    cost_trainable: float
    trains: str
    hparam: str | None = None
    grid_key: str | None = None
    symbol: str | None = None
    hparam_title: str | None = None  # "LoRA rank": findings' and figures' headings
    hparam_unit: str | None = None  # "rank": "best rank", "spread over ranks"
    hparam_axis: str | None = None  # the figure's x label
    hparam_integer: bool = False  # a count (LoRA's rank), shown without decimals, ranges >= 1
    hparam_log_axis: bool = False  # its values double (ranks 8, 16, ...): a log2 axis
    # the first block's input needs a gradient: "always" (the embedding trains), "norm" (a trainable norm sits in
    # between: its weight), "norm_bias" (only a norm's bias trains: where the family's norm has one), "never"
    input_grad: str = "never"
    weight_grads: str = "linears"
    empty_reason: str = "model has no trainable parameters"  # the planner's skip reason when N_tr is 0

    @property
    def adapters(self) -> bool:
        return self.trains == "adapters"

    def cost_per_token(self, n_params, n_trainable):
        """FLOP per real token (works elementwise on arrays)."""
        return self.cost_n * n_params + self.cost_trainable * n_trainable

    def param_counts(self, shape: ModelShape, hparam=None, lora_targets=None) -> tuple[int, int]:
        """(N, N_tr): non-embedding parameters and their trainable part, as the trial will have them."""
        n = shape.n_params()
        if self.trains == "all":
            return n, n
        if self.trains == "last_blocks":
            k = trained_blocks(shape.layers, hparam)
            return n, k * shape.block_params() + sum(shape.final_norm_params())  # + the final norm
        if self.trains == "biases":
            return n, shape.bias_params()
        extra = lora_params(shape, hparam, lora_targets)
        return n + extra, extra

    def first_trained_block(self, layers: int, hparam=None) -> int:
        """The lowest block backward reaches (blocks below it save nothing and compute no gradient)."""
        return layers - trained_blocks(layers, hparam) if self.trains == "last_blocks" else 0

    def input_needs_grad(self, shape: ModelShape) -> bool:
        """Whether, in the first block backward reaches, the Linears reading the block's input need its gradient."""
        if self.input_grad == "always":
            return True
        if self.input_grad == "norm":
            return shape.input_norm
        if self.input_grad == "norm_bias":
            return shape.input_norm and shape.block_norm_params()[1] > 0
        return False

    def serving_params(self, n_params, n_trainable):
        """N of the model that serves: adapters merged into their base (their parameters are gone), else N."""
        return n_params - n_trainable if self.adapters else n_params

    def hparam_value(self, row) -> float | None:
        """The slice's hyperparameter from a row (a dict, a pandas row or a TrialSpec): its field's value as a
        float, None where the method has none (or the value is missing)."""
        if self.hparam is None:
            return None
        value = getattr(row, self.hparam, None) if not hasattr(row, "get") else row.get(self.hparam)
        if value is None or value != value:  # None or NaN
            return None
        return float(value)

    def hparam_fields(self, hparam) -> dict:
        """{field: value} of every HPARAM_FIELDS entry for this method at ``hparam`` (None elsewhere), typed as the
        spec and the store keep them."""
        out = dict.fromkeys(HPARAM_FIELDS)
        if self.hparam is not None and hparam is not None:
            out[self.hparam] = int(hparam) if self.hparam_integer else float(hparam)
        return out

    def show(self, hparam) -> str:
        """``r=8``, ``f=0.25``; "" without a hyperparameter."""
        if self.hparam is None or hparam is None or hparam != hparam:
            return ""
        return f"{self.symbol}={int(hparam) if self.hparam_integer else f'{hparam:g}'}"

    def label(self, hparam) -> str:
        """``lora r=8``, ``freeze f=0.5``, ``full``."""
        shown = self.show(hparam)
        return f"{self.name} {shown}" if shown else self.name


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` (after the built-in ones in every table's order); a name taken is an error."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.hparam is not None and method.hparam not in HPARAM_FIELDS:
        raise ValueError(f"method {method.name}: hparam must be one of {', '.join(HPARAM_FIELDS)}")
    if method.weight_grads not in WEIGHT_GRADS:
        raise ValueError(f"method {method.name}: weight_grads must be one of {', '.join(WEIGHT_GRADS)}")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes a registered method (tests register throwaway ones)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The methods, in the grid's and the reports' order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The record of method ``name``; an unknown name is a ValueError naming the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method: {name!r} is not one of {', '.join(_REGISTRY)}") from None


def param_counts(shape: ModelShape, method: str, lora_rank: int | None = None,
                 trainable_fraction: float | None = None, lora_targets: tuple[str, ...] | None = None
                 ) -> tuple[int, int]:
    """(N, N_tr) of ``method`` on ``shape``. ``lora_targets`` None: the family's default (every Linear of the
    blocks)."""
    record = get(method)
    hparam = {"lora_rank": lora_rank, "trainable_fraction": trainable_fraction}.get(record.hparam)
    return record.param_counts(shape, hparam, lora_targets)


FULL = register(Method("full", cost_n=6.0, cost_trainable=0.0, trains="all", input_grad="always"))
FREEZE = register(Method(
    "freeze", cost_n=2.0, cost_trainable=4.0, trains="last_blocks", hparam="trainable_fraction",
    grid_key="trainable_fraction", symbol="f", hparam_title="trainable fraction", hparam_unit="fraction",
    hparam_axis="trainable fraction of blocks f", input_grad="norm"))
BIAS = register(Method("bias", cost_n=4.0, cost_trainable=2.0, trains="biases", input_grad="norm_bias",
                       weight_grads="none", empty_reason="model has no bias parameters"))
LORA = register(Method(
    "lora", cost_n=4.0, cost_trainable=2.0, trains="adapters", hparam="lora_rank", grid_key="rank", symbol="r",
    hparam_title="LoRA rank", hparam_unit="rank", hparam_axis="LoRA rank r", hparam_integer=True,
    hparam_log_axis=True, weight_grads="adapters"))
