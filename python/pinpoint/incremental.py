"""Incremental runs: recompute only what a patch changes, from a ``Recording``.

* ``mlp_step``, ``tail_from_mid``, ``run_blocks``: the second half of a block, the rest of the
  model from the middle of a layer with later attention frozen, and decoder layers on given
  inputs with the recorded keyword arguments.
* ``logits_match`` and ``check_pre_norm_residual``: the rebuilt-vs-recorded checks. An
  incremental algorithm is only used when rebuilding the recorded logits from its pieces
  reproduces the model's own; otherwise the architecture is refused by name.
* ``SuffixRunner``, ``prefix_cache``, ``expand_cache``, ``new_cache``, ``cache_kwarg``,
  ``first_difference``: reruns on the base run's KV cache.
* The memory model: ``row_bytes(spec, kind, T)`` (bytes one variant row of a locate/knockout
  algorithm holds at its peak), ``memory_budget(device, max_memory)`` and ``chunk_size``.

Shapes: B prompts, N variant rows, T padded tokens, E hidden size.
"""
from __future__ import annotations

import copy
import inspect

import torch

from .batching import Batch
from .models import ModelSpec, UnsupportedArchitectureError
from .recording import Recording, first_tensor, select_rows

__all__ = ["mlp_step", "tail_from_mid", "run_blocks", "logits_match", "check_pre_norm_residual", "require_pre_norm",
           "SuffixRunner",
           "prefix_cache", "expand_cache", "new_cache", "cache_kwarg", "first_difference", "ROW_KINDS",
           "row_bytes", "memory_budget", "chunk_size"]


# ---------------------------------------------------------------------------------------------
# Rebuilding the model's tail from recorded pieces.


def mlp_step(layer, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(post_attn_norm(x)): the second half of a pre-norm decoder block (``layer``: a LayerSpec)."""
    return x + layer.mlp(layer.post_attn_norm(x))


def tail_from_mid(spec: ModelSpec, layer: int, x: torch.Tensor, attn_out_after: list) -> torch.Tensor:
    """Logits [N, vocab] from the residual `x` [N, E] just after layer `layer`'s attention,
    with every later layer's attention output frozen to `attn_out_after[l]` [N, E]."""
    x = mlp_step(spec.layers[layer], x)
    for lspec in spec.layers[layer + 1:]:
        x = mlp_step(lspec, x + attn_out_after[lspec.index])
    return spec.lm_head(spec.final_norm(x))


def run_blocks(spec: ModelSpec, start: int, x: torch.Tensor, kwargs_per_layer: list, rows: torch.Tensor,
               B: int) -> torch.Tensor:
    """Run decoder layers start..L-1 on x [N, T, E] with the kwargs the model used for the
    B recorded rows, re-indexed for the N variant rows (`rows` [N] -> recorded row)."""
    for lspec in spec.layers[start:]:
        args, kw = select_rows(kwargs_per_layer[lspec.index], rows, B)
        x = first_tensor(lspec.block(x, *args, **kw))
    return x


def logits_match(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    """Whether logits rebuilt from recorded pieces reproduce the model's own `want`, and the
    error: max |got - want| / max |want|, within 1e-3 (fp32) or 5e-2 (half types; NaN never is)."""
    scale = want.float().abs().max().clamp(min=1e-6)
    err = float((got.float() - want.float()).abs().max() / scale)
    return err <= (1e-3 if want.dtype == torch.float32 else 5e-2), err


def check_pre_norm_residual(spec: ModelSpec, rec: Recording, *, what: str) -> None:
    """Rebuild the recorded last-token logits from the per-layer pieces. If the blocks are not
    plain pre-norm residual blocks, the incremental algorithms would be wrong: refuse."""
    x = rec.resid_pre[0] + rec.attn_out[0]
    require_pre_norm(spec, tail_from_mid(spec, 0, x, rec.attn_out), rec.logits, what=what)


def require_pre_norm(spec: ModelSpec, rebuilt: torch.Tensor, recorded: torch.Tensor, *, what: str) -> None:
    """Refuse the model unless logits ``rebuilt`` [N, vocab] from the recorded per-layer pieces
    (residual + frozen attention, MLPs recomputed) match the model's own ``recorded`` ones."""
    ok, err = logits_match(rebuilt, recorded.to(rebuilt.device))
    if not ok:
        raise UnsupportedArchitectureError(
            f"{type(spec.model).__name__}: the decoder layers are not plain pre-norm residual blocks "
            f"(h + attn(norm(h)), then h + mlp(norm(h))); rebuilding the {what} logits from them is off by "
            f"{float(err):.2e} of the logit scale, so {what} cannot be computed incrementally")


# ---------------------------------------------------------------------------------------------
# KV caches.


def first_difference(a: Batch, b: Batch) -> int:
    """The first position (padded coordinates) where any row of `a` and `b` differ in tokens
    or mask; a.T if they never do. Positions before it compute the same values in both runs."""
    if a.input_ids.shape != b.input_ids.shape:
        return 0
    diff = (a.input_ids != b.input_ids) | (a.attention_mask != b.attention_mask)
    cols = diff.any(0).nonzero()
    return int(cols[0]) if len(cols) else a.T


def cache_kwarg(model) -> str:
    """The keyword a module's forward takes its KV cache by ("cache" or "past_key_values")."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(spec: ModelSpec):
    """An empty ``transformers.DynamicCache`` for the model (given its config where the
    installed transformers takes one)."""
    from transformers import DynamicCache

    takes_config = "config" in inspect.signature(DynamicCache.__init__).parameters
    return DynamicCache(config=spec.config) if takes_config else DynamicCache()


def _fill_cache(spec: ModelSpec, batch: Batch, stop: int):
    """A cache holding every row's positions 0..stop-1 (one forward of the body)."""
    cache = new_cache(spec)
    spec.body(input_ids=batch.input_ids[:, :stop], attention_mask=batch.attention_mask[:, :stop],
              position_ids=batch.position_ids[:, :stop], use_cache=True, **{cache_kwarg(spec.body): cache})
    return cache


@torch.no_grad()
def prefix_cache(spec: ModelSpec, batch: Batch):
    """KV cache of every row's tokens but the last (left padding), for one-token reruns."""
    if batch.side != "left":
        raise ValueError("prefix_cache needs a left-padded batch")
    if batch.T == 1:
        return None
    return _fill_cache(spec, batch, batch.T - 1)


def expand_cache(cache, rows: torch.Tensor):
    """A copy of `cache` whose batch rows are cache rows `rows` (the original is untouched)."""
    if cache is None:
        return None
    c = copy.deepcopy(cache)
    c.reorder_cache(rows)
    return c


class SuffixRunner:
    """Rerun decoder layers on positions p0..T-1 only, attending to the base run's K/V for
    positions < p0 through a KV cache: what activation patching needs when the base and
    source prompts share their first p0 tokens (patching there changes nothing).

    Llama-family blocks only (they take ``cache``/``past_key_values``, ``position_ids``,
    ``position_embeddings`` and a 4-D mask by keyword); ``None`` from :meth:`build` means the
    caller must rerun every position."""

    def __init__(self, spec: ModelSpec, batch: Batch, rec: Recording, p0: int, cache, ckw: str,
                 cache_position: bool):
        self.spec, self.batch, self.rec, self.p0, self.cache, self.ckw = spec, batch, rec, p0, cache, ckw
        self.cache_position = cache_position  # whether the blocks take `cache_position`

    @classmethod
    @torch.no_grad()
    def build(cls, spec: ModelSpec, batch: Batch, rec: Recording, p0: int):
        if not 0 < p0 < batch.T or batch.side != "left" or not rec.block_kwargs or rec.block_kwargs[0] is None:
            return None
        args, kw = rec.block_kwargs[0]
        ckw = cache_kwarg(spec.layers[0].block) if "cache" in kw or "past_key_values" in kw else None
        if args or ckw is None or "position_embeddings" not in kw:
            return None
        cache_position = "cache_position" in kw or \
            "cache_position" in inspect.signature(spec.layers[0].block.forward).parameters
        return cls(spec, batch, rec, p0, _fill_cache(spec, batch, p0), ckw, cache_position)

    def _mask(self, mask, rows: torch.Tensor):
        """The recorded attention mask for query positions p0..T-1 of variant rows ``rows``."""
        p0, T = self.p0, self.batch.T
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (T, T):
            return mask[:, :, p0:, :]
        if mask is None:  # the model relied on is_causal: spell the mask out (bool, for SDPA)
            q = torch.arange(p0, T, device=rows.device)[:, None]
            k = torch.arange(T, device=rows.device)[None, :]
            return (k <= q)[None, None] & self.batch.attention_mask[rows].bool()[:, None, None, :]
        raise ValueError("unexpected attention mask layout")

    def _kwargs(self, layer: int, rows: torch.Tensor, cache) -> dict:
        p0, T = self.p0, self.batch.T
        _, kw = select_rows(self.rec.block_kwargs[layer], rows, self.batch.size)
        kw = dict(kw)
        kw["attention_mask"] = self._mask(kw.get("attention_mask"), rows)
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
        if start >= self.spec.n_layers:
            return x
        cache = expand_cache(self.cache, rows)
        for lspec in self.spec.layers[start:]:
            x = first_tensor(lspec.block(x, **self._kwargs(lspec.index, rows, cache)))
        return x


# ---------------------------------------------------------------------------------------------
# The memory model.

ROW_KINDS = ("path", "activation_all", "activation_last", "knockout")


def intermediate_size(spec: ModelSpec) -> int:
    """The MLP's hidden width (``intermediate_size``, GPT-2's ``n_inner``, else 4·E)."""
    cfg = spec.config
    return getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * spec.hidden_size


def kv_cache_bytes(spec: ModelSpec, T: int) -> int:
    """Bytes of one row's KV cache over T positions, all layers."""
    return _elem(spec) * spec.n_layers * 2 * spec.n_kv_heads * spec.head_dim * T


def _elem(spec: ModelSpec) -> int:
    return torch.finfo(spec.dtype).bits // 8


def row_bytes(spec: ModelSpec, kind: str, T: int = 1, *, rerun: int | None = None, cached: bool = False) -> int:
    """Peak bytes one variant row of ``kind`` holds (an estimate used only to size chunks).

    With e bytes per element, E hidden, I MLP width, H query heads of D, V vocabulary:

    * ``"path"`` (one token through o_proj, MLPs and unembedding): e·(8E + 2HD + 3I + 2V);
    * ``"activation_all"`` (``rerun`` = T − p0 positions rerun through every later layer):
      e·rerun·(6E + 3I + 4HD + 2HT), plus the row's prefix KV cache when ``cached``;
    * ``"activation_last"`` (one token on the row's own copy of the KV cache): the cache of T
      positions + e·(16E + 2V);
    * ``"knockout"`` (a full forward through the fused kernel): 2e·T·(8E + 4HD + 2HT).
    """
    e, E, H, D = _elem(spec), spec.hidden_size, spec.n_heads, spec.head_dim
    if kind == "path":
        return e * (8 * E + 2 * H * D + 3 * intermediate_size(spec) + 2 * spec.vocab_size)
    if kind == "activation_all":
        n = T if rerun is None else rerun
        return e * n * (6 * E + 3 * intermediate_size(spec) + 4 * H * D + 2 * H * T) + \
            (kv_cache_bytes(spec, T) if cached else 0)
    if kind == "activation_last":
        return kv_cache_bytes(spec, T) + e * (16 * E + 2 * spec.vocab_size)
    if kind == "knockout":
        return 2 * e * T * (8 * E + 4 * H * D + 2 * H * T)
    raise ValueError(f"unknown row kind {kind!r}: use one of {', '.join(ROW_KINDS)}")


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
    """Rows per chunk: as many as fit ``budget`` (at least 1, at most ``total``)."""
    return max(1, min(total, budget // max(1, bytes_per_row)))
