"""The planner never hands Ray a trial that cannot run: a DeepSpeed trial's ranks divide its batch (each rank embeds
batch / ranks pairs), and a trial that no node of the cluster holds is skipped with the reason instead of becoming a
placement group Tune waits on forever. Numbers by hand in the comments."""
from __future__ import annotations

from orchestrator.plan import DataStats, deepspeed_ranks, node_problem, plan_grid, size_trial

from test_plan import pythia, tiny_grid


def test_deepspeed_ranks_divide_the_batch():
    # 1024 over a 6-GPU node: 6 and 5 do not divide it (1024 = 2^10), 4 does
    assert deepspeed_ranks(1024, 6, None) == (4, None)
    assert deepspeed_ranks(1024, 8, None) == (8, None)
    assert deepspeed_ranks(1000, 6, None) == (5, None)  # 1000 = 5 x 200
    assert deepspeed_ranks(7, 4, None) == (1, None)  # a prime batch: one rank
    # asked for 3: 1024 % 3 = 1, skipped with the reason rather than a trial that raises at run time
    k, problem = deepspeed_ranks(1024, 8, 3)
    assert k == 3 and problem.startswith("train.batch_size 1024 does not split over resources.deepspeed_gpus 3")
    assert deepspeed_ranks(1023, 8, 3) == (3, None)  # 1023 = 3 x 341
    assert deepspeed_ranks(1024, 2, 3) == (2, None)  # capped at the node: 2 divides


def test_a_deepspeed_trial_is_sized_over_ranks_that_split_its_batch(tmp_path):
    grid = tiny_grid(tmp_path)
    shape, spec = pythia("1.4b", batch_size=1024)  # N_tr = 1.2e9 >= deepspeed_from_params: DeepSpeed
    s = size_trial(shape, spec, 6, grid)
    assert (s.resources, s.deepspeed_gpus, s.problem) == ({"CPU": 4, "GPU": 4}, 4, None)
    three = tiny_grid(tmp_path, resources__deepspeed_gpus=3)
    s = size_trial(shape, spec, 8, three)
    assert s.deepspeed_gpus == 3 and "does not split over resources.deepspeed_gpus 3" in s.problem
    # memory's DeepSpeed sizes too: a 1b trial on 16 GB GPUs needs ZeRO over 2 (tests/orchestrator/test_plan.py);
    # a batch of 1023 pairs splits over no even count, so no DeepSpeed size is tried and nothing holds it
    shape, spec = pythia("1b", batch_size=1023)
    s = size_trial(shape, spec, 8, grid, 16e9)
    assert s.problem.startswith("does not fit in GPU memory") and s.deepspeed_gpus == 0


def test_node_problem_by_hand():
    nodes = [{"CPU": 16, "GPU": 4}, {"CPU": 64}]
    assert node_problem({"CPU": 4, "GPU": 4}, nodes) is None
    assert node_problem({"CPU": 32}, nodes) is None  # the CPU node holds it
    assert node_problem({"CPU": 8, "GPU": 8}, nodes) == (
        "no node holds the trial: it needs 8 CPU, 8 GPU on one node; the largest node has 16 CPU, 4 GPU")
    assert node_problem({"CPU": 32, "GPU": 1}, nodes).startswith("no node holds the trial")  # GPUs and CPUs apart
    assert node_problem({"CPU": 8, "GPU": 8}, None) is None  # the cluster not known: nothing checked


def test_a_trial_larger_than_any_node_is_skipped_with_the_reason(tmp_path):
    # the grid plans for 8 GPUs a node; the cluster's largest has 4: DeepSpeed over 8 cannot be placed
    grid = tiny_grid(tmp_path, resources__gpus=8, resources__deepspeed_from_params=1, train__batch_size=8)
    stats = DataStats({"./tiny": 30.0}, None)
    nodes = [{"CPU": 32, "GPU": 4, "memory": 1e11}, {"CPU": 8}]
    plan = plan_grid(grid, data=stats, nodes=nodes)
    assert plan.trials and not plan.runnable
    assert all("no node holds the trial: it needs 8 CPU, 8 GPU on one node" in t.skip_reason for t in plan.trials)
    # planned for the node it has: every trial runs (4 GPUs divide the batch of 8)
    fits = plan_grid(tiny_grid(tmp_path, resources__gpus=4, resources__deepspeed_from_params=1, train__batch_size=8,
                               plan__min_steps=1),
                     data=stats, nodes=nodes)
    assert all(t.runnable and t.deepspeed_gpus == 4 for t in fits.trials)
