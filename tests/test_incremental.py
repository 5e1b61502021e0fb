"""pinpoint.incremental: cache helpers and the one memory model."""
import pytest
import torch

from pinpoint.batching import make_batch
from pinpoint.incremental import (ROW_KINDS, chunk_size, first_difference, memory_budget, new_cache, prefix_cache,
                                  row_bytes)
from pinpoint.models import spec_for
from pinpoint.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_row_bytes_formulas():
    spec = spec_for(tiny_model("llama", n_layers=3, n_heads=4, n_kv_heads=2, hidden_size=32))
    e, E, H, D, V = 4, 32, 4, spec.head_dim, spec.vocab_size
    I, L, Hkv = spec.config.intermediate_size, 3, 2
    T = 10
    kv = e * L * 2 * Hkv * D * T
    assert row_bytes(spec, "path") == e * (8 * E + 2 * H * D + 3 * I + 2 * V)
    assert row_bytes(spec, "activation_all", T) == e * T * (6 * E + 3 * I + 4 * H * D + 2 * H * T)
    assert row_bytes(spec, "activation_all", T, rerun=4, cached=True) == \
        e * 4 * (6 * E + 3 * I + 4 * H * D + 2 * H * T) + kv
    assert row_bytes(spec, "activation_last", T) == kv + e * (16 * E + 2 * V)
    assert row_bytes(spec, "knockout", T) == 2 * e * T * (8 * E + 4 * H * D + 2 * H * T)
    half = spec_for(tiny_model("llama", n_layers=3, n_heads=4, n_kv_heads=2, hidden_size=32, dtype=torch.bfloat16))
    assert all(2 * row_bytes(half, k, T) == row_bytes(spec, k, T) for k in ROW_KINDS)
    with pytest.raises(ValueError, match="unknown row kind 'mlp'"):
        row_bytes(spec, "mlp")


def test_gpt2_mlp_width():
    spec = spec_for(tiny_model("gpt2", hidden_size=32))
    I = spec.config.n_inner or 4 * 32
    assert row_bytes(spec, "path") == 4 * (8 * 32 + 2 * 32 + 3 * I + 2 * spec.vocab_size)


def test_budget_and_chunks():
    assert memory_budget(torch.device("cpu"), 1000) == 1000
    assert memory_budget(torch.device("cpu"), None) > 0
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_memory must be positive bytes"):
            memory_budget(torch.device("cpu"), bad)
    assert chunk_size(1000, 100, 50) == 10
    assert chunk_size(1000, 100, 4) == 4
    assert chunk_size(10, 100, 50) == 1      # always at least one row
    assert chunk_size(10 ** 9, 0, 50) == 50  # a zero-byte estimate cannot divide by zero


def test_first_difference_and_prefix_cache():
    a = make_batch([[1, 2, 3, 4], [5, 6, 7, 8]], pad_id=0)
    b = make_batch([[1, 2, 9, 4], [5, 6, 7, 8]], pad_id=0)
    assert first_difference(a, b) == 2 and first_difference(a, a) == a.T
    assert first_difference(a, make_batch([[1, 2, 3]], pad_id=0)) == 0
    spec = spec_for(tiny_model("llama"))
    cache = prefix_cache(spec, a)
    assert cache.get_seq_length() == a.T - 1
    assert new_cache(spec).get_seq_length() == 0
    assert prefix_cache(spec, make_batch([[1]], pad_id=0)) is None
    with pytest.raises(ValueError, match="left-padded"):
        prefix_cache(spec, make_batch([[1, 2]], pad_id=0, side="right"))
