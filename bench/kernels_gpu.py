"""GPU microbenchmarks of pinpoint's kernels at Llama-2-7B layer shapes, with asserted cross-checks.

Attention (bf16, causal, head_dim 128), each config through the public op and through the
backend's internal launcher (the difference is validation cost), for every GPU backend:
  * ``mha_T512``: 64 variant rows x 32 heads, T=512, one shared K/V row, 1 of 32 heads patched
    per row; peers: one SDPA call over the same rows (K/V materialised per row, SDPA's best
    case) and the unfused per-variant loop (one SDPA call per row + the patch write);
  * ``gqa32x8_T4096``: GQA 32/8, T=4096, 4 rows on 2 K/V rows, 50 % of heads patched, q/k/v
    as HF's transposed [B, H, T, D] views; peer: SDPA with enable_gqa;
  * ``gqa32x8_Tq256_Tk2048``: Tq < Tk (queries are the last 256 of 2048 keys), 16 rows on 4
    K/V rows, 50 % patched.
head_slice_grad: 4 of 32 heads, N = 4096 tokens, in/out = 4096, by rows and by cols, vs the
full weight-gradient GEMM then slicing. head_slice_linear forward+backward (by rows and by
cols) vs dense ``F.linear`` with a full weight gradient, masked to the selected heads.

Every result is cross-checked (fp32 reference on a few rows, SDPA on unpatched heads,
patched heads exact, gradients vs the reference, head_slice_linear vs dense); a mismatch, an
exception or an unavailable backend is a failure and the exit status is 1. Targets (fused
<= 1.1x one SDPA call, >= 5x the loop, head_slice_grad <= 0.25x the full GEMM) are reported,
not asserted. Writes bench/out/kernels_gpu.{json,md}.

    python3 bench/kernels_gpu.py [--iters 10] [--warmup 3]
    python3 bench/kernels_gpu.py --tiny --device cpu   # small shapes on the CPU backend (tests)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import pinpoint_kernels as pk  # noqa: E402
from pinpoint_kernels import backends  # noqa: E402
from pinpoint_kernels import reference as ref  # noqa: E402

OUT = ROOT / "bench" / "out"
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}  # as tests/gpu/_cases.py
# (name, R rows, Rk K/V rows, Tq, Tk, Hq, Hkv, D, patched fraction, [B,H,T,D] views, peers)
ATTN_CONFIGS = [
    ("mha_T512", 64, 1, 512, 512, 32, 32, 128, 1 / 32, False, ("sdpa", "loop")),
    ("gqa32x8_T4096", 4, 2, 4096, 4096, 32, 8, 128, 0.5, True, ("sdpa",)),
    ("gqa32x8_Tq256_Tk2048", 16, 4, 256, 2048, 32, 8, 128, 0.5, False, ()),
]
TINY_ATTN = [("tiny_mha", 6, 1, 24, 24, 4, 4, 16, 0.25, False, ("sdpa", "loop")),
             ("tiny_gqa", 4, 2, 40, 40, 4, 2, 16, 0.5, True, ("sdpa",)),
             ("tiny_tq_lt_tk", 4, 2, 8, 40, 4, 2, 16, 0.5, False, ())]


class Bench:
    """Timings and checks of one run; `run` turns an exception into a recorded failure."""

    def __init__(self, device: str, warmup: int, iters: int):
        self.dev, self.warmup, self.iters = torch.device(device), warmup, iters
        self.timings: dict = {}
        self.checks: list = []

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def time(self, section: str, name: str, fn, iters: int | None = None):
        """Run fn once (its output is returned for the cross-checks), then time it."""
        try:
            out = fn()
            self.sync()
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(iters or self.iters):
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append((time.perf_counter() - t0) * 1e3)
        except Exception as exc:  # a failure, with its traceback: never "skipped"
            traceback.print_exc()
            self.check(section, f"{name} runs", False, f"{type(exc).__name__}: {exc}")
            return None
        self.timings.setdefault(section, {})[name] = {"median_ms": statistics.median(times), "min_ms": min(times)}
        return out

    def check(self, section: str, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"check": f"{section}: {name}", "ok": bool(ok), "detail": detail})
        if not ok:
            print(f"MISMATCH {section}: {name}: {detail}", file=sys.stderr, flush=True)

    def close(self, section: str, name: str, got, want, atol: float, rtol: float) -> None:
        got, want = got.float(), want.float().to(got.device)
        err = (got - want).abs()
        bad = ~(err <= atol + rtol * want.abs())
        self.check(section, name, not bool(bad.any()) and got.shape == want.shape,
                   f"max |diff| {float(err.max()) if err.numel() else 0:.3g} (atol {atol:g}, rtol {rtol:g}), "
                   f"{int(bad.sum())} of {bad.numel()} outside")


def gpu_backends(device: torch.device, wanted: list[str] | None) -> tuple[list[str], dict]:
    """Backends to bench (dispatch order, reference aside) and why the others cannot run."""
    names = wanted or (["cuda", "triton"] if device.type == "cuda" else ["cpu"])
    why = {b: backends._usable(b, device) for b in names}
    return [b for b in names if why[b] is None], {b: w for b, w in why.items() if w}


def attention_inputs(cfg, dev, dt, seed: int = 0) -> dict:
    name, R, Rk, Tq, Tk, Hq, Hkv, D, frac, bhtd, _ = cfg
    g = torch.Generator(device=dev).manual_seed(seed)  # on the device: CPU RNG of 10^8 values is slow
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
    if bhtd:  # HF's layout: [B, H, T, D] tensors, passed as transposed views
        q, k, v = rnd(R, Hq, Tq, D).transpose(1, 2), rnd(Rk, Hkv, Tk, D).transpose(1, 2), rnd(Rk, Hkv, Tk, D).transpose(1, 2)
    else:
        q, k, v = rnd(R, Tq, Hq, D), rnd(Rk, Tk, Hkv, D), rnd(Rk, Tk, Hkv, D)
    hm = torch.rand(R, Hq, generator=g, device=dev) < frac
    if frac <= 1 / Hq:  # exactly one head per row: row r patches head r % Hq
        hm = torch.zeros(R, Hq, dtype=torch.bool, device=dev)
        hm[torch.arange(R), torch.arange(R) % Hq] = True
    return dict(q=q, k=k, v=v, head_mask=hm, patch=rnd(1, Tq, Hq, D),
                kv_index=(torch.arange(R) * Rk // R).to(dev), patch_index=torch.zeros(R, dtype=torch.long, device=dev))


def sdpa_peers(x: dict, cfg, causal_ok: bool):
    """(one SDPA call over all rows in [R, H, T, D] layout, the per-variant loop) closures."""
    R, Hq, Hkv = cfg[1], cfg[5], cfg[6]
    q4 = x["q"].transpose(1, 2).contiguous()
    kv = [t[x["kv_index"]].transpose(1, 2).contiguous() for t in (x["k"], x["v"])]
    gqa = {"enable_gqa": True} if Hq != Hkv else {}

    def one_call():
        return F.scaled_dot_product_attention(q4, kv[0], kv[1], is_causal=causal_ok, **gqa)

    patched = [x["head_mask"][r].nonzero()[:, 0] for r in range(R)]  # built once, outside the timing

    def loop():
        out = torch.empty_like(x["q"])
        for r in range(R):
            o = F.scaled_dot_product_attention(q4[r:r + 1], kv[0][r:r + 1], kv[1][r:r + 1], is_causal=True, **gqa)
            out[r] = o[0].transpose(0, 1)
            out[r, :, patched[r]] = x["patch"][0, :, patched[r]]
        return out.reshape(R, out.shape[1], -1)

    return one_call, loop


def bench_attention(b: Bench, cfg, names: list[str]) -> None:
    name, R, Rk, Tq, Tk, Hq, Hkv, D, frac, bhtd, peers = cfg
    dt = torch.bfloat16 if b.dev.type == "cuda" else torch.float32
    x = attention_inputs(cfg, b.dev, dt)
    kw = dict(kv_index=x["kv_index"], patch_index=x["patch_index"])
    args = (x["q"], x["k"], x["v"], x["head_mask"], x["patch"])
    rows = min(R, 2)
    want = ref.head_patched_attention(*(t[:rows] if i in (0, 3) else t for i, t in enumerate(args)),
                                      kv_index=kw["kv_index"][:rows], patch_index=kw["patch_index"][:rows])
    sel = x["head_mask"][:, None, :, None].expand(R, Tq, Hq, D)
    outs = {}
    for bk in names:
        launcher = backends._launcher(bk, "head_patched_attention", b.dev)
        outs[f"fused_{bk}"] = b.time(name, f"fused_{bk}", lambda: pk.head_patched_attention(*args, backend=bk, **kw))
        outs[f"launcher_{bk}"] = b.time(name, f"launcher_{bk}", lambda: launcher(
            *args, **kw, key_padding_mask=None, scale=D**-0.5, causal=True))
    one_call, loop = sdpa_peers(x, cfg, causal_ok=Tq == Tk)
    if "sdpa" in peers:
        sd = b.time(name, "sdpa_one_call", one_call)
        if sd is not None:
            outs["sdpa_one_call"] = sd.transpose(1, 2).reshape(R, Tq, Hq * D)
    if "loop" in peers:
        outs["sdpa_loop_per_variant"] = b.time(name, "sdpa_loop_per_variant", loop, iters=max(2, b.iters // 4))
    tol = ATTN_TOL[dt]
    for key, out in outs.items():
        if out is None:
            continue
        o4 = out.view(R, Tq, Hq, D)
        if key != "sdpa_one_call":
            b.close(name, f"{key} vs fp32 reference ({rows} rows)", out[:rows], want, tol, tol)
            b.check(name, f"{key} patched heads exact", torch.equal(o4[sel], x["patch"].expand(R, Tq, Hq, D)[sel]))
        if "sdpa_one_call" in outs and key.startswith(("fused", "launcher")):
            base = outs["sdpa_one_call"].view(R, Tq, Hq, D)
            b.close(name, f"{key} vs SDPA (unpatched heads)", o4[~sel], base[~sel], 2 * tol, 2 * tol)


def bench_grad(b: Bench, names: list[str], N: int, H: int, D: int, width: int) -> None:
    dt = torch.bfloat16 if b.dev.type == "cuda" else torch.float32
    g = torch.Generator(device=b.dev).manual_seed(1)
    heads_list = sorted({0, H // 4 - 1, H // 2 + 3, H - 1} & set(range(H)))
    heads = torch.tensor(heads_list, device=b.dev)
    for by in ("rows", "cols"):
        sec = f"head_slice_grad_{by}"
        out_f, in_f = (H * D, width) if by == "rows" else (width, H * D)
        dy = torch.randn(N, out_f, generator=g, device=b.dev, dtype=dt)
        x = torch.randn(N, in_f, generator=g, device=b.dev, dtype=dt)
        want = ref.head_slice_grad(dy, x, heads, D, by=by)
        for bk in names:
            launcher = backends._launcher(bk, "head_slice_grad", b.dev)
            for key, fn in ((f"public_{bk}", lambda: pk.head_slice_grad(dy, x, heads, D, by=by, backend=bk)),
                            (f"launcher_{bk}", lambda: launcher(dy, x, heads, D, by=by))):
                got = b.time(sec, key, fn)
                if got is not None:
                    b.close(sec, f"{key} vs reference", got, want, 1e-3 * N ** 0.5, 1e-3)

        def full():  # the whole [out, in] weight gradient, then the selected slices
            w = dy.t() @ x
            cols = (heads[:, None] * D + torch.arange(D, device=b.dev)).reshape(-1)
            return (w[cols].view(-1, D, in_f) if by == "rows"
                    else w[:, cols].view(out_f, -1, D).transpose(0, 1)).float()

        got = b.time(sec, "full_gemm_then_slice", full)
        if got is not None:  # the GEMM rounds to dt: a loose bound, as a sanity check of the peer
            b.close(sec, "full_gemm_then_slice vs reference", got, want, 1e-3 * N ** 0.5, 2e-2)


def bench_linear(b: Bench, N: int, H: int, D: int, width: int) -> None:
    """head_slice_linear forward+backward vs dense F.linear on the merged weight with a full
    weight gradient masked to the selected heads (what hook-zeroed SPT computes)."""
    dt = torch.bfloat16 if b.dev.type == "cuda" else torch.float32
    g = torch.Generator(device=b.dev).manual_seed(2)
    heads = [0, H // 4 - 1, H // 2 + 3, H - 1] if H >= 8 else [0, H - 1]
    idx = torch.tensor(heads, device=b.dev)
    index = pk.SliceIndex(heads, D, H, device=b.dev)  # validated once, as an attached adapter does
    rnd = lambda *s, dtype=dt: torch.randn(*s, generator=g, device=b.dev, dtype=dtype)  # noqa: E731
    for by in ("rows", "cols"):
        sec = f"head_slice_linear_{by}"
        out_f, in_f = (H * D, width) if by == "rows" else (width, H * D)
        w = rnd(out_f, in_f) * in_f ** -0.5
        x = rnd(N, in_f).requires_grad_()
        dy = rnd(N, out_f)
        delta = (rnd(len(heads), *((D, in_f) if by == "rows" else (out_f, D)), dtype=torch.float32) * 1e-2)
        delta.requires_grad_()
        w_eff = ref.head_slice_apply(w.clone(), delta.detach(), idx, D, by=by)  # round(W + Δ), as merged
        cols = (idx[:, None] * D + torch.arange(D, device=b.dev)).reshape(-1)

        def sparse():
            x.grad = delta.grad = None
            y = pk.head_slice_linear(x, w, None, delta, index, by=by)
            y.backward(dy)
            return y.detach(), x.grad, delta.grad

        dense_w = w_eff.clone().requires_grad_()

        def dense():
            x.grad = dense_w.grad = None
            y = F.linear(x, dense_w)
            y.backward(dy)
            dw = dense_w.grad.float()
            dw = dw[cols].view(-1, D, in_f) if by == "rows" else dw[:, cols].view(out_f, -1, D).transpose(0, 1)
            return y.detach(), x.grad, dw

        got, want = b.time(sec, "head_slice_linear fwd+bwd", sparse), b.time(sec, "dense F.linear fwd+bwd, masked dW", dense)
        if got is None or want is None:
            continue
        b.check(sec, "forward == dense on the merged weight (bitwise)", torch.equal(got[0], want[0]))
        b.close(sec, "dX vs dense", got[1], want[1], ATTN_TOL[dt], ATTN_TOL[dt])
        exact = ref.head_slice_grad(dy, x.detach(), idx, D, by=by)
        b.close(sec, "dDelta vs fp32 reference", got[2], exact, 1e-3 * N ** 0.5, 1e-3)
        b.close(sec, "dense masked dW vs fp32 reference", want[2], exact, 1e-3 * N ** 0.5, 2e-2)


def markdown(res: dict) -> str:
    lines = [f"# pinpoint kernels on {res['device']}", "", f"torch {res['torch']}, {res['date']}; "
             f"{'PASSED' if res['ok'] else 'FAILED'} ({sum(c['ok'] for c in res['checks'])}/{len(res['checks'])} "
             "cross-checks)", ""]
    for sec, t in res["timings"].items():
        base = next((t[k]["median_ms"] for k in ("sdpa_one_call", "full_gemm_then_slice",
                                                 "dense F.linear fwd+bwd, masked dW") if k in t), None)
        lines += [f"## {sec}", "", "| variant | median ms | min ms | vs peer |", "|---|---:|---:|---:|"]
        for name, v in t.items():
            ratio = f"{v['median_ms'] / base:.2f}x" if base else ""
            lines.append(f"| {name} | {v['median_ms']:.3f} | {v['min_ms']:.3f} | {ratio} |")
        lines.append("")
    lines += ["## targets (reported, not asserted)", ""] + [f"- {k}: {v}" for k, v in res["targets"].items()]
    lines += ["", "## cross-checks", ""] + [f"- {'ok' if c['ok'] else 'MISMATCH'} {c['check']}: {c['detail']}"
                                             for c in res["checks"]]
    return "\n".join(lines) + "\n"


def targets(timings: dict, first: str) -> dict:
    t, out = timings.get(first, {}), {}
    for bk in ("cuda", "triton", "cpu"):
        f = t.get(f"fused_{bk}")
        if f and "sdpa_one_call" in t:
            r = f["median_ms"] / t["sdpa_one_call"]["median_ms"]
            out[f"fused_{bk} <= 1.1x one SDPA call"] = f"{r:.2f}x ({'met' if r <= 1.1 else 'NOT met'})"
        if f and "sdpa_loop_per_variant" in t:
            r = t["sdpa_loop_per_variant"]["median_ms"] / f["median_ms"]
            out[f"fused_{bk} >= 5x the per-variant loop"] = f"{r:.1f}x ({'met' if r >= 5 else 'NOT met'})"
        for by in ("rows", "cols"):
            gt = timings.get(f"head_slice_grad_{by}", {})
            if f"public_{bk}" in gt and "full_gemm_then_slice" in gt:
                r = gt[f"public_{bk}"]["median_ms"] / gt["full_gemm_then_slice"]["median_ms"]
                out[f"head_slice_grad {by} {bk} <= 0.25x full GEMM"] = f"{r:.2f}x ({'met' if r <= 0.25 else 'NOT met'})"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", help="comma-separated (default: cuda,triton on a GPU, cpu on the CPU)")
    ap.add_argument("--tiny", action="store_true", help="small shapes (tests; any device)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device (use --device cpu --tiny for the CPU check)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32
    b = Bench(args.device, args.warmup, args.iters)
    names, missing = gpu_backends(b.dev, args.backends.split(",") if args.backends else None)
    for bk, why in missing.items():  # on the GPU machine every backend must run
        b.check("backends", f"{bk} available", False, why)
    configs = TINY_ATTN if args.tiny else ATTN_CONFIGS
    grad_shape = (64, 4, 16, 48) if args.tiny else (4096, 32, 128, 4096)
    t0 = time.time()
    for cfg in configs:
        bench_attention(b, cfg, names)
    bench_grad(b, names, *grad_shape)
    bench_linear(b, *grad_shape)
    res = {"device": torch.cuda.get_device_name(b.dev) if b.dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "backends": names, "timings": b.timings,
           "targets": targets(b.timings, configs[0][0]), "checks": b.checks, "wall_s": time.time() - t0}
    res["ok"] = bool(b.checks) and all(c["ok"] for c in b.checks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out / "kernels_gpu.md").write_text(md)
    print(md)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
