import pytest
import torch


@pytest.fixture(autouse=True)
def _small_thread_pool():
    # The suite runs on 2 cores; more threads only oversubscribe them.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
