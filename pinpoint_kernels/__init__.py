"""pinpoint_kernels: the ops behind pinpoint, with no knowledge of models or tasks.

* :func:`head_patched_attention` — causal attention over many variant rows with
  per-(row, head) patches, GQA, padding and shared K/V rows.
* :func:`head_slice_grad` / :func:`head_slice_apply` — weight gradients of, and updates
  to, only selected heads' slices of a projection.

* :func:`head_slice_linear` — a frozen projection whose selected head slices carry
  trainable deltas (the training path), with :class:`SliceIndex` built once per projection.

``reference`` holds the plain PyTorch definitions; backends (``_C`` on the CPU,
``triton``, ``_cuda``) are chosen per call, see :mod:`pinpoint_kernels.backends`. The ops
are registered with ``torch.library`` as ``pinpoint::*`` (:mod:`pinpoint_kernels.library`),
so ``torch.compile(fullgraph=True)``, fake/meta tensors and ``torch.library.opcheck`` see
them; the backend is chosen inside each op. Index values are read on the host only where
that is free (CPU tensors, Python lists, :class:`SliceIndex` construction) or with
``PINPOINT_DEBUG_CHECKS=1``; on a GPU the per-call path uses device-side asserts, so it
never synchronises with the host.
"""
from . import library, reference
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
    "library",
    "reference",
]
