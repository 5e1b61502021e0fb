"""The ops registered with torch.library (``pinpoint::*``): torch.compile(fullgraph=True),
fake/meta shapes without a kernel, torch.library.opcheck, and autograd formulas.

Tolerances: compiled vs eager runs the same kernels on the same inputs, so results are
compared exactly (torch.equal). Against pinpoint_kernels.reference the kernels differ in
summation order only: fp32 atol = rtol = 1e-5 (see test_attention / test_head_slice).
Gradient checks in float64 (reference backend) use torch.autograd.gradcheck's defaults.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn import functional as F

import pinpoint_kernels as pk
from pinpoint_kernels import backends, library
from pinpoint_kernels import reference as ref
from pinpoint_kernels.head_slice_linear import SliceIndex

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

FP32 = dict(atol=1e-5, rtol=1e-5)


def _attn_case(g, dtype=torch.float32, grad=False):
    q = torch.randn(3, 4, 4, 8, generator=g).to(dtype)
    k = torch.randn(2, 5, 2, 8, generator=g).to(dtype)
    v = torch.randn(2, 5, 2, 8, generator=g).to(dtype)
    hm = torch.tensor([[True, False, False, True], [False] * 4, [False, True, False, False]])
    patch = torch.randn(2, 4, 4, 8, generator=g).to(dtype)
    kw = dict(kv_index=torch.tensor([1, 0, 1]), patch_index=torch.tensor([0, 1, 1]),
              key_padding_mask=torch.tensor([[True] * 5, [False, True, True, True, True]]))
    if grad:
        for t in (q, k, v, patch):
            t.requires_grad_()
    return q, k, v, hm, patch, kw


def _linear_case(g, *, by, layout="linear", dtype=torch.float32, H=4, D=8, other=12, N=5):
    out_f, in_f = (H * D, other) if by == "rows" else (other, H * D)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    if layout == "conv1d":
        w = w.t().contiguous()
    b = torch.randn(out_f, generator=g).to(dtype)
    idx = SliceIndex([3, 1], D, H)
    delta = (torch.randn(*((2, D, in_f) if by == "rows" else (2, out_f, D)), generator=g) * 0.1).requires_grad_()
    db = (torch.randn(2, D, generator=g) * 0.1).requires_grad_() if by == "rows" else None
    x = torch.randn(N, in_f, generator=g).to(dtype).requires_grad_()
    return x, w, b, delta, db, idx


def _dense(x, w, b, delta, db, idx, by, layout="linear"):
    """Plain autograd: a dense F.linear on W + scatter(Δ) built differentiably (fp32 sum,
    one rounding to W's dtype), so dΔ is the slices of the ordinary dense dW."""
    w_oi = (w if layout == "linear" else w.t()).float()
    f = idx.features
    if by == "rows":
        w_eff = w_oi.index_add(0, f, delta.reshape(-1, w_oi.shape[1]))
    else:
        w_eff = w_oi.index_add(1, f, delta.permute(1, 0, 2).reshape(w_oi.shape[0], -1))
    b_eff = b.float().index_add(0, f, db.reshape(-1)) if db is not None else b.float()
    return F.linear(x, w_eff.to(w.dtype), b_eff.to(w.dtype))


# ---- torch.compile(fullgraph=True) --------------------------------------------------------

def test_compiled_attention_and_slice_ops_match_eager_and_reference():
    """backend="aot_eager": dynamo, fake-tensor tracing and AOT autograd, i.e. everything that
    uses the registrations; inductor only changes the code around these opaque ops (the
    inductor test below covers head_slice_linear)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, hm, patch, kw = _attn_case(g)
    dy, x = torch.randn(6, 32, generator=g), torch.randn(6, 12, generator=g)

    def fn(q, k, v, hm, patch, kv_index, patch_index, kpm, dy, x, w):
        out = pk.head_patched_attention(q, k, v, hm, patch, kv_index=kv_index, patch_index=patch_index,
                                        key_padding_mask=kpm)
        grad = pk.head_slice_grad(dy, x, [3, 1], 8)
        pk.head_slice_apply(w, grad * 1e-2, [3, 1], 8)
        return out, grad

    args = (q, k, v, hm, patch, kw["kv_index"], kw["patch_index"], kw["key_padding_mask"], dy, x)
    w0 = torch.randn(32, 12, generator=g)
    w_eager, w_comp = w0.clone(), w0.clone()
    want = fn(*args, w_eager)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args, w_comp)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(w_comp, w_eager) and not torch.equal(w_comp, w0)  # the mutation happened, once
    torch.testing.assert_close(got[0], ref.head_patched_attention(q, k, v, hm, patch, **kw), **FP32)
    torch.testing.assert_close(got[1], ref.head_slice_grad(dy, x, torch.tensor([3, 1]), 8), **FP32)
    torch.testing.assert_close(w_comp, ref.head_slice_apply(w0.clone(), want[1] * 1e-2, torch.tensor([3, 1]), 8),
                               **FP32)


@pytest.mark.parametrize("by", ["rows", "cols"])
def test_compiled_head_slice_linear_forward_and_backward_inductor(by):
    """The default backend (inductor): forward bit-identical to eager, gradients equal."""
    g = torch.Generator().manual_seed(1)
    x, w, b, delta, db, idx = _linear_case(g, by=by)

    def fn(x, delta, db):
        return pk.head_slice_linear(torch.tanh(x), w, b, delta, idx, by=by, delta_bias=db).square().sum()

    eager = fn(x, delta, db)
    grads_eager = torch.autograd.grad(eager, [x, delta] + ([db] if db is not None else []))
    comp = torch.compile(fn, fullgraph=True)(x, delta, db)
    grads_comp = torch.autograd.grad(comp, [x, delta] + ([db] if db is not None else []))
    torch.testing.assert_close(comp, eager, **FP32)  # tanh/square may be fused: not bit-exact
    for a, e in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, e, **FP32)
    dense = _dense(torch.tanh(x), w, b, delta, db, idx, by).square().sum()
    for a, e in zip(grads_comp, torch.autograd.grad(dense, [x, delta] + ([db] if db is not None else []))):
        torch.testing.assert_close(a, e, **FP32)


def test_compiled_attention_backward_matches_reference_autograd():
    g = torch.Generator().manual_seed(2)
    q, k, v, hm, patch, kw = _attn_case(g, grad=True)

    def fn(q, k, v, patch):
        return pk.head_patched_attention(q, k, v, hm, patch, **kw).square().sum()

    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, patch),
                              [q, k, v, patch])
    want = torch.autograd.grad(ref.head_patched_attention(q, k, v, hm, patch, **kw).square().sum(),
                               [q, k, v, patch])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **FP32)


# ---- fake / meta tensors ------------------------------------------------------------------

@pytest.fixture
def no_kernels(monkeypatch):
    """Any backend lookup fails: a shape computed with this active ran no kernel."""
    def refuse(op, *a, **k):
        raise AssertionError(f"a kernel for {op} was requested")
    monkeypatch.setattr(backends, "resolve", refuse)


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_fake_and_meta_give_shapes_without_a_kernel(device, no_kernels):
    mode = FakeTensorMode() if device == "fake" else torch.device("meta")
    with mode:
        q, k = torch.randn(3, 4, 4, 8), torch.randn(2, 5, 2, 8)
        out = pk.head_patched_attention(q, k, k, torch.zeros(3, 4, dtype=torch.bool), torch.randn(1, 4, 4, 8),
                                        kv_index=torch.tensor([1, 0, 1]))
        grad_rows = pk.head_slice_grad(torch.randn(6, 32).bfloat16(), torch.randn(6, 12).bfloat16(), [3, 1], 8)
        grad_cols = pk.head_slice_grad(torch.randn(2, 3, 12), torch.randn(2, 3, 32), [0, 2, 1], 8, by="cols")
        w = torch.randn(12, 32)
        assert pk.head_slice_apply(w, torch.randn(1, 12, 8), [2], 8, by="cols") is w
        x = torch.randn(2, 5, 12, requires_grad=True)
        d = torch.randn(2, 8, 12, requires_grad=True)
        y = pk.head_slice_linear(x, torch.randn(12, 32), torch.randn(32), d, [3, 1], 8, layout="conv1d")
        y.sum().backward()
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32
    assert grad_rows.shape == (2, 8, 12) and grad_rows.dtype == torch.float32  # fp32 from bf16
    assert grad_cols.shape == (3, 12, 8)
    assert y.shape == (2, 5, 32) and d.grad.shape == d.shape and x.grad.shape == x.shape
    for t in (out, grad_rows, y):
        assert isinstance(t, FakeTensor) if device == "fake" else t.is_meta


# ---- torch.library.opcheck ----------------------------------------------------------------

def test_opcheck_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v, hm, patch, kw = _attn_case(g, grad=True)
    torch.library.opcheck(library.head_patched_attention,
                          (q, k, v, None, None, kw["kv_index"], None, None, 0.3, True, None))
    torch.library.opcheck(library.head_patched_attention,
                          (q, k, v, hm, patch, kw["kv_index"], kw["patch_index"], kw["key_padding_mask"], 0.3,
                           False, None))


@pytest.mark.parametrize("by", ["rows", "cols"])
def test_opcheck_slice_ops(by):
    g = torch.Generator().manual_seed(4)
    x, w, b, delta, db, idx = _linear_case(g, by=by)
    out_f = w.shape[0]
    dy = torch.randn(x.shape[0], out_f, generator=g, requires_grad=True)
    torch.library.opcheck(library.head_slice_grad, (dy, x, idx.heads, 8, by, None))  # x is Z [N, H*D] by cols
    torch.library.opcheck(library.head_slice_apply, (w.clone(), delta.detach(), idx.heads, 8, by, 1.0, None))
    torch.library.opcheck(library.head_slice_linear,
                          (x, w, b, delta, db, idx.heads, idx.features, 8, by, "linear", torch.float32))
    torch.library.opcheck(library.head_slice_linear_input_grad,
                          (dy.detach(), w, delta.detach(), idx.heads, idx.features, 8, by, "linear", torch.float32))


# ---- autograd formulas --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_grads_equal_autograd_through_the_reference(dtype):
    """The registered backward against autograd of the definition (the reference computes in
    fp32 whatever the input dtype, so float64 gradcheck does not apply). The op's forward
    runs the default (native) backend; its backward is the reference's VJP, so the
    gradients agree to fp32 rounding (bf16: one rounding of each gradient to bf16)."""
    g = torch.Generator().manual_seed(5)
    q, k, v, hm, patch, kw = _attn_case(g, dtype=dtype, grad=True)
    dy = torch.randn(3, 4, 32, generator=g).to(dtype)
    got = torch.autograd.grad(pk.head_patched_attention(q, k, v, hm, patch, **kw), [q, k, v, patch], dy)
    want = torch.autograd.grad(ref.head_patched_attention(q, k, v, hm, patch, **kw), [q, k, v, patch], dy)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e, **(FP32 if dtype == torch.float32 else dict(atol=1e-5, rtol=0)))
    assert torch.all(got[0].view(3, 4, 4, 8)[hm[:, None, :, None].expand(3, 4, 4, 8)] == 0)  # patched: no dq


@pytest.mark.parametrize("by", ["rows", "cols"])
def test_head_slice_grad_grads_equal_autograd_through_the_reference(by):
    """head_slice_grad is bilinear; its registered VJP against autograd of the reference."""
    g = torch.Generator().manual_seed(6)
    dy = torch.randn(2, 5, 32 if by == "rows" else 7, generator=g, requires_grad=True)
    x = torch.randn(2, 5, 7 if by == "rows" else 32, generator=g, requires_grad=True)
    heads = torch.tensor([2, 0])
    gout = torch.randn(*((2, 8, 7) if by == "rows" else (2, 7, 8)), generator=g)
    got = torch.autograd.grad(pk.head_slice_grad(dy, x, heads, 8, by=by), [dy, x], gout)
    want = torch.autograd.grad(ref.head_slice_grad(dy, x, heads, 8, by=by), [dy, x], gout)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, **FP32)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_head_slice_linear_grads_equal_dense_autograd_fp32(by, layout):
    g = torch.Generator().manual_seed(7)
    x, w, b, delta, db, idx = _linear_case(g, by=by, layout=layout)
    y = pk.head_slice_linear(x, w, b, delta, idx, by=by, layout=layout, delta_bias=db)
    y2 = _dense(x, w, b, delta, db, idx, by, layout)
    assert torch.equal(y, y2)  # the stock GEMM on the merged weight: bit for bit
    dy = torch.randn(y.shape, generator=g)
    params = [x, delta] + ([db] if db is not None else [])
    for a, e in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y2, params, dy)):
        torch.testing.assert_close(a, e, **FP32)


@pytest.mark.parametrize("by", ["rows", "cols"])
def test_head_slice_linear_grads_equal_dense_autograd_bf16(by):
    """bf16 weights and activations. dX: both sides are one bf16 GEMM on the same merged
    weight, so equal. dΔ/dΔb: ours accumulates bf16 products in fp32 and stays fp32; dense
    autograd rounds dW (and db) to bf16 once, so they differ by <= 1 bf16 ulp of the
    gradient: rtol = 2**-7, plus atol 1e-3 for entries near zero."""
    g = torch.Generator().manual_seed(8)
    x, w, b, delta, db, idx = _linear_case(g, by=by, dtype=torch.bfloat16, N=16)
    y = pk.head_slice_linear(x, w, b, delta, idx, by=by, delta_bias=db)
    y2 = _dense(x, w, b, delta, db, idx, by)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y2)
    dy = torch.randn(y.shape, generator=g).bfloat16()
    params = [x, delta] + ([db] if db is not None else [])
    got, want = torch.autograd.grad(y, params, dy), torch.autograd.grad(y2, params, dy)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, e.float(), atol=1e-3, rtol=2**-7)
