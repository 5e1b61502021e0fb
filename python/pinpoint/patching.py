"""Head interventions on stock HF models.

* :func:`fused_patching` runs a model's attention through pinpoint's fused head-patched
  attention kernel (registered as a transformers attention implementation), so many
  variant rows with per-(row, head) patches run in one batched call and patched heads do no
  attention math.
* :func:`ablate` is a context manager that makes any forward or ``generate()`` run with
  chosen heads zero- or mean-ablated (a pre-hook on o_proj; works with any attention
  implementation and with KV caches).
* :func:`head_means` gives the per-head mean output over prompts, for mean ablation.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

import pinpoint_kernels as pk

from .heads import as_head_list
from .models import spec_for
from .batching import make_batch, pad_id
from .prompts import to_ids
from .recording import record

ATTN_IMPL = "pinpoint_patched"
_state = threading.local()


@dataclass
class LayerPatch:
    """Per-layer instruction for the fused kernel: head_mask bool [R, Hq]; patch
    [P, T, Hq, D] or None (zero); patch_index int [R] or None."""

    head_mask: torch.Tensor
    patch: torch.Tensor | None = None
    patch_index: torch.Tensor | None = None


def _pinpoint_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, Tk, D] ->
    ([B, T, Hq, D], None). Padding comes from the active plan's key padding mask."""
    plan = getattr(_state, "plan", None)
    if plan is None:
        raise RuntimeError(f"attention implementation {ATTN_IMPL!r} used outside pinpoint.fused_patching()")
    layer = getattr(module, "layer_idx", None)
    entry = plan["layers"].get(layer)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    kpm = _on(plan, q.device)
    if kpm is not None and kpm.shape[1] != k.shape[1]:
        raise RuntimeError(f"fused_patching: key padding mask covers {kpm.shape[1]} tokens, layer {layer} "
                           f"attends over {k.shape[1]} (KV caches are not supported here)")
    out = pk.head_patched_attention(
        q, k, v,
        None if entry is None else entry.head_mask,
        None if entry is None else entry.patch,
        patch_index=None if entry is None else entry.patch_index,
        key_padding_mask=kpm, scale=scaling,
    )
    return out.view(q.shape), None


def _on(plan: dict, device: torch.device):
    """The plan's key padding mask on ``device`` (copied once per device: under a ``device_map``
    the layers run on different devices)."""
    kpm = plan["key_padding_mask"]
    if kpm is None or kpm.device == device:
        return kpm
    copies = plan.setdefault("copies", {})
    if device not in copies:
        copies[device] = kpm.to(device)
    return copies[device]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _pinpoint_attention)


@contextlib.contextmanager
def fused_patching(model, layers: dict[int, LayerPatch], key_padding_mask: torch.Tensor | None):
    """Within the block, `model` computes attention with the fused kernel, applying
    `layers[l]` at layer l. key_padding_mask: bool [B, T], True for real tokens."""
    _register()
    config = model.config
    previous = config._attn_implementation
    _state.plan = {"layers": layers, "key_padding_mask": key_padding_mask}
    config._attn_implementation = ATTN_IMPL
    try:
        yield
    finally:
        config._attn_implementation = previous
        _state.plan = None


@torch.no_grad()
def head_means(model, tokenizer, prompts, *, batch_size: int = 16) -> torch.Tensor:
    """Mean output of every head over all real tokens of `prompts`: [n_layers, Hq, D] (fp32)."""
    spec = spec_for(model)
    seqs = [to_ids(tokenizer, p, where=f"prompts[{i}]", vocab_size=spec.vocab_size) for i, p in enumerate(prompts)]
    if not seqs:
        raise ValueError("head_means: prompts is empty")
    total = torch.zeros(spec.n_layers, spec.n_heads * spec.head_dim, dtype=torch.float64)
    count = 0
    for s in range(0, len(seqs), batch_size):
        batch = make_batch(seqs[s:s + batch_size], pad_id=pad_id(tokenizer, model), device=spec.device)
        rec = record(spec, batch, z=True)
        m = batch.attention_mask.bool()
        for layer in range(spec.n_layers):  # z of layer l lives on that layer's device
            total[layer] += rec.z[layer][m.to(rec.z[layer].device)].double().sum(0).cpu()
        count += int(m.sum())
    return (total / count).float().view(spec.n_layers, spec.n_heads, spec.head_dim)


@contextlib.contextmanager
def ablate(model, heads, *, ablation: str = "zero", means: torch.Tensor | None = None):
    """Run `model` with `heads` ablated at every position, for any forward or generate().

    ablation="zero" replaces each head's output (its slice of the o_proj input) with 0;
    "mean" with `means` [n_layers, Hq, D] (from :func:`head_means`).
    """
    spec = spec_for(model)
    heads = as_head_list(heads, n_layers=spec.n_layers, n_heads=spec.n_heads)
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    if ablation == "mean":
        if means is None:
            raise ValueError("ablation='mean' needs means= [n_layers, n_heads, head_dim] (see pinpoint.head_means)")
        if tuple(means.shape) != (spec.n_layers, spec.n_heads, spec.head_dim):
            raise ValueError(f"means must be [n_layers, n_heads, head_dim] = "
                             f"{(spec.n_layers, spec.n_heads, spec.head_dim)}, got {tuple(means.shape)}")
    D = spec.head_dim
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = []

    def make_hook(layer, hs):
        cols = torch.cat([torch.arange(h * D, (h + 1) * D) for h in hs])

        def hook(module, args):
            z = args[0].clone()
            c = cols.to(z.device)
            if ablation == "zero":
                z[..., c] = 0
            else:
                z[..., c] = means[layer].reshape(-1)[c.cpu()].to(z.device, z.dtype)
            return (z, *args[1:])
        return hook

    try:
        for layer, hs in by_layer.items():
            handles.append(spec.layers[layer].o.module.register_forward_pre_hook(make_hook(layer, hs)))
        yield model
    finally:
        for h in handles:
            h.remove()
