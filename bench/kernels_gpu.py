"""GPU microbenchmarks of pinpoint's kernels at a Llama-2-7B layer shape, with cross-checks.

Attention: 64 variant rows x 32 heads x T=512 x head_dim 128, bf16, causal, all rows sharing
one K/V row, 1 of 32 heads patched per row (row r patches head r % 32):
  * fused head_patched_attention, backend cuda and triton (one call; masked heads skipped);
  * one torch SDPA call over the same 64 rows (K/V materialised per row, [B, H, T, D]
    contiguous: SDPA's best case, output left in SDPA's layout);
  * the unfused per-variant loop: one SDPA call per row plus the patch write.
head_slice_grad: 4 of 32 heads, N = 512 x 8 tokens, in/out = 4096, bf16:
  * by rows (q/k/v) and by cols (o_proj), backend cuda and triton;
  * the full weight gradient dYᵀ·X (one cuBLAS GEMM) and then slicing the 4 heads.

The cuda kernel is also timed under each tile variant (PINPOINT_CUDA_ATTN_VARIANT=1..4, see
csrc/cuda/attention_kernel.cuh), so one run shows which default to keep.

Times are CUDA-event medians over repeated calls after warm-up. Results are cross-checked
between the peers (max |diff| on unpatched heads / slices) and against the fp32 reference
on a few rows. Writes bench/out/kernels_gpu.json and bench/out/kernels_gpu.md and prints
the table. Offline; about a minute on an H100.

    python bench/kernels_gpu.py [--rows 64] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import pinpoint_kernels as pk  # noqa: E402
from pinpoint_kernels import backends  # noqa: E402
from pinpoint_kernels import reference as ref  # noqa: E402

OUT = ROOT / "bench" / "out"
DEV = "cuda"  # tests of this script swap in "cpu" (with the kernel emulator)


def cuda_time(fn, *, warmup: int, iters: int) -> dict:
    """Median / min milliseconds of fn() by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def usable(name: str) -> str | None:
    return backends._usable(name, torch.device(DEV))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def bench_attention(R: int, T: int, H: int, D: int, warmup: int, iters: int) -> dict:
    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(R, T, H, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, T, H, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, T, H, D, device=dev, dtype=dt, generator=g)
    kv_index = torch.zeros(R, dtype=torch.long, device=dev)
    head_mask = torch.zeros(R, H, dtype=torch.bool, device=dev)
    head_mask[torch.arange(R, device=dev), torch.arange(R, device=dev) % H] = True  # 1/32 of heads
    patch = torch.randn(1, T, H, D, device=dev, dtype=dt, generator=g)  # e.g. source-run outputs
    patch_index = torch.zeros(R, dtype=torch.long, device=dev)
    flops = 4.0 * R * H * T * T * D / 2  # causal: half the QKᵀ and PV products

    # SDPA's preferred layout, materialised once outside the timing.
    q_bhtd = q.transpose(1, 2).contiguous()
    k_bhtd = k.transpose(1, 2).expand(R, H, T, D).contiguous()
    v_bhtd = v.transpose(1, 2).expand(R, H, T, D).contiguous()

    results: dict = {"shape": dict(R=R, T=T, Hq=H, Hkv=H, D=D, dtype="bfloat16", masked_fraction=1 / H),
                     "causal_tflop": flops / 1e12, "timings": {}, "checks": {}, "skipped": {}}
    outs = {}

    def fused(backend):
        return lambda: pk.head_patched_attention(q, k, v, head_mask, patch, kv_index=kv_index,
                                                 patch_index=patch_index, backend=backend)

    def fused_nomask(backend):
        return lambda: pk.head_patched_attention(q, k, v, kv_index=kv_index, backend=backend)

    def sdpa():
        return F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, is_causal=True)

    k1, v1 = k.transpose(1, 2), v.transpose(1, 2)  # [1, H, T, D] views

    def loop():
        out = torch.empty(R, T, H, D, device=dev, dtype=dt)
        for r in range(R):
            o = F.scaled_dot_product_attention(q[r:r + 1].transpose(1, 2), k1, v1, is_causal=True)
            out[r] = o[0].transpose(0, 1)
            h = r % H
            out[r, :, h] = patch[0, :, h]
        return out.view(R, T, H * D)

    def with_variant(fn, variant):
        def run():
            os.environ["PINPOINT_CUDA_ATTN_VARIANT"] = str(variant)
            try:
                return fn()
            finally:
                os.environ.pop("PINPOINT_CUDA_ATTN_VARIANT", None)
        return run

    cases = {}
    for b in ("cuda", "triton"):
        why = usable(b)
        if why is None:
            cases[f"fused_{b}"] = fused(b)
            cases[f"fused_{b}_nomask"] = fused_nomask(b)
        else:
            results["skipped"][f"fused_{b}"] = why
    if usable("cuda") is None:  # every tile configuration of the cuda kernel (attention_kernel.cuh)
        for variant in (1, 2, 3, 4):
            cases[f"fused_cuda_variant{variant}"] = with_variant(fused("cuda"), variant)
    cases["sdpa_one_call"] = sdpa
    cases["sdpa_loop_per_variant"] = loop
    for name, fn in cases.items():
        try:
            outs[name] = fn()
            torch.cuda.synchronize()
            t = cuda_time(fn, warmup=warmup, iters=iters if "loop" not in name else max(3, iters // 4))
            t["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
            results["timings"][name] = t
        except Exception as exc:  # keep benchmarking the others; report the failure
            results["skipped"][name] = f"{type(exc).__name__}: {exc}"

    # Cross-checks on unpatched heads (SDPA is [B, H, T, D]; the others [R, T, H*D]).
    keep = ~head_mask[:, None, :, None].expand(R, T, H, D)
    base = outs["sdpa_one_call"].transpose(1, 2) if "sdpa_one_call" in outs else None
    for name, o in outs.items():
        if name == "sdpa_one_call" or base is None:
            continue
        o4 = o.view(R, T, H, D)
        results["checks"][f"{name}_vs_sdpa_max_abs_diff"] = max_diff(o4[keep], base[keep])
        if not name.endswith("nomask"):
            sel = ~keep
            pv = patch.expand(R, T, H, D)
            results["checks"][f"{name}_patched_heads_exact"] = bool(torch.equal(o4[sel], pv[sel]))
    rows = 4  # the fp32 reference on a few rows
    want = ref.head_patched_attention(q[:rows], k, v, head_mask[:rows], patch, kv_index=kv_index[:rows],
                                      patch_index=patch_index[:rows])
    for name in ("fused_cuda", "fused_triton", "sdpa_loop_per_variant"):
        if name in outs:
            results["checks"][f"{name}_vs_reference_max_abs_diff"] = max_diff(outs[name][:rows], want)
    t = results["timings"]
    if "sdpa_one_call" in t:
        for name in list(t):
            if name != "sdpa_one_call":
                t[name]["vs_sdpa_one_call"] = t[name]["median_ms"] / t["sdpa_one_call"]["median_ms"]
    return results


def bench_grad(N: int, H: int, D: int, width: int, n_heads: int, warmup: int, iters: int) -> dict:
    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    heads_list = [0, H // 4 - 1, H // 2 + 3, H - 1][:n_heads] if H >= 8 else list(range(min(n_heads, H)))
    n_heads = len(heads_list)
    heads = torch.tensor(heads_list, device=dev)
    results: dict = {"shape": dict(N=N, heads=f"{n_heads} of {H}", head_dim=D, features=width, dtype="bfloat16"),
                     "timings": {}, "checks": {}, "skipped": {}}
    for by in ("rows", "cols"):
        if by == "rows":  # q_proj: dY [N, H*D], X [N, in]
            dy = torch.randn(N, H * D, device=dev, dtype=dt, generator=g)
            x = torch.randn(N, width, device=dev, dtype=dt, generator=g)
        else:  # o_proj: dY [N, out], Z [N, H*D]
            dy = torch.randn(N, width, device=dev, dtype=dt, generator=g)
            x = torch.randn(N, H * D, device=dev, dtype=dt, generator=g)
        flops_sel = 2.0 * N * n_heads * D * width
        flops_full = 2.0 * N * dy.shape[1] * x.shape[1]

        def full():
            w = dy.t() @ x  # the whole [out, in] weight gradient (bf16, cuBLAS)
            if by == "rows":
                return torch.stack([w[h * D:(h + 1) * D] for h in heads_list]).float()
            return torch.stack([w[:, h * D:(h + 1) * D] for h in heads_list]).float()

        cases = {}
        for b in ("cuda", "triton"):
            why = usable(b)
            if why is None:
                cases[f"{by}_{b}"] = (lambda b=b: pk.head_slice_grad(dy, x, heads, D, by=by, backend=b))
            else:
                results["skipped"][f"{by}_{b}"] = why
        cases[f"{by}_full_gemm_then_slice"] = full
        outs = {}
        for name, fn in cases.items():
            try:
                outs[name] = fn()
                torch.cuda.synchronize()
                t = cuda_time(fn, warmup=warmup, iters=iters)
                fl = flops_full if "full" in name else flops_sel
                t["tflops"] = fl / (t["median_ms"] * 1e-3) / 1e12
                results["timings"][name] = t
            except Exception as exc:
                results["skipped"][name] = f"{type(exc).__name__}: {exc}"
        want = ref.head_slice_grad(dy, x, heads, D, by=by)  # fp32 einsum
        for name, o in outs.items():
            results["checks"][f"{name}_vs_reference_max_abs_diff"] = max_diff(o, want)
        base = results["timings"].get(f"{by}_full_gemm_then_slice")
        if base:
            for name in outs:
                if name in results["timings"] and "full" not in name:
                    results["timings"][name]["vs_full_gemm"] = results["timings"][name]["median_ms"] / base["median_ms"]
    return results


def markdown(res: dict) -> str:
    lines = [f"# pinpoint kernels on {res['device']}", "",
             f"torch {res['torch']}, CUDA {res['cuda']}, {res['date']}", ""]
    a = res["attention"]
    s = a["shape"]
    lines += [f"## head_patched_attention: R={s['R']} rows, T={s['T']}, {s['Hq']} heads x {s['D']}, "
              f"bf16, causal, 1/{s['Hq']} heads patched, K/V shared", "",
              "| variant | median ms | min ms | TFLOP/s (causal) | vs one SDPA call |", "|---|---:|---:|---:|---:|"]
    for name, t in a["timings"].items():
        lines.append(f"| {name} | {t['median_ms']:.3f} | {t['min_ms']:.3f} | {t['tflops']:.1f} | "
                     f"{t.get('vs_sdpa_one_call', 1.0):.2f}x |")
    g = res["head_slice_grad"]
    s = g["shape"]
    lines += ["", f"## head_slice_grad: {s['heads']} heads x {s['head_dim']}, N={s['N']}, "
              f"features {s['features']}, bf16", "",
              "| variant | median ms | min ms | TFLOP/s (useful) | vs full GEMM |", "|---|---:|---:|---:|---:|"]
    for name, t in g["timings"].items():
        lines.append(f"| {name} | {t['median_ms']:.3f} | {t['min_ms']:.3f} | {t['tflops']:.1f} | "
                     f"{t.get('vs_full_gemm', 1.0):.2f}x |")
    lines += ["", "## cross-checks", ""]
    for sec in ("attention", "head_slice_grad"):
        for k_, v_ in res[sec]["checks"].items():
            lines.append(f"- {sec}.{k_}: {v_:.3g}" if isinstance(v_, float) else f"- {sec}.{k_}: {v_}")
        for k_, v_ in res[sec]["skipped"].items():
            lines.append(f"- {sec}.{k_}: SKIPPED ({v_})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="sequences of --seq tokens in head_slice_grad")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--features", type=int, default=4096, help="in/out features in head_slice_grad")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "backends": backends.available_backends(DEV),
           "cuda_backend_error": usable("cuda")}
    t0 = time.time()
    res["attention"] = bench_attention(args.rows, args.seq, args.heads, args.head_dim, args.warmup, args.iters)
    res["head_slice_grad"] = bench_grad(args.seq * args.batch, args.heads, args.head_dim, args.features, 4,
                                        args.warmup, args.iters)
    res["wall_s"] = time.time() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kernels_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (OUT / "kernels_gpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
