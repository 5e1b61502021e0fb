"""Installing and removing a module's patched computation, without discarding accelerate's hooks.

A patch replaces what a q/k/v/o module computes, ``fn(module, x)``, while the module keeps
its class, parameters and hooks. Where the replacement goes:

* a plain module: its instance ``forward`` (``module.__dict__["forward"]``), bound to it, so
  ``nn.Module.__call__`` and every registered forward (pre-)hook still run around it;
* a module dispatched by accelerate (``device_map``/offload: it has ``_hf_hook`` and
  ``_old_forward``): accelerate's wrapper stays as ``forward`` and the patch replaces
  ``_old_forward``, the original forward that the wrapper calls after ``pre_forward`` has
  moved the weights onto the execution device. So offloaded weights are materialised before
  the patch reads ``module.weight``, and ``post_forward`` still runs after it.

``uninstall`` puts back exactly what was there (or removes the instance attribute), so a
detached model's modules are as they were. ``is_patched`` tells whether a module carries a
pinpoint patch in either place.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

__all__ = ["Installed", "install", "is_patched", "uninstall"]

_MARK = "_pinpoint_patch"


def _slot(module: nn.Module) -> str:
    d = module.__dict__
    return "_old_forward" if "_hf_hook" in d and "_old_forward" in d else "forward"


@dataclass
class Installed:
    """Where a patch went on ``module`` (``slot``) and what it replaced (``saved``: the
    instance attribute that was there, or None when the class's forward was in use)."""

    module: nn.Module
    slot: str
    saved: Any


def is_patched(module: nn.Module) -> bool:
    return any(getattr(module.__dict__.get(s), _MARK, False) for s in ("forward", "_old_forward"))


def install(module: nn.Module, fn: Callable) -> Installed:
    """Make ``module`` compute ``fn(module, *args, **kwargs)`` instead of its own forward."""
    if is_patched(module):
        raise RuntimeError(f"{type(module).__name__} already carries a pinpoint patch")
    slot = _slot(module)
    saved = module.__dict__.get(slot)
    bound = types.MethodType(fn, module)
    setattr(bound.__func__, _MARK, True)
    # A deepcopy of the model rebinds this to the copy's module (weights included) but the
    # copy still reads the same deltas: merge or detach before copying a model.
    object.__setattr__(module, slot, bound)
    return Installed(module, slot, saved)


def uninstall(record: Installed) -> None:
    """Undo :func:`install`: the module computes what it computed before."""
    module, slot = record.module, record.slot
    if record.saved is not None:
        object.__setattr__(module, slot, record.saved)
    else:
        module.__dict__.pop(slot, None)
