"""The obvious, slow versions of pinpoint's head interventions, written with forward hooks.

pinpoint's fast paths (batched rows, one-token and suffix reruns, fused kernels) are tested against
these: one full forward per (pair, layer, head), nothing batched, nothing cached, so each number is
easy to read off the code. A head's output is its slice ``[h*D, (h+1)*D)`` of the o_proj input
``z`` [1, T, H*D] (H query heads of size D); patching replaces that slice with the source run's.

Shapes: ``ids`` is one sequence of token ids (a list of T ints, run as a batch of one); ``metric``
maps last-position logits [1, V] to [1]; a pair is a ``pinpoint.PromptPair`` of token-id lists
(``.base``, ``.source``); B pairs, L layers, H heads.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["Hook", "run_with_hooks", "capture_heads", "hook_patching", "hook_attribution", "hook_knockout",
           "assert_scores_close"]

# ("pre", module, hook) for register_forward_pre_hook, ("fwd", module, hook) for register_forward_hook.
Hook = tuple[str, nn.Module, Callable]
Metric = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def run_with_hooks(model: nn.Module, ids: Sequence[int], hooks: Iterable[Hook] = ()) -> torch.Tensor:
    """Last-position logits [1, V] of ``model`` on ``ids`` with ``hooks`` installed for this one
    forward (removed afterwards, also on error)."""
    handles = [m.register_forward_pre_hook(h) if kind == "pre" else m.register_forward_hook(h)
               for kind, m, h in hooks]
    try:
        return model(torch.tensor([ids])).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def capture_heads(model: nn.Module, ids: Sequence[int], spec=None):
    """One forward on ``ids``: (logits [1, V], z, attn) where ``z[l]`` is layer l's o_proj input
    [1, T, H*D] and ``attn[l]`` its attention module's output [1, T, hidden]. ``spec`` defaults to
    ``pinpoint.spec_for(model)``."""
    from pinpoint.models import spec_for

    spec = spec_for(model) if spec is None else spec
    z, attn = {}, {}
    hooks = []
    for ls in spec.layers:
        hooks.append(("pre", ls.o.module, lambda m, a, i=ls.index: z.__setitem__(i, a[0].clone())))
        hooks.append(("fwd", ls.attn, lambda m, a, o, i=ls.index: attn.__setitem__(i, o[0].clone())))
    return run_with_hooks(model, ids, hooks), z, attn


def _check_patching(method: str, positions: str) -> None:
    if method not in ("path", "activation"):
        raise ValueError(f"hook_patching: method must be 'path' or 'activation', got {method!r}")
    if positions not in ("last", "all"):
        raise ValueError(f"hook_patching: positions must be 'last' or 'all', got {positions!r}")
    if method == "path" and positions != "last":
        raise ValueError("hook_patching: method='path' patches the last position only (positions='last'), "
                         f"got positions={positions!r}")


def _patch_hooks(spec, layer: int, h: int, zs: dict, ab: dict, method: str, positions: str) -> list[Hook]:
    """Hooks that put the source's head (layer, h) into the base run; for path patching also
    freeze every later layer's attention output at the last position to the base run's."""
    sl = slice(h * spec.head_dim, (h + 1) * spec.head_dim)
    pos = slice(None) if positions == "all" else slice(-1, None)

    def patch(m, a):
        z = a[0].clone()
        z[:, pos, sl] = zs[layer][:, pos, sl].to(z.dtype)
        return (z, *a[1:])
    hooks = [("pre", spec.layers[layer].o.module, patch)]
    for later in range(layer + 1, spec.n_layers) if method == "path" else ():
        def freeze(m, a, o, later=later):
            x = o[0].clone()
            x[:, -1] = ab[later][:, -1]
            return (x, *o[1:])
        hooks.append(("fwd", spec.layers[later].attn, freeze))
    return hooks


def hook_patching(model: nn.Module, pairs, metric: Metric, *, method: str = "path",
                  positions: str = "last") -> torch.Tensor:
    """metric(patched) − metric(base) per (pair, layer, head): [B, L, H] fp32, one forward each.

    method="path" is the paper's loop: the source's head output at the last position goes into
    the base run and every later layer's attention output at the last position is frozen to the
    base run's, so the head acts only through the residual stream (positions must be "last").
    method="activation" patches the head's output at the last position (positions="last") or at
    every position (positions="all", which needs len(base) == len(source)) and lets the rest of
    the model react.
    """
    from pinpoint.models import spec_for

    _check_patching(method, positions)
    spec = spec_for(model)
    out = torch.zeros(len(pairs), spec.n_layers, spec.n_heads)
    for i, p in enumerate(pairs):
        lb, _, ab = capture_heads(model, p.base, spec)
        _, zs, _ = capture_heads(model, p.source, spec)
        mb = metric(lb)
        for layer in range(spec.n_layers):
            for h in range(spec.n_heads):
                hooks = _patch_hooks(spec, layer, h, zs, ab, method, positions)
                out[i, layer, h] = metric(run_with_hooks(model, p.base, hooks)) - mb
    return out


def hook_attribution(model: nn.Module, pair, metric: Metric) -> torch.Tensor:
    """d metric / dt at t=0 per (layer, head) for one pair: [L, H], one backward per head, where
    the head's last-position output in the base run is z_base + t (z_source − z_base). This is
    what attribution patching (gradient × delta) estimates the patching effect with."""
    from pinpoint.models import spec_for

    spec = spec_for(model)
    D = spec.head_dim
    _, zb, _ = capture_heads(model, pair.base, spec)
    _, zs, _ = capture_heads(model, pair.source, spec)
    want = torch.zeros(spec.n_layers, spec.n_heads)
    for layer in range(spec.n_layers):
        for h in range(spec.n_heads):
            sl, t = slice(h * D, (h + 1) * D), torch.zeros((), requires_grad=True)

            def nudge(m, a, sl=sl, layer=layer, t=t):
                z = a[0].clone()
                z[:, -1, sl] = z[:, -1, sl] + t * (zs[layer][:, -1, sl] - zb[layer][:, -1, sl])
                return (z,)
            handle = spec.layers[layer].o.module.register_forward_pre_hook(nudge)
            try:
                with torch.enable_grad():
                    logits = model(torch.tensor([pair.base])).logits[:, -1]
                    (want[layer, h],) = torch.autograd.grad(metric(logits).sum(), t)
            finally:
                handle.remove()
    return want


def hook_knockout(model: nn.Module, pairs, heads, metric: Metric, *, ablation: str = "zero",
                  means: torch.Tensor | None = None) -> torch.Tensor:
    """metric with the first k of ``heads`` ablated, for k = 0..K: [K+1, B], one forward per
    (k, pair) under ``pinpoint.ablate`` (``means`` [L, H, D] for ablation="mean")."""
    from pinpoint.patching import ablate

    want = torch.zeros(len(heads) + 1, len(pairs))
    for k in range(len(heads) + 1):
        for i, p in enumerate(pairs):
            if k == 0:
                want[k, i] = metric(run_with_hooks(model, p.base))
                continue
            with ablate(model, heads[:k], ablation=ablation, means=means):
                want[k, i] = metric(run_with_hooks(model, p.base))
    return want


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    """``got`` matches ``want`` (same shape) to ``rel`` of the largest |want|; refuses a reference
    with no effect anywhere (largest |want| <= 1e-3), which would make the check vacuous."""
    scale = want.abs().max()
    assert scale > 1e-3, "degenerate test: no head has any effect"
    err = (got - want).abs().max()
    assert err <= rel * scale, f"max error {float(err):.3g} > {rel} x {float(scale):.3g}"
