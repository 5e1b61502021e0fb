"""Input checks shared by the public ops: one clear error per mistake, raised before any
backend runs, so no kernel ever sees a malformed call."""
from __future__ import annotations

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


def index_vector(op: str, name: str, x, *, length: int | None, upper: int, what: str,
                 device: torch.device) -> torch.Tensor:
    """A 1-D int64 index tensor on `device` with values in [0, upper)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be an int32/int64 tensor, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but the data is on {device}")
        idx = x
    elif isinstance(x, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        idx = torch.tensor(list(x), dtype=torch.int64, device=device)
    else:
        raise TypeError(f"{op}: {name} must be an int tensor or a sequence of ints, got {type(x).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(idx.shape)}")
    if length is not None and idx.numel() != length:
        raise ValueError(f"{op}: {name} has {idx.numel()} entries, expected {length}")
    if idx.numel():
        bad = ((idx < 0) | (idx >= upper)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{op}: {name}[{i}] = {int(idx[i])} is out of range for {upper} {what}")
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
