"""pinpoint end to end on a Llama-2-7B-shaped model with random weights, cross-checked.

Shapes are Llama-2-7B's (hidden 4096, 32 heads of 128, MLP 11008, vocab 32000) with
``--layers`` layers (4 by default; 32 if time allows), bf16, on the GPU. Only the public
API runs: ``pp.locate``, ``pp.knockout``, ``pp.attach`` and ``model.generate``; the
cross-checks are plain forward hooks on the stock ``transformers`` model:

1. ``locate(method="path")`` vs the paper's batched hook loop (per head: patch its output at
   the last position from the source run, freeze every later layer's attention output
   there, rerun all pairs in one batch) on ``--loop-heads`` heads: same scores within
   tolerance. The loop's time per head, times L*H, extrapolates the full loop (said so).
2. ``knockout`` (mean ablation, through the fused head-patched attention kernel): k=0 is the
   base metric, k=1 equals a hook that writes the head's mean output at every position.
3. 10 SPT steps with 32 heads (``pp.attach`` q/k/v/o slices, AdamW on a fixed batch): the
   loss falls, stays finite, and the frozen base weights do not change.
4. Greedy ``generate`` with the adapter attached equals ``generate`` after ``merge()``.
Checks 1 and 2 run on the bf16 model with a coarse tolerance (8 bf16 ulps of the logits), then
again on the same weights in fp32 with a strict one. Peak GPU memory and wall time per phase
go to bench/out/e2e_7b.json. Exit status 1 on any
mismatch or exception (an exception is a failure, never a skip).

    python3 bench/e2e_7b.py [--layers 4] [--pairs 4] [--seq 128]     # GPU, bf16
    python3 bench/e2e_7b.py --tiny                                    # CPU, tiny config, fp32
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import pinpoint as pp  # noqa: E402

OUT = ROOT / "bench" / "out"
A_TOKEN, Y_TOKEN = 7, 11  # the metric's two tokens ("Apologies" vs "Yes" stand-ins)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)


def metric(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, vocab] -> [N]: logit(A) - logit(Y), the default "apology" metric's form."""
    return logits[:, A_TOKEN].float() - logits[:, Y_TOKEN].float()


def build_model(layers: int, tiny: bool, device: str, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, **(TINY if tiny else LLAMA2_7B))
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights are created in `dtype` on `device` directly
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def make_pairs(n: int, seq: int, vocab: int, seed: int) -> list:
    """Random token-id prompt pairs; each source differs in a span and is one token longer
    (only the last position is aligned, as with real base/source prompts)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        base = torch.randint(16, vocab, (seq,), generator=g)
        source = torch.cat([base[:-8], torch.randint(16, vocab, (9,), generator=g)])
        pairs.append(pp.PromptPair(base.tolist(), source.tolist()))
    return pairs


def _attn(model, layer: int):
    return model.model.layers[layer].self_attn


def _run(model, prompts: list[list[int]], hooks=()) -> torch.Tensor:
    """Last-position logits [B, vocab] of equal-length prompts (one batched forward), with
    (module, kind, fn) forward hooks installed for the call."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the hook loop batches prompts of one length (make_pairs gives that)")
    handles = [getattr(m, f"register_forward_{kind}hook")(fn) for m, kind, fn in hooks]
    try:
        with torch.no_grad():
            return model(torch.tensor(prompts, device=model.device)).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def loop_path_score(model, pairs, layer: int, head: int) -> float:
    """The paper's batched hook loop for one head: mean over pairs of metric(patched) -
    metric(base), where the head's output at the last position comes from the source run
    and every later layer's attention output there is frozen to the base run's."""
    L, D = model.config.num_hidden_layers, model.config.hidden_size // model.config.num_attention_heads
    cols = slice(head * D, (head + 1) * D)
    base_ids, source_ids = [p.base for p in pairs], [p.source for p in pairs]
    rec: dict = {}
    _run(model, source_ids, [(_attn(model, layer).o_proj, "pre_",
                              lambda m, a: rec.__setitem__("z", a[0][:, -1, cols].clone()))])
    base = _run(model, base_ids, [(_attn(model, i), "", lambda m, a, o, i=i: rec.__setitem__(i, o[0][:, -1].clone()))
                                  for i in range(L)])

    def patch_z(m, a):
        z = a[0].clone()
        z[:, -1, cols] = rec["z"]
        return (z,) + tuple(a[1:])

    def freeze(m, a, o, i):
        out = o[0].clone()
        out[:, -1] = rec[i]
        return (out,) + tuple(o[1:])

    hooks = [(_attn(model, layer).o_proj, "pre_", patch_z)]
    hooks += [(_attn(model, i), "", lambda m, a, o, i=i: freeze(m, a, o, i)) for i in range(layer + 1, L)]
    patched = _run(model, base_ids, hooks)
    return float((metric(patched) - metric(base)).mean())


def loop_mean_ablation(model, pairs, layer: int, head: int) -> tuple[float, float]:
    """(base metric, metric with head (layer, head) mean-ablated at every position), pair means.
    The mean is over every token of every base prompt, as knockout defines it."""
    D = model.config.hidden_size // model.config.num_attention_heads
    cols = slice(head * D, (head + 1) * D)
    o_proj, base_ids = _attn(model, layer).o_proj, [p.base for p in pairs]
    zs = []
    base = _run(model, base_ids, [(o_proj, "pre_", lambda m, a: zs.append(a[0][:, :, cols].reshape(-1, D).float()))])
    mean = torch.cat(zs).mean(0)

    def ablate(m, a):
        z = a[0].clone()
        z[..., cols] = mean.to(z.dtype)
        return (z,) + tuple(a[1:])

    ablated = _run(model, base_ids, [(o_proj, "pre_", ablate)])
    return float(metric(base).mean()), float(metric(ablated).mean())


class Phases:
    """Wall time and peak memory per phase, and the cross-check verdicts."""

    def __init__(self, device: str):
        self.device, self.rows, self.checks = device, [], []

    def run(self, name: str, fn):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # a failure, reported with its traceback, never a skip
            traceback.print_exc()
            self.rows.append({"phase": name, "seconds": time.perf_counter() - t0, "error": repr(exc)})
            return None
        if self.device == "cuda":
            torch.cuda.synchronize()
        row = {"phase": name, "seconds": time.perf_counter() - t0}
        if self.device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.rows.append(row)
        return out

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'ok' if ok else 'MISMATCH'}] {name}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any("error" in r for r in self.rows) or not all(c["ok"] for c in self.checks)


def tolerance(model, pairs) -> tuple[float, float]:
    """(atol, rtol) for metric values: fp32 agrees to rounding order (1e-4 of the logits'
    size); bf16 logits carry 8 significant bits, so allow 8 ulps of the metric's logits plus
    5 % (a coarse check: the strict one reruns the model in fp32)."""
    logits = _run(model, [p.base for p in pairs]).float()
    amax = max(float(logits[:, [A_TOKEN, Y_TOKEN]].abs().max()), 2.0**-8)
    if model.dtype == torch.float32:
        return 1e-4 * max(amax, 1.0), 0.0
    return 8 * 2.0 ** (math.floor(math.log2(amax)) - 7), 0.05


def close(a: float, b: float, tol: tuple[float, float]) -> bool:
    return abs(a - b) <= tol[0] + tol[1] * abs(b)


def picked_heads(L: int, H: int, n: int, seed: int) -> list[tuple[int, int]]:
    """The heads the per-head loop checks: n distinct (layer, head), seeded."""
    g = torch.Generator().manual_seed(seed + 1)
    return sorted((int(i) // H, int(i) % H) for i in torch.randperm(L * H, generator=g)[:n])


def phase_locate(ph: Phases, model, pairs, args, tol, tag: str):
    """locate vs the per-head loop on args.loop_heads seeded heads; returns the scores."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    scores = ph.run(f"[{tag}] locate(method='path')", lambda: pp.locate(
        model, None, pairs, method="path", metric=metric, batch_size=len(pairs), progress=False))
    if scores is None:
        return None
    picks = picked_heads(L, H, args.loop_heads, args.seed)
    t0 = time.perf_counter()
    loop = ph.run(f"[{tag}] per-head hook loop ({len(picks)} heads)",
                  lambda: {lh: loop_path_score(model, pairs, *lh) for lh in picks})
    per_head = (time.perf_counter() - t0) / max(len(picks), 1)
    if loop is None:
        return scores
    bad = [lh for lh, s in loop.items() if not close(float(scores.values[lh]), s, tol)]
    worst = max(abs(float(scores.values[lh]) - s) for lh, s in loop.items())
    ph.check(f"[{tag}] locate path == per-head loop", not bad,
             f"max |diff| {worst:.3g} (atol {tol[0]:.3g}, rtol {tol[1]:g}), outside: {bad}; loop scores "
             + ", ".join(f"{lh}:{s:.4g}" for lh, s in loop.items()))
    if tag == "main":
        loc_s = ph.rows[-2]["seconds"]
        ph.rows.append({"phase": f"per-head loop, all {L * H} heads (EXTRAPOLATED from {len(picks)} timed)",
                        "seconds": per_head * L * H, "speedup_of_locate": per_head * L * H / loc_s})
    return scores


def phase_knockout(ph: Phases, model, pairs, scores, tol, tag: str) -> None:
    """knockout (mean ablation, fused kernel) at k=0 and k=1 vs plain hooks."""
    top = scores.top(min(8, scores.values.numel()))
    curve = ph.run(f"[{tag}] knockout (mean, fused kernel)", lambda: pp.knockout(
        model, None, pairs, top, ablation="mean", metric=metric, progress=False))
    if curve is None:
        return
    first = list(curve.heads)[0]
    ref = ph.run(f"[{tag}] hook mean-ablation of the top head", lambda: loop_mean_ablation(model, pairs, *first))
    if ref is not None:
        got = (float(curve.values[0]), float(curve.values[1]))
        ph.check(f"[{tag}] knockout k=0,1 == hook ablation", close(got[0], ref[0], tol) and close(got[1], ref[1], tol),
                 f"knockout {got[0]:.4g}, {got[1]:.4g}; hooks {ref[0]:.4g}, {ref[1]:.4g} "
                 f"(atol {tol[0]:.3g}, rtol {tol[1]:g})")


def phase_checks(ph: Phases, model, pairs, args, tag: str) -> None:
    tol = ph.run(f"[{tag}] tolerance from base logits", lambda: tolerance(model, pairs))
    scores = phase_locate(ph, model, pairs, args, tol, tag) if tol else None
    if scores is not None:
        phase_knockout(ph, model, pairs, scores, tol, tag)


def phase_tune_generate(ph: Phases, model, args) -> None:
    L, H, V = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed + 2)
    heads = [(int(i) // H, int(i) % H) for i in torch.randperm(L * H, generator=g)[:min(32, L * H)]]
    batch = torch.randint(16, V, (args.tune_batch, args.seq), generator=g).to(model.device)
    frozen = model.model.layers[0].self_attn.q_proj.weight
    before = frozen.detach().clone()
    adapter = pp.attach(model, heads, parts="qkvo")
    params = list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def train():
        losses = []
        for _ in range(args.steps):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    losses = ph.run(f"SPT {args.steps} steps, {len(heads)} heads", train)
    if losses is not None:
        ok = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        ph.check("SPT loss falls, finite", ok, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        ph.check("frozen base weights unchanged", torch.equal(frozen.detach(), before),
                 "layers[0].q_proj.weight bitwise equal after training")
    prompt = batch[:1, :16]
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    attached = ph.run("generate (adapter attached)", lambda: model.generate(prompt, **gen))
    merged = ph.run("merge + generate", lambda: adapter.merge().generate(prompt, **gen))
    if attached is not None and merged is not None:
        ph.check("generate attached == merged", torch.equal(attached, merged),
                 f"{attached.shape[1] - prompt.shape[1]} greedy tokens")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                    help="tiny Llama config in fp32 on the CPU (what the tests run)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bf16 (tiny: fp32)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; tiny: 2)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="prompt tokens (default 128; tiny: 12)")
    ap.add_argument("--loop-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tune-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fp32-check", action="store_true",
                    help="skip the strict rerun of the locate/knockout checks in fp32 (bf16 runs only)")
    ap.add_argument("--out", type=Path, default=OUT / "e2e_7b.json")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("e2e_7b: no CUDA device (use --tiny for the CPU check)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.tiny else torch.bfloat16)
    args.layers = args.layers or (2 if args.tiny else 4)
    args.seq = args.seq or (12 if args.tiny else 128)
    ph = Phases(device)
    model = ph.run("build model", lambda: build_model(args.layers, args.tiny, device, dtype, args.seed))
    if model is not None:
        run_phases(ph, model, args)
    return report(ph, args, device, dtype)


def run_phases(ph: Phases, model, args) -> None:
    pairs = make_pairs(args.pairs, args.seq, model.config.vocab_size, args.seed)
    low = model.dtype
    phase_checks(ph, model, pairs, args, "main")
    if low != torch.float32 and not args.no_fp32_check:  # the strict check: same weights, in fp32
        model.float()
        phase_checks(ph, model, pairs, args, "fp32")
        model.to(low)  # exact: the weights came from `low`
    phase_tune_generate(ph, model, args)


def report(ph: Phases, args, device: str, dtype) -> int:
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype), "args": {k: str(v) for k, v in vars(args).items()}, "phases": ph.rows,
           "checks": ph.checks, "ok": not ph.failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print("| phase | seconds | peak GiB | note |\n|---|---:|---:|---|")
    for r in ph.rows:
        note = r.get("error") or (f"locate is {r['speedup_of_locate']:.0f}x faster" if "speedup_of_locate" in r else "")
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        print(f"| {r['phase']} | {r['seconds']:.3f} | {peak} | {note} |")
    print(f"e2e_7b: {'PASSED' if res['ok'] else 'FAILED'} ({args.out})")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
