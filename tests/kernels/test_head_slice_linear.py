"""head_slice_linear: the autograd Function behind pinpoint tuning, against plain autograd
through an explicitly merged weight.

Forward: bit-identical to the stock op (F.linear / Conv1D's addmm) on the weight that
head_slice_apply merges (fp32 sum, one rounding), so tests compare with torch.equal.
Backward: dX, dΔ, dΔb against autograd of that merged weight, fp32, atol = rtol = 1e-5
(summation order only).
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pinpoint_kernels as pk
from pinpoint_kernels import library
from pinpoint_kernels.head_slice_linear import SliceIndex, effective_bias, effective_weight, head_slice_linear


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _stock(x, w, b, layout):
    """What nn.Linear / transformers' Conv1D compute."""
    if layout == "linear":
        return F.linear(x, w, b)
    x2 = x.reshape(-1, x.shape[-1])
    return torch.addmm(b, x2, w).view(*x.shape[:-1], w.shape[1])


def _case(g, *, H, D, other, n_sel, by, layout, bias, dtype=torch.float32, lead=(2, 3)):
    heads = torch.randperm(H, generator=g)[:n_sel]
    out_f, in_f = (H * D, other) if by == "rows" else (other, H * D)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    if layout == "conv1d":
        w = w.t().contiguous()  # stored [in, out]
    b = torch.randn(out_f, generator=g).to(dtype) if bias or layout == "conv1d" else None
    dshape = (n_sel, D, in_f) if by == "rows" else (n_sel, out_f, D)
    delta = (torch.randn(*dshape, generator=g) * 0.1).requires_grad_()
    db = (torch.randn(n_sel, D, generator=g) * 0.1).requires_grad_() if (by == "rows" and b is not None) else None
    x = torch.randn(*lead, in_f, generator=g).to(dtype).requires_grad_()
    return heads, w, b, delta, db, x


def _merged(w, b, delta, db, heads, D, by, layout):
    wm = w.clone()
    pk.head_slice_apply(wm if layout == "linear" else wm.t(), delta.detach(), heads, D, by=by)
    bm = None if b is None else b.clone()
    if db is not None:
        pk.head_slice_apply(bm[:, None], db.detach()[..., None], heads, D, by="rows")
    return wm, bm


def _slices(full_grad, heads, D, by, layout):
    g = full_grad if layout == "linear" else full_grad.t()  # [out, in]
    if by == "rows":
        return torch.stack([g[h * D:(h + 1) * D] for h in heads.tolist()])
    return torch.stack([g[:, h * D:(h + 1) * D] for h in heads.tolist()])


cases = st.fixed_dictionaries({
    "H": st.integers(1, 6),
    "D": st.sampled_from([1, 4, 8, 16]),
    "other": st.integers(1, 40),
    "n_sel": st.integers(1, 6),
    "by": st.sampled_from(["rows", "cols"]),
    "layout": st.sampled_from(["linear", "conv1d"]),
    "bias": st.booleans(),
    "lead": st.sampled_from([(5,), (2, 3), (1, 1, 4)]),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=40, deadline=None)
@given(c=cases)
def test_matches_autograd_through_merged_weight(c):
    g = torch.Generator().manual_seed(c["seed"])
    H, D, by, layout = c["H"], c["D"], c["by"], c["layout"]
    n_sel = min(c["n_sel"], H)
    heads, w, b, delta, db, x = _case(g, H=H, D=D, other=c["other"], n_sel=n_sel, by=by, layout=layout,
                                      bias=c["bias"], lead=c["lead"])
    y = head_slice_linear(x, w, b, delta, heads, D, by=by, layout=layout, delta_bias=db)

    wm, bm = _merged(w, b, delta, db, heads, D, by, layout)
    wm.requires_grad_()
    if bm is not None:
        bm.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = _stock(x2, wm, bm, layout)
    assert torch.equal(y, y2)  # forward: the stock op on the merged weight, bit for bit

    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert delta.grad.dtype == torch.float32
    torch.testing.assert_close(delta.grad, _slices(wm.grad, heads, D, by, layout), atol=1e-5, rtol=1e-5)
    if db is not None:
        want = torch.stack([bm.grad[h * D:(h + 1) * D] for h in heads.tolist()])
        torch.testing.assert_close(db.grad, want, atol=1e-5, rtol=1e-5)
    assert w.grad is None and (b is None or b.grad is None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_half_precision_forward_is_stock_op_on_merged_weight(dtype, by):
    """16-bit weights: the fp32 delta is merged with one rounding, exactly as merge() does."""
    g = torch.Generator().manual_seed(3)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=24, n_sel=2, by=by, layout="linear", bias=True, dtype=dtype)
    y = head_slice_linear(x, w, b, delta, heads, 8, by=by, delta_bias=db)
    wm, bm = _merged(w, b, delta, db, heads, 8, by, "linear")
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, wm, bm))
    y.float().sum().backward()
    assert delta.grad.dtype == torch.float32 and x.grad.dtype == dtype


def test_autocast_computes_like_a_stock_linear_under_autocast():
    g = torch.Generator().manual_seed(4)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="rows", layout="linear", bias=True)
    wm, bm = _merged(w, b, delta, db, heads, 8, "rows", "linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head_slice_linear(x, w, b, delta, heads, 8, by="rows", delta_bias=db)
        y2 = F.linear(x, wm, bm)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y2)
    y.float().sum().backward()
    assert delta.grad.dtype == torch.float32 and db.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32  # flows back through the cast


def test_cols_saves_only_the_selected_columns_and_rows_saves_x_itself():
    g = torch.Generator().manual_seed(5)
    H, D, N = 8, 4, 10
    # o_proj: Z [N, H*D] -> only Z[:, cols] ([N, S*D]) is kept for backward.
    heads, w, b, delta, _, z = _case(g, H=H, D=D, other=12, n_sel=2, by="cols", layout="linear", bias=False, lead=(N,))
    y = head_slice_linear(z, w, None, delta, heads, D, by="cols")
    acts = [t for t in y.grad_fn.saved_tensors if t.shape not in (w.shape, delta.shape)]
    assert [tuple(t.shape) for t in acts] == [(N, 2 * D)]
    cols = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads.tolist()])
    assert torch.equal(acts[0], z.detach()[:, cols])
    # q/k/v: X is saved as is (no copy), so q, k and v share it.
    heads, w, b, delta, _, x = _case(g, H=H, D=D, other=12, n_sel=2, by="rows", layout="linear", bias=False, lead=(N,))
    y = head_slice_linear(x, w, None, delta, heads, D, by="rows")
    acts = [t for t in y.grad_fn.saved_tensors if t.shape not in (w.shape, delta.shape)]
    assert len(acts) == 1 and acts[0].data_ptr() == x.data_ptr()


def test_input_without_grad_gets_none_and_slices_still_train():
    g = torch.Generator().manual_seed(6)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=3, by="rows", layout="conv1d", bias=True)
    x = x.detach()
    head_slice_linear(x, w, b, delta, heads, 8, by="rows", layout="conv1d", delta_bias=db).sum().backward()
    assert x.grad is None and delta.grad is not None and db.grad is not None


def test_no_grad_builds_no_graph_and_index_is_reusable():
    g = torch.Generator().manual_seed(7)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="rows", layout="linear", bias=True)
    idx = SliceIndex(heads, 8, 4)
    with torch.no_grad():
        y = head_slice_linear(x, w, b, delta, idx, by="rows", delta_bias=db)
    assert y.grad_fn is None
    assert torch.equal(y, head_slice_linear(x, w, b, delta, heads, 8, by="rows", delta_bias=db).detach())


def test_zero_delta_is_the_stock_projection_bit_for_bit():
    g = torch.Generator().manual_seed(8)
    for layout in ("linear", "conv1d"):
        heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="rows", layout=layout, bias=True)
        with torch.no_grad():
            delta.zero_()
            db.zero_()
        assert torch.equal(head_slice_linear(x, w, b, delta, heads, 8, by="rows", layout=layout, delta_bias=db),
                           _stock(x, w, b, layout))


def _bad(**over):
    args = dict(x=torch.randn(3, 16), weight=torch.randn(32, 16), bias=None, delta=torch.zeros(1, 8, 16),
                heads=[1], head_dim=8, by="rows", layout="linear", delta_bias=None)
    args.update(over)
    x, w, b, d, h, hd = (args.pop(k) for k in ("x", "weight", "bias", "delta", "heads", "head_dim"))
    return lambda: head_slice_linear(x, w, b, d, h, hd, **args)


@pytest.mark.parametrize("call, exc, match", [
    (_bad(delta=torch.zeros(1, 8, 15)), ValueError, r"delta must have shape \(1, 8, 16\)"),
    (_bad(heads=[4]), ValueError, r"heads\[0\] = 4 is out of range for 4"),
    (_bad(heads=[1, 1], delta=torch.zeros(2, 8, 16)), ValueError, r"heads must be distinct"),
    (_bad(heads=[]), ValueError, r"heads is empty"),
    (_bad(by="diag"), ValueError, r"by must be 'rows' \(q/k/v\) or 'cols' \(o_proj\)"),
    (_bad(layout="conv2d"), ValueError, r"layout must be 'linear'"),
    (_bad(head_dim=5), ValueError, r"32 output features, not a multiple of head_dim 5"),
    (_bad(x=torch.randn(3, 17)), ValueError, r"x has 17 input features but the weight takes 16"),
    (_bad(x=torch.randn(3, 16).double()), TypeError, r"x must be float32, bfloat16 or float16"),
    (_bad(x=torch.randn(3, 16).bfloat16()), TypeError, r"x is torch.bfloat16 but the weight is torch.float32"),
    (_bad(weight=torch.randn(32, 16, requires_grad=True)), ValueError, r"weight and bias must be frozen"),
    (_bad(delta_bias=torch.zeros(1, 8)), ValueError, r"delta_bias given but the projection has no bias"),
    (_bad(by="cols", weight=torch.randn(16, 32), x=torch.randn(3, 32), delta=torch.zeros(1, 16, 8),
          bias=torch.zeros(16), delta_bias=torch.zeros(1, 8)), ValueError, r"delta_bias is only defined for by='rows'"),
    (_bad(head_dim=None), ValueError, r"head_dim is required"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- no full-weight copies (issue 13): W is merged in place for one GEMM, then restored ----

class _NewAllocations(TorchDispatchMode):
    """Sizes (numel) of op outputs that are fresh allocations: not a view of, nor an in-place
    result on, any input's storage. Steps into pinpoint's registered ops."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("pinpoint::"):
            with self:
                return library.IMPLEMENTATIONS[name.split("::")[1]](*args, **kwargs)
        out = func(*args, **kwargs)
        ins = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.sizes.append((name, t.numel()))
        return out


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_no_full_weight_sized_tensor_is_allocated(by, layout):
    g = torch.Generator().manual_seed(9)
    # 8 heads, 2 selected: the slices are 1/4 of W; activations (5 tokens) are far smaller.
    heads, w, b, delta, db, x = _case(g, H=8, D=8, other=48, n_sel=2, by=by, layout=layout, bias=True, lead=(5,))
    idx = SliceIndex(heads, 8, 8)
    with _NewAllocations() as rec:
        y = head_slice_linear(x, w, b, delta, idx, by=by, layout=layout, delta_bias=db)
        y.backward(torch.ones_like(y))
    assert delta.grad is not None and x.grad is not None
    big = [(n, s) for n, s in rec.sizes if s >= w.numel()]
    assert big == [], f"full-weight-sized allocations: {big}"
    assert max(s for _, s in rec.sizes) <= w.numel() // 4  # at most the selected slices


def test_the_allocation_check_catches_a_weight_copy():
    """The old formulation (a merged copy of W per call) is caught by the same recorder."""
    g = torch.Generator().manual_seed(10)
    heads, w, b, delta, db, x = _case(g, H=8, D=8, other=48, n_sel=2, by="rows", layout="linear", bias=True)
    with _NewAllocations() as rec:
        effective_weight(w, delta, SliceIndex(heads, 8, 8), by="rows")
    assert any(s >= w.numel() for _, s in rec.sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_equals_the_old_copy_based_formulation_bit_for_bit(by, layout, dtype):
    """Forward and dX against the previous implementation (stock op / dY·W_eff on a merged
    copy of W): the same GEMMs on the same values, so equal bit for bit in fp32 and bf16.
    dΔ is computed by the same head_slice_grad call as before, so it is not re-checked here."""
    g = torch.Generator().manual_seed(11)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=24, n_sel=2, by=by, layout=layout, bias=True, dtype=dtype)
    idx = SliceIndex(heads, 8, 4)
    y = head_slice_linear(x, w, b, delta, idx, by=by, layout=layout, delta_bias=db)
    w_eff = effective_weight(w, delta, idx, by=by, layout=layout)
    b_eff = effective_bias(b, db, idx) if db is not None else b
    assert torch.equal(y, _stock(x.detach(), w_eff, b_eff, layout))
    dy = torch.randn(y.shape, generator=g).to(dtype)
    (dx,) = torch.autograd.grad(y, [x], dy)
    w_oi = w_eff if layout == "linear" else w_eff.t()
    assert torch.equal(dx, (dy.reshape(-1, dy.shape[-1]) @ w_oi).view(x.shape))


def test_weight_is_restored_exactly_and_keeps_its_version():
    g = torch.Generator().manual_seed(12)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="rows", layout="conv1d", bias=True,
                                      dtype=torch.bfloat16)
    w0, version = w.clone(), w._version
    # Two forwards before one backward: nothing saved for backward is invalidated.
    y = head_slice_linear(x, w, b, delta, heads, 8, layout="conv1d", delta_bias=db)
    y2 = head_slice_linear(x * 2, w, b, delta, heads, 8, layout="conv1d", delta_bias=db)
    (y.float().sum() + y2.float().sum()).backward()
    assert torch.equal(w, w0) and w._version == version
    assert delta.grad is not None and torch.isfinite(delta.grad).all()


def test_weight_is_restored_when_the_gemm_fails(monkeypatch):
    g = torch.Generator().manual_seed(13)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="cols", layout="linear", bias=False)
    w0 = w.clone()

    def boom(*a, **k):
        raise RuntimeError("GEMM failed")

    monkeypatch.setattr(library, "_project", boom)
    with pytest.raises(RuntimeError, match="GEMM failed"):
        head_slice_linear(x, w, None, delta, heads, 8, by="cols")
    assert torch.equal(w, w0)


def test_concurrent_calls_on_one_weight_stay_correct():
    """Merges into one weight are serialised: threads see the right output, and the weight
    is the original at the end."""
    g = torch.Generator().manual_seed(14)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="rows", layout="linear", bias=True)
    w0 = w.clone()
    with torch.no_grad():
        want = head_slice_linear(x, w, b, delta, heads, 8, delta_bias=db)
        idx = SliceIndex(heads, 8, 4)
    bad = []

    def work():
        with torch.no_grad():
            for _ in range(100):
                if not torch.equal(head_slice_linear(x, w, b, delta, idx, delta_bias=db), want):
                    bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad and torch.equal(w, w0)


def test_weight_made_under_inference_mode():
    """A model loaded under torch.inference_mode has inference-tensor weights, which may be
    written only inside inference mode: the temporary merge handles both cases."""
    g = torch.Generator().manual_seed(15)
    heads, w, b, delta, db, x = _case(g, H=4, D=8, other=16, n_sel=2, by="rows", layout="linear", bias=False)
    with torch.inference_mode():
        wi = w.clone()
    w0 = w.clone()
    want = head_slice_linear(x, w, None, delta, heads, 8).detach()
    assert torch.equal(head_slice_linear(x.detach(), wi, None, delta.detach(), heads, 8), want)
    with torch.inference_mode():
        assert torch.equal(head_slice_linear(x, wi, None, delta, heads, 8), want)
    assert torch.equal(wi, w0)
