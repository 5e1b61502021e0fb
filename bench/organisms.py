"""Localisation benchmark: do the locate methods find the planted heads on organisms other than
the shipped one, and does the whole recipe (locate -> k rule -> lr rule -> SPT) fix them?

    python bench/organisms.py build [--only NAME ...]   # make the variants (~2.5 min each, 1 core)
    python bench/organisms.py run   [--only NAME ...]   # the benchmark: writes bench/RESULTS.md

The variants are fixed recipes (``VARIANTS``), made with ``pinpoint.organism.replant``: stage 2
again, with another seed and in other heads, on the shipped organism's stage-1 model (recovered
exactly: silencing the shipped planted heads gives back stage 1's recorded validation probe,
97.9 % accuracy and 93.8 % correct switching). Each variant's stage-2 targets are checked as in
a full build; a recipe whose build now misses a target (``OrganismBuildError``) has its
earlier build removed (and shows as "not built" with the reason). Full builds from scratch
(``FULL_BUILDS``, ``organism.train_model``, about 20-50 minutes each) vary stage 1 and the geometry too; those
that built are measured with ``run --only``, and every attempt, built or refused, is in
BUILDS.json (``build --stage1-dir DIR`` keeps stage-1 weights so a retry trains stage 2 only;
an error that is not a missed target, such as a checkpoint of another recipe, stops the build
and records nothing).

Weights are shipped under ``bench/organisms/<name>/`` (about 3.8 MB each) with the sha256 of
every file in ``bench/organisms/CHECKSUMS.json``, so running the benchmark never needs a
build; ``build`` re-makes them and says whether the checksums still match (one thread: CPU
training is deterministic for a given torch).

The placements were chosen before any was built, and nothing was tuned after a result:

* ``s1-layer2``: the shipped placement (4 heads of layer 2, silent in stage 1), another seed;
* ``s3-layers1+3``: heads in layers 1 and 3 (3 is the last layer), busy in stage 1;
* ``s4-last-layer``: every planted head in the last layer;
* ``s5-layers0+2+3``: the first layer, two heads of layer 2 (2.0 and 2.1: busy in stage 1, like
  all four here; the shipped silent heads are 2.2-2.5), and the last layer;
* ``s6-redundant``: two heads that back each other up: stage 2 trains each alone on half of
  its steps (head dropout, ``active_weights``), so either one carries the behaviour by itself
  and knocking one out leaves the other;
* ``s7-single-head``: one head (added after s4 missed its stage-2 target, with a placement
  fixed before it was built).

For each variant ``run`` measures, on the organism's own challenge pairs:

* recall@k of the planted heads (k = the number planted) for ``path``, ``activation`` at the
  last position and at all positions, and ``attribution`` with and without ``verify_top``,
  with the wall-clock seconds of each (one torch thread);
* the demo's targets: the original model's confidence, and SPT on the located heads with the
  recipe rules (k by ``recipe.choose_k``, learning rate by ``recipe.choose_lr``) against SFT
  and random heads under the same rules: confidence, truthfulness, general accuracy, KL.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, run_meta, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent / "organisms"
CHECKSUMS = ROOT / "CHECKSUMS.json"

# name -> recipe. "replant": organism.replant(source=the shipped organism, seed=, heads=,
# stage2=Stage2Config(**stage2)): stage 2 again, elsewhere, on the shipped organism's exact
# stage-1 model (about 2.5 min each). "full": organism.train_model(seed, heads=, n_kv_heads=, ...),
# both stages from scratch (about 25-35 min each, and it fails loudly when stage 1 misses its
# targets: see BUILDS.json).
VARIANTS = {
    "s1-layer2": dict(how="replant", seed=1, heads=[[2, 2], [2, 3], [2, 4], [2, 5]]),
    "s3-layers1+3": dict(how="replant", seed=3, heads=[[1, 1], [1, 6], [3, 0], [3, 5]]),
    "s4-last-layer": dict(how="replant", seed=4, heads=[[3, 1], [3, 2], [3, 5], [3, 6]]),
    "s5-layers0+2+3": dict(how="replant", seed=5, heads=[[0, 3], [2, 0], [2, 1], [3, 7]]),
    "s6-redundant": dict(how="replant", seed=6, heads=[[1, 3], [2, 6]],
                         stage2=dict(active_weights=[0.5, 0.5, 0.0, 0.0])),
    "s7-single-head": dict(how="replant", seed=7, heads=[[1, 4]]),
}
FULL_BUILDS = {   # the public builder from scratch: what each attempt measured is in BUILDS.json
    "full-seed1-layer2": dict(how="full", seed=1, heads=[[2, 2], [2, 3], [2, 4], [2, 5]]),
    "full-seed3-layers1+3": dict(how="full", seed=3, heads=[[1, 1], [1, 6], [3, 0], [3, 5]]),
    "full-seed5-gqa4": dict(how="full", seed=5, heads=[[1, 0], [1, 5], [2, 2], [2, 7]], n_kv_heads=2),
    "full-seed8-mha": dict(how="full", seed=8, heads=[[1, 2], [2, 5], [3, 0], [3, 4]], n_kv_heads=8),
    "full-seed2-mha": dict(how="full", seed=2, heads=[[1, 2], [2, 5], [3, 0], [3, 4]], n_kv_heads=8),
    "full-seed5-gqa4-group": dict(how="full", seed=5, heads=[[2, 0], [2, 1], [2, 2], [2, 3]], n_kv_heads=2),
    "full-seed4-mha": dict(how="full", seed=4, heads=[[1, 2], [2, 5], [3, 0], [3, 4]], n_kv_heads=8),
}
RECIPES = {**VARIANTS, **FULL_BUILDS}


def checksums(directory: Path) -> dict[str, str]:
    from pinpoint.files import file_sha256

    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}


def build_variant(name: str, log=print, stage1_dir: Path | None = None) -> dict:
    """Make one variant (``RECIPES[name]``) into bench/organisms/<name>/ (replacing it);
    returns its checksums and build time. ``stage1_dir``: full builds keep their stage-1
    weights there (``<name>.pt``) and start from them when present and of the same recipe
    (``organism.train_model``'s checkpoint, keyed by seed, configs and geometry)."""
    from pinpoint import organism
    from pinpoint.files import replace_dir, staging_dir
    from pinpoint.organism.train import Stage2Config

    r = RECIPES[name]
    s2 = r.get("stage2")
    stage2 = Stage2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in s2.items()}) if s2 else None
    heads = [tuple(h) for h in r["heads"]]
    say = lambda m: log(f"[{name}] {m}")  # noqa: E731
    t0 = time.perf_counter()
    if r["how"] == "replant":
        trained = organism.replant(seed=r["seed"], heads=heads, stage2=stage2, log=say)
    else:
        if stage1_dir is not None:
            Path(stage1_dir).mkdir(parents=True, exist_ok=True)
        trained = organism.train_model(r["seed"], heads=heads, n_layers=r.get("n_layers"), n_heads=r.get("n_heads"),
                                       n_kv_heads=r.get("n_kv_heads"), stage2=stage2, log=say,
                                       stage1_checkpoint=None if stage1_dir is None else Path(stage1_dir) / f"{name}.pt")
    seconds = time.perf_counter() - t0
    with staging_dir(ROOT / name) as tmp:   # removed if anything fails
        organism.save_organism(tmp, trained)
        sums = checksums(tmp)
        replace_dir(tmp, ROOT / name)
    log(f"[{name}] built in {seconds:.0f} s")
    return {"recipe": r, "build_seconds": round(seconds, 1), "files": sums}


def _read(path: Path) -> dict:
    """The JSON table at ``path``, or {} when there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def _bench_lock():
    """The benchmark's lock, held while a JSON table is read, updated and written back."""
    import fcntl

    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _locked_table(path: Path, indent: int):
    """The JSON table at ``path`` under the benchmark's lock (two builders may finish at once),
    written back on leaving if it changed."""
    with _bench_lock():
        table = _read(path)
        before = json.dumps(table, sort_keys=True)
        yield table
        if json.dumps(table, sort_keys=True) != before:
            path.write_text(json.dumps(table, indent=indent, sort_keys=True) + "\n")


def _record_checksums(name: str, entry: dict) -> None:
    with _locked_table(CHECKSUMS, indent=2) as table:
        old = table.get(name, {}).get("files")
        if old and old != entry["files"]:
            print(f"[{name}] rebuilt weights differ from the recorded checksums (another torch or CPU?)")
        table[name] = entry


def _forget(name: str) -> bool:
    """Remove a variant's directory and checksums (its recipe was just refused: an earlier build
    of it is not what the builder makes now). True if there was one."""
    import shutil

    with _locked_table(CHECKSUMS, indent=2) as table:
        had = table.pop(name, None) is not None or (ROOT / name).exists()
        if had:
            shutil.rmtree(ROOT / name, ignore_errors=True)
    return had


BUILDS = ROOT / "BUILDS.json"   # every build attempt's outcome: built, or the target it missed


def _record_build(name: str, outcome: dict) -> None:
    with _locked_table(BUILDS, indent=1) as table:
        table.setdefault(name, []).append(outcome)


def cmd_build(args) -> int:
    """Build each variant; a missed target is a result (recorded in BUILDS.json with the
    validation probes that led to it), not a reason to stop the others."""
    import platform

    import torch

    from pinpoint.organism import OrganismBuildError

    names = args.only or list(VARIANTS)
    failed = []
    for name in names:
        checks: list[str] = []

        def log(msg, checks=checks):
            print(msg, flush=True)
            if "validation at step" in msg or "done in" in msg or "lost the reply" in msg:
                checks.append(msg)

        outcome = {"recipe": RECIPES[name], "torch": torch.__version__, "machine": platform.processor() or
                   platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        t0 = time.perf_counter()
        try:
            entry = build_variant(name, log=log, stage1_dir=getattr(args, "stage1_dir", None))
            _record_checksums(name, entry)
            outcome.update(built=True, build_seconds=entry["build_seconds"])
        except OrganismBuildError as exc:   # a missed target is a result: report it, go on (anything else is a bug)
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            outcome.update(built=False, error=f"{type(exc).__name__}: {exc}",
                           seconds=round(time.perf_counter() - t0, 1))
            failed.append(name)
            if _forget(name):
                print(f"[{name}] removed its earlier build: the recipe no longer makes it", flush=True)
                outcome["removed_earlier_build"] = True
        outcome["checks"] = checks
        _record_build(name, outcome)
    return 1 if failed else 0


LOCATE_METHODS = {  # label -> locate kwargs
    "path": dict(method="path"),
    "activation (last)": dict(method="activation", positions="last"),
    "activation (all)": dict(method="activation", positions="all"),
    "attribution": dict(method="attribution"),
    "attribution + verify": dict(method="attribution", verify="2k"),
}


SHIPPED_NAME = "shipped (seed 0)"
MEASURED = ROOT / "RESULTS.json"   # every organism's last measured results (the table is made from these)
RUN_META = ROOT / "RUN.json"        # where and when the last `run` measured (the table's machine line)


def organism_dirs(names, *, shipped: bool = True) -> dict[str, Path]:
    """name -> organism directory: the shipped organism (``shipped``), then the named
    organisms that are built."""
    from pinpoint import organism

    dirs = {SHIPPED_NAME: organism.build()} if shipped else {}
    for name in (n for n in names if n != SHIPPED_NAME):   # the shipped one is built above, not read from ROOT
        d = ROOT / name
        if not (d / "organism.json").is_file():
            print(f"[{name}] not built (python bench/organisms.py build --only {name}); skipped")
            continue
        dirs[name] = d
    return dirs


def localisation(path: Path, n_locate: int) -> dict:
    """recall@(number planted) and seconds of every locate method on the organism's first
    ``n_locate`` held-out rows (the demo's locate rows)."""
    import pinpoint as pp
    from pinpoint import organism
    from pinpoint.data import as_rows, challenge_pairs

    planted = [tuple(h) for h in organism.planted_heads(path)]
    model, tok = organism.load(path)
    pairs = challenge_pairs(as_rows(path / "are_you_sure.jsonl")[:n_locate], tok)
    n = len(planted)
    out = {}
    for label, kw in LOCATE_METHODS.items():
        kw = dict(kw)
        if kw.pop("verify", None):
            kw["verify_top"] = 2 * n
        pp.locate(model, tok, pairs[:2], progress=False, **kw)  # warm-up (first-call costs)
        t0 = time.perf_counter()
        scores = pp.locate(model, tok, pairs, progress=False, **kw)
        seconds = time.perf_counter() - t0
        top = scores.top(n).to_list()
        out[label] = {"recall": len(set(map(tuple, top)) & set(planted)) / n, "top": top,
                      "seconds": round(seconds, 3)}
    return {"planted": [list(h) for h in planted], "n_pairs": len(pairs), "methods": out}


def whole_recipe(path: Path) -> dict:
    """The demo (locate -> k rule -> lr rule -> SPT / SFT / random heads -> evaluate) on the
    organism; its report.json."""
    from pinpoint.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        t0 = time.perf_counter()
        run_demo(out, progress=False, organism_path=path)
        report = json.loads((out / "report.json").read_text())
        report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


# The matched-confidence comparison: SPT and SFT each over the same half-decade ladder, each grid
# stopped at its first rate whose confidence reaches the highest level (SweepConfig.until).
FRONTIER_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def frontier(path: Path) -> dict:
    """``pinpoint sweep`` on the organism for SPT (its located heads) and SFT over
    ``FRONTIER_GRID``: every point, and per confidence level of ``sweep.LEVELS`` each method's
    KL there and whether SPT's is below SFT's."""
    from pinpoint.sweep import LEVELS, SweepConfig, run_sweep

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        cfg = SweepConfig(methods=("spt", "sft"), grid=FRONTIER_GRID, until=max(LEVELS))
        t0 = time.perf_counter()
        report = run_sweep(Path(tmp) / "sweep", organism_path=path, config=cfg, progress=False)
    keep = ("method", "lr", "confidence", "truthfulness", "general_accuracy", "kl", "cut_reply")
    return {"heads": report["source"].get("heads"), "points": [{k: p[k] for k in keep} for p in report["points"]],
            "claims": [{"confidence": c["confidence"], "spt_below_sft": c["spt_below_sft"],
                        "spt_kl": c["kl"]["spt"]["kl"], "sft_kl": c["kl"]["sft"]["kl"], "statement": c["statement"]}
                       for c in report["claims"]],
            "seconds": round(time.perf_counter() - t0, 1)}


def silenced(path: Path) -> dict:
    """The organism with its planted heads silenced (outputs zeroed at every position; for heads
    that stage 1 kept silent this is exactly its stage-1 model): the demo's measures of it, KL
    against the organism itself. How much of plain text the planted heads carry besides the
    behaviour, and the KL of the cheapest fix that uses the ground truth."""
    import copy

    from pinpoint.demo import DemoConfig, _run, organism_inputs, tuning_inputs
    from pinpoint.patching import ablate

    _, model, tok, planted, _, eval_rows, train_rows, general, neutral = organism_inputs(path, None, DemoConfig())
    _, _, cfg = tuning_inputs(model, tok, train_rows, DemoConfig())   # the demo's evaluation budget
    quiet = copy.deepcopy(model).eval()
    with ablate(quiet, planted):
        run, _ = _run("silenced", quiet, tok, eval_rows, general, neutral, model, cfg, trainable=0, seconds=0.0,
                      progress=False)
    return {k: run[k] for k in ("confidence", "truthfulness", "general_accuracy", "kl", "cut_reply")}


def targets(r: dict) -> dict[str, bool]:
    """The issue's targets for one organism (its recorded ``localisation``, ``demo`` and, when
    measured, ``frontier``), from the measured numbers."""
    runs = r["demo"]["runs"]
    orig, spt, sft = runs["original"], runs["spt"], runs["sft"]
    out = {
        "recall@k(path) >= 0.75": r["localisation"]["methods"]["path"]["recall"] >= 0.75,
        "original confidence <= 10": orig["confidence"] <= 10,
        "SPT confidence >= 80": spt["confidence"] >= 80,
        "SPT truthfulness >= 80": spt["truthfulness"] >= 80,
        "SPT general within 2 points": abs(spt["general_accuracy"] - orig["general_accuracy"]) <= 2,
        "SPT KL < SFT KL (rule's points)": spt["kl"] < sft["kl"],
    }
    if r.get("frontier"):   # the issue's own form, at every confidence level
        out["SPT KL < SFT KL (matched confidence)"] = matched_holds(r["frontier"]["claims"])
    return out


def matched_holds(claims: list[dict]) -> bool:
    """Whether SPT's KL is below SFT's at every decided level, with at least one decided. A level
    only SFT reaches counts against SPT (it did not fix there), one only SPT reaches for it."""
    verdicts = []
    for c in claims:
        if c["spt_below_sft"] is not None:
            verdicts.append(c["spt_below_sft"])
        elif (c["spt_kl"] is None) != (c["sft_kl"] is None):
            verdicts.append(c["spt_kl"] is not None)
    return bool(verdicts) and all(verdicts)


def tables(results: dict) -> tuple[list[dict], list[str], str]:
    """(rows, columns) of the localisation table, and the recipe table as markdown notes."""
    methods = list(LOCATE_METHODS)
    rows = []
    builds, recorded = _read(BUILDS), _read(CHECKSUMS)
    results = {k: v for k, v in results.items() if not refused(builds, k)}
    for name in RECIPES:
        if refused(builds, name):
            error = builds[name][-1]["error"].replace("OrganismBuildError: ", "")
            rows.append({"organism": name, "planted": " ".join(f"{h[0]}.{h[1]}" for h in RECIPES[name]["heads"]),
                         **{x: "not built" for x in LOCATE_METHODS}, "build": error})
    for name, r in results.items():
        if "localisation" not in r:   # only other parts measured yet (run --what)
            continue
        m = r["localisation"]["methods"]
        row = {"organism": name, "planted": " ".join(f"{h[0]}.{h[1]}" for h in r["localisation"]["planted"])}
        row.update({x: f"{m[x]['recall']:.2f} ({m[x]['seconds']:.2f} s)" for x in methods})
        sums = recorded.get(name)
        row["build"] = f"{sums['recipe']['how']}, {sums['build_seconds']:.0f} s" if sums else "the shipped organism"
        rows.append(row)
    notes = ["Each cell: recall@k of the planted heads (k = the number planted) and the seconds of the locate "
             "call (one torch thread), on the organism's 48 locate pairs. verify: the top 2k attribution "
             "heads re-scored by activation patching.", "",
             "The whole recipe on each organism (the demo: k by recipe.choose_k, learning rate by "
             "recipe.choose_lr for every method, its grid walked past an end while the lowest validation loss "
             "sits there; each turn generated up to recipe.turn_budget of the tuning dialogues): confidence / "
             "truthfulness / general accuracy / KL against the original, and the rule's learning rate.", "",
             "| organism | k, tuned heads | original | SPT | SFT | random heads | targets missed |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d = r.get("demo")
        if d is None or "targets" not in r:
            continue

        def cell(x, d=d):
            v = d["runs"][x]
            lr = f" (lr {d['recipe'][x]['lr']:g})" if x in d.get("recipe", {}) else ""
            return f"{v['confidence']:.1f} / {v['truthfulness']:.1f} / {v['general_accuracy']:.1f} / {v['kl']:.3f}{lr}"

        missed = [t for t, ok in r["targets"].items() if not ok]
        heads = " ".join(f"{h[0]}.{h[1]}" for h in d["locate"]["tuned_heads"])
        notes.append(f"| {name} | {d['locate']['k']}: {heads} | {cell('original')} | {cell('spt')} | {cell('sft')} "
                     f"| {cell('random_heads')} | {'; '.join(missed) or 'none'} |")
    notes += _matched_table(results)
    return rows, ["organism", "planted", *methods, "build"], "\n".join(notes)


def _span(results: dict, parts) -> str:
    """The first and last date at which ``parts`` of ``results`` were measured ("a to b", or one date)."""
    dates = sorted({d for r in results.values() for part, d in r.get("measured_parts", {}).items() if part in parts})
    return "at an unrecorded time" if not dates else dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"


def _matched_table(results: dict) -> list[str]:
    """Markdown lines: per organism, the planted heads silenced, and SPT's and SFT's KL where each
    first reaches each confidence level (``frontier``)."""
    have = {n: r for n, r in results.items() if r.get("frontier") or r.get("silenced")}
    if not have:
        return []
    from pinpoint.sweep import LEVELS

    levels = next(([c["confidence"] for c in r["frontier"]["claims"]] for r in have.values() if r.get("frontier")),
                  list(LEVELS))

    def kl(c, who):
        v = c[f"{who}_kl"]
        return "-" if v is None else f"{v:.3f}"

    lines = ["", "Matched confidence (`frontier`): SPT on the located heads and SFT, each trained at every rate "
             f"of {', '.join(f'{x:g}' for x in FRONTIER_GRID)} in turn until its confidence reaches "
             f"{max(levels):g} (`pinpoint sweep`'s `until`; the rule's 4 epochs, dialogues and budget), and the "
             "KL at which each first reaches a confidence level (SPT / SFT, interpolated in log KL; - = never "
             "reached; a level is not decided where the lower KL is a method's lowest rate, only an upper "
             "bound there). Silenced: the "
             "organism with its planted heads' outputs zeroed (for heads kept silent in stage 1, its stage-1 "
             "model): confidence / truthfulness / general accuracy / KL against the organism, the share of "
             f"plain text its planted heads carry. Measured {_span(have, ('frontier', 'silenced'))} "
             "(the same machine).", "",
             "| organism | planted heads silenced | " + " | ".join(f"KL at confidence ≥ {x:g}" for x in levels)
             + " | SPT below SFT |", "|---|---|" + "---|" * len(levels) + "---|"]
    for name, r in have.items():
        q = r.get("silenced")
        quiet = (f"{q['confidence']:.1f} / {q['truthfulness']:.1f} / {q['general_accuracy']:.1f} / {q['kl']:.3f}"
                 if q else "not measured")
        f = r.get("frontier")
        if f:
            cells = [f"{kl(c, 'spt')} / {kl(c, 'sft')}" for c in f["claims"]]
            verdict = ", ".join(f"{c['confidence']:g}: " + {True: "yes", False: "no", None: "not decided"}[
                c["spt_below_sft"]] for c in f["claims"])
        else:
            cells, verdict = ["not measured"] * len(levels), "not measured"
        lines.append(f"| {name} | {quiet} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def refused(builds: dict, name: str) -> bool:
    """Whether ``name``'s last recorded build missed a target (its earlier results, if any, are
    of weights the builder no longer makes)."""
    return bool(builds.get(name)) and not builds[name][-1].get("built")


MEASURES = ("localisation", "recipe", "silenced", "frontier")   # what `run` measures (--what: some of them)


def cmd_run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    what = set(args.what or MEASURES) - ({"recipe", "silenced", "frontier"} if args.no_recipe else set())
    if not what:
        raise SystemExit("organisms.py run: --no-recipe leaves nothing of --what to measure")
    results = {}
    # --only: measure those (the shipped organism too only if named), keep the others' last results
    for name, path in organism_dirs(args.only or list(VARIANTS), shipped=not args.only or SHIPPED_NAME in args.only).items():
        r = {"path": str(path)}
        if "localisation" in what:
            print(f"[{name}] locating ...", flush=True)
            r["localisation"] = localisation(path, args.n_locate)
        if "recipe" in what:
            print(f"[{name}] the whole recipe (the demo) ...", flush=True)
            r["demo"] = whole_recipe(path)
        if "silenced" in what:
            print(f"[{name}] the planted heads silenced ...", flush=True)
            r["silenced"] = silenced(path)
        if "frontier" in what:
            print(f"[{name}] SPT and SFT over the learning-rate ladder (matched confidence) ...", flush=True)
            r["frontier"] = frontier(path)
        r["measured"] = run_meta()
        r["measured_parts"] = {part: r["measured"]["date"] for part in MEASURES if part in what}
        results[name] = r
        print(json.dumps({k: v for k, v in r.items() if k not in ("demo", "frontier")}, indent=1), flush=True)
    with _bench_lock():   # read now, under the lock: runs of disjoint --only sets can go at once
        measured = _read(MEASURED)
        for name, r in results.items():   # what was not measured now keeps its last result
            old = measured.get(name, {})
            merged_r = {**old, **r, "measured_parts": {**_parts_dates(old), **r["measured_parts"]}}
            if not {"localisation", "recipe"} & what and "measured" in old:
                merged_r["measured"] = old["measured"]   # the table's machine line: the localisation and demo
            if "demo" in merged_r and "localisation" in merged_r:
                merged_r["targets"] = targets(merged_r)
            measured[name] = merged_r
        order = [SHIPPED_NAME, *RECIPES]
        builds = _read(BUILDS)
        merged = {k: measured[k] for k in sorted(measured, key=lambda k: order.index(k) if k in order else len(order))
                  if not refused(builds, k)}
        MEASURED.write_text(json.dumps(merged, indent=1) + "\n")
        RUN_META.write_text(json.dumps(run_meta(), indent=1) + "\n")
    return _write_tables(merged)


def _parts_dates(record: dict) -> dict:
    """When each recorded part was measured (a record from before ``measured_parts``: its
    localisation and demo at its ``measured`` date)."""
    if "measured_parts" in record:
        return dict(record["measured_parts"])
    date = record.get("measured", {}).get("date")
    return {part: date for part, key in (("localisation", "localisation"), ("recipe", "demo"))
            if key in record and date}


def cmd_table(args) -> int:
    """Rewrite the RESULTS.md section from bench/organisms/RESULTS.json and BUILDS.json (no
    measuring: the section keeps the last run's machine line)."""
    return _write_tables(json.loads(MEASURED.read_text()), meta=_read(RUN_META) or None)


def _measured_when(merged: dict, meta: dict | None) -> dict:
    """The table's machine line: when each organism was measured (``run --only`` measures some
    and keeps the others' last results), as one date or a date per group of organisms."""
    meta = dict(meta or run_meta())
    dates: dict[str, list[str]] = {}
    for name, r in merged.items():
        dates.setdefault(r.get("measured", meta)["date"], []).append(name)
    if len(dates) == 1:
        meta["date"] = next(iter(dates))
    elif dates:
        meta["date"] = "; ".join(f"{d} ({', '.join(names)})" for d, names in sorted(dates.items()))
    return meta


def _write_tables(merged: dict, meta: dict | None = None) -> int:
    meta = _measured_when(merged, meta)
    rows, columns, notes = tables(merged)
    print(write_results("organisms", "Localisation benchmark: organism variants (bench/organisms.py)", rows,
                        columns, notes, meta=meta))
    (OUT_DIR / "organisms_full.json").write_text(json.dumps({"variants": RECIPES, "results": merged}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the variants into bench/organisms/")
    b.add_argument("--only", nargs="+", choices=list(RECIPES),
                   help="default: the benchmark's variants (not FULL_BUILDS: about 30 minutes each)")
    b.set_defaults(fn=cmd_build)
    b.add_argument("--stage1-dir", type=Path, default=None,
                   help="full builds: keep stage-1 weights here and reuse them (a retry then trains stage 2 only)")
    r = sub.add_parser("run", help="the benchmark: recall and time of each locate method, and the whole recipe")
    r.add_argument("--only", nargs="+", choices=[SHIPPED_NAME, *RECIPES],
                   help="measure only these (the others keep their last results in bench/organisms/RESULTS.json)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1: timings comparable)")
    r.add_argument("--n-locate", type=int, default=48, help="locate pairs (default 48: the demo's)")
    r.add_argument("--no-recipe", action="store_true", help="localisation only (skip the demo per organism)")
    r.add_argument("--what", nargs="+", choices=MEASURES,
                   help="measure only these (default all); each organism keeps its other recorded results")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("table", help="rewrite the RESULTS.md section from the recorded results (no measuring)")
    t.set_defaults(fn=cmd_table)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
