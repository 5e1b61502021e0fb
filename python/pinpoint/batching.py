"""How token-id sequences become model inputs: one pad-id policy, one padding/collate helper,
one device policy, and one batching order.

* ``pad_id(tokenizer, model=None)``: the id written at padded positions.
* ``input_device(model_or_spec)``: where inputs go: the ``ModelSpec``'s ``device``, the
  execution device of the model's input embedding (accelerate's hook device when the model
  is dispatched with a ``device_map``).
* ``pad(seqs, value, side)``: [B, T] tensor and [B, T] mask of ragged rows.
* ``make_batch(seqs, pad_id=, side=, device=)`` -> ``Batch`` (ids, mask, positions, last);
  ``stack(a, b, pad_id)``: two batches as one (one forward for base and source prompts).
* ``collate(rows, pad_id, device)``: right-padded (ids, mask, labels) of (ids, labels) rows,
  labels padded with ``IGNORE`` (-100, cross-entropy's ignore index).
* ``length_batches(seqs, batch_size)``: index batches, longest first (least padding).
* ``take_last(x, last)``: each row's value at its last real token.

Shapes: B rows, T padded tokens. Positions always follow the real tokens (cumulative count of
real tokens), so left and right padding give what each row gives alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["IGNORE", "Batch", "stack", "pad_id", "input_device", "pad", "make_batch", "collate",
           "length_batches", "take_last"]

IGNORE = -100  # label of tokens that carry no loss (torch's cross_entropy ignore_index)


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

    def widen(self, T: int, pad_id: int) -> "Batch":
        """The same rows padded (on ``side``) to ``T >= self.T`` tokens; results do not change."""
        n = T - self.T
        if n < 0:
            raise ValueError(f"cannot widen a batch of {self.T} tokens to {T}")
        if n == 0:
            return self

        def grow(x: torch.Tensor, value: int) -> torch.Tensor:
            fill = torch.full((x.shape[0], n), value, dtype=x.dtype, device=x.device)
            return torch.cat([fill, x] if self.side == "left" else [x, fill], 1)

        last = self.last + n if self.side == "left" else self.last
        return Batch(grow(self.input_ids, pad_id), grow(self.attention_mask, 0), grow(self.position_ids, 0), last,
                     self.side)

    def rows(self, index: torch.Tensor) -> "Batch":
        """The sub-batch of rows ``index`` [N] (same width and padding side)."""
        return Batch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                     self.last[index], self.side)


def stack(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Rows of ``a`` then rows of ``b`` in one batch (same padding side; widened to the longer)."""
    if a.side != b.side:
        raise ValueError(f"cannot stack a {a.side}-padded batch with a {b.side}-padded one")
    T = max(a.T, b.T)
    a, b = a.widen(T, pad_id), b.widen(T, pad_id)
    return Batch(*(torch.cat([x, y]) for x, y in zip((a.input_ids, a.attention_mask, a.position_ids, a.last),
                                                    (b.input_ids, b.attention_mask, b.position_ids, b.last))),
                 a.side)


def pad_id(tokenizer=None, model=None) -> int:
    """The id written at padded positions: the first of the tokenizer's pad and eos ids, the
    model config's, then its generation config's; else 0. Padded positions are masked out,
    so any id in the vocabulary gives the same results; a real one is chosen for safety."""
    for src in (tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(src, name, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    return 0


def input_device(model) -> torch.device:
    """The device inputs go to: ``spec.device`` for a ``ModelSpec``, else the execution device
    of the model's input embedding (its first parameter's device as a fallback; CPU for a
    parameterless callable)."""
    from .models import ModelSpec, module_device

    if isinstance(model, ModelSpec):
        return model.device
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    if isinstance(emb, torch.nn.Module):
        return module_device(emb)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows as a [B, T] long tensor filled with ``value`` (T = longest row) and the
    [B, T] long mask of real entries (1)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty list of sequences")
    B, T = len(seqs), max(len(s) for s in seqs)
    out = torch.full((B, T), value, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        out[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def make_batch(seqs: Sequence[Sequence[int]], *, pad_id: int, side: str = "left", device=None) -> Batch:
    """A ``Batch`` of token-id rows padded on ``side``, on ``device``."""
    ids, mask = pad(seqs, pad_id, side)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    T = ids.shape[1]
    last = torch.full((len(seqs),), T - 1, dtype=torch.long) if side == "left" else mask.sum(1) - 1
    return Batch(ids.to(device), mask.to(device), pos.to(device), last.to(device), side)


def collate(rows, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T], labels [B, T]) of (ids, labels) rows,
    right-padded: ids with ``pad_id``, labels with ``IGNORE``."""
    for i, (x, y) in enumerate(rows):
        if len(y) > len(x):
            raise ValueError(f"row {i} has {len(y)} labels for {len(x)} tokens")
    ids, mask = pad([x for x, _ in rows], pad_id, "right")
    labels = torch.full_like(ids, IGNORE)
    for i, (_, y) in enumerate(rows):  # labels shorter than their ids: the rest carry no loss
        labels[i, :len(y)] = torch.as_tensor(list(y), dtype=torch.long)
    return ids.to(device), mask.to(device), labels.to(device)


def length_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``seqs`` in batches of ``batch_size``, longest first (ties in input order),
    so rows of one batch have similar lengths and little padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def take_last(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [B, ...] at each row's last real token."""
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]
