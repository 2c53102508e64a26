"""The trial entry point on a Ray worker: a thin adapter from Tune to ``workers.trial.run_trial``.

The only place the orchestrator touches torch, and only inside the function (the driver never imports it).
"""
from __future__ import annotations


def run_tune_trial(config: dict) -> None:
    from ray import tune

    from workers.spec import TrialSpec
    from workers.trial import run_trial

    trial = config["trial"]

    def report(event: dict) -> None:
        event = dict(event)
        event["final"] = event.pop("done")  # Tune gives `done` its own meaning
        tune.report(event)

    run_trial(TrialSpec.from_dict(trial["spec"]), report=report, checkpoint_uri=trial["checkpoint_uri"])
