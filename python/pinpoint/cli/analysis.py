"""`pinpoint locate` and `pinpoint knockout`: score the heads, then check the top ones."""
from __future__ import annotations

from ..errors import UserError
from ..outdir import OutDir
from .common import check_k, default_k, load_heads, load_model, load_rows, positive_int


def run_locate(args) -> int:
    from ..data import challenge_pairs
    from ..locate import locate
    from ..models import spec_for

    if args.method == "path" and args.positions == "all":
        raise UserError("--positions all needs --method activation (path patching patches the last position only)")
    out = OutDir(args.out, command="locate", overwrite=args.overwrite)
    out.check()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, chat_template=args.chat_template)
    spec = spec_for(model)
    check_k(args.k, spec.n_layers, spec.n_heads)
    k = args.k or default_k(spec.n_layers, spec.n_heads)
    rows = load_rows(args.data, limit=args.limit)
    pairs = challenge_pairs(rows, tok)
    print(f"locate: {len(pairs)} prompt pairs, method {args.method}, metric {args.metric}, k = {k}"
          + ("" if args.k else " (default: about 4% of the heads)"))
    with out.open() as stage:
        scores = locate(model, tok, pairs, method=args.method, positions=args.positions, metric=args.metric,
                        aggregate=args.aggregate, batch_size=args.batch_size, progress=not args.quiet)
        scores.save(stage / "scores")
        scores.plot(stage / "heatmap.png", k=k)
        top = scores.top(k)
        top.save(stage / "top_heads.json")
    print(f"top {k} heads: {top.to_list()}")
    print(f"wrote {out.path / 'scores'} (with scores.csv), {out.path / 'heatmap.png'}, {out.path / 'top_heads.json'}")
    return 0


def run_knockout(args) -> int:
    from ..data import challenge_pairs
    from ..files import atomic_write_json
    from ..locate import knockout

    out = OutDir(args.out, command="knockout", overwrite=args.overwrite)
    out.check()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, chat_template=args.chat_template)
    heads = load_heads(args.heads, args.k, model)
    rows = load_rows(args.data, limit=args.limit)
    pairs = challenge_pairs(rows, tok)
    print(f"knockout: top 1..{len(heads)} heads, {args.ablation} ablation, {len(pairs)} prompt pairs")
    with out.open() as stage:
        curve = knockout(model, tok, pairs, heads, ablation=args.ablation, metric=args.metric,
                         batch_size=args.batch_size, progress=not args.quiet)
        atomic_write_json(stage / "knockout.json", curve.to_dict(), default=str)
        curve.plot(stage / "knockout.png")
    print(repr(curve))
    print(f"wrote {out.path / 'knockout.json'}, {out.path / 'knockout.png'}")
    return 0


def add_parsers(cmd, common) -> None:
    p = cmd("locate", "score every head by path or activation patching on 'are you sure' challenges", run_locate)
    common(p)
    p.add_argument("--method", default="path", choices=["path", "activation", "attribution"])
    p.add_argument("--positions", default="last", choices=["last", "all"])
    p.add_argument("--metric", default="apology", choices=["apology", "apology_ratio"])
    p.add_argument("--aggregate", default="diff", choices=["diff", "relative"])
    p.add_argument("--k", type=positive_int, default=None,
                   help="how many top heads to mark and save (default: about 4%% of the heads)")

    p = cmd("knockout", "mean-ablate the top 1..K heads cumulatively and plot the metric", run_knockout)
    common(p, heads=True)
    p.add_argument("--ablation", default="mean", choices=["mean", "zero"])
    p.add_argument("--metric", default="apology", choices=["apology", "apology_ratio"])

