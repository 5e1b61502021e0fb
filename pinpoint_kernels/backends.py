"""Which backend runs an op: discovery, ``PINPOINT_BACKEND`` and the dispatch order.

Order for a CUDA tensor: ``cuda`` (the _cuda extension) → ``triton`` → ``reference``.
Order for a CPU tensor: ``cpu`` (the _C extension) → ``reference``.
``PINPOINT_BACKEND=reference|cpu|triton|cuda`` (or ``backend=`` on a call) forces one; a
forced backend that cannot run the op on that device is an error, never a silent fallback.
Forcing ``triton`` for CPU tensors runs the Triton interpreter (``TRITON_INTERPRET=1``).

A missing extension or a missing Triton only narrows the choice: importing this package
never fails for lack of them.

Self-check: a kernel that has never run in this process is not trusted blindly. Before a
backend's first use for an (op, backend, dtype, device kind, head_dim) combination, it runs
one tiny case (:mod:`pinpoint_kernels.self_check`) against the reference. A failure (wrong
values or an exception) gives one :class:`SelfCheckWarning` and that backend is skipped for
the combination for the rest of the process; a forced backend that fails raises instead.
``PINPOINT_SELF_CHECK=0`` skips the checks. The reference needs none. The check is skipped
(and retried at the next call) where it cannot run real tensors: meta tensors, a CUDA device
without a driver, CUDA-graph capture, and code that dynamo is tracing; under a FakeTensor
mode (e.g. a custom op's fake kernel during torch.compile) it leaves the mode and runs on
real tensors, once, at trace time.
"""
from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings
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


# Per-op limits of a backend, beyond the device: (op, backend) -> (limit, what, why).
LIMITS = {("head_patched_attention", "cuda"): (256, "head_dim", "the CUDA kernels support head_dim 1..256; "
                                                                "use backend='triton' or 'reference'")}


def _launcher(name: str, op: str, device: torch.device):
    """Backend `name`'s launcher for `op` (None if it has none). Forcing triton on CPU
    tensors selects the interpreter, which must be set before pinpoint_kernels.triton loads."""
    if name == "triton" and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    return getattr(_backend_module(name), op, None)


def resolve(op: str, device: torch.device, backend: str | None = None, **sizes):
    """The launcher for `op` on `device`: (backend name, callable).

    `sizes` (e.g. head_dim=...) rule out backends whose limits they exceed; ``dtype=`` (the
    op's main tensor dtype) narrows the self-check to that dtype (without it, all three float
    dtypes are checked). Before a backend's first use for a combination it passes a
    self-check (see :func:`self_check_error`): in the dispatch order a failing backend is
    skipped with one warning; a forced backend (``backend=`` or PINPOINT_BACKEND) that fails
    raises instead of silently running another one.
    """
    dtype = sizes.pop("dtype", None)

    def why_not(name):
        why = _usable(name, device)
        limit = LIMITS.get((op, name))
        if why is None and limit is not None and sizes.get(limit[1], 0) > limit[0]:
            why = f"{limit[1]} {sizes[limit[1]]} exceeds its limit of {limit[0]} ({limit[2]})"
        return why

    forced = backend or forced_backend()
    if forced is not None:
        forced = forced.lower()
        why = why_not(forced)
        if why is not None:
            raise RuntimeError(f"backend {forced!r} cannot run {op}: {why}")
        fn = _launcher(forced, op, device)
        if fn is None:
            raise RuntimeError(f"backend {forced!r} does not implement {op}")
        err = self_check_error(op, forced, fn, device, dtype, sizes.get("head_dim"))
        if err is not None:
            raise RuntimeError(f"backend {forced!r} failed its self-check for {op} on {device.type} "
                               f"tensors ({err}); it was forced by backend= or PINPOINT_BACKEND, so "
                               "pinpoint will not run another backend in its place. Force another "
                               "backend, or unset it to fall back automatically.")
        return forced, fn
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for i, name in enumerate(order):
        fn = _launcher(name, op, device) if why_not(name) is None else None
        if fn is None:
            continue
        err = self_check_error(op, name, fn, device, dtype, sizes.get("head_dim"))
        if err is None:
            return name, fn
        _warn_once((op, name, device.type, dtype),
                   f"pinpoint_kernels: backend {name!r} failed its self-check for {op} on "
                   f"{device.type} tensors ({err}); falling back to {', then '.join(order[i + 1:])} "
                   "for the rest of this process. Please report this; PINPOINT_SELF_CHECK=0 skips "
                   "the check.")
    raise RuntimeError(f"no backend can run {op} on {device}")  # unreachable: reference runs anywhere


class SelfCheckWarning(RuntimeWarning):
    """A backend failed its self-check and pinpoint fell back to the next backend."""


_CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHECKS: dict[tuple, str | None] = {}  # combination -> None (passed) or the failure
_WARNED: set[tuple] = set()
_CHECK_LOCK = threading.RLock()  # RLock: a launcher that re-enters resolve cannot deadlock


def self_check_enabled() -> bool:
    return os.environ.get("PINPOINT_SELF_CHECK", "1").strip() != "0"


def _can_check(device: torch.device) -> bool:
    """Whether a check can run real tensors on `device` now (else it waits for a later call)."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()
    return True


def _run_check(op: str, fn, device: torch.device, dtype: torch.dtype, head_dim) -> str | None:
    from torch.utils._python_dispatch import _disable_current_modes

    from . import self_check

    try:
        with _disable_current_modes():  # FakeTensor / proxy modes: the check needs real tensors
            self_check.run(op, fn, device, dtype, head_dim)
    except Exception as exc:  # any fault, wrong value or crash, disqualifies the backend
        text = " ".join(str(exc).split())
        return f"{str(dtype).replace('torch.', '')}: {type(exc).__name__}: {text[:400]}"
    return None


def self_check_error(op: str, name: str, fn, device: torch.device, dtype: torch.dtype | None = None,
                     head_dim: int | None = None) -> str | None:
    """None if backend `name` may run `op` on `device` (its check passed, was skipped, or is
    not needed), else why not. The check runs at most once per (op, backend, dtype, device
    kind, head_dim) per process; without a known dtype, every float dtype must pass."""
    if name == "reference" or not self_check_enabled():
        return None
    if dtype not in _CHECK_DTYPES:
        for dt in _CHECK_DTYPES:
            err = self_check_error(op, name, fn, device, dt, head_dim)
            if err is not None:
                return err
        return None
    key = (op, name, dtype, device.type, head_dim)
    if key in _CHECKS:  # the per-call path: one dict lookup
        return _CHECKS[key]
    if not _can_check(device):
        return None
    with _CHECK_LOCK:
        if key not in _CHECKS:
            _CHECKS[key] = _run_check(op, fn, device, dtype, head_dim)
        return _CHECKS[key]


def _warn_once(key: tuple, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, SelfCheckWarning, stacklevel=4)


def self_check_results() -> dict[tuple, str | None]:
    """{(op, backend, dtype, device kind, head_dim): None if passed else the failure}."""
    return dict(_CHECKS)


def reset_self_checks() -> None:
    """Forget every check result and warning (tests; or after replacing a backend)."""
    with _CHECK_LOCK:
        _CHECKS.clear()
        _WARNED.clear()


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on `device` here, in dispatch order (forced ones aside)."""
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "triton", "reference")
    return [name for name in order if _usable(name, device) is None]
