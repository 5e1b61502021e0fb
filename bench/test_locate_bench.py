"""pytest-benchmark view of bench/locate.py at a smaller size: pinpoint path patching against
the hook loop (one batched forward per head), on the same model and pairs, results cross-checked.

    pytest bench/test_locate_bench.py --benchmark-enable
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pinpoint as pp  # noqa: E402
from locate import build_model, hook_loop_path, left_pad, make_pairs, metric_last  # noqa: E402

SMALL = dict(n_layers=4, n_heads=4, hidden=128, intermediate=344, vocab=1000, dtype=torch.float32, device="cpu")
N_PAIRS, TOKENS = 3, 24


@pytest.fixture(scope="module")
def setup():
    model = build_model(SMALL, "eager")
    pairs = make_pairs(N_PAIRS, TOKENS, SMALL["vocab"], equal=False, seed=3)
    base_in = left_pad([p.base for p in pairs], "cpu")
    src_in = left_pad([p.source for p in pairs], "cpu")
    return model, pairs, base_in, src_in


def _pinpoint(model, pairs):
    return pp.locate(model, None, pairs, method="path", metric=metric_last, progress=False, batch_size=N_PAIRS)


def _check(got, want):
    scale = want.abs().max()
    assert scale > 0, "degenerate benchmark: no head has any effect"
    err = (got - want).abs().max()
    assert err <= 1e-4 * scale, f"max error {float(err):.3g} > 1e-4 x {float(scale):.3g}"


@pytest.mark.parametrize("impl", ["pinpoint", "hook_loop"])
def test_path_patching(benchmark, setup, impl):
    model, pairs, base_in, src_in = setup
    benchmark.group = f"path patching L={SMALL['n_layers']} H={SMALL['n_heads']} B={N_PAIRS} T~{TOKENS}"
    if impl == "pinpoint":
        scores = benchmark(_pinpoint, model, pairs)
        _check(scores.per_pair, hook_loop_path(model, base_in, src_in)[0].cpu())
    else:
        got, _ = benchmark(hook_loop_path, model, base_in, src_in)
        _check(got.cpu(), _pinpoint(model, pairs).per_pair)
