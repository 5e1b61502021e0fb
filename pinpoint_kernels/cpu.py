"""Launchers for the CPU extension ``pinpoint_kernels._C``.

Arguments arrive validated and normalised (see attention.py / head_slice.py); this module
only turns tensors into pointers, shapes and strides. The kernels use torch's intra-op
thread count.
"""
from __future__ import annotations

import torch

from .backends import native_module
from .validation import DTYPE_CODES, attention_native_args


def _C():
    return native_module("_C")


def head_patched_attention(q, k, v, head_mask, patch, *, kv_index, patch_index, key_padding_mask,
                           scale, causal):
    out, args = attention_native_args(q, k, v, head_mask, patch, kv_index=kv_index, patch_index=patch_index,
                                      key_padding_mask=key_padding_mask, scale=scale, causal=causal)
    _C().head_patched_attention(*args, torch.get_num_threads())
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
