"""The slice plan: which rows and columns of which modules an adapter trains. Pure bookkeeping.

``plan_slices(spec, heads, parts, kv, bias)`` turns a head selection into a ``SlicePlan``
for a :class:`~pinpoint.models.ModelSpec`. It creates no parameters and touches no module;
:mod:`pinpoint.adapter` allocates the deltas it names and :mod:`pinpoint.install` patches
the modules it lists.

* ``q``: the q_proj rows of each selected query head            delta [S_l, D, in]
* ``k``/``v``: the k_proj/v_proj rows of KV heads, chosen by ``kv``  delta [G_l, D, in]
* ``o``: the o_proj columns of each selected query head          delta [S_l, out, D]
* with ``bias=True`` and a model with q/k/v biases: those rows' bias entries [S_l or G_l, D].
  o_proj's bias is shared by every head, so it is never trained.

``kv`` decides which K/V heads are trained under grouped-query attention (under MHA every
KV head is read by one query head, so the three rules differ only in "none"):

* ``"whole"``: a KV head's k/v rows are trained only when *every* query head that reads it
  is selected. No unselected head's keys or values change. The default everywhere.
* ``"group"``: the KV head of every selected query head, even when unselected heads of the
  same group read it too (their K/V then change: see ``SlicePlan.kv_changes``); the
  default before 0.2, and what the organism's stage 2 uses.
* ``"none"``: no k/v rows, as the paper did for GQA models (q and o only).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .heads import as_head_list
from .models import ModelSpec

__all__ = ["KV_MODES", "PARTS", "ModulePlan", "SlicePlan", "SliceSpec", "normalize_parts", "plan_slices"]

PARTS = "qkvo"
KV_MODES = ("whole", "group", "none")
_KV_HELP = ("'group' (the KV heads the selected heads read, shared ones included), 'whole' (k/v rows of a "
            "KV head only when every query head reading it is selected) or 'none' (q and o only, as the "
            "paper did for GQA models)")


def normalize_parts(parts) -> str:
    """Canonical subset of "qkvo" (in that order) from e.g. "qo", "oq" or ["q", "o"]."""
    if not isinstance(parts, (str, Iterable)):
        raise TypeError(f"parts must be a string of q/k/v/o letters, got {type(parts).__name__}")
    letters = list(parts)
    for p in letters:
        if not isinstance(p, str) or p not in PARTS:
            raise ValueError(f"parts: {p!r} is not a part; use letters from 'qkvo' "
                             "(q/k/v rows of a head, o_proj columns of a head)")
    if len(set(letters)) != len(letters):
        raise ValueError(f"parts {parts!r} repeats a letter")
    if not letters:
        raise ValueError("parts is empty; choose at least one of 'q', 'k', 'v', 'o'")
    return "".join(p for p in PARTS if p in letters)


def check_kv(kv) -> str:
    if kv not in KV_MODES:
        raise ValueError(f"kv must be {_KV_HELP}; got {kv!r}")
    return kv


@dataclass(frozen=True)
class SliceSpec:
    """One delta tensor: ``name`` ("l{layer}_{part}" or "..._bias"), the projection ``part``
    and ``layer``, ``heads`` (indices in the projection: query heads for q/o, KV heads for
    k/v), ``shape`` of the delta, ``by`` ("rows" | "cols") and whether it is a ``bias``."""

    name: str
    part: str
    layer: int
    heads: tuple[int, ...]
    shape: tuple[int, ...]
    by: str
    bias: bool = False


@dataclass(frozen=True)
class ModulePlan:
    """One module to patch. ``blocks``: head_dim-blocks of the module's rows (by="rows") or
    columns (by="cols") that the deltas cover, in the order of ``names`` concatenated (GPT-2's
    fused c_attn holds q, k and v, so its blocks are offset by each projection's position);
    ``n_blocks``: how many such blocks the module has; ``names``/``bias_names``: the delta
    tensors, concatenated along dim 0 in this order (``bias_names`` None when no bias trains)."""

    module: object
    kind: str
    by: str
    blocks: tuple[int, ...]
    n_blocks: int
    names: tuple[str, ...]
    bias_names: tuple[str, ...] | None


@dataclass(frozen=True)
class SlicePlan:
    """What an adapter trains: ``heads`` (sorted query heads), ``parts``, ``kv``, ``bias``,
    ``slices`` (one :class:`SliceSpec` per delta, in parameter order), ``modules`` (one
    :class:`ModulePlan` per patched module), ``kv_heads`` ((layer, KV head) pairs whose k
    or v rows are trained), ``group_size`` and ``lowest_layer``."""

    heads: tuple[tuple[int, int], ...]
    parts: str
    kv: str
    bias: bool
    slices: tuple[SliceSpec, ...]
    modules: tuple[ModulePlan, ...]
    kv_heads: tuple[tuple[int, int], ...]
    group_size: int
    lowest_layer: int

    def kv_changes(self) -> dict:
        """Whose keys/values this plan changes: ``kv_heads`` [(layer, KV head)], ``readers``
        [(layer, query head)] that read a changed KV head, and ``unselected``: those readers
        that are not selected (empty under ``kv="whole"``/``"none"``)."""
        g = self.group_size
        readers = [(l, kvh * g + i) for l, kvh in self.kv_heads for i in range(g)]
        chosen = set(self.heads)
        return {"kv_heads": list(self.kv_heads), "readers": readers,
                "unselected": [h for h in readers if h not in chosen]}


def _kv_heads(qheads: list[int], group_size: int, kv: str) -> list[int]:
    groups = sorted({h // group_size for h in qheads})
    if kv == "none":
        return []
    if kv == "whole":
        chosen = set(qheads)
        return [g for g in groups if all(g * group_size + i in chosen for i in range(group_size))]
    return groups


def plan_slices(spec: ModelSpec, heads, parts="qkvo", kv: str = "whole", *, bias: bool = True) -> SlicePlan:
    """The :class:`SlicePlan` for ``heads`` (query heads; any form :func:`as_head_list` takes)."""
    heads = tuple(as_head_list(heads, n_layers=spec.n_layers, n_heads=spec.n_heads, sort=True))
    parts = normalize_parts(parts)
    check_kv(kv)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    D = spec.head_dim
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    slices: list[SliceSpec] = []
    modules: dict[int, dict] = {}  # id(module) -> ModulePlan fields, in first-seen order
    kv_heads: list[tuple[int, int]] = []
    for l, qheads in sorted(by_layer.items()):
        layer = spec.layers[l]
        kvh = _kv_heads(qheads, spec.group_size, kv)
        if any(p in parts for p in "kv"):
            kv_heads.extend((l, g) for g in kvh)
        for part in parts:
            local = qheads if part in "qo" else kvh
            if not local:
                continue
            proj = getattr(layer, part)
            name = f"l{l}_{part}"
            if part == "o":
                by, offset, shape = "cols", 0, (len(local), proj.out_size, D)
            else:
                by, offset, shape = "rows", proj.out_offset // D, (len(local), D, proj.in_features)
            slices.append(SliceSpec(name, part, l, tuple(local), shape, by))
            bname = None
            if part != "o" and bias and proj.bias() is not None:
                bname = f"{name}_bias"
                slices.append(SliceSpec(bname, part, l, tuple(local), (len(local), D), by, bias=True))
            m = modules.setdefault(id(proj.module), {"module": proj.module, "kind": proj.kind, "by": by,
                                                     "blocks": [], "names": [], "bias": []})
            m["blocks"].extend(offset + h for h in local)
            m["names"].append(name)
            m["bias"].append(bname)
    if not slices:
        raise ValueError(f"nothing to train: parts={parts!r} with kv={kv!r} selects no rows, because no KV head "
                         f"has all of its {spec.group_size} query heads selected; select whole groups, add 'q' or "
                         "'o' to parts, or pass kv='group'")
    plans = []
    for m in modules.values():
        w = m["module"].weight
        out_f, in_f = w.shape if m["kind"] == "linear" else (w.shape[1], w.shape[0])
        bnames = None if any(b is None for b in m["bias"]) else tuple(m["bias"])
        plans.append(ModulePlan(m["module"], m["kind"], m["by"], tuple(m["blocks"]),
                                (out_f if m["by"] == "rows" else in_f) // D, tuple(m["names"]), bnames))
    return SlicePlan(heads, parts, kv, bias, tuple(slices), tuple(plans), tuple(kv_heads), spec.group_size,
                     min(s.layer for s in slices))
