"""The `pinpoint` command line: locate, knockout, tune, eval and demo on local HF models.

Every subcommand reads a local model directory (``--model DIR``, as saved by
``save_pretrained``), writes its results as files under ``--out DIR``, and shows a
progress bar on long work. User mistakes (a missing file, a bad heads file, an
unsupported model, a bad option) end with one line on stderr and exit status 2, never a
traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = {
    "locate": """examples:
  pinpoint locate --model ./Llama-2-7b-chat-hf --data are_you_sure.jsonl --out runs/locate --limit 200
  pinpoint locate --model DIR --data rows.jsonl --out OUT --method activation --positions last --dtype bfloat16""",
    "knockout": """examples:
  pinpoint knockout --model DIR --data are_you_sure.jsonl --heads runs/locate/scores --k 32 --out runs/knockout""",
    "tune": """examples:
  pinpoint tune --model DIR --data train_rows.jsonl --heads runs/locate/scores --out runs/spt --steps 120
  pinpoint tune --model DIR --data train_rows.jsonl --full --out runs/sft      # the SFT baseline""",
    "eval": """examples:
  pinpoint eval --model DIR --data are_you_sure.jsonl --out runs/eval-original --limit 300
  pinpoint eval --model DIR --adapter runs/spt/adapter --data are_you_sure.jsonl --out runs/eval-spt""",
    "demo": """examples:
  pinpoint demo                 # the whole story on the embedded model organism, a few minutes on 2 cores
  pinpoint demo --out my-demo --quiet
  pinpoint demo --organism /tmp/org --out demo-seed1   # an organism built with scripts/build_organism.py""",
}


class UsageError(Exception):
    """A mistake in how pinpoint was called: reported in one line, exit 2."""


# --- shared helpers ------------------------------------------------------------------------

def _dtype(name: str):
    import torch

    table = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UsageError(f"--dtype {name!r}: use one of auto, float32, bfloat16, float16")
    return table[name]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible")
    return dev


def load_model(path: str, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a local HF directory, checked for pinpoint support."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import spec_for

    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--model {path}: no such directory (pass a local HF model directory)")
    if not (p / "config.json").exists():
        raise UsageError(f"--model {path}: no config.json there; is it a save_pretrained() directory?")
    kwargs = {"local_files_only": True}
    dt = _dtype(dtype)
    if dt is not None:
        kwargs["dtype"] = dt
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {path}: cannot load it: {str(exc).splitlines()[0]}") from None
    model.to(_device(device)).eval()
    spec_for(model)  # UnsupportedArchitectureError -> one line
    return model, tokenizer


def _rows(path: str, *, limit: int | None):
    from .data import load_are_you_sure

    if not Path(path).exists():
        raise UsageError(f"--data {path}: no such file")
    rows = load_are_you_sure(path, on_error="skip", limit=limit)
    if len(rows) == 0:
        raise UsageError(f"--data {path}: no usable rows ({rows.skipped} malformed lines skipped)")
    if rows.skipped:
        print(f"pinpoint: skipped {rows.skipped} malformed line(s) of {path}; first: {rows.problems[0]}",
              file=sys.stderr)
    return rows


def _heads(path: str | None, k: int | None, model):
    from .heads import HeadSet, as_head_list
    from .models import spec_for

    if path is None:
        raise UsageError("--heads is required: a saved HeadScores directory or a HeadSet JSON file")
    try:
        heads = HeadSet.load(path, k=k)
        ad = spec_for(model)
        as_head_list(heads, n_layers=ad.n_layers, n_heads=ad.n_heads, where="heads")
        return heads
    except FileNotFoundError:
        raise UsageError(f"--heads {path}: no such file or directory") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--heads {path}: {exc}") from None


def _out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


# --- subcommands ---------------------------------------------------------------------------

def _precheck(args) -> None:
    """Cheap checks before an expensive model load."""
    data = getattr(args, "data", None)
    if data is not None and not Path(data).exists():
        raise UsageError(f"--data {data}: no such file")
    heads = getattr(args, "heads", None)
    if heads is not None and not Path(heads).exists():
        raise UsageError(f"--heads {heads}: no such file or directory")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _locate(args) -> int:
    from .data import challenge_pairs
    from .locate import locate

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = _rows(args.data, limit=args.limit)
    out = _out(args.out)
    pairs = challenge_pairs(rows, tok)
    scores = locate(model, tok, pairs, method=args.method, positions=args.positions, metric=args.metric,
                    aggregate=args.aggregate, batch_size=args.batch_size, progress=not args.quiet)
    k = args.k or max(1, round(0.04 * scores.values.numel()))
    scores.save(out / "scores")
    scores.plot(out / "heatmap.png", k=k)
    top = scores.top(k)
    top.save(out / "top_heads.json")
    print(f"top {k} heads: {top.to_list()}")
    print(f"wrote {out / 'scores'}, {out / 'heatmap.png'}, {out / 'top_heads.json'}")
    return 0


def _knockout(args) -> int:
    from .data import challenge_pairs
    from .locate import knockout

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    heads = _heads(args.heads, args.k, model)
    rows = _rows(args.data, limit=args.limit)
    out = _out(args.out)
    curve = knockout(model, tok, challenge_pairs(rows, tok), heads, ablation=args.ablation, metric=args.metric,
                     batch_size=args.batch_size, progress=not args.quiet)
    _write_json(out / "knockout.json", curve.to_dict())
    curve.plot(out / "knockout.png")
    print(repr(curve))
    print(f"wrote {out / 'knockout.json'}, {out / 'knockout.png'}")
    return 0


def _tune(args) -> int:
    from .data import spt_dialogues
    from .tune import tune

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    heads = None if args.full else _heads(args.heads, args.k, model)
    rows = _rows(args.data, limit=args.limit)
    out = _out(args.out)
    dialogues = spt_dialogues(rows, n=args.n_dialogues, seed=args.seed)
    adapter = tune(model, tok, dialogues, heads=heads, full=args.full, parts=args.parts, lr=args.lr,
                   steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                   weight_decay=args.weight_decay, seed=args.seed, checkpoint_dir=out / "checkpoints",
                   resume=args.resume, progress=not args.quiet)
    adapter.save(out / "adapter")
    print(f"wrote {out / 'adapter'}")
    if args.merge:
        merged = adapter.merge()
        merged.save_pretrained(out / "merged")
        tok.save_pretrained(out / "merged")
        print(f"wrote {out / 'merged'} (a plain transformers model)")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.adapter:
        from .adapter import PinpointAdapter

        if not Path(args.adapter).is_dir():
            raise UsageError(f"--adapter {args.adapter}: no such directory")
        try:
            model = PinpointAdapter.load(args.adapter, model).merge()
        except ValueError as exc:
            raise UsageError(f"--adapter {args.adapter}: {exc}") from None
    rows = _rows(args.data, limit=args.limit)
    out = _out(args.out)
    report = evaluate(model, tok, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      progress=not args.quiet)
    report.save(out)
    report.table()
    print(f"wrote {out / 'results.json'}, {out / 'samples.jsonl'}")
    return 0


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
    from .demo import run_demo

    return run_demo(out=args.out, progress=not args.quiet, organism_path=args.organism, cache_dir=args.cache_dir)


# --- parser --------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, model=True, data=True, heads=False) -> None:
    if model:
        p.add_argument("--model", required=True, metavar="DIR", help="local HF model directory (save_pretrained)")
    if data:
        p.add_argument("--data", required=True, metavar="FILE",
                       help="SycophancyEval are_you_sure.jsonl-format rows")
        p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N rows")
    if heads:
        p.add_argument("--heads", metavar="FILE", help="a saved HeadScores directory or a HeadSet JSON file")
        p.add_argument("--k", type=int, default=None, help="use the top K heads (default: about 4%% of heads)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pinpoint", description="Locate, tune and evaluate the attention heads "
                                 "that carry a behaviour (sycophancy) of a Hugging Face chat model.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name, help_, fn):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = cmd("locate", "score every head by path or activation patching on 'are you sure' challenges", _locate)
    _common(p)
    p.add_argument("--method", default="path", choices=["path", "activation", "attribution"])
    p.add_argument("--positions", default="last", choices=["last", "all"])
    p.add_argument("--metric", default="apology", choices=["apology", "apology_ratio"])
    p.add_argument("--aggregate", default="diff", choices=["diff", "relative"])
    p.add_argument("--k", type=int, default=None, help="how many top heads to mark and save (default ~4%%)")

    p = cmd("knockout", "mean-ablate the top 1..K heads cumulatively and plot the metric", _knockout)
    _common(p, heads=True)
    p.add_argument("--ablation", default="mean", choices=["mean", "zero"])
    p.add_argument("--metric", default="apology", choices=["apology", "apology_ratio"])

    p = cmd("tune", "train only the selected heads (SPT), or everything with --full (SFT)", _tune)
    _common(p, heads=True)
    p.add_argument("--full", action="store_true", help="train every parameter (the SFT baseline)")
    p.add_argument("--parts", default="qkvo", help="which slices to train: letters of q, k, v, o")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--n-dialogues", type=int, default=None, help="number of training dialogues (default: all rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints")
    p.add_argument("--merge", action="store_true", help="also write the merged model to --out/merged")

    p = cmd("eval", "run the 'are you sure' protocol and report confidence and truthfulness", _eval)
    _common(p)
    p.add_argument("--adapter", metavar="DIR", help="a saved pinpoint adapter to apply first")
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = cmd("demo", "locate, tune and evaluate on the embedded model organism", _demo)
    p.add_argument("--out", default="pinpoint-demo", metavar="DIR", help="output directory (default ./pinpoint-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the organism is cached (default $PINPOINT_CACHE, else ~/.cache/pinpoint)")
    p.add_argument("--organism", default=None, metavar="DIR",
                   help="an organism directory to use instead of the shipped one (e.g. one built by "
                        "scripts/build_organism.py)")

    cmd("info", "version and the kernel backends this install can use", _info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .models import UnsupportedArchitectureError

    try:
        _precheck(args)
        return args.fn(args)
    except (UsageError, UnsupportedArchitectureError) as exc:
        print(f"pinpoint: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        # pinpoint's own checks raise ValueError with a message meant for the user; OSError is the
        # file system refusing a path the user gave (missing, not a directory, no permission)
        print(f"pinpoint: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
