"""The `pinpoint` command line: locate, knockout, tune, eval, compare, export, demo, organism, info.

Every model command reads a local model directory (``--model DIR``, as saved by
``save_pretrained``) and writes its results under ``--out DIR`` by the policy of
:mod:`pinpoint.outdir` (a non-empty ``--out`` another command made is refused without
``--overwrite``; a concurrent run into the same ``--out`` fails fast; results are moved into
place only when the command finishes).

Errors: a user's mistake is a :class:`pinpoint.errors.UserError` (or a library
:class:`pinpoint.errors.InputError` about the data), printed as one line
``pinpoint: error: ...`` with exit status 2 (argparse's usage errors too). Anything else is a
bug: the traceback is printed with a line asking for a report, exit status 1. Ctrl-C exits
with 130 and one line saying what was saved and how to continue.

One module per command group: ``analysis`` (locate, knockout), ``training`` (tune, export),
``evaluation`` (eval, compare), ``misc`` (demo, info, organism); ``common`` holds the shared
loaders and flag types.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from ..errors import InputError, UserError
from . import analysis, evaluation, misc, training
from .common import THREADS_HELP, add_threads, set_threads

__all__ = ["main", "build_parser", "UserError"]

EXAMPLES = {
    "locate": """examples:
  pinpoint locate --model ./Llama-2-7b-chat-hf --data are_you_sure.jsonl --out runs/locate --limit 200
  pinpoint locate --model DIR --data rows.jsonl --out OUT --method activation --positions last --dtype bfloat16""",
    "knockout": """examples:
  pinpoint knockout --model DIR --data are_you_sure.jsonl --heads runs/locate/scores --k 32 --out runs/knockout""",
    "tune": """examples:
  pinpoint tune --model DIR --data train_rows.jsonl --heads runs/locate/scores --out runs/spt --steps 120
  pinpoint tune --model DIR --data train_rows.jsonl --full --out runs/sft      # the SFT baseline -> runs/sft/model
  pinpoint tune ... --out runs/spt --resume                                   # continue an interrupted run""",
    "eval": """examples:
  pinpoint eval --model DIR --data are_you_sure.jsonl --out runs/eval-original --limit 300
  pinpoint eval --model DIR --adapter runs/spt/adapter --data are_you_sure.jsonl --out runs/eval-spt \\
      --general choices.jsonl --kl-against DIR --kl-text neutral.txt
  pinpoint eval --model runs/sft/model --data are_you_sure.jsonl --out runs/eval-sft""",
    "compare": """examples:
  pinpoint compare runs/eval-original runs/eval-spt runs/eval-sft --csv runs/compare.csv""",
    "export": """examples:
  pinpoint export --model DIR --adapter runs/spt/adapter --out runs/spt-merged
  pinpoint export --model DIR --adapter runs/spt/adapter --out runs/spt-lora --peft   # PeftModel / vLLM LoRA""",
    "demo": """examples:
  pinpoint demo                 # the whole story on the embedded model organism, a few minutes on 2 cores
  pinpoint demo --out my-demo --quiet --threads 1
  pinpoint demo --organism /tmp/org --out demo-seed1   # an organism built with scripts/build_organism.py""",
    "organism": """examples:
  pinpoint organism path        # where the shipped organism (model + data files) lives
  pinpoint organism replant --seed 3 --heads 1.1,3.5 --out org-r3                            # 2-4 min: stage 2 only
  pinpoint organism build --seed 3 --heads 1.1,1.6,3.0,3.5 --n-kv-heads 2 --out org-s3   # 20-50 min on one core""",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``pinpoint: error: ...`` and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"pinpoint: error: {message} (see `{self.prog} --help`)\n")


def _common(p: argparse.ArgumentParser, *, model=True, data=True, heads=False) -> None:
    """The flags of every model command."""
    from .common import positive_int

    if model:
        p.add_argument("--model", required=True, metavar="DIR", help="local HF model directory (save_pretrained)")
        p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for a tokenizer that has "
                       "none (or a tokenizer_config.json that has one)")
    if data:
        p.add_argument("--data", required=True, metavar="FILE",
                       help="SycophancyEval are_you_sure.jsonl-format rows")
        p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="use the first N rows")
    if heads:
        p.add_argument("--heads", metavar="FILE", help="a saved HeadScores directory or a HeadSet JSON file")
        p.add_argument("--k", type=positive_int, default=None, help="use the top K heads (default with a scores "
                       "directory: the recipe rule, the heads above the largest drop in score, and every head within 25%% of the top)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the results (refused if another "
                   "command's results or your own files are in it, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (another command's "
                   "results, or your own files); only the files this command writes are replaced")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    if model:
        p.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                       help="spread the model over GPUs, CPU and disk with accelerate (instead of --device)")
        p.add_argument("--max-memory", default=None, metavar="SPEC",
                       help="with --device-map: memory per device, e.g. 0=10GiB,1=20GiB,cpu=30GiB")
        p.add_argument("--offload-dir", default=None, metavar="DIR",
                       help="with --device-map: where offloaded weights go (default: a temporary directory)")
    p.add_argument("--dtype", default="auto", help="auto (the dtype saved in config.json), float32, bfloat16 or "
                   "float16")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="pinpoint", description="Locate, tune and evaluate the attention heads that carry a "
                 "behaviour (sycophancy) of a Hugging Face chat model.",
                 epilog=f"shared machine? Every command takes --threads N: {THREADS_HELP}.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name, help_, fn):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_threads(p)
        if fn is not None:
            p.set_defaults(fn=fn)
        return p

    for group in (analysis, training, evaluation, misc):
        group.add_parsers(cmd, _common)
    return ap


def _interrupted(args) -> str:
    note = getattr(args, "on_interrupt", None)
    if callable(note):
        return note()
    if note:
        return note
    out = getattr(args, "out", None)
    if out is not None:
        return (f"nothing new was written to --out {out} (results move into place only when a command "
                "finishes); rerun the command to start again")
    return "nothing was saved"


def _peer_rank_stopped(exc: BaseException) -> bool:
    """Another torchrun rank stopped during a collective (only possible once distributed ran)."""
    mod = sys.modules.get("pinpoint.distributed")
    return mod is not None and isinstance(exc, mod.RankFailure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
        if getattr(args, "quiet", False):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return args.fn(args)
    except (UserError, InputError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pinpoint: error: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npinpoint: interrupted: {_interrupted(args)}", file=sys.stderr)
        return 130
    except Exception as exc:
        if _peer_rank_stopped(exc):  # not a bug here: the rank that stopped printed its own error
            print(f"pinpoint: stopped: {exc}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print("pinpoint: internal error (the traceback above): this is a bug in pinpoint, not in how it was "
              "called; please report it to the pinpoint maintainers with the traceback, the command line and "
              "`pinpoint info`", file=sys.stderr)
        return 1
