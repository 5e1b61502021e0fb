"""tests/gpu: CUDA-only checks of the cuda and triton backends (marked `gpu`).

Every test marked `gpu` is skipped when torch.cuda.is_available() is False. The CUDA
emulator tests (test_emulated_kernels.py) carry no such marker on purpose: they run the CUDA
sources on the CPU, so they run (their default subset) in every plain `pytest`. On a CUDA machine a
backend that is not available (the _cuda extension not built, Triton missing) is skipped
with the reason, unless PINPOINT_REQUIRE_CUDA_EXT=1 (set by bench/gpu_check.sh), which
turns a missing _cuda extension into a failure.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def require_backend(name: str) -> None:
    """Skip (or fail, see the module doc) unless backend `name` can run CUDA tensors."""
    from pinpoint_kernels import backends

    why = backends._usable(name, torch.device("cuda"))
    if why is None:
        return
    if name == "cuda" and os.environ.get("PINPOINT_REQUIRE_CUDA_EXT") == "1":
        pytest.fail(f"the cuda backend is required here but unavailable: {why}")
    pytest.skip(f"backend {name!r} unavailable: {why}")


@pytest.fixture(scope="session")
def need_backend():
    return require_backend
