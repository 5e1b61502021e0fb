"""A frozen projection whose selected head slices carry trainable fp32 deltas.

``head_slice_linear(x, weight, bias, delta, heads, head_dim, by=...)`` computes

    by="rows" (q/k/v: heads split the output features):
        Y = X · (W + scatter_rows(Δ))ᵀ + (b + scatter(Δb))      Δ [S, D, in], Δb [S, D]
    by="cols" (o_proj: heads split the input features):
        Y = Z · (W + scatter_cols(Δ))ᵀ + b                      Δ [S, out, D]

with W and b frozen (they never receive a gradient) and Δ/Δb trainable. It is differentiable
(a registered autograd formula), so a model built on it trains with any torch optimizer.

**Forward.** The selected slices of W are merged in place, W[slices] = round(W + Δ) (fp32
sum, one rounding, exactly as :func:`head_slice_apply` merges), the projection runs as one
ordinary GEMM on W (``F.linear`` for ``layout="linear"``, ``addmm`` like ``transformers``'
Conv1D for ``layout="conv1d"``), and the original slices are copied back bit for bit
(:func:`pinpoint_kernels.library.merged_weight`). So the output equals, bit for bit, the
stock module applied to the merged weight: what you train is what ``merge`` gives you,
even in bf16. No extra GEMM runs (a separate X·Δᵀ correction would cost S/H of the
projection and round differently) and no full-size copy of W is made: the only
temporaries are the saved original slices ([S·D, in] or [out, S·D]).

**Backward.** dX = dY · W_eff (dense, only when X requires grad; computed on W merged the
same way), dΔ = :func:`head_slice_grad` (fp32, only the selected slices), dΔb = Σ dY[:, rows].
Saved for backward: X itself for by="rows" (the same tensor object for q, k and v, so it is
held once), and only the selected heads' columns Z[:, cols] ([N, S·D]) for by="cols". When
neither X nor Δ needs a gradient (inference, or under ``torch.no_grad``) nothing is saved
and no autograd node is built.

**Registered op.** The computation is the custom op ``pinpoint::head_slice_linear``
(:mod:`pinpoint_kernels.library`), so it works under ``torch.compile(fullgraph=True)`` and
with fake/meta tensors. The merge writes into the frozen weight for the length of one GEMM:
do not run the same attached module from several threads on different CUDA streams.

**Autocast.** Under an enabled autocast the projection computes in the autocast dtype,
like a stock ``nn.Linear`` would: X is cast outside the op (so its gradient flows back
through the cast) and the merged W is cast after the fp32 merge (a full-size cast copy, the
same one a stock ``nn.Linear`` makes under autocast).

No model knowledge lives here: the caller says which heads, which layout, which dim.
"""
from __future__ import annotations

import torch

from . import backends, library
from . import validation as V
from .library import oi_view

__all__ = ["SliceIndex", "head_slice_linear", "effective_weight", "effective_bias"]

_BY = ("rows", "cols")
_LAYOUTS = ("linear", "conv1d")


class SliceIndex:
    """Validated, device-resident indices of the selected heads of one projection.

    Build once (e.g. when an adapter attaches) and pass to every :func:`head_slice_linear`
    (or :func:`head_slice_grad` / :func:`head_slice_apply`) call: the range and uniqueness
    checks run here, once, on the host (one device sync for an accelerator tensor), so the
    per-call path reads no index values at all.

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
                             what=f"heads of head_dim {head_dim}", device=device, distinct=True, on_host=True)
        if idx.numel() == 0:
            raise ValueError(f"{op}: heads is empty; select at least one head")
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


def effective_weight(weight: torch.Tensor, delta: torch.Tensor, index: SliceIndex, *, by: str,
                     layout: str = "linear", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor W + scatter(Δ) in weight's layout: fp32 sum rounded once to weight's
    dtype (exactly what :func:`head_slice_apply` merges), then cast to ``dtype`` if given.
    A full copy of W: for inspection and tests; the op itself merges in place instead."""
    w = weight.detach().clone()
    backends.resolve("head_slice_apply", w.device)[1](oi_view(w, layout), delta.detach().contiguous(), index.heads,
                                                      index.head_dim, by=by, alpha=1.0)
    return w if dtype is None or dtype == w.dtype else w.to(dtype)


def effective_bias(bias: torch.Tensor, delta_bias: torch.Tensor, index: SliceIndex,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor b + scatter(Δb) (fp32 sum, one rounding), cast to ``dtype`` if given."""
    b = library.merged_bias(bias, delta_bias, index.heads, index.head_dim)
    return b if dtype is None or dtype == b.dtype else b.to(dtype)


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
    out_f, in_f = oi_view(weight, layout).shape
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
        feats = oi_view(weight, layout).shape[0 if by == "rows" else 1]
        if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim > 0 and feats % head_dim:
            raise ValueError(f"head_slice_linear: weight has {feats} {'output' if by == 'rows' else 'input'} "
                             f"features, not a multiple of head_dim {head_dim}")
        n_heads = feats // head_dim if isinstance(head_dim, int) and head_dim > 0 else 1
        heads = SliceIndex(heads, head_dim, max(n_heads, 1), device=weight.device)
    elif head_dim is not None and head_dim != heads.head_dim:
        raise ValueError(f"head_slice_linear: head_dim {head_dim} differs from the SliceIndex's {heads.head_dim}")
    _check(x, weight, bias, delta, delta_bias, heads, by, layout)

    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):  # meta has no autocast
        cdt = torch.get_autocast_dtype(dev)
        x = x.to(cdt)
    else:
        cdt = weight.dtype
        if x.dtype != cdt:
            raise TypeError(f"head_slice_linear: x is {x.dtype} but the weight is {cdt} (outside autocast "
                            "they must match, as for nn.Linear)")
    return library.head_slice_linear(x, weight, bias, delta, delta_bias, heads.heads, heads.features,
                                     heads.head_dim, by, layout, cdt)
