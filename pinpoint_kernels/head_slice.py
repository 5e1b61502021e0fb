"""Sparse head-slice gradients and slice merge/detach: validation, then the registered ops
``pinpoint::head_slice_grad`` / ``pinpoint::head_slice_apply`` (which pick the backend).

Definitions: :func:`pinpoint_kernels.reference.head_slice_grad` and
:func:`pinpoint_kernels.reference.head_slice_apply`. A projection's "heads" are blocks of
``head_dim`` output features (by="rows": q/k/v) or input features (by="cols": o_proj).
"""
from __future__ import annotations

import torch

from . import library
from . import validation as V
from .head_slice_linear import SliceIndex

_BY = ("rows", "cols")


def _check_by(op: str, by: str) -> None:
    if by not in _BY:
        raise ValueError(f"{op}: by must be 'rows' (q/k/v) or 'cols' (o_proj), got {by!r}")


def _check_head_dim(op: str, head_dim) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"{op}: head_dim must be a positive int, got {head_dim!r}")
    return head_dim


def _heads(op: str, heads, n_heads: int, head_dim: int, device: torch.device, features_of: str) -> torch.Tensor:
    """int64 [S] head indices. A :class:`SliceIndex` was checked when it was built, so only
    its head_dim, head count and device are compared here (no index values are read)."""
    if isinstance(heads, SliceIndex):
        if (heads.head_dim, heads.n_heads) != (head_dim, n_heads):
            raise ValueError(f"{op}: the SliceIndex is for {heads.n_heads} heads of head_dim {heads.head_dim}, "
                             f"but {features_of}")
        if heads.device != device:
            raise ValueError(f"{op}: the SliceIndex is on {heads.device} but the data is on {device}")
        return heads.heads
    idx = V.index_vector(op, "heads", heads, length=None, upper=n_heads,
                         what=f"heads ({features_of})", device=device, distinct=True)
    if idx.numel() == 0:
        raise ValueError(f"{op}: heads is empty; select at least one head")
    return idx


def _n_heads(op: str, name: str, features: int, head_dim: int) -> int:
    if features % head_dim:
        raise ValueError(f"{op}: {name} has {features} features, not a multiple of head_dim {head_dim}")
    return features // head_dim


def head_slice_grad(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    heads,
    head_dim: int,
    *,
    by: str = "rows",
    backend: str | None = None,
) -> torch.Tensor:
    """fp32 weight gradients of the selected heads' slices of Y = X Wᵀ.

    by="rows": grad_out [..., H*D], inp X [..., in]  -> [S, D, in]
    by="cols": grad_out [..., out], inp Z [..., H*D] -> [S, out, D]
    ``heads``: S distinct head indices (int tensor or sequence) or a :class:`SliceIndex`.
    """
    op = "head_slice_grad"
    _check_by(op, by)
    head_dim = _check_head_dim(op, head_dim)
    grad_out = V.tensor(op, "grad_out", grad_out, ndim=tuple(range(1, 9)), shape_doc="[..., out]")
    inp = V.tensor(op, "inp", inp, ndim=tuple(range(1, 9)), shape_doc="[..., in]")
    V.float_dtype(op, "grad_out", grad_out)
    V.float_dtype(op, "inp", inp)
    V.same_device(op, "grad_out", grad_out, inp=inp)
    if grad_out.shape[:-1] != inp.shape[:-1]:
        raise ValueError(f"{op}: grad_out {tuple(grad_out.shape)} and inp {tuple(inp.shape)} must "
                         "agree in every dim but the last (the tokens)")
    if by == "rows":
        n_heads = _n_heads(op, "grad_out", grad_out.shape[-1], head_dim)
        heads = _heads(op, heads, n_heads, head_dim, grad_out.device, f"grad_out has {n_heads} of head_dim {head_dim}")
    else:
        n_heads = _n_heads(op, "inp", inp.shape[-1], head_dim)
        heads = _heads(op, heads, n_heads, head_dim, inp.device, f"inp has {n_heads} of head_dim {head_dim}")
    return library.head_slice_grad(grad_out, inp, heads, head_dim, by, backend)


def head_slice_apply(
    weight: torch.Tensor,
    slices: torch.Tensor,
    heads,
    head_dim: int,
    *,
    by: str = "rows",
    alpha: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """In place: weight[selected slices] += alpha * slices (fp32 sum, one rounding).

    weight [out, in], any strides (a Conv1D weight's transposed view works); by="rows": slices [S, D, in]; by="cols": slices [S, out, D].
    alpha=+1 merges trained deltas into the weight, alpha=-1 detaches them. ``heads``: S
    distinct head indices or a :class:`SliceIndex`. Returns weight.
    """
    op = "head_slice_apply"
    _check_by(op, by)
    head_dim = _check_head_dim(op, head_dim)
    weight = V.tensor(op, "weight", weight, ndim=2, shape_doc="[out, in]")
    slices = V.tensor(op, "slices", slices, ndim=3, shape_doc="[S, D, in] or [S, out, D]")
    V.float_dtype(op, "weight", weight)
    V.float_dtype(op, "slices", slices)
    V.same_device(op, "weight", weight, slices=slices)
    out_f, in_f = weight.shape
    if by == "rows":
        n_heads = _n_heads(op, "weight's output", out_f, head_dim)
        expect = (slices.shape[0], head_dim, in_f)
    else:
        n_heads = _n_heads(op, "weight's input", in_f, head_dim)
        expect = (slices.shape[0], out_f, head_dim)
    heads = _heads(op, heads, n_heads, head_dim, weight.device, f"weight has {n_heads} of head_dim {head_dim}")
    if tuple(slices.shape) != (heads.numel(), *expect[1:]):
        raise ValueError(f"{op}: slices must have shape {(heads.numel(), *expect[1:])} for {heads.numel()} "
                         f"heads by {by}, got {tuple(slices.shape)}")
    library.head_slice_apply(weight, slices.contiguous(), heads, head_dim, by, float(alpha), backend)
    return weight
