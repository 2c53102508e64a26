"""The grid file (docs/reference.md "Grid file"): YAML -> a frozen, typed ``Grid`` -> trials.

Validated at the edge: unknown keys, wrong types, out-of-range values and a hyperparameter given to the wrong
method raise ``GridError`` with one line ``<file>: <dotted.path>: <problem>``; nothing downstream re-validates.
Relative model and data paths resolve against ``base_dir`` (default: the grid file's directory).

Trial identity: ``trial_id`` is the first 16 hex digits of sha256 over the canonical JSON of
``TrialSpec.identity()`` in which the model and the data are written *as in the grid* (normalised:
``./models/a/`` == ``models/a``), not as resolved on this machine. So the same grid gives the same ids across
submits, machines and checkouts; moving data files changes ids only if the URI written in the grid changes
(and editing a file in place changes none: the id hashes the URI, not the content). Runtime knobs
(``run.report_every``, ``run.checkpoint_every_s``, ``run.chunk_size``, ``run.packing``, ``run.save_model``, the
planner's tokens-per-pair) never change an id; LoRA's ``alpha``/``dropout``/``targets`` change only LoRA trials' ids.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from core import methods
from core.models import ModelConfigError, auto_lr, model_shape, read_config
from core.spec import ATTENTIONS, BATCHING, KEEP_WEIGHTS, PACKINGS, POOLINGS, DeepSpeedConfigError, TrialSpec, default, parse_deepspeed_override
from core.spec import replicate_seed
from core.spec import trial_id
from core.strategy import STRATEGIES, AdaptiveConfig
from core.uris import SCHEMES as DATA_SCHEMES
from core.uris import StorageError, check_no_credentials, is_remote, local_path, redact
from orchestrator.errors import GridError

SWEEP_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
# run.mirror's trackers -> the module each one's extra installs (pyproject.toml: repurpose[mlflow], repurpose[wandb])
MIRROR_MODULES = {"mlflow": "mlflow", "wandb": "wandb"}
MIRRORS = tuple(MIRROR_MODULES)


# --- value types: YAML scalars -> typed values, with the messages users see ---------------------------------
def _got(v: Any) -> dict:
    return {"got": repr(v) if len(repr(v)) <= 40 else type(v).__name__}


def _number(v: Any) -> float:
    """A finite number. Strings too: PyYAML (YAML 1.1) reads ``1.5e15`` and ``1e9`` as strings."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise PydanticCustomError("number_type", "must be a number, got {got}", _got(v))
    try:
        x = float(v)
    except ValueError:
        raise PydanticCustomError("number_type", "must be a number, got {got}", _got(v)) from None
    if not math.isfinite(x):
        raise PydanticCustomError("number_finite", "must be a finite number, got {got}", _got(v))
    return x


def _int(v: Any) -> int:
    """An integer; ``8.0`` and ``"2.1e6"`` are accepted (integral), ``8.5``, ``true`` and ``"eight"`` are not."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, (float, str)) and not isinstance(v, bool):
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if math.isfinite(x) and x.is_integer():
            return int(x)
    raise PydanticCustomError("int_type", "must be an integer, got {got}", _got(v))


def _listify(v: Any) -> Any:
    """``rank: 8`` means ``rank: [8]``."""
    return [v] if isinstance(v, (int, float, str)) else v


def _unique(values: tuple) -> tuple:
    seen = set()
    for v in values:
        if v in seen:
            raise PydanticCustomError("duplicate", "{value} is listed twice", {"value": repr(v)})
        seen.add(v)
    return values


def _auto_or(parse, ok, what: str):
    """A validator: 'auto', or a value ``parse`` reads and ``ok`` accepts; ``what`` names the value in the error
    ("a number > 0", "an integer >= 0")."""
    def check(v: Any):
        if v == "auto":
            return v
        try:
            x = parse(v)
        except PydanticCustomError:
            x = None
        if x is None or not ok(x):
            raise PydanticCustomError("auto_or", "must be 'auto' or {what}, got {got}", {"what": what, **_got(v)})
        return x
    return check


def _auto_or_positive(what: str):
    """'auto', or a number > 0 (``what`` names it in the error: "a number", "a number of GB")."""
    return _auto_or(_number, lambda x: x > 0, f"{what} > 0")


_lr = _auto_or_positive("a number")
_gpus = _auto_or(_int, lambda n: n >= 0, "an integer >= 0")


def _lr_axis(v: Any) -> float | str | tuple:
    """``lr: 1e-4`` or ``lr: auto`` as before; ``lr: [1e-4, 3e-4]`` a grid axis (a list of one is its item, so a
    stored grid reads back the same)."""
    if not isinstance(v, (list, tuple)):
        return _lr(v)
    if not v:
        raise PydanticCustomError("too_short", "must not be empty")
    values = _unique(tuple(_lr(x) for x in v))
    return values if len(values) > 1 else values[0]


def _instruction_axis(v: Any) -> tuple:
    """``query_instruction: "..."`` or a list of them (a grid axis); "" is none (today's trials)."""
    values = _listify(v)
    if not isinstance(values, (list, tuple)) or not values:
        raise PydanticCustomError("instruction", "must be a string or a non-empty list of strings")
    for x in values:
        if not isinstance(x, str):
            raise PydanticCustomError("instruction", "must be a string or a list of strings, got {got}", _got(x))
    return _unique(tuple(values))


def _auto_bool(v: Any) -> bool | str:
    if v == "auto" or isinstance(v, bool):
        return v
    raise PydanticCustomError("auto_bool", "must be auto, true or false, got {got}", _got(v))


Number = Annotated[float, BeforeValidator(_number)]
Int = Annotated[int, BeforeValidator(_int)]
Text = Annotated[str, Field(min_length=1)]
StrictBool = Annotated[bool, Field(strict=True)]


def _listify_or_none(v: Any) -> Any:
    """``mirror:`` (YAML null) is an empty list."""
    return () if v is None else _listify(v)


def _list_of(item: Any) -> Any:
    """A non-empty list of distinct items (a scalar is a list of one)."""
    return Annotated[tuple[item, ...], BeforeValidator(_listify), Field(min_length=1), AfterValidator(_unique)]


# --- the grid's sections -----------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Optional(_Section):
    """A section that may be left empty: `train:` (nothing after the colon) is YAML null = the defaults."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_defaults(cls, data: Any) -> Any:
        return {} if data is None else data


# LoRA's knobs, taken by every method that trains adapters (core.methods.Method.adapters): (type, default)
_ADAPTER_KNOBS = {
    "alpha": (Annotated[Number, Field(gt=0)] | None, None),  # None: peft's default, as the authors' code
    "dropout": (Annotated[Number, Field(ge=0, lt=1)], 0.0),
    # Linears adapted, by module name; default: every Linear of the family's blocks (for GPT-NeoX exactly the
    # authors' four, core.models.LORA_TARGETS; embed_in left out). Checked against each model's family.
    "targets": (_list_of(Text) | None, None),
}


def _method_config(record: methods.Method) -> type[_Optional]:
    """A method's section, from its record: its hyperparameter's list (a count >= 1, or a fraction in (0, 1]),
    then the adapter knobs where it trains adapters."""
    fields: dict[str, Any] = {}
    if record.grid_key:
        value = Annotated[Int, Field(ge=1)] if record.hparam_integer else Annotated[Number, Field(gt=0, le=1)]
        fields[record.grid_key] = (_list_of(value), ...)
    if record.adapters:
        fields.update(_ADAPTER_KNOBS)
    name = "".join(part.capitalize() for part in record.name.replace("-", "_").split("_")) + "Config"
    return create_model(name, __base__=_Optional, **fields)


class _Methods(_Section):
    """``methods:``, one optional section per registered method (``methods_model`` adds them)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_selected(cls, data: Any) -> Any:
        # `bias:` selects the method with its defaults; None here would mean "not in the grid"
        if isinstance(data, dict):
            return {k: ({} if v is None else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _at_least_one(self) -> "_Methods":
        if not self.selected():
            raise PydanticCustomError("no_method", "must name at least one of " + ", ".join(methods.names()))
        return self

    def selected(self) -> tuple[str, ...]:
        return tuple(m for m in type(self).model_fields if getattr(self, m) is not None)

    def config(self, method: str):
        """The section of ``method`` (None: not in the grid)."""
        return getattr(self, method, None)

    def cells(self) -> tuple[tuple[str, int | None, float | None], ...]:
        """(method, lora_rank, trainable_fraction) per method hyperparameter setting, in the methods' order."""
        out = []
        for m in self.selected():
            record = methods.get(m)
            values = getattr(self.config(m), record.grid_key) if record.grid_key else (None,)
            out += [(m, *record.hparam_fields(v).values()) for v in values]
        return tuple(out)


def methods_model() -> tuple[type[_Methods], dict[str, type[_Optional]]]:
    """The ``methods:`` section and each method's section, built from the registered records (core.methods)."""
    configs = {m: _method_config(methods.get(m)) for m in methods.names()}
    model = create_model("Methods", __base__=_Methods, **{m: (c | None, None) for m, c in configs.items()})
    return model, configs


Methods, METHOD_CONFIGS = methods_model()


def _data_uri(uri: str) -> str:
    """A data path or URI: no credentials in it (the grid is printed and stored; the error masks them), and a
    scheme the data layer opens."""
    try:
        check_no_credentials(uri)
    except StorageError as e:
        raise PydanticCustomError("credentials", "{problem}", {"problem": str(e)}) from None
    scheme = uri.split("://", 1)[0] if "://" in uri else None
    if scheme is not None and scheme not in (*DATA_SCHEMES, "file"):
        raise PydanticCustomError("scheme", "{uri}: unsupported scheme '{scheme}' (use a local path, s3:// or gs://)",
                                  {"uri": uri, "scheme": scheme})
    return uri


DataURI = Annotated[Text, AfterValidator(_data_uri)]


class DataConfig(_Section):
    train: DataURI  # BGE JSONL or Parquet: path, glob or s3:// / gs:// URI
    eval: DataURI | None = None  # held-out pairs for eval_loss


class NegativesConfig(_Section):
    """``train.negatives: {hard: k}``: k mined negatives per pair from the data's ``neg`` lists (a pair with fewer
    is skipped and counted: workers/records.py)."""

    hard: Annotated[Int, Field(ge=1)]


class TrainConfig(_Optional):
    """Defaults are the paper's (docs/study.md "Training recipe"), read from core.spec.TrialSpec's fields."""

    batch_size: Annotated[Int, Field(ge=2)] = default("batch_size")  # in-batch negatives need 2
    temperature: Annotated[Number, Field(gt=0)] = default("temperature")
    max_length: Annotated[Int, Field(ge=1)] = default("max_length")
    # auto: pretraining lr / 10; a list is an axis
    lr: Annotated[float | Literal["auto"] | tuple[float | Literal["auto"], ...], BeforeValidator(_lr_axis)] = "auto"
    warmup_fraction: Annotated[Number, Field(ge=0, lt=1)] = default("warmup_fraction")
    weight_decay: Annotated[Number, Field(ge=0)] = default("weight_decay")
    seed: Int = default("seed")
    precision: Literal["auto", "bf16", "fp32"] = default("precision")
    # auto: only where the memory model needs it (core/memory.py); true / false force it
    gradient_checkpointing: Annotated[bool | Literal["auto"], BeforeValidator(_auto_bool)] = default(
        "gradient_checkpointing")
    batching: Literal[BATCHING] = default("batching")  # random (the paper's) | length_buckets (opt-in)
    # the knobs (docs/reference.md "Knobs"): each a grid axis, absent = today's trials
    lr_scale: _list_of(Annotated[Number, Field(gt=0)]) = (1.0,)  # factors around lr (auto or given)
    negatives: NegativesConfig | None = None  # {hard: k}: k mined negatives per pair from the data's `neg`
    attention: _list_of(Literal[ATTENTIONS]) = (default("attention"),)
    query_instruction: Annotated[tuple[str, ...], BeforeValidator(_instruction_axis)] = (default("query_instruction"),)

    @model_validator(mode="after")
    def _one_lr_to_scale(self) -> "TrainConfig":
        if isinstance(self.lr, tuple) and self.lr_scale != (1.0,):
            raise PydanticCustomError("lr_scale", "lr_scale scales one lr; with a list of lr, list the lr instead")
        return self

    def lrs(self) -> tuple[float | str, ...]:
        """The lr values of the grid as written (``auto`` or numbers)."""
        return self.lr if isinstance(self.lr, tuple) else (self.lr,)

    def hard_negatives(self) -> int:
        return 0 if self.negatives is None else self.negatives.hard
    # torch.compile of the blocks: auto = on CUDA past the break-even (core/throughput.py); not in the trial id
    compile: Annotated[bool | Literal["auto"], BeforeValidator(_auto_bool)] = default("compile")


class PlanConfig(_Optional):
    min_steps: Annotated[Int, Field(ge=1)] = 10  # fewer optimizer steps than this: skipped
    max_epochs: Annotated[Number, Field(gt=0)] = default("max_epochs")  # more passes over the training pairs than this: skipped
    tokens_per_pair: Annotated[Number, Field(gt=0)] | None = None  # overrides the measurement on the data
    train_pairs: Annotated[Int, Field(ge=1)] | None = None  # overrides counting the training pairs
    sample_pairs: Annotated[Int, Field(ge=1)] = 1024  # pairs read to measure tokens per pair


class ResourcesConfig(_Optional):
    """Per-trial resources (orchestrator.plan.size_trial): CPU-only clusters use ``cpus_per_trial``
    CPUs; on GPU clusters models with N below ``gpu_fraction_below_params`` share a GPU
    (``gpu_fraction`` each), larger ones take one GPU, and trials with N_tr >= ``deepspeed_from_params``
    take ``deepspeed_gpus`` GPUs of one node (default: all of them) under DeepSpeed ZeRO. Where the GPUs' memory
    is known (``gpu_memory_gb``, else the cluster's accelerator type, else `plan --device`), a trial whose memory
    (core/memory.py) does not fit that share takes more: a larger share, one GPU, then DeepSpeed over 2, 4, ...
    GPUs."""

    gpus: Annotated[int | Literal["auto"], BeforeValidator(_gpus)] = "auto"  # GPUs per node; auto: ask Ray
    cpus_per_trial: Annotated[Number, Field(gt=0)] = 1.0
    gpu_fraction: Annotated[Number, Field(gt=0, le=1)] = 0.25
    gpu_fraction_below_params: Annotated[Number, Field(ge=0)] = 1e8  # Pythia 14m-160m share a GPU
    deepspeed_from_params: Annotated[Number, Field(gt=0)] = 1e9
    deepspeed_gpus: Annotated[Int, Field(ge=1)] | None = None
    # memory of one GPU in GB; auto: from the cluster's accelerator type (Ray's accelerator_type:*), or `plan --device`
    gpu_memory_gb: Annotated[float | Literal["auto"], BeforeValidator(_auto_or_positive("a number of GB"))] = "auto"


class RunConfig(_Optional):
    max_concurrent_trials: Annotated[Int, Field(ge=1)] | None = None  # None: as many as resources allow
    max_failures: Annotated[Int, Field(ge=0)] = 2  # retries of a failed trial (from its checkpoint)
    checkpoint_every_s: Annotated[Number, Field(gt=0)] = default("checkpoint_every_s")
    report_every: Annotated[Int, Field(ge=1)] = default("report_every")  # optimizer steps between metrics rows
    # seconds between reports to the driver (rows batched)
    report_every_s: Annotated[Number, Field(ge=0)] = default("report_every_s")
    eval_every: Annotated[Int, Field(ge=0)] = default("eval_every")  # steps between evaluations; 0: at the end
    eval_pairs: Annotated[Int, Field(ge=1)] = default("eval_pairs")
    chunk_size: Annotated[Int, Field(ge=1)] | None = default("chunk_size")  # gradient-cache sub-batch; None: auto
    packing: Literal[PACKINGS] = default("packing")  # texts packed in rows, no padding (workers/packing.py)
    save_model: StrictBool = default("save_model")
    # trainable: a completed trial keeps what it trained (adapter, blocks, biases or the whole model) under
    # <sweep>/models/<trial_id>/, pickle-free, for `repurpose export`; none: nothing kept
    keep_weights: Literal[KEEP_WEIGHTS] = default("keep_weights")
    # true: `submit` tokenises the data once per tokenizer into <storage>/_cache/ (Ray Data) and trials read ids
    # from it (`repurpose prepare` builds it alone); false: every trial tokenises the raw data itself
    token_cache: StrictBool = True
    # DeepSpeed trials: a JSON object (inline, or a path / s3:// / gs:// URI) merged over the default ZeRO-2 config
    deepspeed_config: Text | None = None
    # experiment trackers that get a copy of every metric row (orchestrator/tuning.py, Ray Tune's logger callbacks);
    # the store stays the source of truth, a tracker that fails is warned about once and dropped. Never in an id.
    mirror: Annotated[tuple[Literal[MIRRORS], ...], BeforeValidator(_listify_or_none), AfterValidator(_unique)] = ()
    mlflow_tracking_uri: Text | None = None  # None: $MLFLOW_TRACKING_URI, else <sweep>/mlflow.db on a local store
    wandb_project: Text | None = None  # None: $WANDB_PROJECT, else the sweep's name

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is not None and redact(v) != v:  # the grid is printed and stored
            raise ValueError(f"{redact(v)}: credentials in a URI are refused: give them in MLFLOW_TRACKING_USERNAME "
                             "/ MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
        return v

    @field_validator("deepspeed_config")
    @classmethod
    def _deepspeed_override(cls, v: str | None) -> str | None:
        if v is not None and v.lstrip().startswith("{"):  # inline JSON: checked here (a file: by the trial)
            try:
                parse_deepspeed_override(v)
            except DeepSpeedConfigError as e:
                raise ValueError(str(e).removeprefix("deepspeed_config").lstrip(":. ")) from None
        return v


def _knob(name: str):
    return AdaptiveConfig.__dataclass_fields__[name].default


class AdaptiveKnobs(_Optional):
    """``strategy: adaptive``'s knobs (core/strategy.py AdaptiveConfig; defaults chosen by benchmarks/adaptive.py)."""

    margin: Annotated[Number, Field(ge=0, lt=1)] = _knob("margin")  # relative loss kept within the best
    neighbours: Annotated[Int, Field(ge=0)] = _knob("neighbours")  # model sizes kept each side of the optimum
    full_rungs: Annotated[Int, Field(ge=1)] = _knob("full_rungs")  # rungs run in full before any pruning
    dominated_rungs: Annotated[Int, Field(ge=1)] = _knob("dominated_rungs")  # before a method is pruned
    n_boot: Annotated[Int, Field(ge=0)] = _knob("n_boot")  # bootstrap refits behind each decision's interval
    replicates: Annotated[Int, Field(ge=1)] = _knob("replicates")  # most runs of a close cell (1: no replicates)
    noise_rungs: Annotated[Int, Field(ge=0)] = _knob("noise_rungs")  # first rungs run every cell several times
    noise_runs: Annotated[Int, Field(ge=2)] = _knob("noise_runs")  # how many: what measures the noise
    decide_runs: Annotated[Int, Field(ge=1)] = _knob("decide_runs")  # most runs of an unsettled recipe's cells
    decide_flops: Annotated[Number, Field(ge=0)] = _knob("decide_flops")  # last rung: settle the recipe within it

    def config(self) -> AdaptiveConfig:
        return AdaptiveConfig(**self.model_dump())


class Grid(_Section):
    name: Annotated[str, Field(pattern=SWEEP_NAME_PATTERN)]
    models: _list_of(Text)  # HF names or local paths of GPT-NeoX (Pythia) checkpoints
    methods: Methods
    # how a text's hidden states become one embedding: a grid axis (docs/reference.md); mean is the study's
    pooling: _list_of(Literal[POOLINGS]) = (default("pooling"),)
    budgets: _list_of(Annotated[Number, Field(gt=0)])  # FLOP, paper convention
    data: DataConfig
    # grid: every cell; adaptive: the budgets as rungs, cells that cannot be on the frontier pruned (never part of a
    # trial's id: a later `strategy: grid` submit of the same grid runs exactly the pruned cells)
    strategy: Literal[STRATEGIES] = "grid"
    adaptive: AdaptiveKnobs = AdaptiveKnobs()
    # runs of every cell, each with its own seed (train.seed + replicate): the spread between them is the run-to-run
    # noise the analysis measures; a cell's first run keeps the id it has without replicates
    seeds: Annotated[Int, Field(ge=1)] = 1
    train: TrainConfig = TrainConfig()
    plan: PlanConfig = PlanConfig()
    resources: ResourcesConfig = ResourcesConfig()
    run: RunConfig = RunConfig()
    # Where relative paths resolve; load_grid sets it to an absolute directory (default: the grid file's), and
    # the store's copy of the grid keeps it, so `resume` finds the same files.
    base_dir: str | None = None

    def resolve(self, ref: str) -> str:
        """A data path or URI as the workers open it: relative paths against ``base_dir``."""
        if "://" in ref:
            return ref
        path = os.path.expanduser(ref)
        return os.path.normpath(path if os.path.isabs(path) else os.path.join(self.base_dir or ".", path))

    def model_path(self, model: str) -> str:
        """A model as the workers load it: a local checkpoint directory, else the HF name as written."""
        if _looks_local(model) or os.path.exists(self.resolve(model)):
            return self.resolve(model)
        return model

    def to_yaml(self) -> str:
        """The resolved grid (``base_dir`` absolute) as YAML: what the store keeps and ``resume`` reloads."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _looks_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..")


# --- loading -----------------------------------------------------------------------------------------------
def load_grid(path: str) -> Grid:
    """Read, validate and resolve a grid file; any problem is a GridError naming ``path`` and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise GridError.at(path, None, f"cannot read the grid file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise GridError.at(path, None, f"cannot read the grid file (not UTF-8 text: byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GridError.at(path, where, f"invalid YAML: {problem}") from None
    grid = parse_grid(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
    check_mirrors(grid, path)
    return grid


def check_mirrors(grid: Grid, source: str, sweep_uri: str | None = None) -> None:
    """Every tracker of ``run.mirror`` is installed (its extra), and, given the sweep's store, MLflow has somewhere
    to write. Checked where a sweep is planned or run (load_grid; the driver, before Ray), not in parse_grid:
    reading a stored grid (`replay`) needs no tracker."""
    for name in grid.run.mirror:
        if not _installed(MIRROR_MODULES[name]):
            raise GridError.at(source, "run.mirror", f"{name} is not installed (pip install 'repurpose[{name}]')")
    if sweep_uri is not None and "mlflow" in grid.run.mirror and mlflow_tracking_uri(grid.run, sweep_uri) is None:
        raise GridError.at(source, "run.mirror", f"mlflow needs a tracking URI with a remote store "
                           f"({redact(sweep_uri)}): set run.mlflow_tracking_uri or MLFLOW_TRACKING_URI")


def mlflow_tracking_uri(run: RunConfig, sweep_uri: str) -> str | None:
    """Where the MLflow mirror writes: ``run.mlflow_tracking_uri``, else the user's ``$MLFLOW_TRACKING_URI``, else a
    SQLite database ``<sweep>/mlflow.db`` beside the store's files when the store is local (None: a remote store).
    SQLite, not MLflow's file store: MLflow 3 keeps that in maintenance mode and opens it only when told to."""
    uri = run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if is_remote(sweep_uri):
        return None
    return "sqlite:///" + os.path.join(local_path(sweep_uri), "mlflow.db")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def parse_grid(data: Any, *, source: str = "grid.yaml", base_dir: str = ".", references: bool = True) -> Grid:
    """Validate an already-parsed grid; relative paths (and a relative ``base_dir`` key) resolve against
    ``base_dir``. Checks the models (config readable, GPT-NeoX, lr resolvable) and that local data exists, unless
    ``references`` is False (a stored grid read where its models and data need not be: replay)."""
    if not isinstance(data, dict):
        raise GridError.at(source, None, "must be a YAML mapping with name, models, methods, budgets, data")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as e:
        raise GridError(f"{source}: {format_validation_error(e)}") from None
    root = os.path.join(os.path.abspath(base_dir), os.path.expanduser(grid.base_dir or "."))
    grid = grid.model_copy(update={"base_dir": os.path.normpath(root)})
    if references:
        _check_references(grid, source)
    return grid


def _check_references(grid: Grid, source: str) -> None:
    seen: dict[str, int] = {}
    for i, model in enumerate(grid.models):
        ref = normalise_ref(model)
        if ref in seen:
            raise GridError.at(source, f"models[{i}]", f"the same model as models[{seen[ref]}]")
        seen[ref] = i
        path = grid.model_path(model)
        try:
            config = read_config(path)
            model_shape(path)
        except ModelConfigError as e:
            raise GridError.at(source, f"models[{i}]", str(e)) from None
        for m in grid.methods.selected():
            if methods.get(m).adapters:
                try:
                    model_shape(path).check_lora_targets(grid.methods.config(m).targets, model)
                except ModelConfigError as e:
                    raise GridError.at(source, f"methods.{m}.targets", str(e)) from None
        if "auto" in grid.train.lrs():
            try:
                auto_lr(path, config)
            except ModelConfigError:
                raise GridError.at(source, "train.lr", f"'auto' needs the pretraining lr of {model} (a Pythia "
                                   "name or 'repurpose_pretrain_lr' in its config.json); give a number") from None
    for field in ("train", "eval"):
        ref = getattr(grid.data, field)
        if ref is not None and "://" not in ref and not glob.glob(grid.resolve(ref)):
            raise GridError.at(source, f"data.{field}", f"no file matches {grid.resolve(ref)}")
    if grid.run.eval_every > 0 and grid.data.eval is None:
        raise GridError.at(source, "run.eval_every", "evaluating during training needs data.eval")


# --- pydantic errors -> one line ---------------------------------------------------------------------------
_SECTIONS: dict[tuple, type[BaseModel]] = {
    (): Grid, ("methods",): Methods, **{("methods", m): c for m, c in METHOD_CONFIGS.items()}, ("data",): DataConfig,
    ("train",): TrainConfig, ("train", "negatives"): NegativesConfig, ("plan",): PlanConfig, ("adaptive",): AdaptiveKnobs, ("resources",): ResourcesConfig,
    ("run",): RunConfig,
}
_TYPE_PROBLEMS = {
    "missing": "required",
    "string_too_short": "must not be empty",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def dotted_path(loc: tuple) -> str:
    """('methods', 'lora', 'rank', 2) -> 'methods.lora.rank[2]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(e: ValidationError) -> str:
    """The first error as ``<dotted.path>: <problem>``; an unknown key first (``modles:`` is a misspelt ``models``,
    and saying "models: required" would hide it)."""
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    return f"{dotted_path(err['loc'])}: {_problem(err)}"


def _problem(err: dict) -> str:
    kind, ctx, loc = err["type"], err.get("ctx") or {}, tuple(err["loc"])
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}"
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern'].strip('^$')}, got {err['input']!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {err['input']!r}"
    if kind == "too_short":
        return "must not be empty"
    if kind in _TYPE_PROBLEMS:
        return _TYPE_PROBLEMS[kind]
    return err["msg"].removeprefix("Value error, ")


def _unknown_key(loc: tuple) -> str:
    *parent, key = loc
    parent = tuple(parent)
    if parent == ("methods",):
        return "unknown method (expected one of " + ", ".join(methods.names()) + ")"
    if len(parent) == 2 and parent[0] == "methods":
        owners = [m for m in METHOD_CONFIGS if key in METHOD_CONFIGS[m].model_fields]
        if owners:
            return f"{key} is a hyperparameter of {' and '.join(owners)}, not {parent[1]}"
        allowed = list(_SECTIONS[parent].model_fields)
        return f"unknown key for {parent[1]} (allowed: {', '.join(allowed) or 'none'})"
    allowed = list(_SECTIONS.get(parent, Grid).model_fields)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")


# --- expansion: grid -> trials -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    trial_id: str
    model: str  # as written in the grid (the store's `model` column)
    spec: TrialSpec  # model and data resolved to what the workers open


def normalise_ref(ref: str) -> str:
    """A model or data reference as it enters the trial id: as written, with ./, // and a trailing / gone."""
    if "://" in ref:
        return ref
    return posixpath.normpath(ref.replace(os.sep, "/"))


def trial_identity(grid: Grid, model: str, spec: TrialSpec) -> dict:
    """``spec.identity()`` with the model and data as written in the grid, not as resolved here."""
    identity = spec.identity()
    identity["model"] = normalise_ref(model)
    identity["train_data"] = normalise_ref(grid.data.train)
    identity["eval_data"] = normalise_ref(grid.data.eval) if grid.data.eval is not None else None
    return identity


def trial_spec(grid: Grid, model: str, method: str, budget_flops: float,
               lora_rank: int | None = None, trainable_fraction: float | None = None,
               pooling: str = "mean") -> TrialSpec:
    t, r = grid.train, grid.run
    lora_fields = {}
    if methods.get(method).adapters:  # the adapters' knobs define adapter trials only
        knobs = grid.methods.config(method)
        targets = model_shape(grid.model_path(model)).check_lora_targets(knobs.targets, model)
        lora_fields = {"lora_alpha": knobs.alpha, "lora_dropout": knobs.dropout, "lora_targets": targets}
    return TrialSpec(
        model=grid.model_path(model), method=method, budget_flops=float(budget_flops),
        train_data=grid.resolve(grid.data.train),
        eval_data=grid.resolve(grid.data.eval) if grid.data.eval is not None else None,
        lora_rank=lora_rank, trainable_fraction=trainable_fraction, pooling=pooling, **lora_fields,
        batch_size=t.batch_size, temperature=t.temperature, max_length=t.max_length,
        lr=None if t.lrs()[0] == "auto" else float(t.lrs()[0]), warmup_fraction=t.warmup_fraction,
        weight_decay=t.weight_decay, seed=t.seed, max_epochs=grid.plan.max_epochs, batching=t.batching,
        gradient_checkpointing=t.gradient_checkpointing, precision=t.precision, compile=t.compile,
        eval_every=r.eval_every, eval_pairs=r.eval_pairs,
        chunk_size=r.chunk_size, packing=r.packing, report_every=r.report_every, report_every_s=r.report_every_s,
        checkpoint_every_s=r.checkpoint_every_s,
        save_model=r.save_model, keep_weights=r.keep_weights, deepspeed_config=r.deepspeed_config,
    )


def replicate_of(grid: Grid, model: str, spec: TrialSpec, replicate: int) -> tuple[str, TrialSpec]:
    """(trial id, spec) of replicate ``replicate`` of a cell (``spec`` any run of it): its own seed, and an id that
    is the cell's own for replicate 0."""
    spec = dataclasses.replace(spec, replicate=replicate, seed=replicate_seed(grid.train.seed, replicate))
    return trial_id(trial_identity(grid, model, spec)), spec


def expand(grid: Grid) -> tuple[Trial, ...]:
    """model x method x (rank | fraction) x pooling x knobs (``knob_settings``) x budget, in that nesting order."""
    trials = []
    for model in grid.models:
        knobs = knob_settings(grid, model)
        for method, rank, fraction in grid.methods.cells():
            for pooling in grid.pooling:
                for knob in knobs:
                    for budget in grid.budgets:
                        spec = trial_spec(grid, model, method, budget, rank, fraction, pooling)
                        spec = dataclasses.replace(spec, **knob)
                        trials.append(Trial(trial_id(trial_identity(grid, model, spec)), model, spec))
    return tuple(trials)


# --- the knobs: lr, query instruction, hard negatives, attention ---------------------------------------------
def knob_settings(grid: Grid, model: str) -> list[dict]:
    """The TrialSpec fields of each knob cell of ``model``: lr x query_instruction x attention (the negatives are
    one setting). At their defaults the fields equal today's trial's, so its id stays."""
    t = grid.train
    return [{"lr": lr, "query_instruction": q, "attention": a, "hard_negatives": t.hard_negatives()}
            for lr in lr_values(grid, model) for q in t.query_instruction for a in t.attention]


def lr_values(grid: Grid, model: str) -> list[float | None]:
    """The peak lrs ``model``'s trials train with: each listed lr times each ``lr_scale`` factor. ``auto`` at
    factor 1 stays None (resolved by the trial, as before: the same id); any other factor resolves it here."""
    out = []
    for lr in grid.train.lrs():
        for factor in grid.train.lr_scale:
            if factor == 1.0:
                out.append(None if lr == "auto" else float(lr))
            else:
                out.append(factor * (resolved_lr(grid, model) if lr == "auto" else float(lr)))
    return out


def resolved_lr(grid: Grid, model: str, lr: float | None = None) -> float:
    """A trial's peak lr: ``lr``, or the model's 'auto' (pretraining lr / 10) when None."""
    if lr is not None:
        return float(lr)
    path = grid.model_path(model)
    return auto_lr(path, read_config(path))
