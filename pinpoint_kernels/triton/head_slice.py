"""Triton sparse head-slice gradient (one grouped GEMM) and slice apply: kernels and launchers.

Definitions: :func:`pinpoint_kernels.reference.head_slice_grad` and
:func:`pinpoint_kernels.reference.head_slice_apply`. Arguments arrive validated and
normalised by :mod:`pinpoint_kernels.head_slice`: dy [N, out] and x [N, in] with unit
column stride, heads int64 [S] distinct, slices contiguous.

head_slice_grad is one launch for all S selected heads, a grouped GEMM
``C[s] = A_sᵀ · B_s`` over the N tokens, grid ``(tiles_M * tiles_N, S)``. The head index is
read inside the kernel and picks the slice by pointer offset, so nothing is gathered:
  by="rows": A_s = dY[:, h_s*D : (h_s+1)*D], B_s = X            -> C [S, D, in]
  by="cols": A_s = dY,                       B_s = Z[:, h_s*D : (h_s+1)*D] -> C [S, out, D]
Each program owns one BLOCK_M x BLOCK_N tile of C[s] and walks the tokens in BLOCK_K
steps with an fp32 accumulator.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, cast_out, check_device, is_interpreted

# Tile-size caps (GPU defaults); tests lower them to reach multi-tile paths with tiny shapes.
MAX_BLOCK_M = 128
MAX_BLOCK_N = 128
MAX_BLOCK_K = 32
MAX_BLOCK_R = 32
MAX_BLOCK_C = 128


@triton.jit
def _head_slice_grad_kernel(
    DY, X, HEADS, OUT,
    N, M, NC, stride_dy, stride_x, HEAD_DIM,
    BY_ROWS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    tiles_n = (NC + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    head = tl.load(HEADS + s)  # int64

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < NC
    if BY_ROWS:  # the head's block of dY's columns, all of X
        a_ptrs = DY + head * HEAD_DIM + offs_k[:, None] * stride_dy + offs_m[None, :]
        b_ptrs = X + offs_k[:, None] * stride_x + offs_n[None, :]
    else:  # all of dY, the head's block of Z's columns
        a_ptrs = DY + offs_k[:, None] * stride_dy + offs_m[None, :]
        b_ptrs = X + head * HEAD_DIM + offs_k[:, None] * stride_x + offs_n[None, :]

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k_valid = (k0 + offs_k) < N
        a = tl.load(a_ptrs, mask=k_valid[:, None] & m_valid[None, :], other=0.0)  # [K, M]
        b = tl.load(b_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)  # [K, N]
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
        # Advance the pointers (64-bit) rather than forming k * stride in 32-bit ints.
        a_ptrs += BLOCK_K * stride_dy
        b_ptrs += BLOCK_K * stride_x

    out_ptrs = OUT + s.to(tl.int64) * M * NC + offs_m[:, None] * NC + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=m_valid[:, None] & n_valid[None, :])


def head_slice_grad(dy, x, heads, head_dim, *, by):
    """dy [N, out] and x [N, in], unit column stride -> fp32 [S, D, in] / [S, out, D]."""
    kernel = _head_slice_grad_kernel
    check_device("head_slice_grad", kernel, dy.device)
    interpreted = is_interpreted(kernel)
    N = dy.shape[0]
    S = heads.numel()
    by_rows = by == "rows"
    M, NC = (head_dim, x.shape[1]) if by_rows else (dy.shape[1], head_dim)
    out = torch.empty(S, M, NC, dtype=torch.float32, device=dy.device)
    if out.numel() == 0:
        return out
    if N == 0:
        return out.zero_()

    # tl.dot needs every dim >= 16: smaller heads/tokens are padded by masked loads.
    BLOCK_M = block(M, 16, MAX_BLOCK_M)
    BLOCK_N = block(NC, 16, MAX_BLOCK_N)
    BLOCK_K = block(N, 16, MAX_BLOCK_K)
    # Mixed input dtypes meet in fp32; so do bfloat16 ones in the interpreter, whose tl.dot
    # multiplies bfloat16 bit patterns (triton#11584). Both are exact: a product of two
    # 16-bit floats fits fp32, which is what the accumulator holds anyway.
    dot_f32 = dy.dtype != x.dtype or (interpreted and dy.dtype == torch.bfloat16)
    fp32_dot = dot_f32 or dy.dtype == torch.float32
    precision = "ieee" if fp32_dot else "tf32"  # fp32 inputs: no TF32 rounding

    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(NC, BLOCK_N), S)
    extra = {} if interpreted else {"num_warps": 8 if BLOCK_M * BLOCK_N >= 128 * 128 else 4,
                                    "num_stages": 3}
    kernel[grid](
        dy, x, heads, out, N, M, NC, dy.stride(0), x.stride(0), head_dim,
        BY_ROWS=by_rows, DOT_F32=dot_f32, DOT_PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **extra,
    )
    return out


@triton.jit
def _head_slice_apply_kernel(
    W, SL, HEADS, stride_w0, stride_w1, SR, SC, HEAD_DIM, alpha,
    BY_ROWS: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    tiles_c = (SC + BLOCK_C - 1) // BLOCK_C
    offs_r = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < SR)[:, None] & (offs_c < SC)[None, :]
    head = tl.load(HEADS + s)  # int64
    if BY_ROWS:  # slice [D, in] -> weight rows h*D + i
        w_r = head * HEAD_DIM + offs_r
        w_c = offs_c.to(tl.int64)
    else:  # slice [out, D] -> weight columns h*D + j
        w_r = offs_r.to(tl.int64)
        w_c = head * HEAD_DIM + offs_c
    w_ptrs = W + w_r[:, None] * stride_w0 + w_c[None, :] * stride_w1
    sl = tl.load(SL + s.to(tl.int64) * SR * SC + offs_r[:, None] * SC + offs_c[None, :], mask=mask)
    w = tl.load(w_ptrs, mask=mask)
    new = w.to(tl.float32) + alpha * sl.to(tl.float32)  # fp32 sum, one rounding below
    tl.store(w_ptrs, cast_out(new, W.dtype.element_ty, BF16_BITS), mask=mask)


def head_slice_apply(weight, slices, heads, head_dim, *, by, alpha):
    """In place: weight [out, in] (any strides) selected slices += alpha * slices."""
    kernel = _head_slice_apply_kernel
    check_device("head_slice_apply", kernel, weight.device)
    interpreted = is_interpreted(kernel)
    S, SR, SC = slices.shape
    if slices.numel() == 0:
        return weight
    slices = slices.contiguous()
    BLOCK_R = block(SR, 1, MAX_BLOCK_R)
    BLOCK_C = block(SC, 1, MAX_BLOCK_C)
    grid = (triton.cdiv(SR, BLOCK_R) * triton.cdiv(SC, BLOCK_C), S)
    # The interpreter truncates fp32 -> bfloat16 (BF16_BITS: round to nearest even by hand).
    # No mul+add -> FMA fusion on the GPU, so the result rounds exactly like the reference.
    extra = {} if interpreted else {"num_warps": 4, "enable_fp_fusion": False}
    kernel[grid](
        weight, slices, heads, weight.stride(0), weight.stride(1), SR, SC, head_dim, float(alpha),
        BY_ROWS=by == "rows", BF16_BITS=interpreted and weight.dtype == torch.bfloat16,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, **extra,
    )
    return weight


__all__ = ["head_slice_grad", "head_slice_apply"]
