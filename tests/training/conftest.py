"""Training tests run many tiny steps: one thread avoids OpenMP oversubscription on a shared 2-core CPU."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
