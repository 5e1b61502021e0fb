"""Save and restore a module's train/eval mode and its parameters' ``requires_grad``.

* ``train_mode(*models, mode=True)``: every module in train (or eval) mode for the block;
  afterwards each submodule's own ``training`` flag is restored (not just the root's).
* ``eval_mode(*models)``: ``train_mode(..., mode=False)``.
* ``frozen(*models)``: every parameter ``requires_grad=False`` for the block; each flag
  restored afterwards.
* ``inference(*models, grads=False)``: eval mode, frozen parameters and
  ``torch.set_grad_enabled(grads)`` (``grads=True`` keeps autograd on for gradients with
  respect to activations, as attribution patching needs).

Objects without ``train``/``parameters`` (a callable that is not an ``nn.Module``) are skipped.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["train_mode", "eval_mode", "frozen", "inference"]


def _modules(models):
    return [m for m in models if m is not None and hasattr(m, "modules") and hasattr(m, "train")]


@contextlib.contextmanager
def train_mode(*models, mode: bool = True):
    mods = _modules(models)
    flags = [(sub, sub.training) for m in mods for sub in m.modules()]
    try:
        for m in mods:
            m.train(mode)
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def eval_mode(*models):
    return train_mode(*models, mode=False)


@contextlib.contextmanager
def frozen(*models):
    flags = [(p, p.requires_grad) for m in _modules(models) for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def inference(*models, grads: bool = False):
    with eval_mode(*models), frozen(*models), torch.set_grad_enabled(grads):
        yield
