"""Helpers shared by the Triton kernels and launchers.

Import-order robustness: Triton picks compiled vs interpreted mode for every @triton.jit
function when it is decorated, including the ones inside ``triton.language`` itself
(``tl.zeros``, ``tl.cdiv``, ``tl.max``, ``tl.sum``, ...). If ``triton`` was imported before
``TRITON_INTERPRET=1`` was set, those stay compiled-mode functions, and calling one from an
interpreted kernel fails ("Cannot call @triton.jit'd outside of the scope of a kernel").
So the kernels here use builtins only (``tl.full``, integer ``//`` for cdiv) and reduce with
``tl.reduce`` and the standard combine functions below: the interpreter recognises those
by identity and runs them as numpy reductions without ever calling them, and the compiler
inlines them exactly as ``tl.max`` / ``tl.sum`` do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Row reductions that work whatever the import order (see above).
row_max = getattr(tl.standard, "_elementwise_max", None)
row_sum = getattr(tl.standard, "_sum_combine", None)
if row_max is None or row_sum is None:  # pragma: no cover - a Triton that renamed them
    @triton.jit
    def row_max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def row_sum(a, b):
        return a + b


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (the CPU interpreter)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(op: str, kernel, device: torch.device) -> None:
    """A clear error instead of a crash when tensors and the kernel mode do not match."""
    if device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            f"triton {op}: got CPU tensors but pinpoint_kernels.triton was imported without "
            "TRITON_INTERPRET=1, so its kernels were compiled for the GPU; set TRITON_INTERPRET=1 "
            "before the first import (backend='triton' does this for you)")


def block(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, clamped to [lo, hi] (tl.dot needs every dim >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@triton.jit
def cast_out(x, dtype: tl.constexpr, BF16_BITS: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, as the GPU converts.

    The interpreter's own fp32 -> bfloat16 cast truncates (``_convert_float`` without a
    rounding mode), so there BF16_BITS=True rounds by hand on the fp32 bit pattern:
    add 0x7FFF plus the lowest kept bit (ties to even), keep the high 16 bits. Launchers
    set it only when interpreting with a bfloat16 target; compiled kernels use ``.to``.
    """
    if BF16_BITS:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y
