"""Recorded runs: one batched forward of a stock HF model with hooks that keep what the
incremental algorithms of ``locate`` reuse.

* ``record(spec, batch, z=, attn_out=, resid_pre=, block_kwargs=, last_only=)`` -> ``Recording``.
* ``body_forward(spec, batch)``: the base model (no head): final hidden states.
* ``select_rows(obj, rows, B)``: the same rows of every batch-shaped tensor inside ``obj``.
* ``first_tensor(out)``: a module's output tensor (modules return a tensor or a tuple).

Shapes: B prompts, T padded tokens, Hq query heads, D head_dim, E hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batching import Batch, take_last
from .models import ModelSpec

__all__ = ["Recording", "record", "body_forward", "select_rows", "first_tensor"]


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

    def rows(self, index: torch.Tensor) -> "Recording":
        """The recording of rows ``index`` [N] only (e.g. the base half of a stacked run)."""
        B = self.logits.shape[0]
        pick = lambda xs: [None if x is None else select_rows(x, index, B) for x in xs]  # noqa: E731
        return Recording(select_rows(self.logits, index, B), pick(self.z), pick(self.attn_out), pick(self.resid_pre),
                         pick(self.block_kwargs))


def first_tensor(out):
    """``out`` itself, or its first element when a module returned a tuple/list."""
    return out[0] if isinstance(out, (tuple, list)) else out


def body_forward(spec: ModelSpec, batch: Batch, **kwargs):
    """The base model (no head) on a batch: final hidden states [B, T, E] (post final norm)."""
    out = spec.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else first_tensor(out)


def _add_hooks(handles: list, spec: ModelSpec, store: dict, keep, *, z, attn_out, resid_pre, block_kwargs) -> None:
    """Register the hooks that fill ``store[name][layer]``, appending each handle to ``handles``
    as it is made (so the caller removes every one, even if a later registration fails)."""
    for lspec in spec.layers:
        i = lspec.index
        if z:
            handles.append(lspec.o.module.register_forward_pre_hook(
                lambda m, args, i=i: store["z"].__setitem__(i, keep(args[0].detach()))))
        if attn_out:
            handles.append(lspec.attn.register_forward_hook(
                lambda m, args, out, i=i: store["attn_out"].__setitem__(i, keep(first_tensor(out).detach()))))
        if resid_pre or block_kwargs:
            def pre(m, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                if resid_pre:
                    store["resid_pre"][i] = keep(h.detach())
                if block_kwargs:  # some models (GPT-2) pass the mask positionally
                    store["block_kwargs"][i] = (tuple(args[1:]),
                                                {k: v for k, v in kwargs.items() if k != "hidden_states"})
            handles.append(lspec.block.register_forward_pre_hook(pre, with_kwargs=True))


@torch.no_grad()
def record(spec: ModelSpec, batch: Batch, *, z=True, attn_out=False, resid_pre=False,
           block_kwargs=False, last_only=False) -> Recording:
    """One forward pass recording the requested per-layer tensors."""
    L = spec.n_layers
    store = {"z": [None] * L, "attn_out": [None] * L, "resid_pre": [None] * L, "block_kwargs": [None] * L}
    keep = (lambda x: take_last(x, batch.last)) if last_only else (lambda x: x)
    handles = []
    try:
        _add_hooks(handles, spec, store, keep, z=z, attn_out=attn_out, resid_pre=resid_pre,
                   block_kwargs=block_kwargs)
        hidden = body_forward(spec, batch)
        logits = spec.lm_head(take_last(hidden, batch.last))
    finally:
        for h in handles:
            h.remove()
    return Recording(logits=logits, **store)


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
