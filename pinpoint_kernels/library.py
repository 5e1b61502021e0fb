"""pinpoint's ops as ``torch.library`` custom ops (namespace ``pinpoint``).

Registering them makes them visible to ``torch.compile`` (one opaque node each, so
``fullgraph=True`` works), to fake/meta tensors (``register_fake`` gives output shapes
without running a kernel) and to ``torch.library.opcheck``:

* ``pinpoint::head_patched_attention`` — fused head-patched attention; autograd through
  :func:`pinpoint_kernels.reference.head_patched_attention_vjp`.
* ``pinpoint::head_slice_grad`` — sparse head-slice weight gradients; autograd through
  :func:`pinpoint_kernels.reference.head_slice_grad_vjp`.
* ``pinpoint::head_slice_apply`` — in-place slice merge (``mutates_args=("weight",)``).
* ``pinpoint::head_slice_linear`` — a frozen projection with trainable slice deltas;
  its backward calls ``pinpoint::head_slice_linear_input_grad`` and ``head_slice_grad``.

The ops take already validated, normalised arguments (the public functions in
attention.py, head_slice.py and head_slice_linear.py check inputs once and call them).
Backend choice (:func:`pinpoint_kernels.backends.resolve`, with its first-use self-check)
happens inside each op, at run time, so a compiled graph still dispatches to
``_C``/``_cuda``/Triton/reference.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from . import backends, reference
from .validation import unit_last_stride

NAMESPACE = "pinpoint"


def _op(name: str, mutates_args=()):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)


# ---- head_patched_attention ---------------------------------------------------------------

def _attention(q: Tensor, k: Tensor, v: Tensor, head_mask: Optional[Tensor], patch: Optional[Tensor],
               kv_index: Tensor, patch_index: Optional[Tensor], key_padding_mask: Optional[Tensor],
               scale: float, causal: bool, backend: Optional[str]) -> Tensor:
    """q [R, Tq, Hq, D]; k, v [Rk, Tk, Hkv, D]; kv_index int64 [R] -> [R, Tq, Hq*D]."""
    R, Tq, Hq, D = q.shape
    _, fn = backends.resolve("head_patched_attention", q.device, backend, head_dim=D)
    if q.numel() == 0:
        return q.new_zeros(R, Tq, Hq * D)
    return fn(q, k, v, head_mask, patch, kv_index=kv_index, patch_index=patch_index,
              key_padding_mask=key_padding_mask, scale=scale, causal=causal)


head_patched_attention = _op("head_patched_attention")(_attention)


@head_patched_attention.register_fake
def _(q, k, v, head_mask, patch, kv_index, patch_index, key_padding_mask, scale, causal, backend):
    R, Tq, Hq, D = q.shape
    return q.new_empty(R, Tq, Hq * D)


def _attention_setup(ctx, inputs, output):
    q, k, v, head_mask, patch, kv_index, patch_index, key_padding_mask, scale, causal, _ = inputs
    ctx.save_for_backward(q, k, v, head_mask, patch, kv_index, patch_index, key_padding_mask)
    ctx.options = (scale, causal)


def _attention_backward(ctx, grad):
    q, k, v, head_mask, patch, kv_index, patch_index, key_padding_mask = ctx.saved_tensors
    scale, causal = ctx.options
    dq, dk, dv, dpatch = reference.head_patched_attention_vjp(
        grad, q, k, v, head_mask, patch, kv_index=kv_index, patch_index=patch_index,
        key_padding_mask=key_padding_mask, scale=scale, causal=causal)
    return dq, dk, dv, None, dpatch, None, None, None, None, None, None


head_patched_attention.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---- head_slice_grad ----------------------------------------------------------------------

def _slice_grad(grad_out: Tensor, inp: Tensor, heads: Tensor, head_dim: int, by: str,
                backend: Optional[str]) -> Tensor:
    """grad_out [..., out], inp [..., in], heads int64 [S] -> fp32 [S, D, in] (rows) / [S, out, D] (cols)."""
    dy = unit_last_stride(grad_out.reshape(-1, grad_out.shape[-1]))
    x = unit_last_stride(inp.reshape(-1, inp.shape[-1]))
    _, fn = backends.resolve("head_slice_grad", dy.device, backend)
    return fn(dy, x, heads, head_dim, by=by)


head_slice_grad = _op("head_slice_grad")(_slice_grad)


@head_slice_grad.register_fake
def _(grad_out, inp, heads, head_dim, by, backend):
    S = heads.shape[0]
    shape = (S, head_dim, inp.shape[-1]) if by == "rows" else (S, grad_out.shape[-1], head_dim)
    return grad_out.new_empty(shape, dtype=torch.float32)


def _slice_grad_setup(ctx, inputs, output):
    grad_out, inp, heads, head_dim, by, _ = inputs
    ctx.save_for_backward(grad_out, inp, heads)
    ctx.options = (head_dim, by)


def _slice_grad_backward(ctx, grad):
    grad_out, inp, heads = ctx.saved_tensors
    head_dim, by = ctx.options
    d_dy, d_x = reference.head_slice_grad_vjp(grad, grad_out, inp, heads, head_dim, by=by)
    return d_dy, d_x, None, None, None, None


head_slice_grad.register_autograd(_slice_grad_backward, setup_context=_slice_grad_setup)


# ---- head_slice_apply (in place) ----------------------------------------------------------

def _slice_apply(weight: Tensor, slices: Tensor, heads: Tensor, head_dim: int, by: str, alpha: float,
                 backend: Optional[str]) -> None:
    """weight [out, in] (any strides) += alpha * scatter(slices), fp32 sum, one rounding."""
    _, fn = backends.resolve("head_slice_apply", weight.device, backend)
    fn(weight, slices, heads, head_dim, by=by, alpha=alpha)


head_slice_apply = _op("head_slice_apply", mutates_args=("weight",))(_slice_apply)


@head_slice_apply.register_fake
def _(weight, slices, heads, head_dim, by, alpha, backend):
    return None


# ---- head_slice_linear --------------------------------------------------------------------

def oi_view(w: Tensor, layout: str) -> Tensor:
    """The [out, in] view of a weight stored in `layout` ("linear" [out, in], "conv1d" [in, out])."""
    return w if layout == "linear" else w.t()


# One merge at a time: two threads merging into one weight would each save the other's
# merged slices as "originals" and restore them, corrupting the weight for good.
_MERGE_LOCK = threading.Lock()


def _head_blocks(weight: Tensor, head_dim: int, by: str, layout: str) -> tuple[Tensor, int]:
    """A view of the weight *as stored* with its head features split into [n_heads, head_dim]
    blocks, and the dim of the head index. Gathering whole blocks along a storage dim copies
    runs of head_dim (or whole rows) at once; indexing features through the transposed
    [out, in] view of a Conv1D weight would copy element by element (10x slower here)."""
    oi_dim = 0 if by == "rows" else 1  # q/k/v heads are output features, o_proj heads input ones
    dim = oi_dim if layout == "linear" else 1 - oi_dim
    return weight.unflatten(dim, (weight.shape[dim] // head_dim, head_dim)), dim


@contextlib.contextmanager
def merged_weight(weight: Tensor, delta: Tensor, heads: Tensor, head_dim: int, by: str, layout: str):
    """Within the block, ``weight`` holds W + scatter(Δ) (fp32 sum, one rounding: what
    :func:`head_slice_apply` merges); on exit the original slices are copied back exactly.

    Only slice-sized tensors are allocated (the saved originals, S*D rows or columns of W),
    never a full copy of W, and the ordinary GEMM then runs on the very weight tensor, so
    its result equals the stock op on the merged weight bit for bit. Writes go through
    ``.data`` (W is frozen, and its version counter must not change for autograd graphs
    that saved it). The weight is shared state meanwhile: merges are serialised by a lock,
    and work on the same weight queued on another CUDA stream is not ordered with it.
    """
    blocks, dim = _head_blocks(weight.data, head_dim, by, layout)
    # A weight made under inference_mode can only be written to inside it.
    writing = torch.inference_mode if weight.is_inference() else contextlib.nullcontext
    _, apply = backends.resolve("head_slice_apply", weight.device)  # may self-check: not under the lock
    with _MERGE_LOCK:
        original = blocks.index_select(dim, heads)
        try:
            with writing():
                apply(oi_view(weight.data, layout), delta.detach().contiguous(), heads, head_dim, by=by, alpha=1.0)
            yield weight
        finally:
            with writing():
                blocks.index_copy_(dim, heads, original)


def merged_bias(bias: Tensor, delta_bias: Tensor, heads: Tensor, head_dim: int) -> Tensor:
    """b + scatter(Δb) as a new [out] tensor (a bias is small; copying it is cheap)."""
    b = bias.detach().clone()
    _, apply = backends.resolve("head_slice_apply", b.device)
    apply(b[:, None], delta_bias.detach().reshape(heads.numel(), -1, 1).contiguous(), heads, head_dim,
          by="rows", alpha=1.0)
    return b


def _no_autocast(device: torch.device):
    """The impl runs under the caller's autocast state: switch it off, so the GEMM computes in
    compute_dtype (already chosen by the public function) and is not cast a second time."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _project(x: Tensor, w: Tensor, b: Tensor | None, layout: str) -> Tensor:
    if layout == "linear":
        return F.linear(x, w, b)
    # transformers' Conv1D: addmm(bias, x2d, weight[in, out]); reproduced op for op.
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b, x2d, w) if b is not None else x2d @ w
    return y.view(*x.shape[:-1], w.shape[1])


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, delta_bias: Optional[Tensor],
            heads: Tensor, features: Tensor, head_dim: int, by: str, layout: str,
            compute_dtype: torch.dtype) -> Tensor:
    """x [..., in] (in compute_dtype) -> [..., out]: the stock projection on the merged weight."""
    with _no_autocast(x.device):
        b = None
        if bias is not None:
            b = merged_bias(bias, delta_bias, heads, head_dim) if delta_bias is not None else bias.detach()
            b = b.to(compute_dtype)
        with merged_weight(weight, delta, heads, head_dim, by, layout) as w:
            # Under autocast the cast is a full copy, exactly as a stock nn.Linear makes one.
            return _project(x, w.detach().to(compute_dtype), b, layout)


head_slice_linear = _op("head_slice_linear")(_linear)


@head_slice_linear.register_fake
def _(x, weight, bias, delta, delta_bias, heads, features, head_dim, by, layout, compute_dtype):
    out_f = oi_view(weight, layout).shape[0]
    return x.new_empty(*x.shape[:-1], out_f, dtype=compute_dtype)


def _input_grad(dy: Tensor, weight: Tensor, delta: Tensor, heads: Tensor, features: Tensor, head_dim: int,
                by: str, layout: str, compute_dtype: torch.dtype) -> Tensor:
    """dY [N, out] -> dX = dY · (W + scatter(Δ)) [N, in] in compute_dtype, on the merged weight."""
    with _no_autocast(dy.device):
        with merged_weight(weight, delta, heads, head_dim, by, layout) as w:
            return dy.to(compute_dtype) @ oi_view(w.detach().to(compute_dtype), layout)


head_slice_linear_input_grad = _op("head_slice_linear_input_grad")(_input_grad)


@head_slice_linear_input_grad.register_fake
def _(dy, weight, delta, heads, features, head_dim, by, layout, compute_dtype):
    return dy.new_empty(dy.shape[0], oi_view(weight, layout).shape[1], dtype=compute_dtype)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, delta, delta_bias, heads, features, head_dim, by, layout, cdt = inputs
    # by="rows": X itself (the same object for q, k and v, so held once); by="cols": only
    # the selected heads' input columns Z[:, cols] [N, S*D].
    saved = x if by == "rows" else x.reshape(-1, x.shape[-1]).index_select(1, features)
    ctx.save_for_backward(saved, weight, delta)
    ctx.index = (heads, features)  # small index tensors: kept out of saved_tensors
    ctx.options = (head_dim, by, layout, cdt, x.shape, delta_bias is not None)


def _linear_backward(ctx, dy):
    saved, weight, delta = ctx.saved_tensors
    heads, features = ctx.index
    head_dim, by, layout, cdt, x_shape, has_db = ctx.options
    need_x, _, _, need_delta, need_db = ctx.needs_input_grad[:5]
    dx = ddelta = ddb = None
    dy2 = unit_last_stride(dy.reshape(-1, dy.shape[-1]))
    if need_x:
        dx = head_slice_linear_input_grad(dy2, weight, delta, heads, features, head_dim, by, layout,
                                          cdt).view(x_shape)
    if need_delta:
        if by == "rows":
            ddelta = head_slice_grad(dy2, saved.reshape(-1, saved.shape[-1]), heads, head_dim, "rows", None)
        else:  # saved holds only the selected columns: heads 0..S-1 of it
            local = torch.arange(heads.shape[0], device=heads.device)
            ddelta = head_slice_grad(dy2, saved, local, head_dim, "cols", None)
        ddelta = ddelta.to(delta.dtype)
    if has_db and need_db:
        ddb = dy2.index_select(1, features).float().sum(0).view(heads.shape[0], head_dim)
    return dx, None, None, ddelta, ddb, None, None, None, None, None, None


head_slice_linear.register_autograd(_linear_backward, setup_context=_linear_setup)

# The eager bodies of the ops, for tools that must look inside one (e.g. a dispatch mode
# that records which aten ops an op runs).
IMPLEMENTATIONS = {
    "head_patched_attention": _attention,
    "head_slice_grad": _slice_grad,
    "head_slice_apply": _slice_apply,
    "head_slice_linear": _linear,
    "head_slice_linear_input_grad": _input_grad,
}
