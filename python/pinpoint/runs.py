"""Batched runs of a stock HF model with recording hooks, and the pieces that let locate
recompute only what a patch changes.

Shapes: B prompts, T padded tokens, Hq query heads, D head_dim, E hidden size.
Positions are always passed explicitly (cumulative count of real tokens), so left and
right padding give the same numbers as running each prompt alone.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch

from .models import ModelSpec, UnsupportedArchitectureError


@dataclass
class Batch:
    """A padded batch. ``last`` [B] is the index of each row's last real token."""

    input_ids: torch.Tensor       # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    position_ids: torch.Tensor    # [B, T] long
    last: torch.Tensor            # [B] long
    side: str

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def T(self) -> int:
        return self.input_ids.shape[1]

    def key_padding_mask(self) -> torch.Tensor:
        return self.attention_mask.bool()


def pad_id_of(tokenizer, model) -> int:
    for src in (tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(src, name, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    return 0  # padded positions are masked out, so any id works


def make_batch(seqs: list[list[int]], *, pad_id: int, side: str = "left", device=None) -> Batch:
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    last = torch.full((B,), T - 1, dtype=torch.long) if side == "left" else mask.sum(1) - 1
    return Batch(ids.to(device), mask.to(device), pos.to(device), last.to(device), side)


def take_last(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [B, ...] at each row's last real token."""
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]


@dataclass
class Recording:
    """What one batched run left behind, per layer (lists of length n_layers).

    z: o_proj inputs [B, T, Hq*D]; attn_out: attention outputs added to the residual
    [B, T, E]; resid_pre: residual stream entering the layer [B, T, E]; block_kwargs:
    the (positional args after hidden_states, keyword args) the model passed to each layer. With last_only, the
    tensors are [B, ...] at the last real token instead.
    """

    logits: torch.Tensor                      # [B, vocab] at the last real token
    z: list = field(default_factory=list)
    attn_out: list = field(default_factory=list)
    resid_pre: list = field(default_factory=list)
    block_kwargs: list = field(default_factory=list)


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def body_forward(adapter: ModelSpec, batch: Batch, **kwargs):
    """The base model (no head) on a batch: final hidden states [B, T, E] (post final norm)."""
    out = adapter.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else _first_tensor(out)


@torch.no_grad()
def record(adapter: ModelSpec, batch: Batch, *, z=True, attn_out=False, resid_pre=False,
           block_kwargs=False, last_only=False) -> Recording:
    """One forward pass recording the requested per-layer tensors."""
    L = adapter.n_layers
    store = {"z": [None] * L, "attn_out": [None] * L, "resid_pre": [None] * L, "block_kwargs": [None] * L}
    keep = (lambda x: take_last(x, batch.last)) if last_only else (lambda x: x)
    handles = []
    try:
        for spec in adapter.layers:
            i = spec.index
            if z:
                handles.append(spec.o.module.register_forward_pre_hook(
                    lambda m, args, i=i: store["z"].__setitem__(i, keep(args[0].detach()))))
            if attn_out:
                handles.append(spec.attn.register_forward_hook(
                    lambda m, args, out, i=i: store["attn_out"].__setitem__(i, keep(_first_tensor(out).detach()))))
            if resid_pre or block_kwargs:
                def pre(m, args, kwargs, i=i):
                    h = args[0] if args else kwargs["hidden_states"]
                    if resid_pre:
                        store["resid_pre"][i] = keep(h.detach())
                    if block_kwargs:  # some models (GPT-2) pass the mask positionally
                        store["block_kwargs"][i] = (tuple(args[1:]),
                                                    {k: v for k, v in kwargs.items() if k != "hidden_states"})
                handles.append(spec.block.register_forward_pre_hook(pre, with_kwargs=True))
        hidden = body_forward(adapter, batch)
        logits = adapter.lm_head(take_last(hidden, batch.last))
    finally:
        for h in handles:
            h.remove()
    rec = Recording(logits=logits)
    for name in ("z", "attn_out", "resid_pre", "block_kwargs"):
        setattr(rec, name, store[name])
    return rec


def select_rows(obj, rows: torch.Tensor, B: int):
    """Index the batch dim of every [B, ...] tensor (dim >= 2) inside obj by `rows`."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == B:
            return obj.index_select(0, rows.to(obj.device))
        return obj
    if isinstance(obj, tuple):
        return tuple(select_rows(o, rows, B) for o in obj)
    if isinstance(obj, list):
        return [select_rows(o, rows, B) for o in obj]
    if isinstance(obj, dict):
        return {k: select_rows(v, rows, B) for k, v in obj.items()}
    return obj


def mlp_step(spec, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(post_attn_norm(x)): the second half of a pre-norm decoder block."""
    return x + spec.mlp(spec.post_attn_norm(x))


def tail_from_mid(adapter: ModelSpec, layer: int, x: torch.Tensor, attn_out_after: list) -> torch.Tensor:
    """Logits [N, vocab] from the residual `x` [N, E] just after layer `layer`'s attention,
    with every later layer's attention output frozen to `attn_out_after[l]` [N, E]."""
    x = mlp_step(adapter.layers[layer], x)
    for spec in adapter.layers[layer + 1:]:
        x = mlp_step(spec, x + attn_out_after[spec.index])
    return adapter.lm_head(adapter.final_norm(x))


def logits_match(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    """Whether logits rebuilt from recorded pieces reproduce the model's own `want`, and the
    error: max |got - want| / max |want|, within 1e-3 (fp32) or 5e-2 (half types; NaN never is)."""
    scale = want.float().abs().max().clamp(min=1e-6)
    err = float((got.float() - want.float()).abs().max() / scale)
    return err <= (1e-3 if want.dtype == torch.float32 else 5e-2), err


def check_pre_norm_residual(adapter: ModelSpec, rec: Recording, *, what: str) -> None:
    """Rebuild the recorded last-token logits from the per-layer pieces. If the blocks are not
    plain pre-norm residual blocks, the incremental algorithms would be wrong: refuse."""
    x = rec.resid_pre[0] + rec.attn_out[0]
    ok, err = logits_match(tail_from_mid(adapter, 0, x, rec.attn_out), rec.logits)
    if not ok:
        raise UnsupportedArchitectureError(
            f"{type(adapter.model).__name__}: the decoder layers are not plain pre-norm residual blocks "
            f"(h + attn(norm(h)), then h + mlp(norm(h))); rebuilding the {what} logits from them is off by "
            f"{float(err):.2e} of the logit scale, so {what} cannot be computed incrementally")


def run_blocks(adapter: ModelSpec, start: int, x: torch.Tensor, kwargs_per_layer: list, rows: torch.Tensor,
               B: int) -> torch.Tensor:
    """Run decoder layers start..L-1 on x [N, T, E] with the kwargs the model used for the
    B recorded rows, re-indexed for the N variant rows (`rows` [N] -> recorded row)."""
    for spec in adapter.layers[start:]:
        args, kw = select_rows(kwargs_per_layer[spec.index], rows, B)
        x = _first_tensor(spec.block(x, *args, **kw))
    return x


def first_difference(a: Batch, b: Batch) -> int:
    """The first position (padded coordinates) where any row of `a` and `b` differ in tokens
    or mask; a.T if they never do. Positions before it compute the same values in both runs."""
    if a.input_ids.shape != b.input_ids.shape:
        return 0
    diff = (a.input_ids != b.input_ids) | (a.attention_mask != b.attention_mask)
    cols = diff.any(0).nonzero()
    return int(cols[0]) if len(cols) else a.T


class SuffixRunner:
    """Rerun decoder layers on positions p0..T-1 only, attending to the base run's K/V for
    positions < p0 through a KV cache: what activation patching needs when the base and
    source prompts share their first p0 tokens (patching there changes nothing).

    Llama-family blocks only (they take ``cache``/``past_key_values``, ``position_ids``,
    ``position_embeddings`` and a 4-D mask by keyword); ``None`` from :meth:`build` means the
    caller must rerun every position."""

    def __init__(self, adapter: ModelSpec, batch: Batch, rec: Recording, p0: int, cache, ckw: str,
                 cache_position: bool):
        self.ad, self.batch, self.rec, self.p0, self.cache, self.ckw = adapter, batch, rec, p0, cache, ckw
        self.cache_position = cache_position  # whether the blocks take `cache_position`

    @classmethod
    @torch.no_grad()
    def build(cls, adapter: ModelSpec, batch: Batch, rec: Recording, p0: int):
        if not 0 < p0 < batch.T or batch.side != "left" or not rec.block_kwargs or rec.block_kwargs[0] is None:
            return None
        args, kw = rec.block_kwargs[0]
        ckw = cache_kwarg(adapter.layers[0].block) if "cache" in kw or "past_key_values" in kw else None
        if args or ckw is None or "position_embeddings" not in kw:
            return None
        import inspect

        from transformers import DynamicCache

        cache_position = "cache_position" in kw or \
            "cache_position" in inspect.signature(adapter.layers[0].block.forward).parameters

        cache = DynamicCache(config=adapter.config) if _takes_config(DynamicCache) else DynamicCache()
        adapter.body(input_ids=batch.input_ids[:, :p0], attention_mask=batch.attention_mask[:, :p0],
                     position_ids=batch.position_ids[:, :p0], use_cache=True, **{cache_kwarg(adapter.body): cache})
        return cls(adapter, batch, rec, p0, cache, ckw, cache_position)

    def _kwargs(self, layer: int, rows: torch.Tensor, cache) -> dict:
        p0, B, T = self.p0, self.batch.size, self.batch.T
        _, kw = select_rows(self.rec.block_kwargs[layer], rows, B)
        kw = dict(kw)
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (T, T):
            kw["attention_mask"] = mask[:, :, p0:, :]
        elif mask is None:  # the model relied on is_causal: spell the mask out (bool, for SDPA)
            q = torch.arange(p0, T, device=rows.device)[:, None]
            k = torch.arange(T, device=rows.device)[None, :]
            keep = (k <= q)[None, None] & self.batch.attention_mask[rows].bool()[:, None, None, :]
            kw["attention_mask"] = keep
        else:
            raise ValueError("unexpected attention mask layout")
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (cos[:, p0:], sin[:, p0:])
        if isinstance(kw.get("position_ids"), torch.Tensor):
            kw["position_ids"] = kw["position_ids"][:, p0:]
        if self.cache_position:
            kw["cache_position"] = torch.arange(p0, T, device=rows.device)
        kw[self.ckw] = cache
        kw["use_cache"] = True
        return kw

    @torch.no_grad()
    def run(self, start: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Layers start..L-1 on x [N, T - p0, E] (variant rows -> recorded rows `rows`)."""
        if start >= self.ad.n_layers:
            return x
        cache = expand_cache(self.cache, rows)
        for spec in self.ad.layers[start:]:
            x = _first_tensor(spec.block(x, **self._kwargs(spec.index, rows, cache)))
        return x


def cache_kwarg(model) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def prefix_cache(adapter: ModelSpec, batch: Batch):
    """KV cache of every row's tokens but the last (left padding), for one-token reruns."""
    if batch.side != "left":
        raise ValueError("prefix_cache needs a left-padded batch")
    if batch.T == 1:
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=adapter.config) if _takes_config(DynamicCache) else DynamicCache()
    adapter.body(input_ids=batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                 position_ids=batch.position_ids[:, :-1], use_cache=True,
                 **{cache_kwarg(adapter.body): cache})
    return cache


def _takes_config(cls) -> bool:
    import inspect

    return "config" in inspect.signature(cls.__init__).parameters


def expand_cache(cache, rows: torch.Tensor):
    """A copy of `cache` whose batch rows are cache rows `rows` (the original is untouched)."""
    if cache is None:
        return None
    c = copy.deepcopy(cache)
    c.reorder_cache(rows)
    return c


@contextlib.contextmanager
def hooks(*handles_factories):
    handles = []
    try:
        for make in handles_factories:
            handles.append(make())
        yield
    finally:
        for h in handles:
            h.remove()


def memory_budget(device: torch.device, max_memory: int | float | None) -> int:
    """Bytes locate may use for variant rows: the user's figure, or a fraction of free memory."""
    if max_memory is not None:
        if max_memory <= 0:
            raise ValueError(f"max_memory must be positive bytes, got {max_memory}")
        return int(max_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.25 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 2 << 30


def chunk_size(budget: int, bytes_per_row: int, total: int) -> int:
    return max(1, min(total, budget // max(1, bytes_per_row)))


def progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="variant", disable=not enabled or os.environ.get("PINPOINT_NO_PROGRESS") == "1",
                leave=False)
