"""The variant rows' tails of path and activation patching, layer by layer.

Both algorithms record a base and a source run, then push every variant row (head h of
layer l patched, for pair b: v = (l*H + h)*B + b) through the rest of the model. Here the rows
advance together, layer by layer, so each layer's weights are used at one moment: inside
``layer(k)``, a context that streaming (:mod:`pinpoint.stream`) uses to read the layer from
disk, and that is a no-op for a model in memory. Each layer's tensors live on its device.

* ``path_scores`` / ``path_tails``: path patching (last position, later attention frozen).
* ``activation_tails``: activation patching (head outputs replaced at every position, or the
  last), later layers rerun in full with the recorded keyword arguments.
* ``head_masks``, ``check_finite``, ``base_metric``: shared with :mod:`pinpoint.locate`.

Shapes: B pairs, L layers, H query heads, D head_dim, T tokens, E hidden size.
"""
from __future__ import annotations

import contextlib

import torch

from .batching import take_last
from .incremental import chunk_size, mlp_step, require_pre_norm, row_bytes
from .metrics import apply_metric
from .models import ModelSpec
from .placement import layer_devices
from .recording import first_tensor, select_rows

__all__ = ["head_masks", "check_finite", "base_metric", "path_scores", "path_tails", "activation_tails"]


def check_finite(logits: torch.Tensor, offset: int, side: str) -> None:
    """Refuse NaN/inf ``logits`` [B, vocab], naming the first bad pair (``offset`` + row)."""
    bad = (~torch.isfinite(logits)).any(-1).nonzero()
    if bad.numel():
        i = offset + int(bad[0, 0])
        raise ValueError(f"the model produced NaN or inf logits for pairs[{i}].{side}; check the prompt "
                         "and the model's dtype")


def head_masks(H: int, D: int, device) -> torch.Tensor:
    """bool [H, H*D]: row h selects head h's features."""
    return torch.arange(H * D, device=device)[None, :] // D == torch.arange(H, device=device)[:, None]


def base_metric(spec, fn, rec, start, side="base"):
    """The metric [B] of a recording's logits (checked finite first)."""
    check_finite(rec.logits, start, side)
    return apply_metric(fn, rec.logits, what=f"the {side} prompts")


def path_scores(spec: ModelSpec, fn, rb, rs, start: int, budget: int, bar, check: bool, *, layer=None,
                 devices=None):
    """Path-patching effects [B, L, H] and base metric [B] from the base (``rb``: z, attn_out,
    resid_pre, last only) and source (``rs``: z) recordings. ``layer(k)``: a context in which
    layer k's weights are present (streaming); ``devices``: each layer's device."""
    mb = base_metric(spec, fn, rb, start)
    check_finite(rs.logits, start, "source")
    B, L, H = rb.logits.shape[0], spec.n_layers, spec.n_heads
    n = chunk_size(budget, row_bytes(spec, "path"), L * H * B)
    vals = path_tails(spec, fn, rb, rs, n, bar, layer=layer, devices=devices, check=check)
    return vals.to(mb.device).view(L, H, B).permute(2, 0, 1) - mb[:, None, None], mb


def path_tails(spec: ModelSpec, fn, rb, rs, n: int, bar, *, layer=None, devices=None, check: bool = False):
    """The metric [L*H*B] of every path-patched variant v = (l*H + h)*B + b (head h of layer l
    takes the source's value for pair b), from recordings ``rb``/``rs`` (last position only).

    Layer by layer (layer k's weights are used once, inside ``layer(k)``, for all variants):
    the rows of senders < k get the frozen base attention output of layer k, the H·B rows of
    sender k join through its o_proj, then every started row runs layer k's MLP, ``n`` rows
    at a time. Each layer's tensors live on its own device (``devices[k]``, default
    ``spec.layer_device(k)``); the rows' residual follows them. With ``check``, B unpatched
    rows ride along from layer 0 and must rebuild the recorded logits (else the blocks are not
    pre-norm residual blocks and the model is refused).
    """
    B, L, H, D = rb.logits.shape[0], spec.n_layers, spec.n_heads, spec.head_dim
    layer = layer or (lambda k: contextlib.nullcontext())
    devices = devices or layer_devices(spec)
    x = (rb.resid_pre[0] + rb.attn_out[0]).to(devices[0]) if check else None   # [rows started, E]
    for k in range(L):
        dev = devices[k]
        with layer(k):
            lspec = spec.layers[k]
            if k > 0:                                                       # frozen attention of layer k
                x = x.to(dev)
                x += rb.attn_out[k].to(dev).repeat(len(x) // B, 1)
            masks = head_masks(H, D, dev)                                  # [H, H*D]
            z = torch.where(masks[:, None, :], rs.z[k].to(dev)[None], rb.z[k].to(dev)[None])  # [H, B, H*D]
            new = rb.resid_pre[k].to(dev).repeat(H, 1) + lspec.o.module(z.reshape(H * B, H * D))
            x = new if x is None else torch.cat([x, new])
            for i in range(0, len(x), n):
                x[i:i + n] = mlp_step(lspec, x[i:i + n])
        bar.update(H * B)
    dev = spec.unembed_device
    if check:
        require_pre_norm(spec, spec.lm_head(spec.final_norm(x[:B].to(dev))), rb.logits, what="path patching")
        x = x[B:]
    return torch.cat([apply_metric(fn, spec.lm_head(spec.final_norm(x[i:i + n].to(dev))), what="path-patched rows")
                      for i in range(0, len(x), n)])


def _patched_z(spec, rb, rs, k: int, base, last_only: bool) -> torch.Tensor:
    """[H*B, T, H*D]: the layer-k o_proj input of variant rows h*B + b (head h of pair b takes
    the source's output, at every position or at the last one only)."""
    H, D, B, T = spec.n_heads, spec.head_dim, base.size, base.T
    zb, zs = rb.z[k], rs.z[k]                                                  # [B, T, H*D]
    sel = head_masks(H, D, zb.device)[:, None, None, :]                       # [H, 1, 1, H*D]
    if last_only:  # left padding: every row's last token is at T - 1 in both halves of the stack
        sel = sel & (torch.arange(T, device=zb.device) == T - 1)[None, None, :, None]
    return torch.where(sel, zs[None], zb[None]).reshape(H * B, T, H * D)


def activation_tails(spec, fn, rb, rs, base, n: int, bar, *, layer, check: bool, last_only: bool) -> torch.Tensor:
    """The metric [L*H*B] of every activation-patched variant v = (l*H + h)*B + b, layer by
    layer: at layer k the started rows run decoder layer k (with the recorded keyword
    arguments of their pair) and the H·B rows patched at layer k join through its o_proj and
    MLP, ``n`` rows at a time; layer k's weights are used once, inside ``layer(k)``. Holds the
    residual of every started row: [rows, T, E]. Later layers rerun every position (no KV
    cache), so a row costs about T times a path-patching row: streaming suits path patching
    best. With ``check``, B unpatched rows ride along from layer 0 and must reproduce the
    recorded logits."""
    B, L, H = base.size, spec.n_layers, spec.n_heads
    x, pair = None, torch.empty(0, dtype=torch.long)                          # [rows, T, E], [rows]
    for k in range(L):
        with layer(k):
            lspec = spec.layers[k]
            if x is not None:
                for i in range(0, len(x), n):
                    args, kw = select_rows(rb.block_kwargs[k], pair[i:i + n], B)
                    x[i:i + n] = first_tensor(lspec.block(x[i:i + n], *args, **kw))
            z = _patched_z(spec, rb, rs, k, base, last_only)
            if check and k == 0:
                z = torch.cat([rb.z[0], z])
            new_pair = torch.arange(len(z)) % B
            new = torch.cat([mlp_step(lspec, select_rows(rb.resid_pre[k], new_pair[i:i + n], B) +
                                      lspec.o.module(z[i:i + n])) for i in range(0, len(z), n)])
            x, pair = (new, new_pair) if x is None else (torch.cat([x, new]), torch.cat([pair, new_pair]))
        bar.update(H * B)
    logits = lambda rows: spec.lm_head(spec.final_norm(take_last(x[rows], base.last[pair[rows]])))  # noqa: E731
    if check:
        require_pre_norm(spec, logits(slice(0, B)), rb.logits, what="activation patching")
        x, pair = x[B:], pair[B:]
    return torch.cat([apply_metric(fn, logits(slice(i, i + n)), what="activation-patched rows")
                      for i in range(0, len(x), n)])
