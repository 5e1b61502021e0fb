"""`pinpoint demo`, `pinpoint info` and `pinpoint organism path` (`organism build`: organism_build.py)."""
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
