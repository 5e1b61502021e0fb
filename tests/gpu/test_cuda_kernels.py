"""The cuda and triton backends on CUDA tensors, against pinpoint_kernels.reference.

Skipped without a CUDA device. Cases and tolerances: _cases.py (tolerances are stated and
justified in its docstring). The reference runs on the same device in fp32 (TF32 off).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import pinpoint_kernels as pk
from pinpoint_kernels import backends, self_check
from pinpoint_kernels import reference as ref


def _load(name: str):
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"pinpoint_gpu_tests_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _load("_cases.py")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BACKENDS = ["cuda", "triton"]
DEV = "cuda"
HSETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Random shapes per test; bench/gpu_check.sh lowers it (each new shape can cost a cold
# Triton compilation of seconds) to fit its time caps.
EXAMPLES = int(os.environ.get("PINPOINT_GPU_EXAMPLES", "20"))


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _run_attention(backend, case, dtype):
    q, k, v, hm, patch, kw = C.attention_case(dtype=dtype, device=DEV, **case)
    extra = C.call_kwargs(case)
    want = ref.head_patched_attention(q, k, v, hm, patch, **kw, **extra)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend=backend, **kw, **extra)
    torch.cuda.synchronize()
    C.check_attention(got, want, q, hm, dtype)


# ------------------------------------------------------------------------------------------
# head_patched_attention

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("case", C.ATTN_CASES, ids=[c["id"] for c in C.ATTN_CASES])
def test_attention_cases(need_backend, backend, dtype, case):
    need_backend(backend)
    _run_attention(backend, case, dtype)


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", C.VARIANT_CASES, ids=[c["id"] for c in C.VARIANT_CASES])
def test_attention_cuda_tile_variants(need_backend, monkeypatch, variant, dtype, case):
    """Every tile configuration of the cuda kernel (see attention_kernel.cuh)."""
    need_backend("cuda")
    monkeypatch.setenv("PINPOINT_CUDA_ATTN_VARIANT", str(variant))
    _run_attention("cuda", case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@settings(max_examples=EXAMPLES, **HSETTINGS)
@given(p=C.attention_shapes)
def test_attention_random_shapes(need_backend, backend, dtype, p):
    need_backend(backend)
    _run_attention(backend, C.from_shape(p), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_llama_layer_shape(need_backend, backend):
    """The benchmark's shape, scaled down in rows: 32 heads of 128, T = 512, shared K/V."""
    need_backend(backend)
    R, T, H, D = 4, 512, 32, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(R, T, H, D, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(1, T, H, D, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(1, T, H, D, generator=g).to(DEV, torch.bfloat16)
    hm = torch.zeros(R, H, dtype=torch.bool, device=DEV)
    hm[torch.arange(R), torch.arange(R) * 5] = True
    patch = torch.randn(1, T, H, D, generator=g).to(DEV, torch.bfloat16)
    kw = dict(kv_index=torch.zeros(R, dtype=torch.long, device=DEV))
    want = ref.head_patched_attention(q, k, v, hm, patch, **kw)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend=backend, **kw)
    C.check_attention(got, want, q, hm, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_heads_never_read_q_or_kv(need_backend, backend):
    """A patched (row, head) must not depend on its q, nor on K/V that only it reads."""
    need_backend(backend)
    R, T, H, D = 3, 70, 4, 64
    q = torch.randn(R, T, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, T, 2, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(2, T, 2, D, device=DEV, dtype=torch.bfloat16)
    hm = torch.zeros(R, H, dtype=torch.bool, device=DEV)
    hm[:, 2:] = True  # heads 2, 3 read K/V head 1: poison it and their queries
    q[:, :, 2:] = float("nan")
    k[:, :, 1] = float("nan")
    v[:, :, 1] = float("nan")
    patch = torch.randn(R, T, H, D, device=DEV, dtype=torch.bfloat16)
    out = pk.head_patched_attention(q, k, v, hm, patch, kv_index=torch.tensor([0, 1, 0], device=DEV),
                                    backend=backend)
    assert not out.isnan().any()
    assert torch.equal(out.view(R, T, H, D)[:, :, 2:], patch[:, :, 2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_shared_kv_rows_equal_expanded_kv(need_backend, backend, dtype):
    """kv_index sharing gives exactly what copying K/V per row gives."""
    need_backend(backend)
    q, k, v, hm, patch, kw = C.attention_case(R=5, Rk=2, Tq=70, Tk=70, Hq=4, Hkv=2, D=64, dtype=dtype,
                                              pad="left", mask_mode="random", patch_mode="full",
                                              seed=7, shared_kv=True, device=DEV)
    idx = kw["kv_index"]
    shared = pk.head_patched_attention(q, k, v, hm, patch, backend=backend, **kw)
    copied = pk.head_patched_attention(q, k[idx], v[idx], hm, patch,
                                       key_padding_mask=kw["key_padding_mask"][idx], backend=backend)
    assert torch.equal(shared, copied)


@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_on_the_current_stream(need_backend, backend):
    """Launches go to torch's current stream, so work on a side stream stays ordered."""
    need_backend(backend)
    case = dict(R=3, Tq=100, Tk=100, Hq=4, Hkv=2, D=128, mask_mode="random", patch_mode="full", seed=3)
    q, k, v, hm, patch, kw = C.attention_case(dtype=torch.float16, device=DEV, **case)
    want = ref.head_patched_attention(q, k, v, hm, patch, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q2 = q * 1  # produced on the side stream, consumed there
        got = pk.head_patched_attention(q2, k, v, hm, patch, backend=backend, **kw)
        got = got.clone()
    torch.cuda.current_stream().wait_stream(side)
    C.check_attention(got, want, q, hm, torch.float16)


def test_cuda_rejects_unsupported_head_dim(need_backend):
    """Python's limit check (backends.LIMITS) refuses it before any launch, with one message;
    without a forced backend the dispatch skips cuda and runs triton instead."""
    need_backend("cuda")
    q = torch.randn(1, 2, 1, 300, device=DEV)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run head_patched_attention: head_dim 300 "
                                           r"exceeds its limit of 256 \(the CUDA kernels support head_dim "
                                           r"1\.\.256; use backend='triton' or 'reference'\)"):
        pk.head_patched_attention(q, q, q, backend="cuda")
    if backends._usable("triton", q.device) is None:
        assert backends.resolve("head_patched_attention", q.device, head_dim=300)[0] == "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["head_patched_attention", "head_slice_grad", "head_slice_apply"])
def test_backend_passes_its_self_check(need_backend, backend, op):
    """The once-per-process check (pinpoint_kernels.self_check) passes on this GPU in every
    dtype at the head_dims real models use; a failure here means dispatch would fall back."""
    need_backend(backend)  # runs even under PINPOINT_SELF_CHECK=0 (gpu_check's Triton step)
    fn = backends._launcher(backend, op, torch.device(DEV))
    for dtype in C.DTYPES:
        for head_dim in (64, 128):
            self_check.run(op, fn, torch.device(DEV), dtype, head_dim)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_device_keeps_current_device(need_backend, backend):
    need_backend(backend)
    torch.cuda.set_device(0)
    case = dict(R=2, Tq=20, Tk=20, Hq=4, Hkv=2, D=64, mask_mode="random", patch_mode="full")
    q, k, v, hm, patch, kw = C.attention_case(dtype=torch.bfloat16, device="cuda:1", **case)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend=backend, **kw)
    assert torch.cuda.current_device() == 0 and got.device == q.device
    C.check_attention(got, ref.head_patched_attention(q, k, v, hm, patch, **kw), q, hm, torch.bfloat16)


# ------------------------------------------------------------------------------------------
# head_slice_grad / head_slice_apply

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("case", C.GRAD_CASES, ids=lambda c: f"N{c[0]}-D{c[2]}-{c[5]}")
def test_grad_cases(need_backend, backend, dtype, case):
    need_backend(backend)
    dy, x, heads = C.grad_case(*case, dtype=dtype, device=DEV)
    by = case[5]
    want = ref.head_slice_grad(dy, x, heads, case[2], by=by)
    got = pk.head_slice_grad(dy, x, heads, case[2], by=by, backend=backend)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **C.GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@settings(max_examples=EXAMPLES, **HSETTINGS)
@given(c=C.grad_shapes)
def test_grad_random_shapes(need_backend, backend, dtype, c):
    need_backend(backend)
    g = torch.Generator().manual_seed(c["seed"])
    heads = torch.randperm(c["H"], generator=g)[: min(c["n_sel"], c["H"])].tolist()
    dy, x, heads = C.grad_case(c["N"], c["H"], c["D"], c["other"], heads, c["by"], dtype, seed=c["seed"],
                               device=DEV)
    want = ref.head_slice_grad(dy, x, heads, c["D"], by=c["by"])
    got = pk.head_slice_grad(dy, x, heads, c["D"], by=c["by"], backend=backend)
    torch.testing.assert_close(got, want, **C.GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_strided_batched_and_mixed_dtypes(need_backend, backend):
    need_backend(backend)
    dy = torch.randn(3, 10, 64, device=DEV)[:, ::2]  # [3, 5, 64], strided tokens
    x = torch.randn(3, 5, 40, device=DEV)
    want = ref.head_slice_grad(dy.contiguous(), x, torch.tensor([1, 3]), 16)
    torch.testing.assert_close(pk.head_slice_grad(dy, x, [1, 3], 16, backend=backend), want, **C.GRAD_TOL)
    dyb = dy.to(torch.bfloat16)  # bf16 grad with fp32 activations
    want = ref.head_slice_grad(dyb, x, torch.tensor([0, 2]), 16, by="rows")
    torch.testing.assert_close(pk.head_slice_grad(dyb, x, [0, 2], 16, backend=backend), want, **C.GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_grad_llama_shape(need_backend, backend, by):
    """4 of 32 heads of 128 at in/out = 4096, N = 2048 tokens, bf16."""
    need_backend(backend)
    N, H, D, other = 2048, 32, 128, 4096
    dy, x, heads = C.grad_case(N, H, D, other, [0, 7, 19, 31], by, torch.bfloat16, device=DEV)
    want = ref.head_slice_grad(dy, x, heads, D, by=by)
    got = pk.head_slice_grad(dy, x, heads, D, by=by, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-4)  # sums of 2048 O(1) products


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_apply_then_detach_restores_weight(need_backend, backend, by, dtype):
    need_backend(backend)
    g = torch.Generator().manual_seed(1)
    H, D, other = 4, 16, 24
    shape = (H * D, other) if by == "rows" else (other, H * D)
    w0 = torch.randn(*shape, generator=g).to(dtype).to(DEV)
    heads = torch.tensor([2, 0], device=DEV)
    sl_shape = (2, D, other) if by == "rows" else (2, other, D)
    slices = (torch.randn(*sl_shape, generator=g) * 1e-3).to(DEV)
    w = w0.clone()
    pk.head_slice_apply(w, slices, heads, D, by=by, backend=backend)
    want = ref.head_slice_apply(w0.clone(), slices, heads, D, by=by)
    assert torch.equal(w, want)
    untouched = torch.ones(shape, dtype=torch.bool, device=DEV)
    for h in heads.tolist():
        (untouched[h * D:(h + 1) * D] if by == "rows" else untouched[:, h * D:(h + 1) * D]).fill_(False)
    assert torch.equal(w[untouched], w0[untouched])
    pk.head_slice_apply(w, slices, heads, D, by=by, alpha=-1.0, backend=backend)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(w.float(), w0.float(), atol=1e-6, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_on_transposed_conv1d_view_and_bf16_slices(need_backend, backend):
    need_backend(backend)
    conv_w = torch.randn(24, 32, device=DEV)  # GPT-2 Conv1D: [in, out]
    slices = torch.randn(1, 8, 24, device=DEV).to(torch.bfloat16)
    want = ref.head_slice_apply(conv_w.t().clone(), slices, torch.tensor([1], device=DEV), 8, by="rows")
    pk.head_slice_apply(conv_w.t(), slices, [1], 8, by="rows", backend=backend)
    assert torch.equal(conv_w.t(), want)


# ------------------------------------------------------------------------------------------
# head_slice_linear: the training path (forward, backward, autocast) on CUDA tensors

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.float16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp16", "autocast-bf16"])
def test_head_slice_linear(need_backend, monkeypatch, backend, by, dtype, autocast):
    """Its launchers (head_slice_apply, head_slice_grad) come from the dispatch, so the
    backend is forced through PINPOINT_BACKEND."""
    need_backend(backend)
    monkeypatch.setenv("PINPOINT_BACKEND", backend)
    C.check_head_slice_linear(pk, ref, by=by, dtype=dtype, device=DEV, autocast=autocast)
