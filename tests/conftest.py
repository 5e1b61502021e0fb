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


@pytest.fixture(scope="module")
def make_model_dir(tmp_path_factory):
    """Factory: ``make_model_dir(name="tiny-llama", **tiny_model_kwargs)`` saves a tiny Llama
    (default 2 layers, 4 heads, 2 KV heads) and the word tokenizer as an HF directory."""
    def make(name: str = "tiny-llama", **kwargs):
        d = tmp_path_factory.mktemp(name)
        tiny_model("llama", **{"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **kwargs}).save_pretrained(d)
        word_tokenizer().save_pretrained(d)
        return d

    return make


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    """A saved tiny Llama + word tokenizer (the CLI tests' model directory)."""
    return make_model_dir()
