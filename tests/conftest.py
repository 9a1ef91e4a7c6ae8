"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and a shared CPU stays usable). Not global:
    tests/test_gru.py runs the C kernel on torch's thread count, to cover its threaded path."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
