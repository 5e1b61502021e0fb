"""``LoraTuning``: the LoRA baseline (through ``peft``), trained by the same ``Trainer`` as SPT.

``tune(..., lora_r=8)`` wraps every attention projection (q, k, v and o of every layer, as
:func:`pinpoint.models.spec_for` finds them) in a ``peft`` LoRA layer of rank ``r`` and trains
only the LoRA factors: for a projection ``W: [out, in]`` the update is
``ΔW = (alpha / r) · B @ A`` with ``A: [r, in]`` (Kaiming-uniform, drawn from ``seed``) and
``B: [out, r]`` (zeros), so training starts from the original model. ``alpha = 2 r``
(``LORA_ALPHA_PER_RANK``), the common choice; the learning-rate rule absorbs the scale. No
dropout (the other methods have none). The number of trained elements is therefore
``r · Σ (in + out)`` over the 4 · n_layers projections.

``peft`` is an optional extra: it is imported only when a LoRA run is made, and its absence is
a clear error naming ``pip install peft``. ``LoraTuning`` has the surface the ``Trainer`` and
the demo use: ``model``, ``parameters()``, ``num_trainable()``, ``state_dict()`` /
``load_state_dict()``, ``fingerprint()``, ``history``, ``merge()`` (the plain model with
``W + ΔW`` folded in) and ``detach()`` (the original model, weights and requires_grad flags as
before). Checkpoints and ``resume=True`` work as for SPT.
"""
from __future__ import annotations

import torch
from torch import nn

from .fingerprint import weights_fingerprint

__all__ = ["LoraTuning", "LORA_ALPHA_PER_RANK", "lora_targets", "require_peft"]

LORA_ALPHA_PER_RANK = 2


def require_peft():
    """The ``peft`` module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("the LoRA baseline needs the optional package peft: pip install peft") from e
    return peft


def lora_targets(model: nn.Module) -> list[str]:
    """Full module names of the q, k, v and o projections of every layer (fused projections once)."""
    from .models import spec_for

    names = {id(m): n for n, m in model.named_modules()}
    out: list[str] = []
    for layer in spec_for(model).layers:
        for proj in (layer.q, layer.k, layer.v, layer.o):
            name = names[id(proj.module)]
            if name not in out:
                out.append(name)
    return out


class LoraTuning:
    """LoRA factors of rank ``r`` on every attention projection of ``model`` (see the module docstring)."""

    heads = "lora"

    def __init__(self, model: nn.Module, r: int, *, seed: int = 0, alpha: float | None = None):
        peft = require_peft()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"lora_r must be an int > 0, got {r!r}")
        self.r, self.alpha = r, float(alpha if alpha is not None else LORA_ALPHA_PER_RANK * r)
        self.parts = f"lora{r}"
        self.history: list[dict] = []
        self.state = "attached"
        self._model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        # of the base weights, before peft renames them (q_proj.weight -> q_proj.base_layer.weight)
        # and adds the factors, so a checkpoint's fingerprint matches a freshly wrapped model's
        self._fingerprint = weights_fingerprint(model)
        config = peft.LoraConfig(r=r, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                                 target_modules=lora_targets(model))
        with torch.random.fork_rng(devices=[]):  # A's random init: a function of seed only
            torch.manual_seed(seed)
            self._lora = peft.LoraModel(model, config, "default")
        self._named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        for _, p in self._named:
            p.requires_grad_(True)

    @property
    def model(self) -> nn.Module:
        return self._model

    def parameters(self):
        return iter([p for _, p in self._named])

    def named_parameters(self):
        return iter(self._named)

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self._named)

    def state_dict(self) -> dict:
        return {n: p.detach() for n, p in self._named}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        for n, p in self._named:
            p.copy_(sd[n])

    def fingerprint(self) -> str:
        """Fingerprint of the base weights, taken before the LoRA layers were added."""
        return self._fingerprint

    def _restore_flags(self) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def merge(self) -> nn.Module:
        """Fold ``(alpha / r) · B @ A`` into each projection and return the plain model."""
        if self.state != "attached":
            raise RuntimeError(f"cannot merge: the LoRA adapter is already {self.state}")
        with torch.no_grad():
            self._lora.merge_and_unload()
        self._restore_flags()
        self.state = "merged"
        return self._model

    def detach(self) -> nn.Module:
        """Remove the LoRA layers; the model is exactly as it was given."""
        if self.state != "attached":
            raise RuntimeError(f"cannot detach: the LoRA adapter is already {self.state}")
        self._lora.unload()
        self._restore_flags()
        self.state = "detached"
        return self._model

    def __repr__(self) -> str:
        return f"LoraTuning(r={self.r}, alpha={self.alpha:g}, trainable={self.num_trainable():,}, state={self.state!r})"
