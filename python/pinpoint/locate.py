"""Locate: score every attention head by how much it carries a behaviour.

All methods are exact except ``attribution``, which is a first-order screen and says so.

* ``path`` — the paper's path patching. Head (l, h)'s output at the last position is taken
  from the source prompt; every later layer's attention output at that position stays as
  in the base run; MLPs and norms are recomputed. Since only the last position changes and
  later attention is frozen there, each sender layer's H·B variants are single-token rows
  through o_proj and the MLPs: about two full forwards in total, never one per head.
* ``activation`` — the head's output is replaced (at every position, or only the last)
  and everything downstream is recomputed. ``positions="all"`` starts each layer's
  variants from the recorded residual stream (prefix sharing) and reuses the recorded
  attention core of the patched layer; ``positions="last"`` reruns one token per variant on
  the base run's KV cache.
* ``attribution`` — grad · (z_source − z_base) for all heads from 2 forwards + 1 backward;
  ``verify_top=k`` re-scores the k strongest heads exactly with activation patching.

Shapes: B pairs (in batches), L layers, H query heads, D head_dim, E hidden size.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .heads import HeadScores, HeadSet, as_head_list
from .metrics import apply_metric, resolve_metric
from .models import ModelSpec, spec_for
from .patching import LayerPatch, fused_patching, head_means
from .batching import Batch, make_batch, pad_id, take_last
from .incremental import (
    SuffixRunner, cache_kwarg, chunk_size, expand_cache, first_difference, logits_match,
    memory_budget, mlp_step, prefix_cache, row_bytes, run_blocks,
)
from .modes import inference
from .progress import progress as progress_bar
from .prompts import PromptPair, to_ids
from .placement import check_materialised, layer_devices
from .recording import body_forward, record
from .tails import base_metric as _base_metric, check_finite as _check_finite, head_masks as _head_masks, path_scores

__all__ = ["locate", "knockout", "KnockoutCurve"]

METHODS = ("path", "activation", "attribution")


# --- shared preparation -------------------------------------------------------------------

def _as_pairs(pairs) -> list[PromptPair]:
    if isinstance(pairs, PromptPair):
        pairs = [pairs]
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        try:
            pairs = list(pairs)
        except TypeError:
            raise TypeError(f"pairs must be a list of pinpoint.PromptPair, got {type(pairs).__name__}") from None
    if len(pairs) == 0:
        raise ValueError("pairs is empty: give at least one PromptPair(base, source)")
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, PromptPair):
            out.append(p)
        elif isinstance(p, (tuple, list)) and len(p) == 2 and not all(isinstance(t, int) for t in p):
            out.append(PromptPair(*p))
        else:
            raise TypeError(f"pairs[{i}] must be a PromptPair(base, source), got {type(p).__name__}")
    return out


def _encode(spec: ModelSpec, tokenizer, pairs: list[PromptPair], *, sides=("base", "source")):
    enc = {side: [] for side in sides}
    for i, p in enumerate(pairs):
        for side in sides:
            where = f"pairs[{i}].{side}"
            ids = to_ids(tokenizer, getattr(p, side), where=where, vocab_size=spec.vocab_size)
            spec.check_length(len(ids), where=where)   # names a sliding window when that is the limit
            enc[side].append(ids)
    return enc


def _aggregate(per_pair: torch.Tensor, base: torch.Tensor, aggregate: str) -> torch.Tensor:
    """[B, L, H] effects, [B] base metric -> [L, H] scores, never NaN/inf (near-zero guards: metrics)."""
    from .metrics import aggregate_scores

    return aggregate_scores(per_pair, base, aggregate)


# --- locate --------------------------------------------------------------------------------

def locate(model, tokenizer, pairs, *, method: str = "path", metric="apology", aggregate: str = "diff",
           positions: str = "last", batch_size: int = 8, max_memory: int | None = None,
           verify_top: int = 0, padding_side: str = "left", apology_word: str = "Apologies",
           yes_word: str = "Yes", metric_tokens: tuple[int, int] | None = None,
           progress: bool = True, stream: bool = False) -> HeadScores:
    """Score every head (layer, query head) of `model` on prompt `pairs`.

    Returns :class:`HeadScores` with ``values`` float32 [L, H]: ``aggregate="diff"`` is the
    mean over pairs of metric(patched) − metric(base); ``"relative"`` is
    100 · mean((patched − base) / base). ``metric`` is "apology", "apology_ratio" or a
    callable logits [N, vocab] -> [N]. Pairs are processed `batch_size` at a time with
    padding (results do not depend on it); variant rows are chunked to stay within
    `max_memory` bytes (default: a fraction of free memory).

    ``stream=True``: ``model`` is a model directory (save_pretrained, safetensors; or a
    :class:`~pinpoint.stream.LayerStream` of one) and its
    decoder layers are read from the files one at a time, each at most twice per batch of
    pairs (:mod:`pinpoint.stream`), for models larger than memory; path and activation
    patching only. Same results as the model loaded whole.
    """
    _check_locate_args(method, aggregate, positions, batch_size, verify_top)
    streamed = _open_stream(model, method, verify_top) if stream else None
    model = streamed.model if streamed is not None else model
    spec = spec_for(model)
    if streamed is None:
        check_materialised(spec)
    pairs = _as_pairs(pairs)
    fn, metric_name = resolve_metric(metric, tokenizer, apology_word=apology_word, yes_word=yes_word,
                                     token_ids=metric_tokens)
    enc = _encode(spec, tokenizer, pairs)
    if positions == "all" and method != "path":
        _check_equal_lengths(enc)
    budget = memory_budget(spec.device, max_memory)
    pad = pad_id(tokenizer, model)
    side = "left" if (method == "activation" and positions == "last") else padding_side
    run = {"path": _path_patching, "activation": _activation_all if positions == "all" else _activation_last,
           "attribution": functools.partial(_attribution, positions=positions)}[method]
    if streamed is not None:
        run = _streamed_runner(streamed, method, positions, pad)
    with inference(model, grads=(method == "attribution")):
        per_pair, base_metric = _score_pairs(spec, fn, enc, run, _bar(len(pairs) * spec.n_layers * spec.n_heads,
                                                                      method, positions, progress),
                                             batch_size=batch_size, pad=pad, side=side, budget=budget)
    meta = {"method": method, "metric": metric_name, "aggregate": aggregate, "positions": positions,
            "n_pairs": len(pairs), "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "architecture": spec.arch, "dtype": str(spec.dtype).replace("torch.", ""), **_token_meta(fn)}
    if streamed is not None:
        meta.update(stream=True, bytes_read=streamed.bytes_read, resident_bytes=streamed.resident_bytes,
                    layer_reads=list(streamed.reads))
    if method == "attribution":
        meta["screen"] = True
        meta["note"] = "first-order attribution estimate (grad x activation difference), not exact patching"
        if verify_top:
            order = per_pair.mean(0).abs().reshape(-1).argsort(descending=True)[:verify_top]
            verified = [(int(i) // spec.n_heads, int(i) % spec.n_heads) for i in order]
            exact = locate_subset(model, tokenizer, pairs, verified, positions=positions, fn=fn, enc=enc,
                                  batch_size=batch_size, budget=budget, pad=pad, progress=progress)
            for j, (layer, head) in enumerate(verified):
                per_pair[:, layer, head] = exact[:, j]
            meta["verified"] = [list(h) for h in verified]
            meta["note"] += f"; the {len(verified)} strongest heads were re-scored exactly (activation patching)"
    values = _aggregate(per_pair, base_metric, aggregate)
    return HeadScores(values, per_pair=per_pair, base=base_metric, meta=meta)


def _open_stream(model_dir, method: str, verify_top: int):
    """The :class:`~pinpoint.stream.LayerStream` of ``model_dir`` for ``locate(..., stream=True)``."""
    import os

    from .stream import LayerStream

    if isinstance(model_dir, LayerStream):
        model_dir.reset_counts()
    elif not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"stream=True reads the model from its directory: pass the model directory (a str or "
                        f"path), not a {type(model_dir).__name__}")
    if method not in ("path", "activation"):
        raise ValueError(f"stream=True supports method='path' and 'activation' (they go layer by layer); "
                         f"{method!r} needs the whole model at once")
    return model_dir if isinstance(model_dir, LayerStream) else LayerStream(model_dir)


def _streamed_runner(streamed, method: str, positions: str, pad: int):
    from .stream import activation_streamed, path_streamed

    if method == "path":
        return functools.partial(path_streamed, ls=streamed, pad=pad)
    return functools.partial(activation_streamed, ls=streamed, pad=pad, positions=positions)


def _check_locate_args(method, aggregate, positions, batch_size, verify_top) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if aggregate not in ("diff", "relative"):
        raise ValueError(f"aggregate must be 'diff' or 'relative', got {aggregate!r}")
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    if method == "path" and positions != "last":
        raise ValueError("path patching patches the last position only; use positions='last'")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(verify_top, int) or verify_top < 0:
        raise ValueError(f"verify_top must be a non-negative int, got {verify_top!r}")
    if verify_top and method != "attribution":
        raise ValueError("verify_top re-checks an attribution screen; it only applies to method='attribution'")


def _check_equal_lengths(enc) -> None:
    for i, (b, s) in enumerate(zip(enc["base"], enc["source"])):
        if len(b) != len(s):
            raise ValueError(f"positions='all' patches every position, so base and source must have equal "
                             f"token lengths; pairs[{i}] has base {len(b)} and source {len(s)} tokens "
                             "(use positions='last')")


def _pair_batches(spec: ModelSpec, enc: dict, batch_size: int, pad: int, side: str):
    """(start, stop, {side name: Batch}) for consecutive groups of ``batch_size`` pairs."""
    n = len(next(iter(enc.values())))
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        yield start, stop, {k: make_batch(v[start:stop], pad_id=pad, side=side, device=spec.device)
                            for k, v in enc.items()}


def _score_pairs(spec: ModelSpec, fn, enc: dict, run, bar, *, batch_size: int, pad: int, side: str, budget: int,
                 check: bool = True, **run_kwargs):
    """``run`` on every batch of pairs: (per-pair effects [n_pairs, ...] and base metric [n_pairs]
    on the CPU). With ``check``, the first batch runs the algorithm's self-check."""
    per_pair, base_metric = [], []
    try:
        for start, _stop, b in _pair_batches(spec, enc, batch_size, pad, side):
            vals, mb = run(spec, fn, b["base"], b["source"], start, budget, bar, check and start == 0, **run_kwargs)
            per_pair.append(vals.cpu())
            base_metric.append(mb.cpu())
    finally:
        bar.close()
    return torch.cat(per_pair).float(), torch.cat(base_metric).float()


def _bar(total, method, positions, enabled):
    return progress_bar(total, f"locate[{method}{'' if method == 'path' else ':' + positions}]", enabled,
                        unit="variant")


def _path_patching(spec: ModelSpec, fn, base: Batch, src: Batch, start: int, budget: int, bar, check: bool):
    """[B, L, H] patched − base, and the base metric [B]."""
    rb = record(spec, base, z=True, attn_out=True, resid_pre=True, last_only=True)
    rs = record(spec, src, z=True, last_only=True)
    return path_scores(spec, fn, rb, rs, start, budget, bar, check)


def _activation_all(spec: ModelSpec, fn, base: Batch, src: Batch, start: int, budget: int, bar, check: bool,
                    heads_subset=None):
    """Replace head outputs at every position; recompute every later layer. Positions before
    the first token where base and source differ are the same in every variant, so only the
    suffix is rerun (on the base run's prefix KV cache) when the blocks allow it."""
    rb = record(spec, base, z=True, resid_pre=True, block_kwargs=True)
    rs = record(spec, src, z=True)
    mb = _base_metric(spec, fn, rb, start)
    _check_finite(rs.logits, start, "source")
    B, T, L, H, D = base.size, base.T, spec.n_layers, spec.n_heads, spec.head_dim
    variants = heads_subset if heads_subset is not None else [(l, h) for l in range(L) for h in range(H)]
    one = torch.zeros(1, dtype=torch.long, device=spec.device)

    def rerun(layer, rows, z, lo, suffix):
        """Logits [N, vocab] of variant rows whose layer-`layer` o_proj input at positions lo..T-1
        is `z` [N, T - lo, H*D]: that layer's o_proj and MLP, then every later layer (on
        positions lo.. through `suffix`, or on all of them)."""
        x = mlp_step(spec.layers[layer], _take(rb.resid_pre[layer], rows)[:, lo:] + spec.layers[layer].o.module(z))
        x = suffix.run(layer + 1, x, rows) if suffix is not None else run_blocks(spec, layer + 1, x, rb.block_kwargs,
                                                                                 rows, B)
        return _logits_at_last(spec, x, base.last[rows] - lo)

    if check:  # the rebuilt tail must reproduce the recorded run (one row is enough to tell)
        _compare_logits(spec, rerun(0, one, rb.z[0][:1], 0, None), rb.logits[:1], "activation patching")
    p0 = first_difference(base, src)
    suffix = SuffixRunner.build(spec, base, rb, p0) if L > 1 else None
    if suffix is not None:  # the suffix rerun must reproduce the recorded run too, else rerun everything
        try:
            ok, _ = logits_match(rerun(0, one, rb.z[0][:1, p0:], p0, suffix), rb.logits[:1])
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError):
            ok = False
        if not ok:
            suffix = None
    lo = p0 if suffix is not None else 0
    # each variant row reruns T - lo positions, and carries its copy of the prefix KV cache
    per_row = row_bytes(spec, "activation_all", T, rerun=T - lo, cached=suffix is not None)
    n_rows = chunk_size(budget, per_row, len(variants) * B)
    out = torch.empty(B, len(variants), device=mb.device)
    for layer, rows, hh, cols in _variant_chunks(variants, B, n_rows, spec.device):
        sel = _head_masks(H, D, rb.z[layer].device)[hh.to(rb.z[layer].device)]          # [N, H*D]
        z = torch.where(sel[:, None, :], _take(rs.z[layer], rows)[:, lo:], _take(rb.z[layer], rows)[:, lo:])
        vals = apply_metric(fn, rerun(layer, rows, z, lo, suffix), what="activation-patched rows")
        _put(out, rows, cols, vals, mb)
        bar.update(len(rows))
    return (out if heads_subset is not None else out.view(B, L, H)), mb


def _take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]`` with the index moved to ``t``'s device (a layer's recording lives on its device)."""
    return t.index_select(0, rows.to(t.device))


def _put(out: torch.Tensor, rows, cols, vals: torch.Tensor, mb: torch.Tensor) -> None:
    """out[rows, cols] = vals - mb[rows], on ``out``'s device (the unembedding's, where the metric is)."""
    rows, cols = rows.to(out.device), cols.to(out.device)
    out[rows, cols] = vals.to(out.device) - mb.to(out.device)[rows]


def _variant_chunks(variants, B: int, n_rows: int, device):
    """Variant rows (head variant j, pair b), grouped by layer and chunked to n_rows:
    yields (layer, pair index [N], head [N], variant index [N])."""
    by_layer: dict[int, list[int]] = {}
    for j, (layer, _) in enumerate(variants):
        by_layer.setdefault(layer, []).append(j)
    for layer, idx in by_layer.items():
        idx_t = torch.tensor(idx, device=device)
        heads = torch.tensor([variants[j][1] for j in idx], device=device)
        total = len(idx) * B
        for s in range(0, total, n_rows):
            v = torch.arange(s, min(total, s + n_rows), device=device)
            yield layer, v % B, heads[v // B], idx_t[v // B]


def _logits_at_last(spec, x, last):
    return spec.lm_head(spec.final_norm(take_last(x, last)))


def _compare_logits(spec, got, want, what):
    ok, err = logits_match(got, want)
    if not ok:
        from .models import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(
            f"{type(spec.model).__name__}: rerunning the recorded layers does not reproduce the model's own "
            f"logits (off by {err:.2e} of the logit scale), so {what} cannot reuse the recorded prefix")


def _activation_last(spec: ModelSpec, fn, base: Batch, src: Batch, start: int, budget: int, bar, check: bool,
                     heads_subset=None):
    """Replace head outputs at the last position only: one token per variant on the base KV cache."""
    rb = record(spec, base, z=True, last_only=True)
    rs = record(spec, src, z=True, last_only=True)
    mb = _base_metric(spec, fn, rb, start)
    _check_finite(rs.logits, start, "source")
    B, T, L, H, D = base.size, base.T, spec.n_layers, spec.n_heads, spec.head_dim
    cache = prefix_cache(spec, base)
    ckw = cache_kwarg(spec.body)
    variants = heads_subset if heads_subset is not None else [(l, h) for l in range(L) for h in range(H)]
    per_row = row_bytes(spec, "activation_last", T)
    n_rows = chunk_size(budget, per_row, len(variants) * B)

    def one_token(rows, layer=None, hh=None):
        handle = None
        if layer is not None:
            dev = rs.z[layer].device                                  # layer `layer`'s device
            repl, sel = _take(rs.z[layer], rows), _head_masks(H, D, dev)[hh.to(dev)]

            def hook(module, args):  # runs before accelerate's hook moves inputs: follow z
                z = args[0]
                return (torch.where(sel[:, None, :].to(z.device), repl[:, None, :].to(z.device, z.dtype), z),
                        *args[1:])
            handle = spec.layers[layer].o.module.register_forward_pre_hook(hook)
        try:
            extra = {ckw: expand_cache(cache, rows)} if cache is not None else {}
            out = spec.body(input_ids=base.input_ids[rows, -1:], attention_mask=base.attention_mask[rows],
                          position_ids=base.position_ids[rows, -1:], use_cache=cache is not None, **extra)
        finally:
            if handle is not None:
                handle.remove()
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return spec.lm_head(hidden[:, -1])

    if check:
        _compare_logits(spec, one_token(torch.arange(B, device=spec.device)), rb.logits, "last-position patching")
    out = torch.empty(B, len(variants), device=mb.device)
    for layer, rows, hh, cols in _variant_chunks(variants, B, n_rows, spec.device):
        vals = apply_metric(fn, one_token(rows, layer, hh), what="activation-patched rows")
        _put(out, rows, cols, vals, mb)
        bar.update(len(rows))
    return (out if heads_subset is not None else out.view(B, L, H)), mb


def _attribution(spec: ModelSpec, fn, base: Batch, src: Batch, start: int, budget: int, bar, check: bool,
                 positions: str = "last"):
    """First-order estimate of every head's patching effect: <d metric/d z_h, z_src,h − z_base,h>."""
    B, L, H, D = base.size, spec.n_layers, spec.n_heads, spec.head_dim
    with torch.no_grad():
        rs = record(spec, src, z=True, last_only=(positions == "last"))
    _check_finite(rs.logits, start, "source")
    eps, zb = [None] * L, [None] * L
    handles = []
    for lspec in spec.layers:
        def hook(module, args, i=lspec.index):
            z = args[0]
            zb[i] = z.detach()
            eps[i] = torch.zeros_like(z, requires_grad=True)  # d metric / d eps = d metric / d z
            return (z + eps[i], *args[1:])
        handles.append(lspec.o.module.register_forward_pre_hook(hook))
    try:
        hidden = body_forward(spec, base)
        logits = spec.lm_head(take_last(hidden, base.last))
        _check_finite(logits.detach(), start, "base")
        m = apply_metric(fn, logits, what="the base prompts")
        m.sum().backward()
    finally:
        for h in handles:
            h.remove()
    out = torch.empty(B, L, H, device=m.device)
    for layer in range(L):
        g = eps[layer].grad                                                   # on layer `layer`'s device
        if positions == "last":
            contrib = take_last(g, base.last) * (rs.z[layer] - take_last(zb[layer], base.last))   # [B, H*D]
        else:
            real = base.attention_mask[..., None].to(g.device, g.dtype)
            contrib = (g * (rs.z[layer] - zb[layer]) * real).sum(1)
        out[:, layer] = contrib.float().view(B, H, D).sum(-1).to(out.device)
    bar.update(B * L * H)
    return out.detach(), m.detach()


def locate_subset(model, tokenizer, pairs, heads, *, positions="last", fn=None, enc=None, batch_size=8,
                  budget=None, pad=None, progress=False, metric="apology") -> torch.Tensor:
    """Exact activation-patching effects [n_pairs, len(heads)] of just `heads`."""
    spec = spec_for(model)
    heads = as_head_list(heads, n_layers=spec.n_layers, n_heads=spec.n_heads)
    pairs = _as_pairs(pairs)
    if fn is None:
        fn, _ = resolve_metric(metric, tokenizer)
    enc = enc or _encode(spec, tokenizer, pairs)
    budget = budget or memory_budget(spec.device, None)
    pad = pad_id(tokenizer, model) if pad is None else pad
    run = _activation_all if positions == "all" else _activation_last
    with inference(model):
        out, _ = _score_pairs(spec, fn, enc, run, _bar(len(pairs) * len(heads), "activation", positions, progress),
                              batch_size=batch_size, pad=pad, side="left", budget=budget, check=False,
                              heads_subset=heads)
    return out


# --- knockout ------------------------------------------------------------------------------

class KnockoutCurve:
    """Metric after ablating the first k heads of a HeadSet, for k = 0..K.

    ``values`` [K+1] mean over pairs; ``per_pair`` [K+1, n_pairs]; ``heads`` the order used.
    """

    def __init__(self, values, per_pair, heads, meta):
        self.values = values
        self.per_pair = per_pair
        self.heads = HeadSet(heads)
        self.meta = meta

    @property
    def ks(self) -> list[int]:
        return list(range(len(self.values)))

    def __repr__(self) -> str:
        pts = ", ".join(f"{k}:{float(v):.3g}" for k, v in zip(self.ks, self.values))
        return f"KnockoutCurve({self.meta.get('ablation')} ablation, {self.meta.get('metric')}: {pts})"

    def to_dict(self) -> dict:
        return {"k": self.ks, "values": [float(v) for v in self.values], "heads": self.heads.to_list(),
                "per_pair": self.per_pair.tolist(), "meta": self.meta}

    def plot(self, path, *, title: str | None = None):
        """The curve as a PNG at ``path`` (1350 x 675 px): the mean metric after ablating the
        top k heads, k = 0..K, each tick naming the head added at that k, the unablated value
        dashed. Returns the path."""
        from pathlib import Path

        from matplotlib.figure import Figure

        from .heads import metric_label

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(9, 4.5), dpi=150)
        ax = fig.add_subplot()
        ax.plot(self.ks, self.values.numpy(), marker="o", ms=4)
        ax.axhline(float(self.values[0]), color="grey", lw=0.8, ls="--", label="no head ablated")
        ax.set_xticks(self.ks, ["none"] + [f"{k}\n+{l}.{h}" for k, (l, h) in enumerate(self.heads, start=1)],
                      fontsize=7 if len(self.ks) > 16 else 9)
        ax.set_xlabel("top-k located heads ablated (cumulative; tick: k and the head added, layer.head)")
        ax.set_ylabel(f"mean {metric_label(self.meta.get('metric'))}")
        ax.set_title(title or f"Knockout of the top-k heads ({self.meta.get('ablation')} ablation)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        return path


def knockout(model, tokenizer, pairs, heads, *, ablation: str = "mean", metric="apology", k_max: int | None = None,
             batch_size: int = 8, max_memory: int | None = None, apology_word: str = "Apologies",
             yes_word: str = "Yes", metric_tokens: tuple[int, int] | None = None,
             progress: bool = True) -> KnockoutCurve:
    """Cumulatively ablate heads[:k] for k = 0..K on the pairs' base prompts.

    All K+1 variants of a batch of pairs run as rows of batched forwards, each row with its
    own head mask, through the fused head-patched attention kernel: ablated heads compute
    no attention and emit the per-head mean (over every real token of the base prompts)
    or zero.
    """
    if ablation not in ("mean", "zero"):
        raise ValueError(f"ablation must be 'mean' or 'zero', got {ablation!r}")
    spec = spec_for(model)
    check_materialised(spec)
    heads = as_head_list(heads, n_layers=spec.n_layers, n_heads=spec.n_heads)
    K = len(heads) if k_max is None else k_max
    if not isinstance(K, int) or not 1 <= K <= len(heads):
        raise ValueError(f"k_max must be an int in [1, {len(heads)}], got {k_max!r}")
    heads = heads[:K]
    pairs = _as_pairs(pairs)
    fn, metric_name = resolve_metric(metric, tokenizer, apology_word=apology_word, yes_word=yes_word,
                                     token_ids=metric_tokens)
    enc = _encode(spec, tokenizer, pairs, sides=("base",))
    pad = pad_id(tokenizer, model)
    budget = memory_budget(spec.device, max_memory)
    per_pair = torch.zeros(K + 1, len(pairs))
    with inference(model):
        means = head_means(model, None, enc["base"]).to(dtype=spec.dtype) if ablation == "mean" else None
        # order[l] [K+1, Hq]: which heads of layer l are ablated in variant k (heads[:k])
        order = torch.zeros(spec.n_layers, K + 1, spec.n_heads, dtype=torch.bool)
        for k in range(1, K + 1):
            layer, head = heads[k - 1]
            order[layer, k:, head] = True
        bar = progress_bar(len(pairs) * (K + 1), f"knockout[{ablation}]", progress, unit="variant")
        try:
            for start, stop, b in _pair_batches(spec, enc, batch_size, pad, "left"):
                vals = _knockout_rows(model, spec, fn, b["base"], order, means, start=start, budget=budget, bar=bar)
                per_pair[:, start:stop] = vals.cpu()
        finally:
            bar.close()
    meta = {"ablation": ablation, "metric": metric_name, "n_pairs": len(pairs),
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__, **_token_meta(fn)}
    return KnockoutCurve(per_pair.mean(1), per_pair, heads, meta)


def _token_meta(fn) -> dict:
    """{"metric_tokens": ...}: the token ids (and pieces) a named metric read, for the results'
    metadata; nothing for a callable metric."""
    tokens = getattr(fn, "metric_tokens", None)
    return {"metric_tokens": tokens.to_dict()} if tokens is not None else {}


def _knockout_rows(model, spec: ModelSpec, fn, base: Batch, order: torch.Tensor, means, *, start: int, budget: int,
                   bar) -> torch.Tensor:
    """The metric [K+1, B] of the K+1 knockout variants of each base prompt: variant k runs
    with the heads ``order[:, k]`` [L, K+1, Hq] ablated (to ``means`` [L, Hq, D] or zero), all
    variants as rows of fused-kernel forwards, chunked to ``budget`` bytes."""
    B, T, Hq, D = base.size, base.T, spec.n_heads, spec.head_dim
    K1 = order.shape[1]
    layers_used = [layer for layer in range(spec.n_layers) if bool(order[layer].any())]
    n = chunk_size(budget, row_bytes(spec, "knockout", T), K1 * B)
    devices = layer_devices(spec)
    vals = torch.empty(K1 * B, device=spec.unembed_device)
    for s in range(0, K1 * B, n):
        v = torch.arange(s, min(K1 * B, s + n), device=spec.device)
        rows, ks = v % B, v // B
        plan = {}
        for layer in layers_used:  # each layer's mask and patch where that layer computes
            dev = devices[layer]
            patch = None if means is None else means[layer].to(dev)[None, None].expand(1, T, Hq, D)
            plan[layer] = LayerPatch(order[layer][ks.cpu()].to(dev), patch)
        sub = base.rows(rows)
        with fused_patching(model, plan, sub.key_padding_mask()):
            hidden = body_forward(spec, sub)
        logits = spec.lm_head(take_last(hidden, sub.last))
        _check_finite(logits, start, "base")
        vals[s:s + len(v)] = apply_metric(fn, logits, what="knockout rows").to(vals.device)
        bar.update(len(v))
    return vals.view(K1, B)
