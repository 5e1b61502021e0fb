"""`pinpoint demo`, `pinpoint sweep`, `pinpoint info` and `pinpoint organism path` (`organism build`:
organism_build.py)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..outdir import OutDir
from .common import add_threads

# what `pinpoint demo --organism DIR` reads from an organism directory
ORGANISM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "organism.json", "are_you_sure.jsonl",
                  "spt_rows.jsonl", "choices.jsonl", "neutral.txt")


def check_organism(path: str) -> None:
    from .. import organism

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--organism {path}: " + ("is a file; pass an organism directory" if p.exists()
                                                  else "no such directory"))
    missing = [f for f in ORGANISM_FILES if not (p / f).is_file()]
    if missing:
        raise UserError(f"--organism {path} is not a pinpoint organism directory (missing {', '.join(missing)})")
    try:
        organism.planted_heads(p)
    except ValueError as exc:  # its organism.json names no usable planted heads
        raise UserError(f"--organism {path}: {exc}") from None


def run_demo_cmd(args) -> int:
    from ..demo import run_demo

    out = OutDir(args.out, command="demo", overwrite=args.overwrite)
    out.check()
    if args.organism is not None:
        check_organism(args.organism)
    with out.open(stage=False) as path:  # run_demo stages its results in a temporary sibling itself
        return run_demo(out=path, progress=not args.quiet, organism_path=args.organism, cache_dir=args.cache_dir)


def _grid(text: str):
    """argparse type of --grid: comma-separated positive learning rates."""
    import argparse

    from ..sweep import parse_grid

    try:
        return parse_grid(text, where="")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).lstrip(": ")) from None


def _budget(text: str):
    """argparse type of sweep's --max-new-tokens: one positive int for every turn, or three
    (answer, reply, final answer)."""
    import argparse

    parts = [x.strip() for x in text.split(",")]
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or A,R,F (positive whole numbers), got {text!r}") from None
    if len(values) not in (1, 3) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected N or A,R,F (positive whole numbers), got {text!r}")
    return tuple(values * 3 if len(values) == 1 else values)


def _confidence(text: str) -> float:
    """argparse type of --until: a confidence in (0, 100] (``sweep.check_until``)."""
    import argparse

    from ..sweep import check_until

    try:
        return check_until(float(text), where="")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a confidence in (0, 100], got {text!r}") from None


def _grid_for(text: str):
    """argparse type of --grid-for METHOD=LR,LR,...: one method's own grid."""
    import argparse

    from ..sweep import METHODS

    method, sep, rates = text.partition("=")
    if not sep or method not in METHODS:
        raise argparse.ArgumentTypeError(f"expected METHOD=LR,LR,... with METHOD one of {', '.join(METHODS)}, "
                                         f"got {text!r}")
    return method, _grid(rates)


def _methods(text: str):
    import argparse

    from ..sweep import METHODS

    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from "
                                         f"{', '.join(METHODS)}")
    return names


def _sweep_inputs(args):
    """(model, tok, heads, locate rows, eval rows, train rows, general, neutral) for --model."""
    from ..general import load_choices
    from .common import load_heads, load_model, load_rows, placement

    missing = [f for f, v in (("--data", args.data), ("--train-data", args.train_data), ("--general", args.general),
                               ("--kl-text", args.kl_text)) if v is None]
    if missing:
        raise UserError(f"--model needs {', '.join(missing)} (or use --organism, or neither for the shipped one)")
    for flag, v in (("--general", args.general), ("--kl-text", args.kl_text)):
        if not Path(v).is_file():
            raise UserError(f"{flag} {v}: no such file")
    model, tok = load_model(args.model, **placement(args), dtype=args.dtype, chat_template=args.chat_template)
    heads = load_heads(args.heads, args.k, model).to_list() if args.heads else None
    rows = list(load_rows(args.data, limit=None))
    n_loc = 0 if heads else args.n_locate
    if len(rows) < n_loc + 1:
        raise UserError(f"--data {args.data}: {len(rows)} rows; need more than the {n_loc} used to locate heads")
    train = load_rows(args.train_data, limit=None)
    neutral = [t for t in Path(args.kl_text).read_text().splitlines() if t.strip()]
    return (model, tok, heads, rows[:n_loc], rows[n_loc:n_loc + args.n_eval], train, load_choices(args.general),
            neutral)


def run_sweep_cmd(args) -> int:
    from ..sweep import SweepConfig, run_sweep

    out = OutDir(args.out, command="sweep", overwrite=args.overwrite)
    out.check()
    if args.organism is not None and args.model is not None:
        raise UserError("pass --organism or --model, not both")
    if args.organism is not None:
        check_organism(args.organism)
    try:
        cfg = SweepConfig(methods=args.methods, grid=args.grid, grids=dict(args.grid_for or []), n_eval=args.n_eval,
                          n_locate=args.n_locate, n_dialogues=args.n_dialogues, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, until=args.until)
    except ValueError as exc:   # the combination of valid flags (--until below the highest level)
        raise UserError(f"--until: {exc}") from None
    inputs = _sweep_inputs(args) if args.model is not None else None
    with out.open(stage=False) as path:  # run_sweep stages its results in a temporary sibling itself
        run_sweep(path, organism_path=args.organism, cache_dir=args.cache_dir, config=cfg, progress=not args.quiet,
                  inputs=inputs)
    return 0


def run_info(args) -> int:
    import torch

    import pinpoint
    import pinpoint_kernels as pk

    print(f"pinpoint {pinpoint.__version__} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    print(f"backends for CPU tensors:  {', '.join(pk.available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"backends for CUDA tensors: {', '.join(pk.available_backends('cuda'))}")
    else:
        print("CUDA: no device visible")
    return 0


def run_organism_path(args) -> int:
    """Print the shipped organism's directory (copied into the cache on first use)."""
    from .. import organism

    cache = Path(args.cache_dir) if args.cache_dir is not None else None
    if cache is not None and cache.exists() and not cache.is_dir():
        raise UserError(f"--cache-dir {args.cache_dir} exists and is not a directory")
    print(organism.build(cache))
    return 0


def add_parsers(cmd, common) -> None:
    p = cmd("demo", "locate, tune and evaluate on the embedded model organism", run_demo_cmd)
    p.add_argument("--out", default="pinpoint-demo", metavar="DIR", help="output directory (default ./pinpoint-demo)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (another command's "
                   "results, or your own files); only the files this command writes are replaced")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the organism is cached (default $PINPOINT_CACHE, else ~/.cache/pinpoint)")
    p.add_argument("--organism", default=None, metavar="DIR",
                   help="an organism directory to use instead of the shipped one (e.g. one built by "
                        "scripts/build_organism.py)")

    _add_sweep_parser(cmd)
    cmd("info", "version and the kernel backends this install can use", run_info)

    p = cmd("organism", "the embedded model organism", None)
    sub = p.add_subparsers(dest="organism_command", required=True, metavar="ACTION")
    q = sub.add_parser("path", help="print the directory of the shipped organism (a standard HF model "
                       "directory with its data files)", description="Print the shipped organism's directory.")
    q.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the cache it is copied into (default $PINPOINT_CACHE, else ~/.cache/pinpoint)")
    add_threads(q)
    q.set_defaults(fn=run_organism_path)
    from .organism_build import add_build_parser

    add_build_parser(sub)


def _add_sweep_parser(cmd) -> None:
    from .common import positive_int

    p = cmd("sweep", "every method over a grid of learning rates: frontier.png (fix against KL) and the claim "
            "'SPT moves the model less than SFT for the same fix' per confidence level", run_sweep_cmd)
    p.add_argument("--out", default="pinpoint-sweep", metavar="DIR", help="output directory (default ./pinpoint-sweep)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--grid", type=_grid, default=(1e-4, 3e-4, 1e-3, 3e-3), metavar="LR,LR,...",
                   help="learning rates of every method (default 1e-4,3e-4,1e-3,3e-3)")
    p.add_argument("--max-new-tokens", type=_budget, default=None, metavar="N|A,R,F",
                   help="tokens generated per turn (answer, reply, final answer); default: the longest such turn "
                        "of the tuning dialogues + 8 (recipe.turn_budget). Each point reports the replies it cut")
    p.add_argument("--grid-for", type=_grid_for, action="append", metavar="METHOD=LR,...",
                   help="one method's own grid, e.g. sft=1e-5,3e-5,1e-4,3e-4 (repeatable)")
    p.add_argument("--until", type=_confidence, default=None, metavar="C",
                   help="stop each method's grid after its first rate whose confidence reaches C (the claims read "
                        "each curve only up to there; later rates cost a tuning run each)")
    p.add_argument("--methods", type=_methods, default=("spt", "sft", "random_heads", "lora8", "lora16"),
                   metavar="M,M,...", help="of spt, sft, random_heads, lora8, lora16 (default: all)")
    p.add_argument("--organism", default=None, metavar="DIR", help="an organism directory (default: the shipped one)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where the shipped organism is cached")
    p.add_argument("--model", default=None, metavar="DIR", help="a real model instead (needs --data, --train-data, "
                   "--general, --kl-text)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for a tokenizer that has none")
    p.add_argument("--data", default=None, metavar="FILE", help="with --model: evaluation rows (are_you_sure.jsonl "
                   "format); the first --n-locate locate the heads unless --heads is given")
    p.add_argument("--train-data", default=None, metavar="FILE", help="with --model: rows to build training "
                   "dialogues from (never the evaluation rows)")
    p.add_argument("--general", default=None, metavar="FILE", help="with --model: multiple-choice rows for "
                   "general accuracy (choices.jsonl format)")
    p.add_argument("--kl-text", default=None, metavar="FILE", help="with --model: neutral text, one per line, for KL")
    p.add_argument("--heads", default=None, metavar="FILE", help="with --model: heads to tune (scores directory or "
                   "HeadSet JSON) instead of locating them")
    p.add_argument("--k", type=positive_int, default=None, help="with --heads: the top K (default: the recipe rule)")
    p.add_argument("--n-locate", type=positive_int, default=48)
    p.add_argument("--n-eval", type=positive_int, default=120)
    p.add_argument("--n-dialogues", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
