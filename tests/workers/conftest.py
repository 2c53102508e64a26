"""Fixtures shared by the worker tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """2 cores shared by several jobs: one intra-op thread is ~5x faster than two oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
