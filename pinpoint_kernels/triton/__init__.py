"""Triton backend: the same three launchers as :mod:`pinpoint_kernels.cpu`.

Kernels live next to their launchers (attention.py, head_slice.py). Triton decides at
decoration time whether a kernel is compiled for the GPU or run by the interpreter, so
``TRITON_INTERPRET=1`` must be set before this package is first imported for the kernels
to run on CPU tensors (``backend='triton'`` on a CPU tensor sets it before importing).
On a machine without CUDA the interpreter is the only way these kernels can run, so it
is selected by default there.
"""
from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from .attention import head_patched_attention  # noqa: E402
from .head_slice import head_slice_apply, head_slice_grad  # noqa: E402

__all__ = ["head_patched_attention", "head_slice_apply", "head_slice_grad"]
