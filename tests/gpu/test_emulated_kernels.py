"""The CUDA kernels' source, run on the CPU by the warp emulator (tests/gpu/emulator).

It compiles csrc/cuda with g++ and runs every CUDA thread as a host fiber, so it is the only
execution of the CUDA sources on a machine without a GPU. It checks what can be checked
without one: tile/fragment index math, masking, zero-fill, pipelining and barrier placement,
against pinpoint_kernels.reference with the same cases and tolerances as test_cuda_kernels.py.

* Default (``pytest``): a representative subset (every feature and tile variant once, each
  dtype's kernel path, both gradient layouts); under 2 minutes on 2 CPU cores, build included.
* ``PINPOINT_CUDA_EMULATOR=1``: the full set (every case x dtype, random shapes), ~6 minutes.
* ``PINPOINT_CUDA_EMULATOR=0``: none. Without g++ / pybind11 headers: skipped, saying which.

``PP_EMU_CPASYNC=lazy`` delays every cp.async to its wait; building with ``--sanitize
thread`` (see emulator/build.py) checks shared-memory races. These tests carry no `gpu`
marker, so tests/gpu/conftest.py does not skip them on machines without CUDA.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
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
BUILDER = _load("emulator/build.py")
MODE = os.environ.get("PINPOINT_CUDA_EMULATOR", "subset")
FULL = MODE == "1"
_missing = BUILDER.missing_tools()
pytestmark = [
    pytest.mark.skipif(MODE == "0", reason="PINPOINT_CUDA_EMULATOR=0 turns the CUDA emulator tests off"),
    pytest.mark.skipif(_missing is not None, reason=f"CUDA emulator cannot be built: {_missing}"),
]
full_only = pytest.mark.skipif(not FULL, reason="not in the default subset; PINPOINT_CUDA_EMULATOR=1 runs "
                                                "the full emulator set")

F32, BF16, F16 = C.DTYPES
# The default subset: each line is a feature the kernels branch on, in the dtype whose path it
# stresses (fp32 has its own CUDA-core kernel; bf16/fp16 share the tensor-core one).
QUICK_ATTN = {
    BF16: ["gqa2", "tq_lt_tk", "multi_tile", "d128", "d80", "left_pad", "empty_rows", "shared_kv",
           "masked_rows", "fused_qkv_view", "offset_storage", "non_causal", "all_masked", "custom_scale"],
    F32: ["gqa2", "tq_lt_tk", "multi_tile", "d128", "left_pad", "offset_storage", "non_causal"],
    F16: ["d128", "shared_kv", "expanded_patch"],
}
QUICK_VARIANTS = {("v_d128_multi", BF16), ("v_d64", F16)}  # each with every tile variant 1..4
QUICK_GRAD = {1, 2, 7, 8, 9, 10}  # indices into C.GRAD_CASES: both layouts, D 1/24/128, odd widths


def _params(pairs, quick, ids):
    """pytest.params over `pairs`; those not in `quick` run only in the full set."""
    return [pytest.param(*p, id=i, marks=() if p in quick else full_only) for p, i in zip(pairs, ids)]


_attn_pairs = list(itertools.product(C.ATTN_CASES, C.DTYPES))
ATTN_PARAMS = _params([(c["id"], d) for c, d in _attn_pairs],
                      {(n, d) for d, names in QUICK_ATTN.items() for n in names},
                      [f"{c['id']}-{d}" for c, d in _attn_pairs])
CASES_BY_ID = {c["id"]: c for c in C.ATTN_CASES + C.VARIANT_CASES}
_var_pairs = list(itertools.product(C.VARIANT_CASES, [BF16, F16]))
VARIANT_PARAMS = _params([(c["id"], d) for c, d in _var_pairs], QUICK_VARIANTS,
                         [f"{c['id']}-{d}" for c, d in _var_pairs])
_grad_pairs = list(itertools.product(range(len(C.GRAD_CASES)), C.DTYPES))
GRAD_PARAMS = _params(_grad_pairs, {(i, d) for i in QUICK_GRAD for d in (F32, BF16)},
                      [f"N{C.GRAD_CASES[i][0]}-D{C.GRAD_CASES[i][2]}-{C.GRAD_CASES[i][5]}-{d}"
                       for i, d in _grad_pairs])


@pytest.fixture(scope="module")
def emu():
    with BUILDER.emulated_cuda(os.environ.get("PP_EMU_SANITIZE") or None) as launchers:
        yield launchers


def _attention(case, dtype):
    q, k, v, hm, patch, kw = C.attention_case(dtype=dtype, **case)
    extra = C.call_kwargs(case)
    want = ref.head_patched_attention(q, k, v, hm, patch, **kw, **extra)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend="cuda", **kw, **extra)
    C.check_attention(got, want, q, hm, dtype)


@pytest.mark.parametrize("case_id, dtype", ATTN_PARAMS)
def test_attention_cases(emu, case_id, dtype):
    _attention(CASES_BY_ID[case_id], dtype)


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
@pytest.mark.parametrize("case_id, dtype", VARIANT_PARAMS)
def test_attention_variants(emu, monkeypatch, variant, case_id, dtype):
    monkeypatch.setenv("PINPOINT_CUDA_ATTN_VARIANT", str(variant))
    _attention(CASES_BY_ID[case_id], dtype)


@full_only
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


@pytest.mark.parametrize("index, dtype", GRAD_PARAMS)
def test_grad_cases(emu, index, dtype):
    case = C.GRAD_CASES[index]
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


@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.float32, True)], ids=["fp32", "bf16", "autocast-bf16"])
def test_head_slice_linear(emu, monkeypatch, by, dtype, autocast):
    """The training path through the CUDA kernels: forward, backward, autocast."""
    monkeypatch.setenv("PINPOINT_BACKEND", "cuda")
    C.check_head_slice_linear(pk, ref, by=by, dtype=dtype, autocast=autocast)


def _sanitize_cases(monkeypatch):
    cases = _load("sanitize_cases.py")
    monkeypatch.setattr(cases, "DEV", "cpu")
    return cases


def test_sanitizer_script_cases(emu, monkeypatch):
    """tests/gpu/sanitize_cases.py (run under compute-sanitizer by bench/gpu_check.sh) passes
    through the emulated kernels, and exits 1 when a kernel returns a wrong value."""
    cases = _sanitize_cases(monkeypatch)
    assert cases.main(["grad", "apply"]) == 0
    assert cases.main(["nonsense"]) == 2
    real = emu.head_slice_grad
    monkeypatch.setattr(emu, "head_slice_grad", lambda *a, **k: real(*a, **k) * 1.01)
    monkeypatch.setenv("PINPOINT_SELF_CHECK", "0")  # else the check refuses the broken kernel first
    assert cases.main(["grad"]) == 1


@full_only
def test_sanitizer_script_attention_cases(emu, monkeypatch):
    assert _sanitize_cases(monkeypatch).main(["attention", "multi_tile"]) == 0
