"""`pinpoint locate` and `pinpoint knockout`: score the heads, then check the top ones."""
from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import UserError
from ..outdir import OutDir
from .common import check_k, load_heads, load_model, load_rows, load_streamed, placement, positive_int


def token_pair(text: str) -> tuple[int, int]:
    """--metric-tokens A,Y: two token ids."""
    try:
        a, y = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two token ids APOLOGY_ID,YES_ID, got {text!r}") from None
    if a < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return a, y


def check_metric_tokens(args, model, tok):
    """The two tokens the metric reads, found (and printed) before any work: a tokenizer that
    cannot encode the words is a one-line error naming the flags that fix it."""
    from ..metrics import metric_tokens

    vocab = model.get_output_embeddings().weight.shape[0]
    if args.metric_tokens is not None and max(args.metric_tokens) >= vocab:
        raise UserError(f"--metric-tokens {args.metric_tokens[0]},{args.metric_tokens[1]}: the model has "
                        f"{vocab} tokens (ids 0..{vocab - 1})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tokens = metric_tokens(tok, args.apology_word, args.yes_word, token_ids=args.metric_tokens)
        except ValueError as exc:  # the tokenizer cannot encode a word, or both words share a token
            why = str(exc).strip().splitlines()[0].split("; pass ")[0]
            raise UserError(f"--model {args.model}: {why}; pass --apology-word/--yes-word with words its tokenizer "
                            "knows, or --metric-tokens APOLOGY_ID,YES_ID") from None
    for w in caught:
        print(f"pinpoint: note: {w.message}", file=sys.stderr)
    print(f"metric tokens: {tokens}")
    return tokens


def _metric_kwargs(args) -> dict:
    return {"apology_word": args.apology_word, "yes_word": args.yes_word, "metric_tokens": args.metric_tokens}


def run_locate(args) -> int:
    from ..data import challenge_pairs
    from ..locate import locate
    from ..models import spec_for
    from ..recipe import choose_k, choose_k_by_ablation

    if args.method == "path" and args.positions == "all":
        raise UserError("--positions all needs --method activation (path patching patches the last position only)")
    out = OutDir(args.out, command="locate", overwrite=args.overwrite)
    out.check()
    if args.stream and (args.device_map or args.method == "attribution" or args.device not in ("auto", "cpu")):
        raise UserError("--stream reads layers from the files on the CPU: it takes --method path or activation, "
                        "no --device-map and no --device other than cpu")
    if args.stream:
        streamed, tok = load_streamed(args.model, dtype=args.dtype, chat_template=args.chat_template)
        model = streamed.model
    else:
        model, tok = load_model(args.model, **placement(args), dtype=args.dtype, chat_template=args.chat_template)
    spec = spec_for(model)
    check_k(args.k, spec.n_layers, spec.n_heads)
    check_metric_tokens(args, model, tok)
    rows = load_rows(args.data, limit=args.limit)
    pairs = challenge_pairs(rows, tok)
    print(f"locate: {len(pairs)} prompt pairs, method {args.method}, metric {args.metric}, "
          + (f"k = {args.k}" if args.k else "k by the recipe rule"))
    with out.open() as stage:
        scores = locate(streamed if args.stream else model, tok, pairs, stream=args.stream, method=args.method,
                        positions=args.positions, metric=args.metric, aggregate=args.aggregate, batch_size=args.batch_size, progress=not args.quiet,
                        **_metric_kwargs(args))
        if args.stream:     # a streamed model holds no layers to ablate: the scores alone
            rule_k, how = choose_k(scores), "recipe.choose_k"
        else:               # the recipe rule, checked by ablation (pinpoint.recipe.choose_k_by_ablation)
            rule_k, _ = choose_k_by_ablation(model, tok, pairs, scores, progress=not args.quiet, knockout_kwargs=dict(
                metric=args.metric, batch_size=args.batch_size, **_metric_kwargs(args)))
            how = "recipe.choose_k_by_ablation"
        scores.meta["recipe_k"] = {"k": rule_k, "rule": how}   # what `tune --heads <scores>` takes without --k
        scores.save(stage / "scores")
        k = args.k or rule_k
        scores.plot(stage / "heatmap.png", k=k)
        top = scores.top(k)
        top.save(stage / "top_heads.json")
    rule = ("" if args.k else " (k by the recipe rule: the heads above the largest drop in score, and every head "
            "within 25% of the top" + ("" if args.stream else ", and as many as ablating removes 90% of the "
                                       "metric's fall") + "; --k to choose)")
    print(f"top {k} heads: {top.to_list()}" + rule)
    print(f"wrote {out.path / 'scores'} (with scores.csv), {out.path / 'heatmap.png'}, {out.path / 'top_heads.json'}")
    return 0


def run_knockout(args) -> int:
    from ..data import challenge_pairs
    from ..files import atomic_write_json
    from ..locate import knockout

    out = OutDir(args.out, command="knockout", overwrite=args.overwrite)
    out.check()
    model, tok = load_model(args.model, **placement(args), dtype=args.dtype, chat_template=args.chat_template)
    heads = load_heads(args.heads, args.k, model)
    check_metric_tokens(args, model, tok)
    rows = load_rows(args.data, limit=args.limit)
    pairs = challenge_pairs(rows, tok)
    print(f"knockout: top 1..{len(heads)} heads, {args.ablation} ablation, {len(pairs)} prompt pairs")
    with out.open() as stage:
        curve = knockout(model, tok, pairs, heads, ablation=args.ablation, metric=args.metric,
                         batch_size=args.batch_size, progress=not args.quiet, **_metric_kwargs(args))
        atomic_write_json(stage / "knockout.json", curve.to_dict(), default=str)
        curve.plot(stage / "knockout.png")
    print(repr(curve))
    print(f"wrote {out.path / 'knockout.json'}, {out.path / 'knockout.png'}")
    return 0


def _metric_flags(p) -> None:
    p.add_argument("--metric", default="apology", choices=["apology", "apology_ratio"])
    p.add_argument("--apology-word", default="Apologies", metavar="WORD",
                   help="the word of an apology (default Apologies); its first token in a reply is read")
    p.add_argument("--yes-word", default="Yes", metavar="WORD", help="the word of standing firm (default Yes)")
    p.add_argument("--metric-tokens", type=token_pair, default=None, metavar="A,Y",
                   help="the two token ids to read instead of the words' tokens")


def add_parsers(cmd, common) -> None:
    p = cmd("locate", "score every head by path or activation patching on 'are you sure' challenges", run_locate)
    common(p)
    p.add_argument("--method", default="path", choices=["path", "activation", "attribution"])
    p.add_argument("--positions", default="last", choices=["last", "all"])
    _metric_flags(p)
    p.add_argument("--aggregate", default="diff", choices=["diff", "relative"])
    p.add_argument("--k", type=positive_int, default=None,
                   help="how many top heads to mark and save (default: the recipe rule, the heads above the "
                   "largest drop in score and every head within 25%% of the top, at most max(8, 5%% of the heads))")
    p.add_argument("--stream", action="store_true", help="read the decoder layers from the safetensors files one "
                   "at a time (each at most twice per batch): for models larger than memory")

    p = cmd("knockout", "mean-ablate the top 1..K heads cumulatively and plot the metric", run_knockout)
    common(p, heads=True)
    p.add_argument("--ablation", default="mean", choices=["mean", "zero"])
    _metric_flags(p)

