"""Launchers for the CUDA extension ``pinpoint_kernels._cuda``.

Arguments arrive validated and normalised (see attention.py / head_slice.py); this module
only turns tensors into device pointers, shapes and strides, allocates outputs, and passes
the tensor's device index and torch's current stream (``cuda_stream``, an integer) so the
kernels are ordered with the surrounding torch work. Nothing here synchronises with the
device: index tensors (kv_index, patch_index, heads) are read by the kernels themselves.
"""
from __future__ import annotations

import functools

import torch

from .backends import native_module
from .validation import DTYPE_CODES, attention_native_args, data_ptr

MIN_CAPABILITY = (8, 0)  # cp.async, ldmatrix and bf16 mma.sync (the build targets sm_80, sm_90)


def _cuda():
    return native_module("_cuda")


@functools.lru_cache(maxsize=None)
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def _check_device(device: torch.device) -> int:
    """The device index for the kernels; a clear error on GPUs older than sm_80."""
    index = _device_index(device)
    if index >= 0 and not _capability_ok(index):
        major, minor = torch.cuda.get_device_capability(index)
        raise RuntimeError(
            f"pinpoint's CUDA kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ "
            f"(Ampere or newer); {torch.cuda.get_device_name(index)} is {major}.{minor}. "
            "Use backend='triton' or 'reference' (or PINPOINT_BACKEND=triton).")
    return index


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def head_patched_attention(q, k, v, head_mask, patch, *, kv_index, patch_index, key_padding_mask,
                           scale, causal):
    out, args = attention_native_args(q, k, v, head_mask, patch, kv_index=kv_index, patch_index=patch_index,
                                      key_padding_mask=key_padding_mask, scale=scale, causal=causal)
    _cuda().head_patched_attention(*args, _check_device(q.device), _stream(q.device))
    return out


def head_slice_grad(dy, x, heads, head_dim, *, by):
    """dy [N, out] and x [N, in], unit column stride -> fp32 [S, D, in] / [S, out, D]."""
    N = dy.shape[0]
    S = heads.numel()
    offsets = heads * head_dim  # int64 [S] on the device: no host round trip
    if by == "rows":  # C[s] = dY[:, h_s*D : +D]ᵀ · X
        M, Nc, a_off, b_off = head_dim, x.shape[1], offsets, None
    else:  # C[s] = dYᵀ · Z[:, h_s*D : +D]
        M, Nc, a_off, b_off = dy.shape[1], head_dim, None, offsets
    out = torch.empty(S, M, Nc, dtype=torch.float32, device=dy.device)
    if N == 0:
        return out.zero_()
    _cuda().grouped_atb(
        dy.data_ptr(), DTYPE_CODES[dy.dtype], dy.stride(0), dy.shape[1],
        x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), x.shape[1],
        N, M, Nc, S, data_ptr(a_off), data_ptr(b_off), head_dim, out.data_ptr(),
        _check_device(dy.device), _stream(dy.device),
    )
    return out


def head_slice_apply(weight, slices, heads, head_dim, *, by, alpha):
    _cuda().head_slice_apply(
        weight.data_ptr(), DTYPE_CODES[weight.dtype], weight.stride(0), weight.stride(1),
        weight.shape[0], weight.shape[1], slices.data_ptr(), DTYPE_CODES[slices.dtype],
        heads.data_ptr(), heads.numel(), head_dim, by == "rows", alpha,
        _check_device(weight.device), _stream(weight.device),
    )
    return weight
