"""Shared fixtures: seeds, the device-discipline guard, and the GPU marker."""

import contextlib

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
# The tests run many small linear-algebra problems, where intra-op threads cost more than they save
# (and oversubscribe the two cores of CI). Correctness does not depend on it; speed checks live in
# benchmarks/, not here.
torch.set_num_threads(1)


@contextlib.contextmanager
def default_device(device: str):
    """Makes ``device`` the process default for tensor creation, so that any tensor the package creates
    without taking the data's device lands there (``"meta"``) and fails loudly when mixed with data."""
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture
def meta_default_device():
    """Device discipline (ENGINEERING.md): data on the CPU, default device "meta"."""
    with default_device("meta"):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
