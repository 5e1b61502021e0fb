"""``TuneConfig``: every hyper-parameter of a tuning run, validated where it is made.

``TuneConfig(...)`` checks each field on its own (the error names the field and what it
accepts); ``config.resolve(model, tokenizer)`` then checks what needs the model: the heads
(``"all"`` means full fine-tuning, ``"random"`` draws ``random_k`` heads with ``seed``), the
parts, and the default ``max_length`` (the model's context, capped by the tokenizer's).
``config.signature(...)`` is what a checkpoint must match to be resumed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .adapter import random_heads
from .heads import as_head_list
from .models import spec_for
from .slices import check_kv, normalize_parts

__all__ = ["TuneConfig"]


def _number(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        need = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} {need}, got {value!r}")


@dataclass(frozen=True)
class TuneConfig:
    """Hyper-parameters of :func:`pinpoint.tune` (see its docstring for each one's meaning).

    ``kv`` defaults to "whole": under GQA a KV head's k/v rows train only when every query head
    reading it is selected, so no unselected head's keys or values change ("group" and "none"
    as in :mod:`pinpoint.slices`). ``warmup_steps`` is ``warmup`` in steps (a fraction of
    ``steps`` when < 1).
    """

    heads: Any = None
    parts: Any = "qkvo"
    kv: str = "whole"
    bias: bool = True
    full: bool = False
    random_k: int | None = None
    lora_r: int | None = None
    lr: float = 3e-5
    steps: int = 120
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    decay_to: str = "base"
    warmup: float = 0.1
    schedule: str = "cosine"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    too_long: str = "truncate"
    dtype: torch.dtype | None = None
    seed: int = 0
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        _number("lr", self.lr)
        _number("steps", self.steps, integer=True)
        _number("batch_size", self.batch_size, integer=True)
        _number("grad_accum", self.grad_accum, integer=True)
        _number("weight_decay", self.weight_decay, allow_zero=True)
        if self.grad_accum > self.batch_size:
            raise ValueError(f"grad_accum={self.grad_accum} splits a batch of {self.batch_size} dialogues into "
                             "more micro-batches than it has dialogues")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if self.decay_to not in ("base", "zero"):
            raise ValueError(f"decay_to must be 'base' (decay the deltas) or 'zero' (decay the whole selected "
                             f"slices, like the paper), got {self.decay_to!r}")
        w = self.warmup
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"warmup must be a number ≥ 0 (steps, or a fraction of steps if < 1), got {w!r}")
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm)
        if self.checkpoint_every is not None:
            _number("checkpoint_every", self.checkpoint_every, integer=True)
        if self.max_length is not None:
            _number("max_length", self.max_length, integer=True)
        if not self.full:
            check_kv(self.kv)
        if self.lora_r is not None:
            _number("lora_r", self.lora_r, integer=True)
            if self.full:
                raise ValueError("lora_r trains LoRA factors, full=True trains every weight: pass one of them")
            if self.decay_to == "zero" and self.weight_decay > 0:
                raise ValueError("decay_to='zero' decays head slices; LoRA factors decay towards the base model "
                                 "(decay_to='base')")
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__}")
        if len(tuple(self.betas)) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        _number("eps", self.eps)

    @property
    def warmup_steps(self) -> int:
        steps = int(math.ceil(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)
        return min(steps, self.steps)

    def resolve(self, model, tokenizer=None) -> "TuneConfig":
        """This config with ``heads`` as sorted (layer, head) pairs (or "all" with ``full=True``),
        ``parts`` canonical, and ``max_length`` and ``checkpoint_every`` filled in."""
        spec = spec_for(model)
        heads, full, parts = self.heads, bool(self.full), self.parts
        if self.lora_r is not None:  # LoRA on every q/k/v/o projection: no heads to choose
            if heads not in (None, "lora"):
                raise ValueError("lora_r trains every attention projection; do not also pass heads")
            return self._filled(model, tokenizer, heads="lora", full=False, parts=f"lora{self.lora_r}")
        if isinstance(heads, str):
            if heads == "all":
                full = True
            elif heads == "random":
                if self.random_k is None:
                    raise ValueError("heads='random' needs random_k (how many heads to draw)")
                heads = random_heads(model, self.random_k, seed=self.seed)
            else:
                raise ValueError(f"heads must be a HeadSet, an iterable of (layer, head) pairs, 'all' or 'random', "
                                 f"got {heads!r}")
        if full:
            if heads not in (None, "all"):
                raise ValueError("full=True trains every parameter; do not also pass heads")
            heads, parts = "all", "all"
        else:
            if heads is None:
                raise ValueError("tune needs heads= (a HeadSet or (layer, head) pairs), or heads='all' / "
                                 "full=True for the SFT baseline")
            heads = tuple(as_head_list(heads, n_layers=spec.n_layers, n_heads=spec.n_heads, sort=True))
            parts = normalize_parts(parts)
        return self._filled(model, tokenizer, heads=heads, full=full, parts=parts)

    def _filled(self, model, tokenizer, **resolved) -> "TuneConfig":
        """``resolved`` plus the default ``max_length`` (the model's context, capped by the
        tokenizer's) and ``checkpoint_every``."""
        spec = spec_for(model)
        max_length = self.max_length
        if max_length is None:
            max_length = spec.max_seq_len
            tml = getattr(tokenizer, "model_max_length", None)
            if isinstance(tml, int) and 0 < tml < 10**8:
                max_length = min(max_length, tml)
            _number("max_length", max_length, integer=True)
        every = self.checkpoint_every if self.checkpoint_every is not None else max(1, self.steps // 10)
        return replace(self, **resolved, max_length=max_length, checkpoint_every=every)

    def signature(self, *, data: str, model_class: str, compute_dtype: torch.dtype) -> dict:
        """What identifies a run for resuming (of a resolved config): hyper-parameters, heads,
        the data's hash and the model class. ``grad_accum`` and ``checkpoint_every`` change
        memory and files, not the maths, so they are left out."""
        d = asdict(self)
        lora = {} if self.lora_r is None else {"lora_r": self.lora_r}  # absent otherwise: old checkpoints resume
        return {
            **lora, "full": self.full,
            "heads": self.heads if (self.full or self.lora_r is not None) else [list(h) for h in self.heads],
            "parts": self.parts, "kv": self.kv, "bias": self.bias, "lr": float(self.lr), "steps": self.steps,
            "batch_size": self.batch_size, "weight_decay": float(self.weight_decay), "decay_to": self.decay_to,
            "warmup": self.warmup_steps, "schedule": self.schedule, "betas": [float(b) for b in d["betas"]],
            "eps": float(self.eps),
            "max_grad_norm": None if self.max_grad_norm is None else float(self.max_grad_norm),
            "max_length": self.max_length, "dtype": str(compute_dtype), "seed": self.seed, "data": data,
            "model_class": model_class,
        }
