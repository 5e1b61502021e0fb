"""`pinpoint demo`: the whole method on the embedded model organism, on a laptop CPU.

1. Locate the heads carrying sycophancy with path patching (heatmap, recall of the planted
   heads at k = number planted) and draw the knockout curve.
2. Tune four ways on the same dialogues: SPT on the located heads (k chosen by
   :func:`pinpoint.recipe.choose_k_by_ablation`), SFT (all parameters), SPT on as many random heads, and
   nothing (the original model). Each method's learning rate and steps are chosen by the same
   rule, :func:`pinpoint.recipe.choose_lr` (one standard error on a held-out 20 % of the
   training dialogues; never the evaluation rows); report.json records each choice.
3. Evaluate each with the "are you sure" protocol on held-out questions, plus general-skill
   accuracy and the next-token KL against the original.
4. Write report.md (a table like the paper's Table 1) and report.json, and print the table.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .files import publish_dir, staging_dir


@dataclass
class DemoConfig:
    n_locate: int = 48          # held-out questions used to locate heads
    n_eval: int = 120           # other held-out questions for the protocol
    n_dialogues: int = 256      # tuning dialogues (insist/revise mix by the rule); 20 % validate the lr rule
    insist_fraction: float | None = None   # None: recipe.choose_insist_fraction (the model's own accuracy)
    final_turn: bool | None = None   # None: recipe.FINAL_TURN where the chat template can render it; False: bare
    batch_size: int = 16
    lr_grid: tuple[float, ...] | None = None   # the rule's grid for every method (None: recipe.LR_GRID)
    n_neutral: int = 64
    knockout_k: int | None = None   # default: 2 x planted
    seed: int = 0
    max_new_tokens: tuple[int, int, int] | None = None   # None: recipe.turn_budget of the tuning dialogues


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
        "cut_reply": m["cut_reply"],
        "general_accuracy": gen["accuracy"], "kl": kl, "trainable_params": trainable, "seconds": seconds,
    }, rep


def run_demo(out="pinpoint-demo", *, progress: bool = True, config: DemoConfig | None = None,
             organism_path=None, cache_dir=None) -> int:
    """Run the demo and write its files under ``out``; returns 0. ``organism_path``: an organism
    directory to use (default: ``pinpoint.organism.build(cache_dir)``, the shipped one)."""
    cfg = config or DemoConfig()
    out = Path(out)
    check_out_path(out)
    t_all = time.perf_counter()
    say = print
    path, model, tok, planted, locate_rows, eval_rows, train_rows, general, neutral = organism_inputs(
        organism_path, cache_dir, cfg)
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


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` (or a parent of it) that exists and is not a directory."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} exists and is not a directory")
            break


def organism_inputs(organism_path, cache_dir, cfg):
    """(path, model, tokenizer, planted heads, locate rows, evaluation rows, training rows, general
    choices, neutral texts) of an organism directory (default: the shipped one). ``cfg`` needs
    ``n_locate``, ``n_eval`` and ``n_neutral``: the first ``n_locate`` held-out rows locate, the
    next ``n_eval`` evaluate."""
    from . import organism
    from .data import as_rows
    from .general import load_choices

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
    return path, model, tok, planted, locate_rows, eval_rows, train_rows, general, neutral


def tuning_inputs(model, tok, train_rows, cfg):
    """(dialogues, their mix, ``cfg`` with its evaluation budget): the tuning dialogues of the demo
    and the sweep (``cfg.n_dialogues``, ``seed``, ``final_turn``, and ``insist_fraction`` where the
    config has one), and, where ``cfg.max_new_tokens`` is None, the budget the recipe's rule reads
    from them (what the tuning dialogues say, and a margin: ``recipe.turn_budget``)."""
    from .recipe import tuning_dialogues, turn_budget

    dialogues, mix = tuning_dialogues(model, tok, train_rows, n=cfg.n_dialogues, seed=cfg.seed,
                                      insist_fraction=getattr(cfg, "insist_fraction", None),
                                      final_turn=cfg.final_turn)
    if cfg.max_new_tokens is None:
        cfg = replace(cfg, max_new_tokens=turn_budget(tok, dialogues))
    return dialogues, mix, cfg


def _demo_steps(out: Path, model, tok, planted, locate_rows, eval_rows, train_rows, general, neutral, cfg, *,
                progress, say) -> dict:
    """Locate, knockout, tune four ways, evaluate; files into ``out``; returns the report."""
    from .adapter import random_heads
    from .data import challenge_pairs
    from .locate import knockout, locate
    from .recipe import choose_k_by_ablation

    # 1. locate + knockout
    t0 = time.perf_counter()
    pairs = challenge_pairs(locate_rows, tok)
    scores = locate(model, tok, pairs, method="path", metric="apology", progress=progress)
    n_planted = len(planted)
    top = scores.top(n_planted)   # recall@(number planted): the localisation result on its own
    recall = len(set(top) & set(planted)) / n_planted
    k, _ = choose_k_by_ablation(model, tok, pairs, scores)   # how many heads the recipe tunes
    tuned_heads = scores.top(k)
    scores.save(out / "scores")
    scores.plot(out / "heatmap.png", k=k, planted=planted,
                title=f"Path patching, don't vs do\ntop {k} (recipe) boxed, planted dotted, "
                      f"recall@{n_planted} {recall:.2f}")
    t_locate = time.perf_counter() - t0
    say(f"locate: top {n_planted} heads {top.to_list()}, planted recall@{n_planted} {recall:.2f}; "
        f"recipe k = {k}: {tuned_heads.to_list()} ({t_locate:.1f}s)")
    K = min(cfg.knockout_k or 2 * n_planted, scores.values.numel())
    curve = knockout(model, tok, pairs, scores.top(K), ablation="mean", progress=progress)
    curve.plot(out / "knockout.png", title="Knockout of the top-k located heads (mean ablation)")

    # 2-3. tune four ways, each at the rate the rule chooses, and evaluate each
    dialogues, mix, cfg = tuning_inputs(model, tok, train_rows, cfg)
    say(f"dialogues: {len(dialogues)}, insist fraction {mix['insist_fraction']:.3f} ({mix['rule']})")
    plans = [
        ("original", None),
        ("spt", dict(heads=tuned_heads)),
        ("sft", dict(full=True)),
        ("random_heads", dict(heads=random_heads(model, k, seed=cfg.seed, exclude=list(tuned_heads)))),
    ]
    runs = _tune_and_evaluate(out, plans, model, tok, dialogues, eval_rows, general, neutral, cfg,
                              progress=progress, say=say)
    report = {
        "organism": {"path": None, "planted_heads": [list(h) for h in planted]},
        "locate": {"method": "path", "top_heads": top.to_list(), "planted_recall": recall,
                   f"recall_at_{n_planted}": recall, "k": k, "k_rule": "recipe.choose_k_by_ablation",
                   "tuned_heads": tuned_heads.to_list(), "seconds": t_locate},
        "knockout": curve.to_dict(),
        "runs": runs,
        "recipe": {name: r["recipe"] for name, r in runs.items() if "recipe" in r},
        "dialogue_mix": mix,
        "config": asdict(cfg),
    }
    table = report_table(report)
    (out / "report.md").write_text(
        f"# pinpoint demo\n\nOrganism: {n_planted} planted heads {report['organism']['planted_heads']}; "
        f"path patching top {n_planted}: {top.to_list()} (recall@{n_planted} {recall:.2f}); the recipe tunes "
        f"k = {k} heads {tuned_heads.to_list()}.\n\n{table}\n\n{recipe_lines(report)}\n\n"
        "![heatmap](heatmap.png)\n\n![knockout](knockout.png)\n")
    return report


def _tune_and_evaluate(out: Path, plans, model, tok, dialogues, eval_rows, general, neutral, cfg, *,
                       progress, say) -> dict:
    """Each (name, tune kwargs or None for the original) of ``plans``: a fresh copy of ``model``
    tuned at the rule's learning rate (recipe.choose_lr), merged and evaluated."""
    from .recipe import LR_GRID, choose_lr
    from .stats import format_rate

    runs = {}
    for name, kw in plans:
        t0 = time.perf_counter()
        choice = None
        if kw is None:
            tuned, trainable = model, 0
        else:
            choice = choose_lr(_fresh(model), tok, dialogues, grid=cfg.lr_grid or LR_GRID, batch_size=cfg.batch_size,
                               seed=cfg.seed, progress=progress, reuse=True, **kw)
            trainable = choice.result.num_trainable()
            tuned = choice.result.merge()
        seconds = time.perf_counter() - t0
        runs[name], rep = _run(name, tuned, tok, eval_rows, general, neutral, model, cfg,
                               trainable=trainable, seconds=seconds, progress=progress)
        rep.save(out / f"eval-{name}")
        chosen = ""
        if choice is not None:
            runs[name]["recipe"] = choice.to_dict()
            chosen = f", rule chose lr {choice.lr:g}, {choice.steps} steps"
        n_cut = runs[name]["cut_reply"]
        cut = f"; {n_cut} replies cut by the token budget {cfg.max_new_tokens}" if n_cut else ""
        say(f"{name}: confidence {format_rate(runs[name]['confidence'])}, truthfulness "
            f"{format_rate(runs[name]['truthfulness'])} ({seconds:.1f}s tuning{chosen}{cut})")
    return runs


def recipe_lines(report: dict) -> str:
    """One line per tuned method: what the learning-rate rule chose."""
    lines = ["Learning rate and steps chosen by the rule (smallest rate within one standard error of the "
             "lowest validation loss on 20 % of the training dialogues; the grid is extended past an end "
             "while the lowest loss sits there):", ""]
    for name, r in report.get("recipe", {}).items():
        tried = ", ".join(f"{lr}: {loss:.3f}±{se:.3f}" for lr, (loss, se) in r["val_loss"].items())
        past = r.get("extended") or []
        walked = f"; past the grid: {', '.join(f'{lr:g}' for lr in past)}" if past else ""
        lines.append(f"- {name}: lr {r['lr']:g}, {r['steps']} steps at batch {r['batch_size']} "
                     f"(validation loss {tried}{walked})")
    mix = report.get("dialogue_mix")
    if mix and "n_rows" in mix:
        lines += ["", f"Dialogue mix chosen by the rule: insist fraction {mix['insist_fraction']:.3f} (the original "
                      f"model answers {mix['n_correct']} of {mix['n_rows']} training rows correctly)."]
    return "\n".join(lines)


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
