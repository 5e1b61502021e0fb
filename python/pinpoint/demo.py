"""`pinpoint demo`: the whole method on the embedded model organism, on a laptop CPU.

1. Locate the heads carrying sycophancy with path patching (heatmap, recall of the planted
   heads at k = number planted) and draw the knockout curve.
2. Tune four ways on the same dialogues: SPT on the located heads, SFT (all parameters),
   SPT on random heads, and nothing (the original model).
3. Evaluate each with the "are you sure" protocol on held-out questions, plus general-skill
   accuracy and the next-token KL against the original.
4. Write report.md (a table like the paper's Table 1) and report.json, and print the table.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import publish_dir, staging_dir


@dataclass
class DemoConfig:
    n_locate: int = 48          # held-out questions used to locate heads
    n_eval: int = 120           # other held-out questions for the protocol
    n_dialogues: int = 256      # tuning dialogues (half insist, half revise)
    steps: int = 60
    batch_size: int = 16
    lr_spt: float = 1e-3        # only a few heads move: they take a 10x larger step than SFT
    lr_sft: float = 1e-4
    n_neutral: int = 64
    knockout_k: int | None = None   # default: 2 x planted
    seed: int = 0
    max_new_tokens: tuple[int, int, int] = (6, 16, 6)


def _fresh(model):
    return copy.deepcopy(model).eval()


def _run(name, model, tok, rows, general, neutral, original, cfg, *, trainable, seconds, progress):
    from .evaluate import evaluate
    from .general import evaluate_choices, kl_divergence

    rep = evaluate(model, tok, rows, max_new_tokens=cfg.max_new_tokens, batch_size=32, progress=progress,
                   model_name=name)
    m = rep.metrics
    gen = evaluate_choices(model, tok, general, batch_size=32, progress=False)
    kl = 0.0 if model is original else kl_divergence(model, original, neutral, tok, batch_size=16)
    return {
        "confidence": m["confidence"], "truthfulness": m["truthfulness"],
        "accuracy_before": m["accuracy_before"], "accuracy_after": m["accuracy_after"],
        "apology_rate": m["apology_rate"], "flip_rate": m.get("flip_rate"), "unparsed": m.get("unparsed"),
        "general_accuracy": gen["accuracy"], "kl": kl, "trainable_params": trainable, "seconds": seconds,
    }, rep


def run_demo(out="pinpoint-demo", *, progress: bool = True, config: DemoConfig | None = None,
             organism_path=None, cache_dir=None) -> int:
    """Run the demo and write its files under ``out``; returns 0. ``organism_path``: an organism
    directory to use (default: ``pinpoint.organism.build(cache_dir)``, the shipped one)."""
    from . import organism
    from .data import as_rows
    from .general import load_choices

    cfg = config or DemoConfig()
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} exists and is not a directory")
            break
    t_all = time.perf_counter()
    say = print

    if organism_path is not None:
        path = Path(organism_path)
        missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "organism.json",
                               "are_you_sure.jsonl", "spt_rows.jsonl", "choices.jsonl", "neutral.txt")
                   if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a pinpoint organism directory (missing {', '.join(missing)})")
    else:
        path = organism.build(cache_dir)
    planted = [tuple(h) for h in organism.planted_heads(path)]
    model, tok = organism.load(path)
    rows_all = as_rows(path / "are_you_sure.jsonl")
    if len(rows_all) < cfg.n_locate + cfg.n_eval:
        raise ValueError(f"the organism has {len(rows_all)} held-out rows, fewer than n_locate + n_eval")
    locate_rows, eval_rows = rows_all[:cfg.n_locate], rows_all[cfg.n_locate:cfg.n_locate + cfg.n_eval]
    train_rows = as_rows(path / "spt_rows.jsonl")
    general = load_choices(path / "choices.jsonl")
    neutral = [t for t in (path / "neutral.txt").read_text().splitlines() if t.strip()][:cfg.n_neutral]
    say(f"organism: {path} ({sum(p.numel() for p in model.parameters()):,} parameters, planted heads {planted})")

    # Everything is written to a temporary sibling of `out` and moved into place at the end,
    # so a failed or interrupted run leaves no partial results in `out`.
    with staging_dir(out) as work:
        report = _demo_steps(work, model, tok, planted, locate_rows, eval_rows, train_rows, general, neutral, cfg,
                             progress=progress, say=say)
        report["organism"]["path"] = str(path)
        report["seconds_total"] = time.perf_counter() - t_all
        (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
        publish_dir(work, out)
    say("")
    say(report_table(report))
    say(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, heatmap.png, knockout.png "
        f"({report['seconds_total']:.0f}s in all)")
    return 0


def _demo_steps(out: Path, model, tok, planted, locate_rows, eval_rows, train_rows, general, neutral, cfg, *,
                progress, say) -> dict:
    """Locate, knockout, tune four ways, evaluate; files into ``out``; returns the report."""
    from .adapter import random_heads
    from .data import challenge_pairs, spt_dialogues
    from .locate import knockout, locate
    from .tune import tune

    # 1. locate + knockout
    t0 = time.perf_counter()
    pairs = challenge_pairs(locate_rows, tok)
    scores = locate(model, tok, pairs, method="path", metric="apology", progress=progress)
    k = len(planted)
    top = scores.top(k)
    recall = len(set(top) & set(planted)) / k
    scores.save(out / "scores")
    scores.plot(out / "heatmap.png", k=k, planted=planted,
                title=f"Path patching, don't vs do\ntop {k} boxed, planted dotted, recall {recall:.2f}")
    t_locate = time.perf_counter() - t0
    say(f"locate: top {k} heads {top.to_list()}, planted recall {recall:.2f} ({t_locate:.1f}s)")
    K = min(cfg.knockout_k or 2 * k, scores.values.numel())
    curve = knockout(model, tok, pairs, scores.top(K), ablation="mean", progress=progress)
    curve.plot(out / "knockout.png", title="Knockout of the top-k located heads (mean ablation)")

    # 2-3. tune four ways and evaluate each
    dialogues = spt_dialogues(train_rows, n=cfg.n_dialogues, seed=cfg.seed)
    common = dict(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    runs, reports = {}, {}
    plans = [
        ("original", None),
        ("spt", dict(heads=top, lr=cfg.lr_spt)),
        ("sft", dict(full=True, lr=cfg.lr_sft)),
        ("random_heads", dict(heads=random_heads(model, k, seed=cfg.seed, exclude=list(top)), lr=cfg.lr_spt)),
    ]
    for name, kw in plans:
        t0 = time.perf_counter()
        if kw is None:
            tuned, trainable = model, 0
        else:
            m = _fresh(model)
            adapter = tune(m, tok, dialogues, **common, **kw)
            trainable = sum(p.numel() for p in adapter.parameters())
            tuned = adapter.merge()
        seconds = time.perf_counter() - t0
        runs[name], reports[name] = _run(name, tuned, tok, eval_rows, general, neutral, model, cfg,
                                         trainable=trainable, seconds=seconds, progress=progress)
        reports[name].save(out / f"eval-{name}")
        say(f"{name}: confidence {runs[name]['confidence']:.1f}, truthfulness {runs[name]['truthfulness']:.1f} "
            f"({seconds:.1f}s tuning)")

    report = {
        "organism": {"path": None, "planted_heads": [list(h) for h in planted]},
        "locate": {"method": "path", "top_heads": top.to_list(), "planted_recall": recall, "seconds": t_locate},
        "knockout": curve.to_dict(),
        "runs": runs,
        "config": asdict(cfg),
    }
    table = report_table(report)
    (out / "report.md").write_text(
        f"# pinpoint demo\n\nOrganism: {len(planted)} planted heads {report['organism']['planted_heads']}; "
        f"path patching top {k}: {top.to_list()} (recall {recall:.2f}).\n\n{table}\n\n"
        "![heatmap](heatmap.png)\n\n![knockout](knockout.png)\n")
    return report


def report_table(report: dict) -> str:
    cols = [("confidence", "Confidence"), ("truthfulness", "Truthfulness"), ("accuracy_before", "Acc. before"),
            ("accuracy_after", "Acc. after"), ("general_accuracy", "General acc."), ("kl", "KL"),
            ("trainable_params", "Trainable params"), ("seconds", "Tuning s")]
    names = {"original": "Original", "spt": "SPT (located heads)", "sft": "SFT (all parameters)",
             "random_heads": "SPT (random heads)"}
    lines = ["| Run | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for key, label in names.items():
        r = report["runs"].get(key)
        if r is None:
            continue
        cells = []
        for c, _ in cols:
            v = r.get(c)
            if v is None:
                cells.append("–")
            elif c == "kl":
                cells.append(f"{v:.4f}")
            elif c == "trainable_params":
                cells.append(f"{int(v):,}")
            else:
                cells.append(f"{v:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
