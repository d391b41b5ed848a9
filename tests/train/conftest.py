"""Fixtures of the training tests."""

import pytest


@pytest.fixture
def one_thread():
    """torch on one thread, as a node runs it (``[train].threads = 1``): results then match bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
