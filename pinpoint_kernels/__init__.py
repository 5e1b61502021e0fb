"""pinpoint_kernels: the ops behind pinpoint, with no knowledge of models or tasks.

* :func:`head_patched_attention` — causal attention over many variant rows with
  per-(row, head) patches, GQA, padding and shared K/V rows.
* :func:`head_slice_grad` / :func:`head_slice_apply` — weight gradients of, and updates
  to, only selected heads' slices of a projection.

``reference`` holds the plain PyTorch definitions; backends (``_C`` on the CPU,
``triton``, ``_cuda``) are chosen per call, see :mod:`pinpoint_kernels.backends`.
"""
from . import reference
from .attention import head_patched_attention
from .backends import BACKENDS, available_backends
from .head_slice import head_slice_apply, head_slice_grad
from .head_slice_linear import SliceIndex, head_slice_linear

__all__ = [
    "BACKENDS",
    "SliceIndex",
    "available_backends",
    "head_patched_attention",
    "head_slice_apply",
    "head_slice_grad",
    "head_slice_linear",
    "reference",
]
