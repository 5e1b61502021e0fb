"""``FullTuning``: the SFT baseline's handle (every parameter trains), with fp32 master weights.

AdamW on bf16/fp16 parameters loses every update smaller than half a unit in the last place
of the weight (bf16 keeps 8 bits: an update below ~0.4 % of the weight vanishes), so a
low-learning-rate SFT run on a bf16 model would barely move and be an unfair baseline. When
any parameter is not fp32, ``FullTuning`` keeps an fp32 master copy of every parameter: the
forward and backward run on the model's own (low-precision) weights, the optimizer steps
the masters (``parameters()`` yields them), and each step's result is rounded back into
the model (``after_step``). fp32 models train their parameters directly, as before.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["FullTuning"]


class FullTuning:
    """What ``tune(..., full=True)`` returns: every parameter was trained in place.

    Same surface as :class:`~pinpoint.adapter.PinpointAdapter` where it makes sense:
    ``parameters()`` (the fp32 masters when the model is not fp32), ``merge()`` (returns the
    model, restoring the requires_grad flags), ``save(dir)`` (``save_pretrained``),
    ``history``, ``heads == "all"``. ``detach()`` is impossible: the weights themselves were
    trained; keep a copy of the base model to compare against. ``masters``: name -> fp32
    master parameter, or None for an fp32 model.
    """

    heads = "all"
    parts = "all"

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = "attached"
        self.history: list[dict] = []
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(True)
        self._named = list(model.named_parameters())  # tied weights once, as parameters() yields them
        self.masters: dict[str, nn.Parameter] | None = None
        if any(p.dtype != torch.float32 for _, p in self._named):
            self.masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in self._named}

    def parameters(self):
        if self.masters is not None:
            return iter(self.masters.values())
        return iter([p for p, _ in self._flags])

    def named_parameters(self):
        return self.model.named_parameters()

    def num_trainable(self) -> int:
        return sum(p.numel() for p, _ in self._flags)

    @torch.no_grad()
    def before_step(self) -> None:
        """Hand the model's gradients to the fp32 masters (a no-op for an fp32 model)."""
        if self.masters is None:
            return
        for n, p in self._named:
            self.masters[n].grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        """Round the stepped masters back into the model's weights (one rounding per step)."""
        if self.masters is None:
            return
        for n, p in self._named:
            p.copy_(self.masters[n])

    def state_dict(self):
        if self.masters is not None:
            return {n: m.detach() for n, m in self.masters.items()}
        return self.model.state_dict()

    def load_state_dict(self, sd):
        if self.masters is None:
            return self.model.load_state_dict(sd)
        with torch.no_grad():
            for n, m in self.masters.items():
                m.copy_(sd[n])
        self.after_step()
        return None

    def merge(self) -> nn.Module:
        if self.state == "attached":
            for p, flag in self._flags:
                p.requires_grad_(flag)
            self.masters = None
            self.state = "merged"
        return self.model

    def detach(self):
        raise RuntimeError("full fine-tuning trained the model's own weights in place; there is nothing to "
                           "detach. Keep a copy of the base model to compare against.")

    def save(self, directory) -> Path:
        self.model.save_pretrained(directory)
        return Path(directory)

    def __repr__(self) -> str:
        return f"FullTuning(model={type(self.model).__name__}, trainable={self.num_trainable():,})"
