"""Launchers for the CPU extension ``pinpoint_kernels._C``.

Arguments arrive validated and normalised (see attention.py / head_slice.py); this module
only turns tensors into pointers, shapes and strides. The kernels use torch's intra-op
thread count.
"""
from __future__ import annotations

import torch

from .backends import native_module
from .validation import DTYPE_CODES


def _C():
    return native_module("_C")


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def head_patched_attention(q, k, v, head_mask, patch, *, kv_index, patch_index, key_padding_mask,
                           scale, causal):
    R, Tq, Hq, D = q.shape
    Rk, Tk, Hkv, _ = k.shape
    out = torch.empty(R, Tq, Hq * D, dtype=q.dtype, device=q.device)
    _C().head_patched_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), DTYPE_CODES[q.dtype],
        [R, Rk, Tq, Tk, Hq, Hkv, D],
        list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]),
        kv_index.data_ptr(), _ptr(head_mask), _ptr(key_padding_mask),
        _ptr(patch), DTYPE_CODES[patch.dtype] if patch is not None else 0,
        list(patch.stride()) if patch is not None else [],
        _ptr(patch_index if patch is not None else None),
        scale, causal, torch.get_num_threads(),
    )
    return out


def head_slice_grad(dy, x, heads, head_dim, *, by):
    """dy [N, out] and x [N, in], unit column stride -> fp32 [S, D, in] / [S, out, D]."""
    N = dy.shape[0]
    offsets = [int(h) * head_dim for h in heads.tolist()]
    zeros = [0] * len(offsets)
    if by == "rows":  # C[s] = dY[:, h_s*D : +D]ᵀ · X
        M, Nc, a_off, b_off = head_dim, x.shape[1], offsets, zeros
    else:  # C[s] = dYᵀ · Z[:, h_s*D : +D]
        M, Nc, a_off, b_off = dy.shape[1], head_dim, zeros, offsets
    out = torch.empty(len(offsets), M, Nc, dtype=torch.float32, device=dy.device)
    if N == 0:
        return out.zero_()
    _C().grouped_atb(
        dy.data_ptr(), DTYPE_CODES[dy.dtype], dy.stride(0), dy.shape[1],
        x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), x.shape[1],
        N, M, Nc, a_off, b_off, out.data_ptr(), torch.get_num_threads(),
    )
    return out


def head_slice_apply(weight, slices, heads, head_dim, *, by, alpha):
    _C().head_slice_apply(
        weight.data_ptr(), DTYPE_CODES[weight.dtype], weight.stride(0), weight.stride(1),
        weight.shape[0], weight.shape[1], slices.data_ptr(), DTYPE_CODES[slices.dtype],
        [int(h) for h in heads.tolist()], head_dim, by == "rows", alpha, torch.get_num_threads(),
    )
    return weight
