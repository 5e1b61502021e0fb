"""`pinpoint eval` (the "are you sure" protocol, general ability, KL) and `pinpoint compare`."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import UserError
from ..outdir import OutDir
from .common import (check_file, check_model_dir, directory_kind, load_adapter, load_model, load_rows, placement,
                     positive_int)


def _check_eval_flags(args) -> None:
    if (args.kl_against is None) != (args.kl_text is None):
        raise UserError("--kl-against MODEL and --kl-text FILE go together: the KL is measured on the text's tokens "
                        "against that model")
    check_file(args.general, "--general")
    check_file(args.kl_text, "--kl-text")
    if args.kl_against is not None:
        check_model_dir(args.kl_against, "--kl-against")
    if args.adapter is not None:
        a = Path(args.adapter)
        if not a.exists():
            raise UserError(f"--adapter {args.adapter}: no such directory")
        if not a.is_dir():
            raise UserError(f"--adapter {args.adapter} is a file; pass the adapter directory (tune's --out/adapter)")


def _load_general(path: str):
    from ..general import load_choices

    try:
        return load_choices(path)
    except (ValueError, TypeError) as exc:  # load_choices' refusals of the user's file
        raise UserError(f"--general {path}: {str(exc).strip().splitlines()[0]}") from None


def _load_texts(path: str) -> list[str]:
    texts = [t for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise UserError(f"--kl-text {path}: no text in it (one text per line)")
    return texts


def _eval_model(args):
    """(model, tokenizer) to evaluate: --model with --adapter merged in, or the full model an
    --adapter path turns out to hold."""
    if args.adapter is not None and directory_kind(Path(args.adapter)) == "model":
        print(f"note: --adapter {args.adapter} is a full model (e.g. tune --full's model/), not an adapter; "
              "evaluating it in place of --model")
        return load_model(args.adapter, **placement(args), dtype=args.dtype, chat_template=args.chat_template,
                          flag="--adapter")
    model, tok = load_model(args.model, **placement(args), dtype=args.dtype, chat_template=args.chat_template)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter, check_fingerprint=not args.no_fingerprint_check).merge()
    return model, tok


def _general_results(choices_report) -> dict:
    from ..stats import wilson_interval

    m = choices_report.results["all"]
    out = {"n": m["n"]}
    for key in ("accuracy", "accuracy_norm"):
        out[key] = m[key]
        out[f"{key}_ci95"] = wilson_interval(round(m[key] * m["n"] / 100), m["n"], percent=True)
    return out


def run_eval(args) -> int:
    from ..evaluate import evaluate
    from ..files import atomic_write_json
    from ..general import evaluate_choices, kl_divergence
    from ..stats import format_rate

    _check_eval_flags(args)
    out = OutDir(args.out, command="eval", overwrite=args.overwrite)
    out.check()
    model, tok = _eval_model(args)
    rows = load_rows(args.data, limit=args.limit)
    general = _load_general(args.general) if args.general else None
    texts = _load_texts(args.kl_text) if args.kl_text else None
    ref = None
    if args.kl_against is not None:
        ref, _ = load_model(args.kl_against, **placement(args), dtype=args.dtype, flag="--kl-against",
                            need_template=False)  # scored on plain text only
    extra = {}
    with out.open() as stage:
        report = evaluate(model, tok, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          progress=not args.quiet)
        report.save(stage)
        if general is not None:
            choices = evaluate_choices(model, tok, general, batch_size=args.batch_size, progress=not args.quiet)
            choices.save(stage)
            extra["general"] = {"file": str(args.general), **_general_results(choices)}
        if ref is not None:
            kl = kl_divergence(model, ref, texts, tok, batch_size=args.batch_size, progress=not args.quiet)
            extra["kl"] = {"value": kl, "against": str(args.kl_against), "text": str(args.kl_text),
                           "n_texts": len(texts)}
        if extra:
            atomic_write_json(stage / "general.json", extra)
    report.table()
    if "general" in extra:
        g = extra["general"]
        print(f"general accuracy: {format_rate(g['accuracy'], g['accuracy_ci95'])} (n={g['n']}, {args.general})")
    if "kl" in extra:
        print(f"KL(--kl-against || model) on {len(texts)} texts: {extra['kl']['value']:.5f} nats/token")
    print(f"wrote {out.path / 'results.json'}, {out.path / 'samples.jsonl'}"
          + (f", {out.path / 'general.json'}" if extra else ""))
    return 0


# --- compare -------------------------------------------------------------------------------

_RATES = (("confidence", "confidence"), ("truthfulness", "truthful"), ("accuracy_before", "acc before"),
          ("accuracy_after", "acc after"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"compare: {path}: cannot read it ({exc})") from None


def _run_row(run: str) -> dict:
    """One run directory's numbers: an eval (results.json [+ general.json]) and/or a tune (tune.json)."""
    d = Path(run)
    if not d.is_dir():
        raise UserError(f"compare: {run}: " + ("not a directory; pass run directories (eval's or tune's --out)"
                                               if d.exists() else "no such directory"))
    row: dict = {"run": run}
    found = False
    if (d / "results.json").is_file():
        found = True
        m = _read_json(d / "results.json").get("results", {}).get("all", {})
        row["kind"], row["n"] = "eval", m.get("n")
        for key, _ in _RATES:
            row[key], row[f"{key}_ci95"] = m.get(key), m.get(f"{key}_ci95")
    if (d / "general.json").is_file():
        g = _read_json(d / "general.json")
        if "general" in g:
            row["general"], row["general_ci95"] = g["general"].get("accuracy"), g["general"].get("accuracy_ci95")
        if "kl" in g:
            row["kl"] = g["kl"].get("value")
    if (d / "tune.json").is_file():
        found = True
        t = _read_json(d / "tune.json")
        row.update({"kind": t.get("kind"), "k": t.get("k"), "lr": t.get("lr"), "steps": t.get("steps"),
                    "final_loss": t.get("final_loss"), "trainable_params": t.get("trainable_params")})
    if not found:
        raise UserError(f"compare: {run} holds neither results.json (pinpoint eval) nor tune.json (pinpoint tune)")
    return row


_COLUMNS = (("run", "run"), ("kind", "kind"), ("n", "n"), *_RATES, ("general", "general acc"), ("kl", "KL"),
            ("k", "k"), ("lr", "lr"), ("steps", "steps"), ("final_loss", "loss"), ("trainable_params", "trainable"))
_INTERVALS = {k for k, _ in _RATES} | {"general"}


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The table's columns: those with a value in some run."""
    return [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def _cell(row: dict, key: str) -> str:
    from ..stats import format_rate

    v = row.get(key)
    if v is None:
        return "-"
    if f"{key}_ci95" in row:
        return format_rate(v, row[f"{key}_ci95"])
    if key == "kl":
        return f"{v:.5f}"
    if key in ("lr", "final_loss"):
        return f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def compare_table(rows: list[dict]) -> str:
    """An aligned text table of runs, rates with their 95 % intervals."""
    cols = _columns(rows)
    body = [[h for _, h in cols]] + [[_cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in body]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n"


def compare_csv(rows: list[dict]) -> str:
    """The same as CSV: one row per run, every column (empty where a run has no value), each
    interval as two columns (…_ci95_low/high)."""
    header = []
    for k, _ in _COLUMNS:
        header += [k, f"{k}_ci95_low", f"{k}_ci95_high"] if k in _INTERVALS else [k]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        cells = []
        for h in header:
            if h.endswith(("_ci95_low", "_ci95_high")):
                ci = r.get(h.rsplit("_ci95_", 1)[0] + "_ci95")
                cells.append("" if ci is None else ci[0 if h.endswith("low") else 1])
            else:
                cells.append("" if r.get(h) is None else r[h])
        w.writerow(cells)
    return buf.getvalue()


def run_compare(args) -> int:
    from ..files import atomic_write_text

    if args.csv is not None:
        p = Path(args.csv)
        if p.is_dir():
            raise UserError(f"--csv {args.csv} is a directory; pass a file name")
        if p.exists() and not args.overwrite:
            raise UserError(f"--csv {args.csv} exists; pass --overwrite to replace it, or choose another file")
    rows = [_run_row(r) for r in args.runs]
    print(compare_table(rows), end="")
    if args.csv is not None:
        atomic_write_text(args.csv, compare_csv(rows))
        print(f"wrote {args.csv}")
    return 0


def add_parsers(cmd, common) -> None:
    p = cmd("eval", "run the 'are you sure' protocol and report confidence and truthfulness", run_eval)
    common(p)
    p.add_argument("--adapter", metavar="DIR", help="a saved pinpoint adapter to apply first (or a full model "
                   "from tune --full, evaluated in place of --model)")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="apply --adapter even if --model's weights differ from those it was trained on")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--general", metavar="FILE", help="multiple-choice rows (question, choices, answer) for "
                   "general ability: accuracy by log-likelihood")
    p.add_argument("--kl-against", metavar="DIR", help="a reference model (e.g. the untuned one): report the "
                   "next-token KL divergence against it on --kl-text")
    p.add_argument("--kl-text", metavar="FILE", help="neutral text for --kl-against, one text per line")

    p = cmd("compare", "a table of several eval/tune runs, rates with 95%% intervals", run_compare)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --out of eval or tune)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
