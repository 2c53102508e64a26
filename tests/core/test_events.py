"""The worker -> driver event (core/events.py): typed on both sides, a dict only at Ray Tune's report."""
import dataclasses

import pytest

from core.events import TrialEvent

ROW = {"step": 3, "tokens": 30, "flops": 3e6, "train_loss": 0.5}


def test_tune_gets_done_as_final_and_gives_it_back():
    event = TrialEvent(rows=[ROW], done=True, step=3, tokens=30, flops=3e6, budget_flops=4e6,
                       trial={"steps": 3}).on_node("n1")
    sent = event.to_dict()
    assert sent["final"] is True and "done" not in sent and sent["rows"] == [ROW]
    assert sent["trial"] == {"steps": 3, "node_id": "n1"} and sent["node_id"] == "n1"
    # Tune's result carries its own keys beside ours, `done` among them (its meaning, not ours)
    result = {**sent, "done": False, "training_iteration": 4, "trial_id": "abc", "time_this_iter_s": 0.1}
    assert TrialEvent.from_dict(result) == event


def test_a_progress_event_from_tune_is_not_done_and_keeps_its_snapshot():
    got = TrialEvent.from_dict({"rows": [ROW], "restart": True, "step": 3, "tokens": 30, "flops": 3e6,
                                "train_loss": 0.5, "final": False, "done": True})
    assert (got.done, got.restart, got.step, got.tokens, got.train_loss, got.trial) == (False, True, 3, 30, 0.5, None)
    assert got.rows == (ROW,)


def test_the_event_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrialEvent().done = True
