"""benchmarks/adaptive.py --trust's bookkeeping on hand-made rows: the pooled figures and a resumed run that reads
back the stores its --rows file holds instead of running them again. Quick: no replay."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json

import pytest

from benchmarks import adaptive


def _row(truth: str, seed: int, fraction: float, adaptive_rows: list, grid_rows: list) -> dict:
    judged = lambda pairs: [{"budget": 1e15 * (i + 1), "regret": r, "best": r == 0.0, "p_best": p}  # noqa: E731
                            for i, (r, p) in enumerate(pairs)]
    return {"truth": truth, "noise": 0.01, "seed": seed, "config": dataclasses.asdict(adaptive.TRUST_CONFIG),
            "flops_fraction": fraction, "replicates": 3,
            "replay_s": 1.0, "adaptive": judged(adaptive_rows), "grid_fit": judged(grid_rows),
            "grid_trial": judged(grid_rows)}


ROWS = [
    # p_best >= 0.8 on three choices: two truly best (regret 0), one not (0.2 %): calibration 2/3
    _row("mid-cross, flat rank", 0, 0.10, [(0.0, 0.9), (0.002, 0.85)], [(0.0, None), (0.0, None)]),
    _row("mid-cross, flat rank", 1, 0.30, [(0.0, 0.8), (0.01, 0.4)], [(0.007, None), (0.0, None)]),
    _row("mid-cross, flat rank", 2, 0.20, [(0.0, 0.79), (0.0, None)], [(0.0, None), (0.0, None)]),
]


def test_pooled_figures_by_hand():
    p = adaptive.trust_pooled(ROWS)
    assert p["stores"] == 3
    assert p["flops_median"] == pytest.approx(0.20) and p["flops_worst"] == pytest.approx(0.30)
    assert p["sure_choices"] == 3 and p["sure_truly_best"] == pytest.approx(2 / 3)
    # regret <= 0.5 %: adaptive misses only the 1 % choice; the grid only its 0.7 % one
    assert p["per_budget_within"]["adaptive"] == (5, 6)
    assert p["per_budget_within"]["grid_fit"] == (5, 6)


def test_a_resumed_run_reads_back_the_stores_its_rows_file_holds(tmp_path, capsys, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def must_not_run(job):
        raise AssertionError(f"store {job} ran again")

    monkeypatch.setattr(adaptive, "trust_one", must_not_run)
    assert adaptive.run_trust(2, 1, [0], [0.01], True, str(rows), first_seed=1) == 0
    out = json.loads(capsys.readouterr().out)
    # seeds 1 and 2 of the file, not seed 0: the pooled figures of those two rows
    assert out["pooled"]["stores"] == 2 and out["pooled"]["flops_worst"] == pytest.approx(0.30)
    assert out["pooled"]["flops_median"] == pytest.approx(0.25)
    assert len(rows.read_text().splitlines()) == 3  # nothing appended


def test_a_run_with_another_config_does_not_read_back_these_rows(tmp_path, capsys, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ran = []
    monkeypatch.setattr(adaptive, "ProcessPoolExecutor", concurrent.futures.ThreadPoolExecutor)
    monkeypatch.setattr(adaptive, "trust_one", lambda job: ran.append(job) or ROWS[0] | {"seed": job[2]})
    other = dataclasses.replace(adaptive.TRUST_CONFIG, noise_runs=adaptive.TRUST_CONFIG.noise_runs + 1)
    assert adaptive.run_trust(2, 1, [0], [0.01], True, str(rows), first_seed=1, config=other) == 0
    assert [(job[2], job[3]) for job in ran] == [(1, other), (2, other)]
