"""Which backend runs an op: discovery, ``PINPOINT_BACKEND`` and the dispatch order.

Order for a CUDA tensor: ``cuda`` (the _cuda extension) → ``triton`` → ``reference``.
Order for a CPU tensor: ``cpu`` (the _C extension) → ``reference``.
``PINPOINT_BACKEND=reference|cpu|triton|cuda`` (or ``backend=`` on a call) forces one; a
forced backend that cannot run the op on that device is an error, never a silent fallback.
Forcing ``triton`` for CPU tensors runs the Triton interpreter (``TRITON_INTERPRET=1``).

A missing extension or a missing Triton only narrows the choice: importing this package
never fails for lack of them.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def native_module(name: str) -> ModuleType | None:
    """``pinpoint_kernels._C`` or ``pinpoint_kernels._cuda``, or None if not built."""
    try:
        return importlib.import_module(f"pinpoint_kernels.{name}")
    except ImportError:
        return None


def native_import_error(name: str) -> str | None:
    """Why a native module does not import (for error messages), or None."""
    try:
        importlib.import_module(f"pinpoint_kernels.{name}")
    except ImportError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    # find_spec, not import: triton must first be imported after TRITON_INTERPRET is set,
    # or its helpers stay compiled and fail inside interpreted kernels.
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _backend_module(name: str) -> ModuleType:
    # Imported lazily: the triton kernels must see TRITON_INTERPRET before they are imported.
    return importlib.import_module(f"pinpoint_kernels.{name}")


def _usable(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on `device`, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors only, got a {device.type} tensor"
        if native_module("_C") is None:
            return f"pinpoint_kernels._C is not built ({native_import_error('_C')})"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got a {device.type} tensor"
        if native_module("_cuda") is None:
            return f"pinpoint_kernels._cuda is not built ({native_import_error('_cuda')})"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # the kernels use sm_80 tensor-core instructions
            return f"the cuda backend needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
        return None
    if name == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "1") != "1":
                return "triton on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
            return None
        if device.type != "cuda":
            return f"triton runs CUDA tensors (or CPU ones in the interpreter), got {device.type}"
        return None
    return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"


def forced_backend() -> str | None:
    value = os.environ.get("PINPOINT_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"PINPOINT_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


# Per-op limits of a backend, beyond the device: (op, backend) -> (limit, what).
LIMITS = {("head_patched_attention", "cuda"): (256, "head_dim")}


def resolve(op: str, device: torch.device, backend: str | None = None, **sizes):
    """The launcher for `op` on `device`: (backend name, callable). `sizes` (e.g.
    head_dim=...) rule out backends whose limits they exceed."""
    def why_not(name):
        why = _usable(name, device)
        limit = LIMITS.get((op, name))
        if why is None and limit is not None and sizes.get(limit[1], 0) > limit[0]:
            why = f"{limit[1]} {sizes[limit[1]]} exceeds its limit of {limit[0]}"
        return why

    forced = backend or forced_backend()
    if forced is not None:
        forced = forced.lower()
        why = why_not(forced)
        if why is not None:
            raise RuntimeError(f"backend {forced!r} cannot run {op}: {why}")
        if forced == "triton" and device.type == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
        fn = getattr(_backend_module(forced), op, None)
        if fn is None:
            raise RuntimeError(f"backend {forced!r} does not implement {op}")
        return forced, fn
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if why_not(name) is None:
            fn = getattr(_backend_module(name), op, None)
            if fn is not None:
                return name, fn
    raise RuntimeError(f"no backend can run {op} on {device}")  # unreachable: reference runs anywhere


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on `device` here, in dispatch order (forced ones aside)."""
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "triton", "reference")
    return [name for name in order if _usable(name, device) is None]
