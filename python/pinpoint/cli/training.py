"""`pinpoint tune` (SPT on the located heads, or SFT with --full) and `pinpoint export`."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..outdir import OutDir
from .common import (directory_kind, load_adapter, load_heads, load_model, load_rows, nonnegative_float,
                     parts_letters, placement, positive_float, positive_int, unit_fraction)


def _check_tune_flags(args) -> None:
    if args.full and args.heads is not None:
        raise UserError("--full trains every parameter: drop --heads, or drop --full to train only those heads")
    if not args.full and args.heads is None:
        raise UserError("--heads is required (a saved HeadScores directory or a HeadSet JSON file), or pass "
                        "--full for the SFT baseline")
    if args.grad_accum > args.batch_size:
        raise UserError(f"--grad-accum {args.grad_accum}: must be at most --batch-size {args.batch_size} (each "
                        "micro-batch needs a dialogue)")


def _check_checkpoints(args, ckpt_dir: Path) -> bool:
    """Whether --out already holds a tune checkpoint; refuses --resume without one and a
    fresh start over one (unless --overwrite)."""
    has = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
    if args.resume and not has:
        raise UserError(f"--resume: there is no checkpoint in {ckpt_dir} to continue; run without --resume to start")
    if has and not args.resume and not args.overwrite:
        raise UserError(f"--out {args.out} holds a tune checkpoint ({ckpt_dir}); add --resume to continue that run, "
                        "or --overwrite to start over")
    return has


def _check_not_benchmark(rows, allowed: bool) -> None:
    from ..data import SYCOPHANCY_EVAL_DATASETS

    bench = sorted({r.dataset for r in rows} & set(SYCOPHANCY_EVAL_DATASETS))
    if bench and not allowed:
        raise UserError(f"--data: rows of the SycophancyEval benchmark ({', '.join(bench)}) must not be trained on; "
                        "build training rows from other questions, or pass --allow-benchmark-rows if they are "
                        "your own")


def _interrupted_note(ckpt_dir: Path):
    def note() -> str:
        if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            return (f"the last checkpoint is saved in {ckpt_dir}; rerun the same command with --resume to "
                    "continue from it")
        return "no checkpoint was saved yet (one is written every ~10% of --steps); rerun the command to start again"
    return note


def run_tune(args) -> int:
    """Under torchrun every rank runs this: rank 0 prints and writes --out, all ranks train."""
    import contextlib
    import io

    from ..distributed import init_from_env, is_main_process

    init_from_env()
    quiet = contextlib.nullcontext() if is_main_process() else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        return _run_tune(args)


def _run_tune(args) -> int:
    from ..distributed import is_main_process
    from ..files import atomic_write_json
    from ..recipe import tune_auto, tuning_dialogues
    from ..tune import tune

    _check_tune_flags(args)
    out = OutDir(args.out, command="tune", overwrite=args.overwrite)
    out.check()
    ckpt_dir = out.path / "checkpoints"
    had_checkpoint = _check_checkpoints(args, ckpt_dir)
    if args.lr is None and args.resume:
        raise UserError("--resume needs the --lr and --steps of the run it continues (the checkpoint was written "
                        "by a run with --lr)")
    model, tok = load_model(args.model, **placement(args), dtype=args.dtype, chat_template=args.chat_template)
    heads = None if args.full else load_heads(args.heads, args.k, model)
    rows = load_rows(args.data, limit=args.limit)
    _check_not_benchmark(rows, args.allow_benchmark_rows)
    dialogues, insist = tuning_dialogues(model, tok, rows, n=args.n_dialogues, seed=args.seed,
                                         insist_fraction=args.insist_fraction, progress=not args.quiet,
                                         final_turn=None if args.final_turn else False,
                                         allow_benchmark=args.allow_benchmark_rows)
    if "final_turn_note" in insist:
        print(f"no final turn in the dialogues ({insist['final_turn_note']})")
    if args.insist_fraction is None:
        print(f"insist fraction {insist['insist_fraction']:.3f} (the recipe rule: the model answers "
              f"{insist['n_correct']} of {insist['n_rows']} training rows correctly; --insist-fraction to choose)")
    what = "every parameter (SFT)" if args.full else f"k = {len(heads)} heads {heads.to_list()}, parts {args.parts}"
    auto = args.lr is None  # the recipe rule picks lr (and steps, unless --steps) on 20 % of the dialogues
    rate = "lr and steps by the recipe rule" if auto else f"lr {args.lr:g}, {args.steps or 120} steps"
    print(f"tune: {what}; {rate}, batch {args.batch_size} (grad-accum "
          f"{args.grad_accum}), weight decay {args.weight_decay:g}, seed {args.seed}, {len(dialogues)} dialogues")
    with out.open() as stage:
        if had_checkpoint and not args.resume and is_main_process():  # --overwrite: start over
            shutil.rmtree(ckpt_dir)
        args.on_interrupt = _interrupted_note(ckpt_dir)
        t0 = time.perf_counter()
        try:
            common = dict(heads=heads, full=args.full, parts=args.parts, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, weight_decay=args.weight_decay, seed=args.seed,
                          progress=not args.quiet)
            if auto:
                result = tune_auto(model, tok, dialogues, steps=args.steps or "auto", **common)
            else:
                result = tune(model, tok, dialogues, lr=args.lr, steps=args.steps or 120, checkpoint_dir=ckpt_dir,
                              resume=args.resume, **common)
        except ValueError as exc:
            if args.resume and str(exc).startswith("cannot resume"):  # tune's refusal of a foreign checkpoint
                raise UserError(f"--resume: {exc}; rerun with the flags that made it, or --overwrite to start "
                                "over") from None
            raise
        seconds = time.perf_counter() - t0
        if auto:
            r = result.recipe
            past = r.get("extended") or []
            walked = f"; the grid walked on to {', '.join(f'{lr:g}' for lr in past)}" if past else ""
            print(f"the recipe rule chose lr {r['lr']:g}, {r['steps']} steps (validation loss on {r['n_val']} "
                  f"held-out dialogues, trained on {r['n_train']}{walked})")
        wrote = _save_tuned(args, result, tok, stage, out.path)
        atomic_write_json(stage / "tune.json", {**_summary(args, heads, result, len(dialogues), seconds),
                                                "dialogue_mix": insist})
    print("wrote " + ", ".join(str(w) for w in wrote + [out.path / "tune.json"]))
    return 0


def _save_tuned(args, result, tok, stage: Path, final: Path) -> list:
    if args.full:
        model = result.merge()
        model.save_pretrained(stage / "model")
        tok.save_pretrained(stage / "model")
        print(f"the SFT model (with its tokenizer) is {final / 'model'}: evaluate it with "
              f"`pinpoint eval --model {final / 'model'}`")
        return [final / "model"]
    result.save(stage / "adapter")
    wrote = [final / "adapter"]
    if args.merge:
        merged = result.merge()
        merged.save_pretrained(stage / "merged")
        tok.save_pretrained(stage / "merged")
        wrote.append(final / "merged")
    return wrote


def _summary(args, heads, result, n_dialogues: int, seconds: float) -> dict:
    history = list(getattr(result, "history", []))
    recipe = getattr(result, "recipe", None)
    return {
        "format": "pinpoint.tune/1", "kind": "sft" if args.full else "spt",
        "heads": None if args.full else heads.to_list(), "k": None if args.full else len(heads),
        "parts": None if args.full else args.parts, "lr": recipe["lr"] if recipe else args.lr,
        "steps": recipe["steps"] if recipe else (args.steps or 120), "recipe": recipe,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "weight_decay": args.weight_decay,
        "seed": args.seed, "n_dialogues": n_dialogues, "model": str(args.model), "data": str(args.data),
        "trainable_params": sum(p.numel() for p in result.parameters()),
        "final_loss": history[-1]["loss"] if history else None, "seconds": seconds,
        **getattr(result, "training", {}),  # world_size, per_rank_batch (torchrun: data parallel)
    }


def run_export(args) -> int:
    """The adapter as a merged transformers model (with the tokenizer), or with --peft as a
    PEFT LoRA adapter that ``PeftModel.from_pretrained(base, dir)`` loads exactly."""
    out = OutDir(args.out, command="export", overwrite=args.overwrite)
    out.check()
    if Path(args.adapter).is_dir() and directory_kind(Path(args.adapter)) == "model":
        raise UserError(f"--adapter {args.adapter} is a full model (tune --full), not an adapter; it is already "
                        "a plain transformers directory")
    model, tok = load_model(args.model, device="cpu", dtype=args.dtype, chat_template=args.chat_template)
    adapter = load_adapter(model, args.adapter, check_fingerprint=not args.no_fingerprint_check)
    with out.open() as stage:
        if args.peft:
            adapter.save_peft(stage)
        else:
            adapter.merge().save_pretrained(stage)
            tok.save_pretrained(stage)
    if args.peft:
        print(f"wrote {out.path}: a PEFT LoRA adapter (peft.PeftModel.from_pretrained(base model, "
              f"\"{out.path}\"); its base is --model {args.model})")
    else:
        print(f"wrote {out.path}: the merged model with its tokenizer (load it with AutoModelForCausalLM)")
    return 0


def add_parsers(cmd, common) -> None:
    p = cmd("tune", "train only the selected heads (SPT), or everything with --full (SFT)", run_tune)
    common(p, heads=True)
    # the recipe's batch (the demo, the sweep and the README's API use 16); read with recipe.turn_budget, the
    # organism's truthfulness was 96.7-99.2 at batch 8 and 16 alike (README, the recipe rule)
    p.set_defaults(batch_size=16)
    p.add_argument("--full", action="store_true", help="train every parameter (the SFT baseline); writes --out/model")
    p.add_argument("--parts", default="qkvo", type=parts_letters, help="which slices to train: letters of q, k, v, o")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: chosen by the recipe rule, the smallest rate within one "
                   "standard error of the lowest validation loss on 20%% of the dialogues; printed)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps (default: 4 epochs of the training dialogues without --lr, 120 with it)")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--n-dialogues", type=positive_int, default=None,
                   help="number of training dialogues (default: one per row)")
    p.add_argument("--insist-fraction", type=unit_fraction, default=None, metavar="F",
                   help="share of 'insist' dialogues (the first answer was right), the rest 'revise' (default: "
                   "the recipe rule: the share of the training rows the model answers correctly; printed)")
    p.add_argument("--no-final-turn", dest="final_turn", action="store_false",
                   help="end each dialogue at the reply to the challenge (default: add the protocol's final "
                   "question and the correct final answer, the recipe's FINAL_TURN, when the chat template "
                   "can render it for training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out/checkpoints")
    p.add_argument("--merge", action="store_true", help="also write the merged model to --out/merged")
    p.add_argument("--allow-benchmark-rows", action="store_true",
                   help="train on rows of SycophancyEval's datasets (refused by default: it is the benchmark)")

    p = cmd("export", "write a tuned adapter in a standard format: the merged transformers model, or a PEFT "
            "LoRA adapter (--peft)", run_export)
    common(p, data=False)
    p.add_argument("--adapter", required=True, metavar="DIR", help="a saved pinpoint adapter (tune's --out/adapter)")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="apply the adapter even if --model's weights differ from those it was trained on")
    p.add_argument("--peft", action="store_true", help="write a PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors; exact) instead of the merged model")
