"""The CUDA kernels' source, run on the CPU by the warp emulator (tests/gpu/emulator).

Opt-in (it compiles csrc/cuda with g++ and runs every CUDA thread as a host thread, about
a minute in all): PINPOINT_CUDA_EMULATOR=1 python -m pytest tests/gpu/test_emulated_kernels.py

It checks what can be checked without a GPU: tile/fragment index math, masking, zero-fill,
pipelining and barrier placement, against pinpoint_kernels.reference with the same cases
and tolerances as test_cuda_kernels.py. ``PP_EMU_CPASYNC=lazy`` delays every cp.async to its
wait; building with ``--sanitize thread`` (see emulator/build.py) checks shared-memory races.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import pinpoint_kernels as pk
from pinpoint_kernels import reference as ref


def _load(name: str):
    path = Path(__file__).parent / name
    spec = importlib.util.spec_from_file_location(f"pinpoint_gpu_tests_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _load("_cases.py")
pytestmark = pytest.mark.skipif(
    os.environ.get("PINPOINT_CUDA_EMULATOR") != "1" or shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="opt-in: set PINPOINT_CUDA_EMULATOR=1 (needs g++) to run the CUDA kernels in the host emulator")


@pytest.fixture(scope="module")
def emu():
    builder = _load("emulator/build.py")
    with builder.emulated_cuda(os.environ.get("PP_EMU_SANITIZE") or None) as launchers:
        yield launchers


def _attention(case, dtype):
    q, k, v, hm, patch, kw = C.attention_case(dtype=dtype, **case)
    extra = C.call_kwargs(case)
    want = ref.head_patched_attention(q, k, v, hm, patch, **kw, **extra)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend="cuda", **kw, **extra)
    C.check_attention(got, want, q, hm, dtype)


@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("case", C.ATTN_CASES, ids=[c["id"] for c in C.ATTN_CASES])
def test_attention_cases(emu, dtype, case):
    _attention(case, dtype)


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", C.VARIANT_CASES, ids=[c["id"] for c in C.VARIANT_CASES])
def test_attention_variants(emu, monkeypatch, variant, dtype, case):
    monkeypatch.setenv("PINPOINT_CUDA_ATTN_VARIANT", str(variant))
    _attention(case, dtype)


@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=C.attention_shapes)
def test_attention_random_shapes(emu, dtype, p):
    _attention(C.from_shape(p), dtype)


def test_masked_heads_never_read_q_or_kv(emu):
    R, T, H, D = 3, 70, 4, 64
    q = torch.randn(R, T, H, D, dtype=torch.bfloat16)
    k = torch.randn(2, T, 2, D, dtype=torch.bfloat16)
    v = torch.randn(2, T, 2, D, dtype=torch.bfloat16)
    hm = torch.zeros(R, H, dtype=torch.bool)
    hm[:, 2:] = True
    q[:, :, 2:] = float("nan")
    k[:, :, 1] = float("nan")
    v[:, :, 1] = float("nan")
    patch = torch.randn(R, T, H, D, dtype=torch.bfloat16)
    out = pk.head_patched_attention(q, k, v, hm, patch, kv_index=torch.tensor([0, 1, 0]), backend="cuda")
    assert not out.isnan().any()
    assert torch.equal(out.view(R, T, H, D)[:, :, 2:], patch[:, :, 2:])


@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("case", C.GRAD_CASES, ids=lambda c: f"N{c[0]}-D{c[2]}-{c[5]}")
def test_grad_cases(emu, dtype, case):
    dy, x, heads = C.grad_case(*case, dtype=dtype)
    want = ref.head_slice_grad(dy, x, heads, case[2], by=case[5])
    got = pk.head_slice_grad(dy, x, heads, case[2], by=case[5], backend="cuda")
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **C.GRAD_TOL)


def test_grad_strided_and_mixed(emu):
    dy = torch.randn(3, 10, 64)[:, ::2]
    x = torch.randn(3, 5, 40)
    want = ref.head_slice_grad(dy.contiguous(), x, torch.tensor([1, 3]), 16)
    torch.testing.assert_close(pk.head_slice_grad(dy, x, [1, 3], 16, backend="cuda"), want, **C.GRAD_TOL)
    dyb = dy.to(torch.bfloat16)
    want = ref.head_slice_grad(dyb, x, torch.tensor([0, 2]), 16)
    torch.testing.assert_close(pk.head_slice_grad(dyb, x, [0, 2], 16, backend="cuda"), want, **C.GRAD_TOL)


@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_apply_exact_and_round_trip(emu, by, dtype):
    g = torch.Generator().manual_seed(1)
    H, D, other = 4, 16, 24
    shape = (H * D, other) if by == "rows" else (other, H * D)
    w0 = torch.randn(*shape, generator=g).to(dtype)
    heads = torch.tensor([2, 0])
    slices = torch.randn(*((2, D, other) if by == "rows" else (2, other, D)), generator=g) * 1e-3
    w = w0.clone()
    pk.head_slice_apply(w, slices, heads, D, by=by, backend="cuda")
    assert torch.equal(w, ref.head_slice_apply(w0.clone(), slices, heads, D, by=by))
    pk.head_slice_apply(w, slices, heads, D, by=by, alpha=-1.0, backend="cuda")
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(w.float(), w0.float(), atol=1e-6, rtol=tol)


def test_apply_on_transposed_view(emu):
    conv_w = torch.randn(24, 32)  # GPT-2 Conv1D: [in, out]
    slices = torch.randn(1, 8, 24).to(torch.bfloat16)
    want = ref.head_slice_apply(conv_w.t().clone(), slices, torch.tensor([1]), 8, by="rows")
    pk.head_slice_apply(conv_w.t(), slices, [1], 8, by="rows", backend="cuda")
    assert torch.equal(conv_w.t(), want)
