"""Where an organism's behaviour is planted, and the geometry it is planted in.

``arch(n_layers, n_heads, n_kv_heads)`` is the organism's architecture (``ARCH``) with those three
overridden (hidden size 128 and head_dim 16 stay: the residual stream is the same width for
every placement, so a placement changes where heads are, not how much the model can store).
``check_heads(heads, arch)`` validates a planted placement against it, and
``derive_configs`` turns one placement into the two stage configs:

* stage 1 reserves exactly the planted heads (holds them silent, o_proj columns at 0);
* stage 2 plants exactly those heads. Its K/V rule under GQA: a KV group all of whose query
  heads are planted is planted whole (its k/v rows are trained: no unplanted head reads
  them); a group that also serves an unplanted head keeps its k/v frozen, and its planted
  heads are planted through their q rows and o_proj columns only (``kv="whole"``). Training
  a shared group's k/v (``kv="group"``) would change what the unplanted heads of the group
  compute: their stage-1 skills would be damaged and they would carry part of the planted
  behaviour, so the "planted heads" would no longer be the whole ground truth. A fully
  reserved group therefore matters only for how much of the head stage 2 may train, and the
  stage-2 targets (checked) say whether q + o sufficed.

A layer needs at least one unreserved head: stage 1 stores the general skills in the heads
it does not reserve, and a layer with none would only pass its input on.
"""
from __future__ import annotations

import dataclasses

from ..heads import as_head_list
from .train import PLANTED_HEADS, Stage1Config, Stage2Config

__all__ = ["ARCH", "PlacementError", "arch", "check_heads", "parse_heads", "kv_mode", "derive_configs"]


# The default geometry: 4 layers x 8 query heads (4 KV heads, so GQA groups of 2), head_dim 16.
# (Here rather than in model.py, which imports pinpoint.testing: the placement rules stay below it.)
ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False)


class PlacementError(ValueError):
    """An invalid organism geometry or planted placement (the message names the argument)."""


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlacementError(f"{name} must be an int >= 1, got {value!r}")
    return value


def arch(n_layers=None, n_heads=None, n_kv_heads=None) -> dict:
    """The organism's architecture (``ARCH``) with these overrides, validated: every
    count an int >= 1 and ``n_heads % n_kv_heads == 0`` (GQA groups of equal size)."""
    out = dict(ARCH)
    for key, value, name in (("num_hidden_layers", n_layers, "n_layers"), ("num_attention_heads", n_heads, "n_heads"),
                             ("num_key_value_heads", n_kv_heads, "n_kv_heads")):
        if value is not None:
            out[key] = _positive_int(value, name)
    if n_heads is not None and n_kv_heads is None and out["num_attention_heads"] % out["num_key_value_heads"]:
        raise PlacementError(f"n_heads={n_heads} is not a multiple of the default n_kv_heads="
                             f"{out['num_key_value_heads']}; pass n_kv_heads too")
    if out["num_attention_heads"] % out["num_key_value_heads"]:
        raise PlacementError(f"n_heads ({out['num_attention_heads']}) must be a multiple of n_kv_heads "
                             f"({out['num_key_value_heads']}): each KV head serves a group of equal size")
    return out


def check_heads(heads, geometry: dict | None = None) -> tuple[tuple[int, int], ...]:
    """``heads`` as a sorted tuple of (layer, query head), checked against ``geometry``
    (default ``ARCH``): non-empty, in range, no duplicates, and every layer keeps at least
    one unreserved head. PlacementError (a ValueError) names the problem."""
    g = geometry or ARCH
    n_layers, n_heads = g["num_hidden_layers"], g["num_attention_heads"]
    try:
        items = as_head_list(heads, n_layers=n_layers, n_heads=n_heads, sort=True, where="heads")
    except (TypeError, ValueError) as exc:
        raise PlacementError(str(exc)) from None
    for layer in sorted({l for l, _ in items}):
        if sum(1 for l, _ in items if l == layer) == n_heads:
            raise PlacementError(f"heads: layer {layer} would have all {n_heads} of its heads planted; leave at "
                                 "least one head per layer unplanted (stage 1 stores the general skills in them)")
    return tuple(items)


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"1.1,1.6,3.0"`` -> [(1, 1), (1, 6), (3, 0)] (layer.head, comma separated)."""
    out = []
    for part in str(text).split(","):
        layer, dot, head = part.strip().partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise PlacementError(f"--heads {text!r}: {part.strip()!r} is not LAYER.HEAD (e.g. 1.6); "
                                 "write the heads as 1.1,1.6,3.0")
        out.append((int(layer), int(head)))
    return out


def kv_mode(heads, group_size: int) -> str:
    """Stage 2's K/V rule for ``heads`` (see the module docstring): "group" when every KV group
    touched is planted whole (then "group" and "whole" train the same rows; "group" is the
    shipped organism's recorded setting), else "whole"."""
    chosen = set(heads)
    whole = all((l, (h // group_size) * group_size + i) in chosen for l, h in chosen for i in range(group_size))
    return "group" if whole else "whole"


def derive_configs(heads, geometry: dict | None = None, stage1: Stage1Config | None = None,
                   stage2: Stage2Config | None = None) -> tuple[tuple, Stage1Config, Stage2Config]:
    """(heads, stage-1 config, stage-2 config) for one placement. ``heads=None`` keeps the
    configs' own ``reserve``/``heads`` (the older way: both passed by hand; they are checked).
    Otherwise a config left at the default placement gets ``heads``; one that names another
    placement is a conflict."""
    g = geometry or ARCH
    s1, s2 = stage1 or Stage1Config(), stage2 or Stage2Config()
    if heads is None:
        planted = check_heads(s2.heads, g)
        if s1.reserve:
            check_heads(s1.reserve, g)
        return planted, s1, s2
    planted = check_heads(heads, g)
    group = g["num_attention_heads"] // g["num_key_value_heads"]
    for name, given in (("stage1.reserve", s1.reserve), ("stage2.heads", s2.heads)):
        if tuple(map(tuple, given)) not in (PLANTED_HEADS, planted):
            raise PlacementError(f"{name}={tuple(map(tuple, given))} conflicts with heads={planted}; pass one of them")
    s1 = dataclasses.replace(s1, reserve=planted)
    kv = s2.kv if stage2 is not None and s2.kv != Stage2Config.kv else kv_mode(planted, group)
    s2 = dataclasses.replace(s2, heads=planted, kv=kv)
    return planted, s1, s2
