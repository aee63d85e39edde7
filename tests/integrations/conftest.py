"""Integration tests run tiny models whose ops take microseconds: intra-op threads only add synchronisation, and
with two pytest workers on two cores they oversubscribe the machine (tens of times slower when it is busy). Each
test here runs on one thread and restores the setting after."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
