"""A fingerprint of a model's weights that reads a fixed sample of each tensor, never a full copy.

``weights_fingerprint(model)`` hashes (sha256), for every parameter (tied weights once): its
name, dtype and shape, and the values at ``SAMPLE`` fixed positions (every element of a
tensor with at most ``SMALL`` elements). The positions are a pure function of the tensor's
element count, so two models with the same weights fingerprint alike on any machine. Only
the sampled elements are gathered (by index, through a strided view): at 7B that is ~0.3 M
elements instead of a 14 GB copy.

Meta and offloaded parameters: a parameter on the ``meta`` device whose module accelerate
dispatched with an offload map (``module._hf_hook.weights_map``) is read from that map, one
tensor at a time; a meta parameter with no values anywhere contributes its name, dtype and
shape and the marker ``meta``, so a model built on the meta device fingerprints (by
structure only) without failing.

What it can miss: a change confined to elements that are not sampled. An edit of a whole
head slice (1/n_heads of a projection's rows or columns) is caught unless none of the 1024
positions fall in it: probability (1 - 1/n_heads)^1024, about 1e-14 at 32 heads and 1e-7 at
64. A single changed element of a large tensor is missed with probability about
1 - 1024/numel. The hash covers values bit for bit (a rounding change in a sampled element
counts).

Fingerprints from pinpoint ≤ 0.1 ("sha256:" + 64 hex digits) hashed every byte;
:func:`matches` still checks those with the full hash (``legacy_fingerprint``).
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["SAMPLE", "SMALL", "legacy_fingerprint", "matches", "weights_fingerprint"]

SAMPLE = 1024
SMALL = 4096
PREFIX = "sha256:sampled-v1:"


def sample_positions(numel: int) -> torch.Tensor:
    """The flat positions sampled from a tensor of ``numel`` elements (int64 [min(numel, SAMPLE)]):
    all of them for small tensors, else the first and last element plus seeded random ones."""
    if numel <= SMALL:
        return torch.arange(numel)
    g = torch.Generator().manual_seed(numel % (2**63))
    pos = torch.randint(0, numel, (SAMPLE - 2,), generator=g)
    return torch.cat([torch.tensor([0, numel - 1]), pos])


def _values(model: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor | None:
    """The tensor holding ``p``'s values: ``p`` itself, or its offloaded copy, or None (meta only)."""
    if p.device.type != "meta":
        return p
    owner_name, _, local = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    hook = getattr(owner, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is not None:
        try:
            t = weights_map[local]
        except KeyError:
            t = None
        if t is not None and t.device.type != "meta":
            return t
    return None


@torch.no_grad()
def _sample(t: torch.Tensor) -> bytes:
    pos = sample_positions(t.numel())
    if t.dim() == 0:
        vals = t.reshape(1)
    else:
        idx = torch.unravel_index(pos.to(t.device), tuple(t.shape))
        vals = t[idx]  # gathers only the sampled elements, whatever t's strides
    vals = vals.detach().cpu().contiguous()
    return vals.view(torch.uint8).numpy().tobytes() if vals.numel() else b""


def weights_fingerprint(model: nn.Module) -> str:
    """``"sha256:sampled-v1:" + hex`` over each parameter's name, dtype, shape and sampled values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}\n".encode())
        t = _values(model, name, p)
        h.update(b"meta\n" if t is None else _sample(t))
    return PREFIX + h.hexdigest()


def legacy_fingerprint(model: nn.Module) -> str:
    """The pre-0.2 fingerprint: sha256 over every byte of every parameter, copied to the CPU.
    Only for checking adapters and checkpoints saved by older versions."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        t = t.contiguous().cpu()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def matches(model: nn.Module, saved: str, current: str | None = None) -> bool:
    """Whether ``model``'s weights have the fingerprint ``saved`` (either format);
    ``current``: this model's :func:`weights_fingerprint`, if already computed."""
    if saved.startswith(PREFIX):
        return (current or weights_fingerprint(model)) == saved
    return legacy_fingerprint(model) == saved
