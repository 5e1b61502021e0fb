"""pytest-benchmark view of bench/kernels_cpu.py: the same inputs and peers, one group per case.

    pytest bench/test_kernels_cpu.py --benchmark-enable
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import pinpoint_kernels as pk  # noqa: E402
from kernels_cpu import ATTN_CASES, GRAD_CASES, attention_inputs  # noqa: E402
from pinpoint_kernels import reference as ref  # noqa: E402


@pytest.mark.parametrize("impl", ["pinpoint", "sdpa_one_call", "reference"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c[0]}-{str(c[-1])[6:]}")
def test_attention(benchmark, case, impl):
    name, R, Rk, T, Hq, Hkv, D, n_masked, dtype = case
    q, k, v, hm, patch, kvi = attention_inputs(R, Rk, T, Hq, Hkv, D, n_masked, dtype)
    benchmark.group = f"attention {name} {dtype}"
    if impl == "pinpoint":
        out = benchmark(pk.head_patched_attention, q, k, v, hm, patch, kv_index=kvi, patch_index=kvi, backend="cpu")
    elif impl == "reference":
        out = benchmark(ref.head_patched_attention, q, k, v, hm, patch, kv_index=kvi, patch_index=kvi)
    else:
        def sdpa():
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k[kvi].transpose(1, 2), v[kvi].transpose(1, 2),
                                               is_causal=True, enable_gqa=Hq != Hkv).transpose(1, 2)
            return torch.where(hm[:, None, :, None], patch[kvi], o).reshape(R, T, Hq * D)
        out = benchmark(sdpa)
    want = ref.head_patched_attention(q, k, v, hm, patch, kv_index=kvi, patch_index=kvi)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["pinpoint", "full_then_slice"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-{c[5]}of{c[2]}-{str(c[-1])[6:]}")
def test_head_slice_grad(benchmark, case, impl):
    name, N, H, D, other, n_sel, by, dtype = case
    g = torch.Generator().manual_seed(1)
    out_f, in_f = (H * D, other) if by == "rows" else (other, H * D)
    dy, x = torch.randn(N, out_f, generator=g).to(dtype), torch.randn(N, in_f, generator=g).to(dtype)
    heads = torch.arange(n_sel) * (H // n_sel)
    benchmark.group = f"head_slice_grad {name} {n_sel}/{H} {dtype}"
    if impl == "pinpoint":
        got = benchmark(pk.head_slice_grad, dy, x, heads, D, by=by, backend="cpu")
        torch.testing.assert_close(got, ref.head_slice_grad(dy, x, heads, D, by=by), atol=1e-3, rtol=1e-4)
    else:
        benchmark(lambda: dy.t() @ x)
