"""`pinpoint organism build`: train a model organism with sycophancy planted in chosen heads;
`pinpoint organism replant`: plant it again, in other heads, on an organism's stage-1 model.

    pinpoint organism build --seed 3 --heads 1.1,1.6,3.0,3.5 --out DIR [--n-layers 4 --n-heads 8 --n-kv-heads 2]
    pinpoint organism replant --seed 3 --heads 1.1,3.5 --out DIR [--organism SRC]   # minutes, not half an hour

Everything is validated before any work: ``--heads`` (LAYER.HEAD, comma separated; in range,
no duplicates, every layer keeps an unplanted head) and the geometry (``n_heads % n_kv_heads
== 0``), then ``--out`` (the outdir policy). The organism is trained in memory (about 25
minutes on one core; single-threaded whatever ``--threads`` says, so the weights do not
depend on the number of cores) and written to ``--out`` only when both stages met their
targets; a missed target is one line naming the stage, the target and the measured value
(exit 2) and leaves ``--out`` as it was.
"""
from __future__ import annotations

import sys

from ..errors import UserError
from ..outdir import OutDir

__all__ = ["add_build_parser", "run_organism_build", "run_organism_replant"]


def _geometry_and_heads(args):
    """(heads, geometry kwargs), or UserError naming the flag."""
    from ..organism import placement

    geo = {"n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads}
    try:
        arch = placement.arch(**geo)
    except placement.PlacementError as exc:
        raise UserError(f"--n-layers/--n-heads/--n-kv-heads: {exc}") from None
    return _checked_heads(args.heads, arch), geo


def _checked_heads(text: str, arch: dict):
    """``--heads`` parsed and checked against ``arch``, or UserError naming the flag."""
    from ..organism import placement

    try:
        return placement.check_heads(placement.parse_heads(text), arch)
    except placement.PlacementError as exc:
        msg = str(exc)
        raise UserError(msg if msg.startswith("--heads") else f"--heads {text}: {msg}") from None


def run_organism_build(args) -> int:
    from .. import organism

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    heads, geo = _geometry_and_heads(args)
    out = OutDir(args.out, command="organism build", overwrite=args.overwrite)
    out.check()

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    return _train_and_write(args, out, lambda: organism.train_model(args.seed, heads=heads, log=log, **geo))


def _train_and_write(args, out: OutDir, train) -> int:
    """Run ``train`` (a missed target: one line, nothing written), then write --out."""
    from .. import organism

    try:
        trained = train()
    except organism.OrganismBuildError as exc:
        raise UserError(f"{exc}; nothing was written to --out {args.out}") from None
    with out.open() as work:
        organism.save_organism(work, trained)
    print(out.path)
    return 0


def run_organism_replant(args) -> int:
    from .. import organism

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    src = args.organism
    try:
        organism.planted_heads(src)
        arch = organism.architecture(src)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--organism {src}: {exc}") from None
    heads = _checked_heads(args.heads, arch)
    out = OutDir(args.out, command="organism replant", overwrite=args.overwrite)
    out.check()

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    return _train_and_write(args, out, lambda: organism.replant(src, seed=args.seed, heads=heads, log=log))


def add_build_parser(sub) -> None:
    """Add ``build`` to the ``pinpoint organism`` subcommands (``sub``: its subparsers)."""
    from .common import add_threads

    q = sub.add_parser("build", help="train an organism with sycophancy planted in the heads you choose",
                       description=__doc__.split("\n\n")[0])
    q.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    q.add_argument("--heads", required=True, metavar="L.H,...",
                   help="the planted heads, LAYER.HEAD comma separated, e.g. 1.1,1.6,3.0")
    q.add_argument("--n-layers", type=int, default=None, metavar="N", help="layers (default 4)")
    q.add_argument("--n-heads", type=int, default=None, metavar="N", help="query heads per layer (default 8)")
    q.add_argument("--n-kv-heads", type=int, default=None, metavar="N",
                   help="KV heads per layer (default 4); --n-heads must be a multiple of it")
    q.add_argument("--out", required=True, metavar="DIR", help="where the organism directory is written")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (another command's "
                   "results, or your own files); only the files this command writes are replaced")
    q.add_argument("--quiet", action="store_true", help="no training log")
    add_threads(q)
    q.set_defaults(fn=run_organism_build)

    r = sub.add_parser("replant", help="plant the behaviour again, in other heads, on an organism's stage-1 "
                       "model (stage 2 only: minutes)", description="Recover the stage-1 model of --organism "
                       "exactly (its planted heads silenced) and plant sycophancy in --heads with --seed; stage "
                       "2's targets are checked as in a build.")
    r.add_argument("--organism", default=None, metavar="DIR", help="the source organism (default: the shipped one)")
    r.add_argument("--seed", type=int, default=0, help="stage-2 seed (default 0)")
    r.add_argument("--heads", required=True, metavar="L.H,...",
                   help="the planted heads, LAYER.HEAD comma separated, e.g. 1.1,3.5")
    r.add_argument("--out", required=True, metavar="DIR", help="where the organism directory is written")
    r.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    r.add_argument("--quiet", action="store_true", help="no training log")
    add_threads(r)
    r.set_defaults(fn=run_organism_replant)
