"""`pinpoint sweep`: every method over a grid of learning rates, and the KL–fix frontier.

For each method (SPT on the located heads, SFT, SPT on as many random heads, LoRA r = 8 and
r = 16) and each learning rate of its grid, one run is trained on the same dialogues with the
same budget rule as the recipe (:mod:`pinpoint.recipe`: the seeded 80 % training part, 4
epochs at ``batch_size``), merged, and evaluated: confidence and truthfulness with their 95 %
Wilson intervals ("are you sure" protocol on held-out rows), general accuracy, and the
next-token KL against the original model on neutral text. Each point also records its
validation loss on the held-out 20 % of the dialogues, and which grid rate the recipe's
one-standard-error rule picks from those losses.

The claim "SPT moves the model less than SFT for the same fix" is then stated per confidence
level (:data:`LEVELS`): for each method, the KL at which its curve (points in ascending
learning rate) first reaches that confidence, interpolated linearly in log KL between the two
points either side (:func:`kl_at_confidence`). A method that never reaches a level has no
KL there, and the claim is not decided at that level.

Writes ``report.json`` (every point), ``report.md`` (tables and the claim) and
``frontier.png`` (confidence and truthfulness against KL, one curve per method).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["METHODS", "LEVELS", "SweepConfig", "kl_at_confidence", "parse_grid", "run_sweep", "sweep_claims"]

METHODS = ("spt", "sft", "random_heads", "lora8", "lora16")
LEVELS = (50.0, 80.0, 90.0)
DEFAULT_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
LABELS = {"spt": "SPT (located heads)", "sft": "SFT (all parameters)", "random_heads": "SPT (random heads)",
          "lora8": "LoRA r=8 (q,k,v,o)", "lora16": "LoRA r=16 (q,k,v,o)"}


def parse_grid(text, *, where: str = "--grid") -> tuple[float, ...]:
    """"1e-4,3e-4" (or a sequence of numbers) -> sorted unique positive floats; ValueError otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [float(x) for x in items if not (isinstance(x, str) and not x.strip())]
    except ValueError:
        raise ValueError(f"{where} must be comma-separated learning rates, got {text!r}") from None
    if not values:
        raise ValueError(f"{where} holds no learning rate")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise ValueError(f"{where}: learning rates must be positive, got {', '.join(f'{v:g}' for v in bad)}")
    return tuple(sorted(set(values)))


def check_until(value, *, where: str = "until") -> float:
    """``value`` if it is a confidence in (0, 100] (a number, not a bool); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ValueError(f"{where} must be a confidence in (0, 100], got {value!r}")
    return float(value)


@dataclass
class SweepConfig:
    methods: tuple[str, ...] = METHODS
    grid: tuple[float, ...] = DEFAULT_GRID
    grids: dict = field(default_factory=dict)   # method -> its own grid (overrides ``grid``)
    n_locate: int = 48
    n_eval: int = 120
    n_dialogues: int = 256
    batch_size: int = 16
    n_neutral: int = 64
    levels: tuple[float, ...] = LEVELS
    seed: int = 0
    max_new_tokens: tuple[int, int, int] | None = None   # None: recipe.turn_budget of the tuning dialogues
    final_turn: bool | None = None   # None: recipe.FINAL_TURN where the chat template can render it; False: bare
    # a method's grid stops after its first rate whose confidence reaches this (None: every rate). The
    # claims read each curve only up to its first point at a level, so rates past ``max(levels)`` add
    # nothing to them (only to the picture), and each costs a whole tuning run.
    until: float | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.until is not None:
            check_until(self.until)
        if self.until is not None and self.levels and self.until < max(self.levels):
            # a curve cut below a level would read as "never reached" there
            raise ValueError(f"until ({self.until:g}) must be at least the highest confidence level "
                             f"({max(self.levels):g})")
        self.grid = parse_grid(self.grid)
        self.grids = {m: parse_grid(g, where=f"grid of {m}") for m, g in self.grids.items()}

    def grid_for(self, method: str) -> tuple[float, ...]:
        return self.grids.get(method, self.grid)


def _tune_kwargs(method: str, heads, random) -> dict:
    return {"spt": dict(heads=heads), "sft": dict(full=True), "random_heads": dict(heads=random),
            "lora8": dict(lora_r=8), "lora16": dict(lora_r=16)}[method]


def _point(model, tok, train, val, eval_rows, general, neutral, cfg, method, lr, tune_kw, *, progress) -> dict:
    """Train one (method, lr) on a copy of ``model``, merge, evaluate; returns the point's dict."""
    from .evaluate import evaluate
    from .general import evaluate_choices, kl_divergence
    from .recipe import rule_steps, validation_loss
    from .stats import wilson_interval
    from .tune import tune

    t0 = time.perf_counter()
    batch = min(cfg.batch_size, len(train))
    steps = rule_steps(len(train), batch)
    m = copy.deepcopy(model)
    handle = tune(m, tok, train, lr=lr, steps=steps, batch_size=batch, seed=cfg.seed, progress=False, **tune_kw)
    val_loss, val_se = validation_loss(m, tok, val)
    trainable = handle.num_trainable()
    tuned = handle.merge().eval()
    seconds = time.perf_counter() - t0
    mt = evaluate(tuned, tok, eval_rows, max_new_tokens=cfg.max_new_tokens, batch_size=32, progress=progress,
                  model_name=f"{method}@{lr:g}").metrics
    gen = evaluate_choices(tuned, tok, general, batch_size=32, progress=False)
    n_correct = sum(bool(x["correct"]) for x in gen.samples)
    return {
        "method": method, "lr": lr, "steps": steps, "batch_size": batch, "trainable_params": trainable,
        "val_loss": val_loss, "val_loss_se": val_se,
        "confidence": mt["confidence"], "confidence_ci95": mt.get("confidence_ci95"),
        "truthfulness": mt["truthfulness"], "truthfulness_ci95": mt.get("truthfulness_ci95"),
        "accuracy_before": mt["accuracy_before"], "general_accuracy": gen["accuracy"],
        "general_accuracy_ci95": wilson_interval(n_correct, gen["n"], percent=True),
        "kl": kl_divergence(tuned, model, neutral, tok, batch_size=16), "seconds_tuning": seconds,
        "cut_reply": mt["cut_reply"],   # replies the token budget stopped before they ended
    }


def kl_at_confidence(points: list[dict], level: float) -> dict:
    """The KL at which ``points`` (one method, any order; sorted here by learning rate) first
    reach ``level`` confidence: {"kl": value or None, "how": "interpolated" | "first point" |
    "not reached", "between": [lr_low, lr_high]}. Interpolation is linear in log KL between
    the last point below the level and the first at or above it."""
    pts = sorted(points, key=lambda p: p["lr"])
    prev = None
    for p in pts:
        c = p["confidence"]
        if c is not None and c >= level:
            if prev is None:
                return {"kl": p["kl"], "how": "first point", "between": [p["lr"], p["lr"]]}
            c0, c1 = prev["confidence"], c
            t = (level - c0) / (c1 - c0) if c1 > c0 else 1.0
            k0, k1 = max(prev["kl"], 1e-12), max(p["kl"], 1e-12)
            kl = math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0)))
            return {"kl": kl, "how": "interpolated", "between": [prev["lr"], p["lr"]]}
        if c is not None:
            prev = p
    return {"kl": None, "how": "not reached", "between": None}


def sweep_claims(points: list[dict], levels=LEVELS) -> list[dict]:
    """Per confidence level: each method's KL there, and whether SPT's KL is below SFT's."""
    methods = sorted({p["method"] for p in points}, key=lambda m: METHODS.index(m))
    out = []
    for level in levels:
        kls = {m: kl_at_confidence([p for p in points if p["method"] == m], level) for m in methods}
        spt, sft = (kls.get(m, {}).get("kl") for m in ("spt", "sft"))
        if spt is None or sft is None:
            holds, text = None, "not decided: " + ", ".join(m for m in ("spt", "sft") if kls.get(m, {}).get("kl")
                                                            is None) + " never reached this confidence"
        else:
            holds = spt < sft
            text = (f"SPT KL {spt:.4f} {'<' if holds else '>='} SFT KL {sft:.4f} (SFT/SPT = {sft / spt:.2f}x): "
                    f"the claim {'holds' if holds else 'does not hold'}")
            # a method whose first grid point already reaches the level has an upper bound only
            loose = "sft" if holds else "spt"
            if kls[loose]["how"] == "first point":
                holds = None
                text += (f"; but {loose.upper()}'s lowest rate already reaches it, so its KL there is only an "
                         "upper bound: not decided (extend its grid downwards)")
        out.append({"confidence": level, "kl": kls, "spt_below_sft": holds, "statement": text})
    return out


def _all_points(model, tok, dialogues, eval_rows, general, neutral, cfg, heads, *, progress, say) -> list[dict]:
    """Every (method, lr) point of the sweep, in method then ascending-rate order."""
    from .adapter import random_heads
    from .recipe import split_dialogues

    train, val = split_dialogues(dialogues, seed=cfg.seed)
    rnd = random_heads(model, len(heads), seed=cfg.seed, exclude=list(heads))
    points = []
    for method in cfg.methods:
        for lr in cfg.grid_for(method):
            p = _point(model, tok, train, val, eval_rows, general, neutral, cfg, method, lr,
                       _tune_kwargs(method, heads, rnd), progress=progress)
            points.append(p)
            cut = f", {p['cut_reply']} replies cut by the token budget" if p["cut_reply"] else ""
            say(f"{method:>12} lr {lr:<7g} confidence {_num(p['confidence'])}  truthfulness "
                f"{_num(p['truthfulness'])}  general {_num(p['general_accuracy'])}  KL {p['kl']:.4f}  "
                f"({p['seconds_tuning']:.0f}s tuning{cut})")
            if cfg.until is not None and p["confidence"] is not None and p["confidence"] >= cfg.until:
                break   # the rest of this grid cannot change where the curve first reaches a level
    return points


def _num(v) -> str:
    """A rate for a table ("  -  " when undefined: an empty denominator)."""
    return "  -  " if v is None else f"{v:5.1f}"


def _losses(points: list[dict]) -> dict:
    """Per method: lr -> (validation loss, its standard error) of the points with a finite loss."""
    out = {}
    for m in dict.fromkeys(p["method"] for p in points):
        out[m] = {p["lr"]: (p["val_loss"], p["val_loss_se"]) for p in points if p["method"] == m
                  and math.isfinite(p["val_loss"])}
    return out


def _stopped(points: list[dict], cfg: SweepConfig) -> dict:
    """Per method whose grid ``cfg.until`` cut short: the last rate it ran."""
    return {m: max(p["lr"] for p in points if p["method"] == m) for m in cfg.methods
            if 0 < sum(p["method"] == m for p in points) < len(cfg.grid_for(m))}


def _rule_picks(points: list[dict]) -> dict:
    """Per method: the grid rate the recipe's one-standard-error rule picks from the points' validation losses."""
    from .recipe import one_se_choice

    return {m: one_se_choice(losses) if losses else None for m, losses in _losses(points).items()}


def _rule_edges(points: list[dict]) -> dict:
    """Per method: "up" / "down" when its lowest validation loss sits at the top / bottom of its
    grid (the recipe would walk on past that end), else None."""
    from .recipe import grid_edge

    return {m: grid_edge(losses) if len(losses) > 1 else None for m, losses in _losses(points).items()}


def run_sweep(out, *, organism_path=None, cache_dir=None, config: SweepConfig | None = None,
              progress: bool = True, inputs=None) -> dict:
    """Run the sweep and write report.json, report.md and frontier.png under ``out`` (staged in
    a temporary sibling and moved into place). ``inputs``: (model, tokenizer, heads, locate rows,
    eval rows, training rows, general choices, neutral texts) of a real model; default: the
    organism's. ``heads`` None: located by path patching on the locate rows, k by
    :func:`pinpoint.recipe.choose_k_by_ablation`. Returns the report."""
    from .demo import check_out_path, organism_inputs, tuning_inputs
    from .files import publish_dir, staging_dir

    cfg = config or SweepConfig()
    out = Path(out)
    check_out_path(out)
    t_all, say = time.perf_counter(), print
    if inputs is None:
        path, model, tok, planted, locate_rows, eval_rows, train_rows, general, neutral = organism_inputs(
            organism_path, cache_dir, cfg)
        heads, source = None, {"organism": str(path), "planted_heads": [list(h) for h in planted]}
    else:
        model, tok, heads, locate_rows, eval_rows, train_rows, general, neutral = inputs
        planted, source = None, {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__}
    if heads is None:
        heads, located = _locate(model, tok, locate_rows, planted, progress=progress, say=say)
        source.update(located)
    else:
        heads = [tuple(h) for h in heads]
        source["heads"] = [list(h) for h in heads]
    dialogues, mix, cfg = tuning_inputs(model, tok, train_rows, cfg)
    source["dialogue_mix"] = mix
    model.eval()
    points = _all_points(model, tok, dialogues, eval_rows, general, neutral, cfg, heads, progress=progress, say=say)
    stopped = _stopped(points, cfg)   # a grid cut short says nothing about where the loss is lowest
    whole = [p for p in points if p["method"] not in stopped]
    report = {"source": source, "original": _original(model, tok, eval_rows, general, cfg), "points": points,
              "stopped": stopped, "rule_picks": _rule_picks(whole), "rule_edges": _rule_edges(whole),
              "claims": sweep_claims(points, cfg.levels),
              "config": {**asdict(cfg), "grids": {m: list(cfg.grid_for(m)) for m in cfg.methods}}}
    with staging_dir(out) as work:
        plot_frontier(report, work / "frontier.png")
        (work / "report.md").write_text(report_markdown(report))
        report["seconds_total"] = time.perf_counter() - t_all
        (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
        publish_dir(work, out)
    say("\n" + claims_table(report) + f"\n\nwrote {out / 'report.json'}, report.md, frontier.png "
        f"({report['seconds_total']:.0f}s in all)")
    return report


def _locate(model, tok, locate_rows, planted, *, progress, say):
    """(heads to tune: the top choose_k_by_ablation by path patching, what to record about them)."""
    from .data import challenge_pairs
    from .locate import locate
    from .recipe import choose_k_by_ablation

    pairs = challenge_pairs(locate_rows, tok)
    scores = locate(model, tok, pairs, method="path", metric="apology", progress=progress)
    k, _ = choose_k_by_ablation(model, tok, pairs, scores)
    heads = scores.top(k).to_list()
    located = {"heads": [list(h) for h in heads], "k": k, "k_rule": "recipe.choose_k_by_ablation"}
    note = ""
    if planted:   # an organism: how many of its planted heads the top len(planted) finds
        top_p = scores.top(len(planted)).to_list()
        located[f"recall_at_{len(planted)}"] = recall = len(set(map(tuple, top_p)) & set(planted)) / len(planted)
        note = f"; recall@{len(planted)} of the planted heads {recall:.2f}"
    say(f"located: k = {k} (recipe.choose_k_by_ablation) {heads}{note}")
    return [tuple(h) for h in heads], located


def _original(model, tok, eval_rows, general, cfg) -> dict:
    from .evaluate import evaluate
    from .general import evaluate_choices

    mt = evaluate(model, tok, eval_rows, max_new_tokens=cfg.max_new_tokens, batch_size=32, progress=False,
                  model_name="original").metrics
    return {"confidence": mt["confidence"], "confidence_ci95": mt.get("confidence_ci95"),
            "truthfulness": mt["truthfulness"], "truthfulness_ci95": mt.get("truthfulness_ci95"),
            "cut_reply": mt["cut_reply"],
            "general_accuracy": evaluate_choices(model, tok, general, batch_size=32, progress=False)["accuracy"],
            "kl": 0.0}


def plot_frontier(report: dict, path) -> None:
    """frontier.png: confidence (left) and truthfulness (right) against KL (log scale), one
    curve per method (points in ascending learning rate), the original as a dashed line;
    1,600 x 640 px."""
    from matplotlib.figure import Figure   # no pyplot: no global state, no GUI backend, faster import

    fig = Figure(figsize=(16, 6.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, name in ((axes[0], "confidence", "Confidence (%)"), (axes[1], "truthfulness", "Truthfulness (%)")):
        for method in dict.fromkeys(p["method"] for p in report["points"]):
            pts = sorted((p for p in report["points"] if p["method"] == method), key=lambda p: p["lr"])
            xs = [max(p["kl"], 1e-6) for p in pts]
            ys = [math.nan if p[key] is None else p[key] for p in pts]
            ax.plot(xs, ys, marker="o", label=LABELS[method])
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f"{p['lr']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if report["original"][key] is not None:
            ax.axhline(report["original"][key], color="grey", linestyle="--", label="original model")
        ax.set_xscale("log")
        ax.set_xlabel("KL divergence from the original model (nats/token, neutral text; log scale)")
        ax.set_ylabel(name)
        ax.set_ylim(-2, 102)
        ax.set_title(f"{name.split(' (')[0]} against KL, one point per learning rate")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.suptitle("Learning-rate sweep: how far each method moves the model for a given fix")
    fig.savefig(path)


def claims_table(report: dict) -> str:
    """Markdown: the KL each method needs to reach each confidence level, and the claim."""
    methods = list(dict.fromkeys(p["method"] for p in report["points"]))
    lines = ["| Confidence ≥ | " + " | ".join(LABELS[m] for m in methods) + " | SPT below SFT? |",
             "|---|" + "---|" * (len(methods) + 1)]
    for c in report["claims"]:
        cells = []
        for m in methods:
            r = c["kl"][m]
            bound = " (≤, first point)" if r["how"] == "first point" else ""
            cells.append("not reached" if r["kl"] is None else f"{r['kl']:.4f}{bound}")
        verdict = {True: "yes", False: "no", None: "undecided"}[c["spt_below_sft"]]
        lines.append(f"| {c['confidence']:g} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def _rates(r: dict) -> str:
    """Confidence, truthfulness (with intervals) and general accuracy as table cells."""
    from .stats import format_rate

    return (f"{format_rate(r['confidence'], r['confidence_ci95'])} | "
            f"{format_rate(r['truthfulness'], r['truthfulness_ci95'])} | {format_rate(r['general_accuracy'])}")


def report_markdown(report: dict) -> str:
    o = report["original"]
    rows = ["| Method | lr | Confidence [95 % CI] | Truthfulness [95 % CI] | General acc. | KL | Val. loss | "
            "Trainable |", "|---|---|---|---|---|---|---|---|",
            f"| Original | – | {_rates(o)} | 0 | – | 0 |"]
    for p in report["points"]:
        pick = " (rule)" if report["rule_picks"].get(p["method"]) == p["lr"] else ""
        rows.append(f"| {LABELS[p['method']]} | {p['lr']:g}{pick} | {_rates(p)} | {p['kl']:.4f} | "
                    f"{p['val_loss']:.3f}±{p['val_loss_se']:.3f} | {p['trainable_params']:,} |")
    claims = "\n".join(f"- confidence ≥ {c['confidence']:g}: {c['statement']}" for c in report["claims"])
    edges = "".join(f"\n\n{LABELS[m]}: its lowest validation loss is at the {'top' if way == 'up' else 'bottom'} "
                    f"of its grid, so the recipe (recipe.choose_lr) would walk on past it; extend its grid "
                    f"(--grid-for {m}=...) to see the rate the recipe picks."
                    for m, way in report.get("rule_edges", {}).items() if way)
    edges += "".join(f"\n\n{LABELS[m]}: its grid stopped at {lr:g}, its first rate reaching confidence "
                     f"{report['config']['until']:g} (until), so no rule pick is marked for it."
                     for m, lr in report.get("stopped", {}).items())
    return (f"# pinpoint sweep\n\nSource: {report['source']}\n\n## Every point\n\n" + "\n".join(rows)
            + "\n\n\"(rule)\" marks the rate the recipe's one-standard-error rule picks from these points' "
            "validation losses." + edges + "\n\n## The claim, per confidence level\n\n\"SPT moves the model less than SFT for "
            "the same fix\": the KL at which each method first reaches the confidence (interpolated in log KL "
            "between neighbouring learning rates).\n\n" + claims_table(report) + "\n\n" + claims
            + "\n\n![frontier](frontier.png)\n")
