"""Triton fused head-patched attention: the kernel and its launcher.

Definition: :func:`pinpoint_kernels.reference.head_patched_attention`. Arguments arrive
validated and normalised by :mod:`pinpoint_kernels.attention` (kv_index/patch_index int64
[R], masks contiguous bool or None, unit stride in the last dim of q/k/v/patch).

One program per (row, query head, BLOCK_M query tile); grid ``(R * Hq, cdiv(Tq, BLOCK_M))``
with (row, head) on axis 0 (CUDA allows 2**31 - 1 programs there but only 65535 on axis 1),
so neighbouring programs are the heads of one row and a GQA group's K/V tiles are shared
through L2. The query tiles are visited last-first: under the causal mask the last tile
is the longest, so the long programs start first.

Inside a program, FlashAttention-style: K/V tiles of BLOCK_N keys stream through an online
softmax (running max ``m_i``, running sum ``l_i``, fp32 accumulator), in base 2 with the
scale folded into ``qk_scale = scale * log2(e)``. A masked (row, head) does no attention
math at all: it only copies its patch value (or zeros) to the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, cast_out, check_device, is_interpreted, row_max, row_sum

_LOG2E = 1.4426950408889634
# Tile-size caps (GPU defaults); tests lower them to reach multi-tile paths with tiny shapes.
MAX_BLOCK_M = 64
MAX_BLOCK_N = 64


@triton.jit
def _head_patched_attention_kernel(
    Q, K, V, Out, KV_INDEX, HEAD_MASK, PATCH, PATCH_INDEX, KEY_PADDING,
    stride_qr, stride_qt, stride_qh,
    stride_kr, stride_kt, stride_kh,
    stride_vr, stride_vt, stride_vh,
    stride_pr, stride_pt, stride_ph,
    Tq, Tk, Hq, D, GROUP, qk_scale,
    HAS_MASK: tl.constexpr, HAS_PATCH: tl.constexpr, HAS_PADDING: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_rh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest (causal) tiles first
    r = pid_rh // Hq
    h = pid_rh % Hq
    r64 = r.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Tq
    d_valid = offs_d < D  # BLOCK_D is D rounded up to a power of two
    md_mask = m_valid[:, None] & d_valid[None, :]
    hd = Hq * D
    out_ptrs = Out + r64 * Tq * hd + offs_m[:, None] * hd + h * D + offs_d[None, :]

    patched = False
    if HAS_MASK:
        patched = tl.load(HEAD_MASK + pid_rh) != 0

    if patched:
        # Patched head: no attention at all, only the patch value (or zero ablation).
        if HAS_PATCH:
            pr = tl.load(PATCH_INDEX + r)  # int64
            p_ptrs = (PATCH + pr * stride_pr + h * stride_ph
                      + offs_m[:, None] * stride_pt + offs_d[None, :])
            val = tl.load(p_ptrs, mask=md_mask, other=0.0).to(tl.float32)
        else:
            val = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        tl.store(out_ptrs, cast_out(val, Out.dtype.element_ty, BF16_BITS), mask=md_mask)
    else:
        kvr = tl.load(KV_INDEX + r)  # int64: K/V row of this variant row
        kvh = h // GROUP  # GQA: K/V head read in place, never repeated
        q = tl.load(Q + r64 * stride_qr + h * stride_qh
                    + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + kvr * stride_kr + kvh * stride_kh
        v_base = V + kvr * stride_vr + kvh * stride_vh

        # Queries are the last Tq of the Tk positions (bottom-right aligned causal mask).
        pos_q = (Tk - Tq) + offs_m
        if CAUSAL:
            # Key tiles wholly above the diagonal of this query tile are never visited.
            hi = tl.minimum(Tk, (Tk - Tq) + (pid_m + 1) * BLOCK_M)
        else:
            hi = Tk

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_valid = offs_n < Tk
            kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [D, N]
            if DOT_F32:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # log2 units

            allowed = n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= pos_q[:, None])
            if HAS_PADDING:
                real = tl.load(KEY_PADDING + kvr * Tk + offs_n, mask=n_valid, other=0)
                allowed = allowed & (real != 0)[None, :]
            s = tl.where(allowed, s, float("-inf"))

            # Online softmax. A row with no allowed key so far keeps m = -inf; use 0 as its
            # reference point so that exp2(-inf - -inf) = NaN never happens (p and alpha
            # are then exp2(-inf) = 0 and the row stays all-zero).
            m_new = tl.maximum(m_i, tl.reduce(s, 1, row_max))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, row_sum)
            acc = acc * alpha[:, None]

            vt = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                         mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [N, D]
            # P goes into the second product in V's dtype (tensor cores for 16-bit inputs),
            # the accumulation stays fp32.
            pv = cast_out(p, vt.dtype, BF16_BITS)
            if DOT_F32:
                pv = pv.to(tl.float32)
                vt = vt.to(tl.float32)
            acc = tl.dot(pv, vt, acc, input_precision=DOT_PRECISION)
            m_i = m_new

        # A query that may attend to no key (l = 0, acc = 0) outputs 0.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(out_ptrs, cast_out(o, Out.dtype.element_ty, BF16_BITS), mask=md_mask)


def head_patched_attention(q, k, v, head_mask, patch, *, kv_index, patch_index, key_padding_mask,
                           scale, causal):
    """q [R, Tq, Hq, D]; k, v [Rk, Tk, Hkv, D] -> [R, Tq, Hq*D] in q's dtype."""
    kernel = _head_patched_attention_kernel
    check_device("head_patched_attention", kernel, q.device)
    interpreted = is_interpreted(kernel)
    R, Tq, Hq, D = q.shape
    _, Tk, Hkv, _ = k.shape
    out = torch.empty(R, Tq, Hq * D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    BLOCK_D = block(D, 16, 1 << 30)
    BLOCK_M = block(Tq, 16, MAX_BLOCK_M)
    BLOCK_N = block(Tk, 16, MAX_BLOCK_N if BLOCK_D <= 128 else min(MAX_BLOCK_N, 32))
    # The interpreter's tl.dot multiplies bfloat16 operands' raw bits (triton#11584):
    # there, feed it fp32 copies (exact; the products accumulate in fp32 anyway).
    # It also truncates fp32 -> bfloat16 casts; cast_out rounds to nearest even there.
    dot_f32 = interpreted and q.dtype == torch.bfloat16
    # fp32 inputs: full-precision products, not TF32.
    precision = "ieee" if (q.dtype == torch.float32 or dot_f32) else "tf32"

    has_mask = head_mask is not None
    has_patch = has_mask and patch is not None
    has_padding = key_padding_mask is not None
    # bool tensors travel as uint8 views (no copy): plain byte loads on every backend.
    mask_arg = head_mask.view(torch.uint8) if has_mask else kv_index
    kpm_arg = key_padding_mask.view(torch.uint8) if has_padding else kv_index
    patch_arg = patch if has_patch else q
    pidx_arg = patch_index if has_patch else kv_index
    ps = patch.stride()[:3] if has_patch else (0, 0, 0)

    grid = (R * Hq, triton.cdiv(Tq, BLOCK_M))
    extra = {} if interpreted else {"num_warps": 4 if BLOCK_M * BLOCK_D <= 64 * 128 else 8,
                                    "num_stages": 2}
    kernel[grid](
        q, k, v, out, kv_index, mask_arg, patch_arg, pidx_arg, kpm_arg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ps,
        Tq, Tk, Hq, D, Hq // Hkv, float(scale) * _LOG2E,
        HAS_MASK=has_mask, HAS_PATCH=has_patch, HAS_PADDING=has_padding, CAUSAL=bool(causal),
        DOT_F32=dot_f32, DOT_PRECISION=precision, BF16_BITS=dot_f32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **extra,
    )
    return out


__all__ = ["head_patched_attention"]
