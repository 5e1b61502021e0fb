"""Fused head-patched attention: validation, normalisation and dispatch.

The semantics are defined by :func:`pinpoint_kernels.reference.head_patched_attention`;
this wrapper checks the inputs once and hands normalised tensors to the registered op
``pinpoint::head_patched_attention`` (:mod:`pinpoint_kernels.library`), which picks the
backend: ``kv_index`` always present as int64 [R] (``patch_index`` whenever ``patch`` is),
masks as contiguous bool, q/k/v/patch with unit stride in their last dim.

Index values (``kv_index``/``patch_index`` ranges) are checked on the host only where that
costs no device sync (CPU tensors) or in debug mode (``PINPOINT_DEBUG_CHECKS=1``); CUDA
tensors get device-side asserts instead, see :func:`pinpoint_kernels.validation.check_index_values`.
"""
from __future__ import annotations

import torch

from . import library
from . import validation as V

OP = "head_patched_attention"


def head_patched_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    patch: torch.Tensor | None = None,
    *,
    kv_index: torch.Tensor | None = None,
    patch_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention for many variant rows at once, with per-(row, head) patches.

    q [R, Tq, Hq, D]; k, v [Rk, Tk, Hkv, D]; head_mask bool [R, Hq] (True = patched);
    patch [P, Tq, Hq, D]; kv_index int [R]; patch_index int [R]; key_padding_mask bool
    [Rk, Tk] (True = real token). Returns [R, Tq, Hq*D] in q's dtype (o_proj input
    layout). See :func:`pinpoint_kernels.reference.head_patched_attention` for the exact
    definition; ``backend`` forces one of reference/cpu/triton/cuda.
    """
    q = V.tensor(OP, "q", q, ndim=4, shape_doc="[R, Tq, Hq, D]")
    k = V.tensor(OP, "k", k, ndim=4, shape_doc="[Rk, Tk, Hkv, D]")
    v = V.tensor(OP, "v", v, ndim=4, shape_doc="[Rk, Tk, Hkv, D]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.float_dtype(OP, name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    V.same_device(OP, "q", q, k=k, v=v, head_mask=head_mask, patch=patch,
                  key_padding_mask=key_padding_mask)
    R, Tq, Hq, D = q.shape
    Rk, Tk, Hkv, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{OP}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"{OP}: q has head_dim {D} but k/v have head_dim {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{OP}: mismatched GQA: {Hq} query heads cannot be shared evenly by "
                         f"{Hkv} K/V heads (Hq must be a multiple of Hkv)")
    if Tq > Tk:
        raise ValueError(f"{OP}: q has {Tq} tokens but k/v only {Tk}; queries must be the last "
                         "Tq of the Tk key positions")

    if kv_index is None:
        if Rk != R:
            raise ValueError(f"{OP}: q has {R} rows but k/v have {Rk}; pass kv_index [R] to map "
                             "each row to its K/V row")
        kv_index = torch.arange(R, device=q.device)
    else:
        kv_index = V.index_vector(OP, "kv_index", kv_index, length=R, upper=Rk, what="K/V rows",
                                  device=q.device)

    if head_mask is not None:
        V.tensor(OP, "head_mask", head_mask, ndim=2, shape_doc="[R, Hq]")
        V.bool_dtype(OP, "head_mask", head_mask)
        if tuple(head_mask.shape) != (R, Hq):
            raise ValueError(f"{OP}: head_mask must have shape [R, Hq] = {(R, Hq)}, got {tuple(head_mask.shape)}")
        head_mask = head_mask.contiguous()

    if patch is not None:
        if head_mask is None:
            raise ValueError(f"{OP}: patch was given without head_mask, so nothing would be patched")
        V.tensor(OP, "patch", patch, ndim=4, shape_doc="[P, Tq, Hq, D]")
        V.float_dtype(OP, "patch", patch)
        P = patch.shape[0]
        if tuple(patch.shape[1:]) != (Tq, Hq, D):
            raise ValueError(f"{OP}: patch must have shape [P, Tq, Hq, D] = [P, {Tq}, {Hq}, {D}], "
                             f"got {tuple(patch.shape)}")
        if patch_index is None:
            if P not in (R, 1):
                raise ValueError(f"{OP}: patch has {P} rows; without patch_index it needs R = {R} or 1")
            patch_index = (torch.arange(R, device=q.device) if P == R
                           else torch.zeros(R, dtype=torch.int64, device=q.device))
        else:
            patch_index = V.index_vector(OP, "patch_index", patch_index, length=R, upper=P,
                                         what="patch rows", device=q.device)
        patch = V.unit_last_stride(patch)
    elif patch_index is not None:
        raise ValueError(f"{OP}: patch_index was given without patch")

    if key_padding_mask is not None:
        V.tensor(OP, "key_padding_mask", key_padding_mask, ndim=2, shape_doc="[Rk, Tk]")
        V.bool_dtype(OP, "key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (Rk, Tk):
            raise ValueError(f"{OP}: key_padding_mask must have shape [Rk, Tk] = {(Rk, Tk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.contiguous()

    scale = float(D**-0.5 if scale is None else scale)
    return library.head_patched_attention(
        V.unit_last_stride(q), V.unit_last_stride(k), V.unit_last_stride(v), head_mask, patch, kv_index,
        patch_index, key_padding_mask, scale, bool(causal), backend)
