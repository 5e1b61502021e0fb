"""Shared pytest fixtures: an offline word tokenizer and tiny random stock models."""

from __future__ import annotations

import pytest

import torch

from pinpoint.testing import TINY_ARCHS, tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: faster than two (no barrier
    waits) and keeps CPU time low. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    """The default word-level chat tokenizer (shared; do not mutate)."""
    return word_tokenizer()


@pytest.fixture
def tiny():
    """Factory: ``tiny(arch, **kwargs)`` -> a fresh ``pinpoint.testing.tiny_model``."""
    return tiny_model


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    """Each supported tiny architecture name in turn."""
    return request.param


@pytest.fixture
def tiny_lm(arch):
    """A fresh default tiny model of each architecture in turn."""
    return tiny_model(arch)
