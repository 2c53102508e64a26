"""The one message a trial sends its driver: ``TrialEvent``, built by the worker (workers/steps.py) and read by the
store (orchestrator/store.py).

- a progress event (at most every ``report_every_s`` seconds, and at once for an evaluation or a restart):
  ``rows`` (the metric rows since the last event), ``restart`` (True on the first event after a resume: ``rows``
  then holds the whole history up to the checkpoint, so the store replaces what it kept and stays exactly-once), and
  a snapshot: ``step``, ``tokens``, ``flops``, ``budget_flops``, ``train_loss``, ``eval_loss``;
- the last one has ``done`` and ``trial``: the trial row (the trial columns the worker owns, core/store.py).

The driver's side adds ``node_id`` (where the trial ran); a DeepSpeed trial's rank 0 adds ``ranks``. Ray Tune's
``report`` takes a dict, in which ``done`` is Tune's own key: ``to_dict`` / ``from_dict`` convert at that one
boundary (orchestrator/trainable.py sends, orchestrator/tuning.py receives), where ``done`` travels as ``final``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TUNE_DONE_KEY = "final"  # `done` under Tune's report: Tune gives `done` its own meaning


@dataclass(frozen=True)
class TrialEvent:
    rows: tuple[dict, ...] = ()
    restart: bool = False
    done: bool = False
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    budget_flops: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    trial: dict | None = None  # the trial row, on the done event
    node_id: str | None = None  # the driver side: the Ray node the trial ran on
    ranks: int | None = None  # a DeepSpeed trial: how many ranks made it (the store ignores it)

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))

    def on_node(self, node_id: str) -> "TrialEvent":
        """The event as the driver records it: ``node_id`` on it and on its trial row."""
        trial = None if self.trial is None else dict(self.trial, node_id=node_id)
        return dataclasses.replace(self, node_id=node_id, trial=trial)

    def to_dict(self) -> dict:
        """Ray Tune's ``report`` argument: plain values, ``done`` as ``final``, rows as a list."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rows"] = [dict(r) for r in self.rows]
        out[TUNE_DONE_KEY] = out.pop("done")
        return out

    @classmethod
    def from_dict(cls, result: dict) -> "TrialEvent":
        """The event back from a Tune result (which carries Tune's own keys too: those are left out)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"done"}
        fields = {k: result[k] for k in names if result.get(k) is not None}
        return cls(**fields, done=bool(result.get(TUNE_DONE_KEY)))
