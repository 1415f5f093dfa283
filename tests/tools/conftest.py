import pytest
import torch


@pytest.fixture
def one_thread():
    """Measured on the shared 2-core machine: while another process holds a core, 2 intra-op threads run the
    profilers' tiny models ~7x slower than 1. One thread keeps the tests' time steady; the numbers are not compared."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
