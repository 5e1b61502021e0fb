"""Input checks shared by the public ops: one clear error per mistake, raised before any
backend runs, so no kernel ever sees a malformed call."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# Codes the native backends understand (csrc/cpu/dtypes.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def tensor(op: str, name: str, x, *, ndim: int | tuple[int, ...], shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in ndims:
        raise ValueError(f"{op}: {name} must be {ndims[0]}-D {shape_doc}, got shape {tuple(x.shape)}")
    return x


def float_dtype(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def bool_dtype(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor, got {x.dtype}")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; "
                             "move them to one device")


def debug_checks() -> bool:
    """``PINPOINT_DEBUG_CHECKS=1``: check index values on the host everywhere (precise errors,
    at the cost of a device sync per call on an accelerator)."""
    return os.environ.get("PINPOINT_DEBUG_CHECKS", "").strip() == "1"


def values_on_host(x: torch.Tensor) -> bool:
    """Whether reading `x`'s values costs no device sync: it lives on the CPU."""
    return x.device.type == "cpu"


def _has_values(x: torch.Tensor) -> bool:
    """False for tensors whose values cannot be read: meta, FakeTensor and other subclasses
    (e.g. functional tensors), and anything while torch.compile traces."""
    return type(x) is torch.Tensor and not x.is_meta and not torch.compiler.is_compiling()


def _first_bad_in_list(op: str, name: str, values: list[int], upper: int, what: str, distinct: bool) -> None:
    for i, v in enumerate(values):
        if not 0 <= v < upper:
            raise ValueError(f"{op}: {name}[{i}] = {v} is out of range for {upper} {what}")
    if distinct and len(set(values)) != len(values):
        raise ValueError(f"{op}: {name} must be distinct, got {values}")


def check_index_values(op: str, name: str, idx: torch.Tensor, *, upper: int, what: str,
                       distinct: bool = False, on_host: bool = False) -> None:
    """Values of a 1-D int index tensor: in [0, upper), and pairwise distinct if asked.

    Reading values on the host is a device sync on an accelerator, so the check is on the
    host (a precise ValueError naming the first bad entry) only where that is free (CPU
    tensors, see :func:`values_on_host`) or in debug mode (:func:`debug_checks`). Otherwise
    it queues device-side asserts (``torch._assert_async``): no round trip, and a bad value
    still stops the stream with an error instead of an out-of-bounds read in a kernel.
    ``on_host=True`` always checks on the host: for one-time index construction. A tensor
    without values (traced by ``torch.compile``, fake, meta) gets only the device-side asserts."""
    if idx.numel() == 0:
        return
    if (on_host or debug_checks() or values_on_host(idx)) and _has_values(idx):
        _first_bad_in_list(op, name, idx.tolist(), upper, what, distinct)
        return
    torch._assert_async(((idx >= 0) & (idx < upper)).all(),
                        f"{op}: {name} has a value out of range for {upper} {what}")
    if distinct and idx.numel() > 1:
        s = torch.sort(idx).values
        torch._assert_async((s[1:] != s[:-1]).all(), f"{op}: {name} must be distinct")


def index_vector(op: str, name: str, x, *, length: int | None, upper: int, what: str,
                 device: torch.device, distinct: bool = False, on_host: bool = False) -> torch.Tensor:
    """A 1-D int64 index tensor on `device` with values in [0, upper) (distinct if asked).

    A Python sequence is checked in Python before it becomes a tensor (free); a tensor's
    values are checked by :func:`check_index_values` (host or device side)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be an int32/int64 tensor, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but the data is on {device}")
        idx = x
    elif isinstance(x, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        values = list(x)
        _first_bad_in_list(op, name, values, upper, what, distinct)
        idx = torch.tensor(values, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"{op}: {name} must be an int tensor or a sequence of ints, got {type(x).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(idx.shape)}")
    if length is not None and idx.numel() != length:
        raise ValueError(f"{op}: {name} has {idx.numel()} entries, expected {length}")
    if isinstance(x, torch.Tensor):
        check_index_values(op, name, idx, upper=upper, what=what, distinct=distinct, on_host=on_host)
    return idx.to(torch.int64).contiguous()


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with stride 1; copy only when it is not."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def data_ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def attention_native_args(q, k, v, head_mask, patch, *, kv_index, patch_index, key_padding_mask,
                          scale, causal) -> tuple[torch.Tensor, list]:
    """(out, args) for the native attention bindings (_C and _cuda): the output tensor and the
    leading arguments both take; they differ only in the trailing execution arguments."""
    R, Tq, Hq, D = q.shape
    Rk, Tk, Hkv, _ = k.shape
    out = torch.empty(R, Tq, Hq * D, dtype=q.dtype, device=q.device)
    args = [
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), DTYPE_CODES[q.dtype],
        [R, Rk, Tq, Tk, Hq, Hkv, D],
        list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]),
        kv_index.data_ptr(), data_ptr(head_mask), data_ptr(key_padding_mask),
        data_ptr(patch), DTYPE_CODES[patch.dtype] if patch is not None else 0,
        list(patch.stride()) if patch is not None else [],
        data_ptr(patch_index if patch is not None else None),
        scale, causal,
    ]
    return out, args
