"""Sparse head-slice gradients and merge/detach: the reference against full autograd of a
real nn.Linear, and every CPU-side backend against the reference.

Tolerances: the slices are fp32 sums over N token products. fp32 inputs: atol = rtol =
1e-5 (summation order only). bf16/fp16 inputs are widened exactly to fp32 on both sides,
so the same fp32 tolerance holds; the autograd comparison computes in the input dtype and
is only compared in fp32.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pinpoint_kernels as pk
from pinpoint_kernels import reference as ref

CPU_BACKENDS = [b for b in ("cpu",) if b in pk.available_backends("cpu")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_equals_autograd_of_linear(by, bias):
    """The definition: the selected slices of the ordinary full weight gradient."""
    torch.manual_seed(0)
    H, D, other, B, T = 4, 24, 40, 2, 5
    lin = torch.nn.Linear(other, H * D, bias=bias) if by == "rows" else torch.nn.Linear(H * D, other, bias=bias)
    x = torch.randn(B, T, lin.in_features)
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    heads = torch.tensor([3, 0])
    got = ref.head_slice_grad(dy, x, heads, D, by=by)
    full = lin.weight.grad
    if by == "rows":
        want = torch.stack([full[h * D:(h + 1) * D] for h in heads.tolist()])
    else:
        want = torch.stack([full[:, h * D:(h + 1) * D] for h in heads.tolist()])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


grad_cases = st.fixed_dictionaries({
    "N": st.integers(1, 70),
    "H": st.integers(1, 6),
    "D": st.sampled_from([1, 8, 24, 64, 80]),
    "other": st.integers(1, 150),
    "n_sel": st.integers(1, 6),
    "by": st.sampled_from(["rows", "cols"]),
    "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=40, deadline=None)
@given(c=grad_cases)
def test_grad_backend_matches_reference(backend, dtype, c):
    g = torch.Generator().manual_seed(c["seed"])
    H, D, N = c["H"], c["D"], c["N"]
    heads = torch.randperm(H, generator=g)[: min(c["n_sel"], H)]
    if c["by"] == "rows":
        dy, x = torch.randn(N, H * D, generator=g), torch.randn(N, c["other"], generator=g)
    else:
        dy, x = torch.randn(N, c["other"], generator=g), torch.randn(N, H * D, generator=g)
    dy, x = dy.to(dtype), x.to(dtype)
    want = ref.head_slice_grad(dy, x, heads, D, by=c["by"])
    got = pk.head_slice_grad(dy, x, heads, D, by=c["by"], backend=backend)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_strided_and_batched_inputs(backend):
    """Leading dims are flattened; a non-contiguous token dim needs no copy."""
    dy = torch.randn(3, 10, 64)[:, ::2]  # [3, 5, 64], strided tokens
    x = torch.randn(3, 5, 40)
    heads = [1, 3]
    want = ref.head_slice_grad(dy.contiguous(), x, torch.tensor(heads), 16)
    torch.testing.assert_close(pk.head_slice_grad(dy, x, heads, 16, backend=backend), want,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_then_detach_restores_weight(backend, by, dtype):
    g = torch.Generator().manual_seed(1)
    H, D, other = 4, 16, 24
    shape = (H * D, other) if by == "rows" else (other, H * D)
    w0 = torch.randn(*shape, generator=g).to(dtype)
    heads = torch.tensor([2, 0])
    sl_shape = (2, D, other) if by == "rows" else (2, other, D)
    slices = torch.randn(*sl_shape, generator=g) * 1e-3  # small deltas, as after training
    w = w0.clone()
    pk.head_slice_apply(w, slices, heads, D, by=by, backend=backend)
    want = ref.head_slice_apply(w0.clone(), slices, heads, D, by=by)
    assert torch.equal(w, want)
    untouched = torch.ones(shape, dtype=torch.bool)
    for h in heads.tolist():
        (untouched[h * D:(h + 1) * D] if by == "rows" else untouched[:, h * D:(h + 1) * D]).fill_(False)
    assert torch.equal(w[untouched], w0[untouched])  # bit-identical outside the slices
    # w + d - d rounds twice, so it is back within one ulp, not bit-exact (exact restore
    # is the adapter's job: it keeps the original slices).
    pk.head_slice_apply(w, slices, heads, D, by=by, alpha=-1.0, backend=backend)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(w.float(), w0.float(), atol=1e-6, rtol=tol)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_apply_on_transposed_conv1d_view(backend):
    """GPT-2's Conv1D stores [in, out]; its [out, in] view is transposed and must work."""
    conv_w = torch.randn(24, 32)  # [in, out]
    view = conv_w.t()
    slices = torch.randn(1, 8, 24)
    want = conv_w.t().clone()
    want[8:16] += slices[0]
    pk.head_slice_apply(view, slices, [1], 8, by="rows", backend=backend)
    torch.testing.assert_close(conv_w.t(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [4], 8), ValueError,
     r"heads\[0\] = 4 is out of range for 4 heads \(grad_out has 4 of head_dim 8\)"),
    (lambda: pk.head_slice_grad(torch.randn(4, 8), torch.randn(4, 32), [-1], 8, by="cols"), ValueError,
     r"heads\[0\] = -1 is out of range for 4 heads \(inp has 4"),
    (lambda: pk.head_slice_grad(torch.randn(4, 30), torch.randn(4, 8), [0], 8), ValueError,
     r"30 features, not a multiple of head_dim 8"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(5, 8), [0], 8), ValueError,
     r"must agree in every dim but the last"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [0, 0], 8), ValueError,
     r"heads must be distinct"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [], 8), ValueError,
     r"heads is empty"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [0], 8, by="diag"), ValueError,
     r"by must be 'rows' \(q/k/v\) or 'cols' \(o_proj\)"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32).double(), torch.randn(4, 8), [0], 8), TypeError,
     r"grad_out must be float32, bfloat16 or float16"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8).to("meta"), [0], 8), ValueError,
     r"inp is on meta but grad_out is on cpu"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [0], 0), ValueError,
     r"head_dim must be a positive int"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [1.5], 8), TypeError,
     r"heads must be an int tensor or a sequence of ints"),
    (lambda: pk.head_slice_grad(torch.randn(32), torch.randn(4, 8), [0], 8), ValueError,
     r"must agree in every dim but the last"),
    (lambda: pk.head_slice_apply(torch.randn(32, 8), torch.randn(1, 8, 7), [0], 8), ValueError,
     r"slices must have shape \(1, 8, 8\)"),
    (lambda: pk.head_slice_apply(torch.randn(32, 8), torch.randn(1, 8, 8), [4], 8), ValueError,
     r"heads\[0\] = 4 is out of range for 4 heads"),
    (lambda: pk.head_slice_apply(torch.randn(2, 32, 8), torch.randn(1, 8, 8), [0], 8), ValueError,
     r"weight must be 2-D"),
    (lambda: pk.head_slice_grad(torch.randn(4, 32), torch.randn(4, 8), [0], 8, backend="cuda"), RuntimeError,
     r"backend 'cuda' cannot run head_slice_grad"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
