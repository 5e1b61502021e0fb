"""CPU microbenchmarks of pinpoint's two ops against their peers, on the same inputs.

    python bench/kernels_cpu.py            # writes bench/out/kernels_cpu.json + RESULTS.md section

Attention: the fused call (variants share K/V rows, some heads patched) against one
torch SDPA call over the same rows (+ torch.where for the patch, so outputs agree),
a per-variant SDPA loop, and the reference. Head-slice gradient: the _C kernel against
the full weight-gradient GEMM (MKL/oneDNN through torch) followed by slicing.
Outputs are cross-checked before any timing is reported.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import pinpoint_kernels as pk
from pinpoint_kernels import reference as ref

from common import time_call, write_results

ATTN_CASES = [
    # name, R variants, Rk K/V rows, T, Hq, Hkv, D, masked heads per row, dtype
    ("path-patch layer (MHA)", 32, 4, 64, 8, 8, 64, 1, torch.float32),
    ("path-patch layer (MHA)", 32, 4, 64, 8, 8, 64, 1, torch.bfloat16),
    ("knockout, half masked (GQA 4)", 16, 1, 128, 16, 4, 64, 8, torch.float32),
]
GRAD_CASES = [
    # name, N tokens, H, D, other dim, selected heads, by, dtype
    ("q_proj rows", 512, 8, 64, 512, 1, "rows", torch.float32),
    ("q_proj rows", 512, 8, 64, 512, 2, "rows", torch.bfloat16),
    ("o_proj cols", 512, 8, 64, 512, 2, "cols", torch.float32),
]


def attention_inputs(R, Rk, T, Hq, Hkv, D, n_masked, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(Rk, T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(Rk, T, Hkv, D, generator=g).to(dtype)
    kv_index = torch.arange(R) % Rk
    head_mask = torch.zeros(R, Hq, dtype=torch.bool)
    for r in range(R):
        head_mask[r, [(r + i) % Hq for i in range(n_masked)]] = True
    patch = torch.randn(Rk, T, Hq, D, generator=g).to(dtype)
    return q, k, v, head_mask, patch, kv_index


def bench_attention(case, repeat):
    name, R, Rk, T, Hq, Hkv, D, n_masked, dtype = case
    q, k, v, hm, patch, kvi = attention_inputs(R, Rk, T, Hq, Hkv, D, n_masked, dtype)
    group = Hq // Hkv
    sel = hm[:, None, :, None]

    def fused():
        return pk.head_patched_attention(q, k, v, hm, patch, kv_index=kvi, patch_index=kvi, backend="cpu")

    def sdpa_one_call():  # K/V materialised per row, every head computed, patch applied after
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k[kvi].transpose(1, 2), v[kvi].transpose(1, 2),
                                             is_causal=True, enable_gqa=group > 1).transpose(1, 2)
        return torch.where(sel, patch[kvi], out).reshape(R, T, Hq * D)

    def sdpa_loop():  # the unfused way: one call per variant
        outs = []
        for r in range(R):
            kr = int(kvi[r])
            o = F.scaled_dot_product_attention(q[r:r + 1].transpose(1, 2), k[kr:kr + 1].transpose(1, 2),
                                               v[kr:kr + 1].transpose(1, 2), is_causal=True,
                                               enable_gqa=group > 1).transpose(1, 2)
            outs.append(torch.where(sel[r:r + 1], patch[kr:kr + 1], o))
        return torch.cat(outs).reshape(R, T, Hq * D)

    def reference():
        return ref.head_patched_attention(q, k, v, hm, patch, kv_index=kvi, patch_index=kvi)

    want = reference()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for fn in (fused, sdpa_one_call, sdpa_loop):
        torch.testing.assert_close(fn(), want, **tol)
    t = {fn.__name__: time_call(fn, repeat=repeat) for fn in (fused, sdpa_one_call, sdpa_loop, reference)}
    return {
        "op": "attention", "case": name, "shape": f"R={R} Rk={Rk} T={T} Hq={Hq} Hkv={Hkv} D={D}",
        "dtype": str(dtype).replace("torch.", ""), "masked": f"{n_masked}/{Hq}",
        "pinpoint_ms": t["fused"] * 1e3, "sdpa_one_call_ms": t["sdpa_one_call"] * 1e3,
        "sdpa_loop_ms": t["sdpa_loop"] * 1e3, "reference_ms": t["reference"] * 1e3,
        "vs_one_call": t["sdpa_one_call"] / t["fused"], "vs_loop": t["sdpa_loop"] / t["fused"],
        "vs_reference": t["reference"] / t["fused"], "cross_check": "ok",
    }


def bench_grad(case, repeat):
    name, N, H, D, other, n_sel, by, dtype = case
    g = torch.Generator().manual_seed(1)
    if by == "rows":
        dy, x = torch.randn(N, H * D, generator=g).to(dtype), torch.randn(N, other, generator=g).to(dtype)
    else:
        dy, x = torch.randn(N, other, generator=g).to(dtype), torch.randn(N, H * D, generator=g).to(dtype)
    heads = torch.arange(n_sel) * (H // n_sel)
    cols = (heads[:, None] * D + torch.arange(D)).reshape(-1)

    def pinpoint():
        return pk.head_slice_grad(dy, x, heads, D, by=by, backend="cpu")

    def full_then_slice():
        full = dy.t() @ x  # what autograd computes for the whole weight
        return full[cols].float().view(n_sel, D, -1) if by == "rows" else \
            full[:, cols].float().view(-1, n_sel, D).permute(1, 0, 2)

    def reference():
        return ref.head_slice_grad(dy, x, heads, D, by=by)

    want = reference()
    torch.testing.assert_close(pinpoint(), want, atol=1e-3, rtol=1e-4)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    torch.testing.assert_close(full_then_slice(), want, **tol)  # bf16 GEMM rounds its output
    t = {fn.__name__: time_call(fn, repeat=repeat) for fn in (pinpoint, full_then_slice, reference)}
    return {
        "op": "head_slice_grad", "case": name, "shape": f"N={N} H={H} D={D} other={other}",
        "dtype": str(dtype).replace("torch.", ""), "masked": f"{n_sel}/{H} heads",
        "pinpoint_ms": t["pinpoint"] * 1e3, "full_grad_ms": t["full_then_slice"] * 1e3,
        "reference_ms": t["reference"] * 1e3, "vs_full_grad": t["full_then_slice"] / t["pinpoint"],
        "vs_reference": t["reference"] / t["pinpoint"], "cross_check": "ok",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    rows = [bench_attention(c, args.repeat) for c in ATTN_CASES]
    rows += [bench_grad(c, args.repeat) for c in GRAD_CASES]
    cols = ["op", "case", "shape", "dtype", "masked", "pinpoint_ms", "sdpa_one_call_ms", "sdpa_loop_ms",
            "full_grad_ms", "reference_ms", "vs_one_call", "vs_loop", "vs_full_grad", "vs_reference", "cross_check"]
    notes = ("Times are medians in ms; `vs_*` = peer time / pinpoint time (>1: pinpoint faster), measured "
             "in one process on the same inputs. Predicted before tuning: attention roughly on par with "
             "one SDPA call when 1/8 heads are masked (SDPA's kernel is better vectorised; pinpoint skips "
             "masked heads and never copies K/V), well ahead of the per-variant loop; the head-slice "
             "gradient ~H/S times fewer FLOPs than the full GEMM, minus a 2-4x efficiency gap to MKL.")
    print(write_results("kernels_cpu", "CPU kernels: fused attention and head-slice gradient", rows, cols, notes))


if __name__ == "__main__":
    main()
