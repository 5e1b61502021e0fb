"""A frozen projection whose selected head slices carry trainable fp32 deltas.

``head_slice_linear(x, weight, bias, delta, heads, head_dim, by=...)`` computes

    by="rows" (q/k/v: heads split the output features):
        Y = X · (W + scatter_rows(Δ))ᵀ + (b + scatter(Δb))      Δ [S, D, in], Δb [S, D]
    by="cols" (o_proj: heads split the input features):
        Y = Z · (W + scatter_cols(Δ))ᵀ + b                      Δ [S, out, D]

with W and b frozen (they never receive a gradient) and Δ/Δb trainable. It is an autograd
Function, so a model built on it trains with any torch optimizer.

**Forward.** W + scatter(Δ) is formed exactly as :func:`head_slice_apply` merges it (fp32
sum, one rounding to W's dtype) in a scratch copy of W, then the projection runs as one
ordinary GEMM (``F.linear`` for ``layout="linear"``, ``addmm`` like ``transformers``' Conv1D
for ``layout="conv1d"``). So the output equals, bit for bit, the stock module applied to the
merged weight: what you train is what ``merge`` gives you, even in bf16, and no extra GEMM
runs (a separate X·Δᵀ correction would cost S/H of the projection; the scratch copy costs
one pass over W's memory).

**Backward.** dX = dY · W_eff (dense, only when X requires grad; W_eff is rebuilt, not
saved), dΔ = :func:`head_slice_grad` (fp32, only the selected slices), dΔb = Σ dY[:, rows].
Saved for backward: X itself for by="rows" (the same tensor object for q, k and v, so it is
held once), and only the selected heads' columns Z[:, cols] ([N, S·D]) for by="cols". When
neither X nor Δ needs a gradient (inference, or under ``torch.no_grad``) nothing is saved
and no Function node is built.

**Autocast.** Under an enabled autocast the projection computes in the autocast dtype,
like a stock ``nn.Linear`` would: X is cast outside the Function (so its gradient flows
back through the cast) and W_eff is cast after the fp32 merge.

No model knowledge lives here: the caller says which heads, which layout, which dim.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from . import backends
from . import validation as V

__all__ = ["SliceIndex", "head_slice_linear", "effective_weight", "effective_bias"]

_BY = ("rows", "cols")
_LAYOUTS = ("linear", "conv1d")


class SliceIndex:
    """Validated, device-resident indices of the selected heads of one projection.

    Build once (e.g. when an adapter attaches) and pass to every :func:`head_slice_linear`
    call, so the per-call path does no host-device syncs for range/uniqueness checks.

    heads: S distinct head indices in [0, n_heads) (the projection's own numbering: for
    by="rows" blocks of head_dim output features, for by="cols" blocks of input features).
    """

    __slots__ = ("heads", "head_dim", "n_heads", "features", "local")

    def __init__(self, heads, head_dim: int, n_heads: int, *, device=None) -> None:
        op = "SliceIndex"
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"{op}: head_dim must be a positive int, got {head_dim!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0:
            raise ValueError(f"{op}: n_heads must be a positive int, got {n_heads!r}")
        device = torch.device(device) if device is not None else (
            heads.device if isinstance(heads, torch.Tensor) else torch.device("cpu"))
        if isinstance(heads, torch.Tensor):
            heads = heads.to(device)
        idx = V.index_vector(op, "heads", heads, length=None, upper=n_heads,
                             what=f"heads of head_dim {head_dim}", device=device)
        if idx.numel() == 0:
            raise ValueError(f"{op}: heads is empty; select at least one head")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{op}: heads must be distinct, got {idx.tolist()}")
        self.heads = idx
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.features = (idx[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)
        self.local = torch.arange(idx.numel(), device=device)

    @property
    def device(self) -> torch.device:
        return self.heads.device

    def __len__(self) -> int:
        return self.heads.numel()

    def to(self, device) -> "SliceIndex":
        device = torch.device(device)
        if device == self.device:
            return self
        out = SliceIndex.__new__(SliceIndex)
        out.head_dim, out.n_heads = self.head_dim, self.n_heads
        out.heads, out.features, out.local = (t.to(device) for t in (self.heads, self.features, self.local))
        return out

    def __repr__(self) -> str:
        return f"SliceIndex(heads={self.heads.tolist()}, head_dim={self.head_dim}, n_heads={self.n_heads})"


def _launcher(op: str, device: torch.device):
    return backends.resolve(op, device)[1]


def _oi(w: torch.Tensor, layout: str) -> torch.Tensor:
    """The [out, in] view of a weight stored in `layout`."""
    return w if layout == "linear" else w.t()


def effective_weight(weight: torch.Tensor, delta: torch.Tensor, index: SliceIndex, *, by: str,
                     layout: str = "linear", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor W + scatter(Δ) in weight's layout: fp32 sum rounded once to weight's
    dtype (exactly what :func:`head_slice_apply` merges), then cast to ``dtype`` if given."""
    w = weight.detach().clone()
    _launcher("head_slice_apply", w.device)(_oi(w, layout), delta.detach().contiguous(), index.heads,
                                            index.head_dim, by=by, alpha=1.0)
    return w if dtype is None or dtype == w.dtype else w.to(dtype)


def effective_bias(bias: torch.Tensor, delta_bias: torch.Tensor, index: SliceIndex,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor b + scatter(Δb) (fp32 sum, one rounding), cast to ``dtype`` if given."""
    b = bias.detach().clone()
    _launcher("head_slice_apply", b.device)(b[:, None], delta_bias.detach().reshape(len(index), -1, 1).contiguous(),
                                            index.heads, index.head_dim, by="rows", alpha=1.0)
    return b if dtype is None or dtype == b.dtype else b.to(dtype)


def _project(x, w_eff, b_eff, layout):
    if layout == "linear":
        return F.linear(x, w_eff, b_eff)
    # transformers' Conv1D: addmm(bias, x2d, weight[in, out]); reproduced op for op.
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b_eff, x2d, w_eff) if b_eff is not None else x2d @ w_eff
    return y.view(*x.shape[:-1], w_eff.shape[1])


def _forward_math(x, weight, bias, delta, delta_bias, index, by, layout, cdt):
    w_eff = effective_weight(weight, delta, index, by=by, layout=layout, dtype=cdt)
    b_eff = None
    if bias is not None:
        b_eff = (effective_bias(bias, delta_bias, index, dtype=cdt) if delta_bias is not None
                 else bias.detach().to(cdt))
    return _project(x, w_eff, b_eff, layout)


class _HeadSliceLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, delta, delta_bias, index, by, layout, cdt):
        with torch.autocast(x.device.type, enabled=False):
            y = _forward_math(x, weight, bias, delta, delta_bias, index, by, layout, cdt)
        if by == "rows":
            saved = x
        else:  # only the selected heads' input columns
            saved = x.reshape(-1, x.shape[-1]).index_select(1, index.features)
        ctx.save_for_backward(saved, weight, delta)
        ctx.meta = (index, by, layout, cdt, x.shape, delta_bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, weight, delta = ctx.saved_tensors
        index, by, layout, cdt, x_shape, has_db = ctx.meta
        need_x, _, _, need_delta, need_db = ctx.needs_input_grad[:5]
        dx = ddelta = ddb = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = V.unit_last_stride(dy.reshape(-1, dy.shape[-1]))
            if need_x:
                w_eff = effective_weight(weight, delta, index, by=by, layout=layout, dtype=cdt)
                w_oi = _oi(w_eff, layout)  # [out, in]
                dx = (dy2.to(cdt) @ w_oi).view(x_shape)
            if need_delta:
                grad = _launcher("head_slice_grad", dy2.device)
                if by == "rows":
                    x2 = V.unit_last_stride(saved.reshape(-1, saved.shape[-1]))
                    ddelta = grad(dy2, x2, index.heads, index.head_dim, by="rows")
                else:
                    ddelta = grad(dy2, saved, index.local, index.head_dim, by="cols")
                ddelta = ddelta.to(delta.dtype)
            if has_db and need_db:
                ddb = dy2.index_select(1, index.features).float().sum(0).view(len(index), index.head_dim)
        return dx, None, None, ddelta, ddb, None, None, None, None


def _check(x, weight, bias, delta, delta_bias, index, by, layout):
    op = "head_slice_linear"
    if by not in _BY:
        raise ValueError(f"{op}: by must be 'rows' (q/k/v) or 'cols' (o_proj), got {by!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be 'linear' (weight [out, in]) or 'conv1d' (weight [in, out]), "
                         f"got {layout!r}")
    x = V.tensor(op, "x", x, ndim=tuple(range(1, 9)), shape_doc="[..., in]")
    weight = V.tensor(op, "weight", weight, ndim=2, shape_doc="[out, in] (linear) or [in, out] (conv1d)")
    delta = V.tensor(op, "delta", delta, ndim=3, shape_doc="[S, D, in] (rows) or [S, out, D] (cols)")
    for name, t in (("x", x), ("weight", weight), ("delta", delta)):
        V.float_dtype(op, name, t)
    V.same_device(op, "x", x, weight=weight, delta=delta, bias=bias, delta_bias=delta_bias,
                  heads=index.heads)
    out_f, in_f = _oi(weight, layout).shape
    if x.shape[-1] != in_f:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features but the weight takes {in_f}")
    D, S = index.head_dim, len(index)
    n_heads = out_f // D if by == "rows" else in_f // D
    if (out_f if by == "rows" else in_f) % D or n_heads != index.n_heads:
        raise ValueError(f"{op}: the index is for {index.n_heads} heads of head_dim {D}, but the weight has "
                         f"{out_f if by == 'rows' else in_f} {'output' if by == 'rows' else 'input'} features")
    want = (S, D, in_f) if by == "rows" else (S, out_f, D)
    if tuple(delta.shape) != want:
        raise ValueError(f"{op}: delta must have shape {want} for {S} heads by {by}, got {tuple(delta.shape)}")
    if bias is not None:
        V.tensor(op, "bias", bias, ndim=1, shape_doc="[out]")
        if bias.shape[0] != out_f:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries, expected {out_f}")
    if delta_bias is not None:
        if by != "rows":
            raise ValueError(f"{op}: delta_bias is only defined for by='rows' (a head owns its output "
                             "features' bias entries; an o_proj bias is shared by all heads)")
        if bias is None:
            raise ValueError(f"{op}: delta_bias given but the projection has no bias")
        V.tensor(op, "delta_bias", delta_bias, ndim=2, shape_doc="[S, D]")
        if tuple(delta_bias.shape) != (S, D):
            raise ValueError(f"{op}: delta_bias must have shape {(S, D)}, got {tuple(delta_bias.shape)}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(f"{op}: weight and bias must be frozen (requires_grad=False); only delta and "
                         "delta_bias are trained through this op")


def head_slice_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    heads,
    head_dim: int | None = None,
    *,
    by: str = "rows",
    layout: str = "linear",
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = X·(W + scatter(Δ))ᵀ + b (+ scatter(Δb)), differentiable in X, Δ and Δb only.

    x [..., in]; weight [out, in] (``layout="linear"``, nn.Linear) or [in, out]
    (``layout="conv1d"``, transformers' Conv1D), frozen; bias [out] or None, frozen.
    by="rows": delta [S, D, in], delta_bias [S, D] or None. by="cols": delta [S, out, D].
    ``heads``: a :class:`SliceIndex` (validated once; preferred for repeated calls) or S
    distinct head indices, then ``head_dim`` is required. Returns [..., out] in x's dtype
    (or the autocast dtype). See the module docstring for the forward/backward contract.
    """
    if not isinstance(heads, SliceIndex):
        if head_dim is None:
            raise ValueError("head_slice_linear: head_dim is required when heads is not a SliceIndex")
        if by not in _BY or layout not in _LAYOUTS or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            _check(x, weight, bias, delta, delta_bias, None, by, layout)  # raises the precise error
        feats = _oi(weight, layout).shape[0 if by == "rows" else 1]
        if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim > 0 and feats % head_dim:
            raise ValueError(f"head_slice_linear: weight has {feats} {'output' if by == 'rows' else 'input'} "
                             f"features, not a multiple of head_dim {head_dim}")
        n_heads = feats // head_dim if isinstance(head_dim, int) and head_dim > 0 else 1
        heads = SliceIndex(heads, head_dim, max(n_heads, 1), device=weight.device)
    elif head_dim is not None and head_dim != heads.head_dim:
        raise ValueError(f"head_slice_linear: head_dim {head_dim} differs from the SliceIndex's {heads.head_dim}")
    _check(x, weight, bias, delta, delta_bias, heads, by, layout)

    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        x = x.to(cdt)
    else:
        cdt = weight.dtype
        if x.dtype != cdt:
            raise TypeError(f"head_slice_linear: x is {x.dtype} but the weight is {cdt} (outside autocast "
                            "they must match, as for nn.Linear)")
    track = torch.is_grad_enabled() and (
        x.requires_grad or delta.requires_grad or (delta_bias is not None and delta_bias.requires_grad))
    if not track:
        with torch.autocast(dev, enabled=False):
            return _forward_math(x, weight, bias, delta, delta_bias, heads, by, layout, cdt)
    return _HeadSliceLinear.apply(x, weight, bias, delta, delta_bias, heads, by, layout, cdt)
