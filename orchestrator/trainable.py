"""The trial entry point on a Ray worker: a thin adapter from Tune to ``workers.trial.run_trial``, or, for a
trial planned onto k GPUs (``deepspeed_gpus``), to DeepSpeed on k ranks (``workers.distributed``'s recipe, its
ranks started by orchestrator/launchers.py).

The orchestrator touches torch only here and in orchestrator/launchers.py, and only inside functions that run on
a Ray worker (the driver never imports it).
"""
from __future__ import annotations


def trial_ranks(trial: dict) -> int:
    """DeepSpeed ranks of a trial: its planned GPUs, or ``cpu_ranks`` (CPU processes on gloo: tests, CPU-only
    clusters; the planner never sets it); 0: plain PyTorch in the trial's own process."""
    return int(trial.get("deepspeed_gpus") or trial.get("cpu_ranks") or 0)


def rank_bundles(resources: dict, ranks: int) -> list[dict]:
    """The trial's Ray resources split into one bundle per rank; bundle 0 holds the trial's own process."""
    return [{k: v / ranks for k, v in resources.items()} for _ in range(ranks)]


def run_tune_trial(config: dict) -> None:
    import ray
    from ray import tune

    from core.events import TrialEvent
    from core.spec import TrialSpec
    from workers.trial import run_trial

    trial = config["trial"]
    node_id = ray.get_runtime_context().get_node_id()  # recorded in the trial row: where the trial ran

    def report(event: TrialEvent) -> None:
        tune.report(event.on_node(node_id).to_dict())  # Tune takes a dict: the one place the event becomes one

    ranks = trial_ranks(trial)
    if ranks:  # rank 0 here (it reports), the others as actors in this trial's placement group
        from orchestrator.launchers import run_ray_ranks

        run_ray_ranks(trial["spec"], ranks=ranks, bundle=rank_bundles(trial["resources"], ranks)[0], report=report,
                      checkpoint_uri=trial["checkpoint_uri"], trial_id=trial.get("trial_id"))
        return
    from orchestrator.launchers import hide_unassigned_gpus

    hide_unassigned_gpus()  # a trial planned without a GPU sees none, on a GPU node too
    run_trial(TrialSpec.from_dict(trial["spec"]), report=report, checkpoint_uri=trial["checkpoint_uri"],
              trial_id=trial.get("trial_id"))
