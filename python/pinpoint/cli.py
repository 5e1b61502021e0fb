"""The `pinpoint` command line.

User mistakes (bad flags, bad files) end with one line on stderr and exit status 2,
never a traceback.
"""
from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A mistake in how pinpoint was called: reported in one line, exit 2."""


def _info(args) -> int:
    import torch

    import pinpoint
    import pinpoint_kernels as pk

    print(f"pinpoint {pinpoint.__version__} (torch {torch.__version__})")
    print(f"backends for CPU tensors:  {', '.join(pk.available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"backends for CUDA tensors: {', '.join(pk.available_backends('cuda'))}")
    else:
        print("CUDA: no device visible")
    return 0


def _demo(args) -> int:
    # Until the model-organism demo lands this says so plainly instead of pretending.
    print("pinpoint demo: not available yet: the embedded model organism and the end-to-end "
          "locate -> tune -> evaluate run are still being built. `pinpoint info` shows what "
          "this install can run.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pinpoint", description="Locate, tune and evaluate the "
                                 "attention heads that carry a behaviour of a Hugging Face LM.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version and the kernel backends this install can use").set_defaults(fn=_info)
    demo = sub.add_parser("demo", help="the end-to-end run on the embedded model organism")
    demo.add_argument("--out", default="pinpoint-demo", help="output directory")
    demo.set_defaults(fn=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as exc:
        print(f"pinpoint: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
