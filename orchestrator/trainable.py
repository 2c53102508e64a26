"""The trial entry point on a Ray worker: a thin adapter from Tune to ``workers.trial.run_trial``.

The only place the orchestrator touches torch, and only inside the function (the driver never imports it).
"""
from __future__ import annotations


def run_tune_trial(config: dict) -> None:
    import ray
    from ray import tune

    from workers.spec import TrialSpec
    from workers.trial import run_trial

    trial = config["trial"]
    node_id = ray.get_runtime_context().get_node_id()  # recorded in the trial row: where the trial ran

    def report(event: dict) -> None:
        event = dict(event, node_id=node_id)
        event["final"] = event.pop("done")  # Tune gives `done` its own meaning
        if "trial" in event:
            event["trial"] = dict(event["trial"], node_id=node_id)
        tune.report(event)

    run_trial(TrialSpec.from_dict(trial["spec"]), report=report, checkpoint_uri=trial["checkpoint_uri"])
