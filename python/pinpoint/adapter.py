"""Trainable head slices on a frozen stock model: ``attach`` and ``PinpointAdapter``.

``attach(model, heads, parts="qkvo", kv="whole")`` freezes every parameter of ``model`` and
adds packed fp32 *deltas*, zero-initialised, over the frozen weights of the selected heads
only. Which rows and columns: :mod:`pinpoint.slices` (the plan; ``kv`` decides the K/V rows
under GQA). How the modules are patched: :mod:`pinpoint.install`. Saving, loading and the
PEFT export: :mod:`pinpoint.adapter_io`.

The q/k/v/o modules keep their stock class, parameters and hooks; only what they compute is
replaced by :func:`pinpoint_kernels.head_slice_linear.head_slice_linear`, an autograd
Function whose forward is the stock op on W + scatter(Δ) and whose backward computes only
the slices' gradients (``head_slice_grad``). Everything else about the model is ordinary
PyTorch: ``adapter.parameters()`` holds exactly the deltas; any optimizer, clipping,
accumulation, autocast and ``torch.save`` of the optimizer state work. No
``enable_input_require_grads``: autograd stops by itself below the lowest selected layer.

``merge()`` folds the deltas into the weights (fp32 sum, one rounding; the merged model's
logits equal the attached model's bit for bit) and returns the plain model; ``detach()``
removes the patches, leaving the weights exactly as they were (they are never written while
attached). Both restore the parameters' original ``requires_grad`` flags.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from pinpoint_kernels.head_slice import head_slice_apply
from pinpoint_kernels.head_slice_linear import SliceIndex, head_slice_linear

from . import adapter_io
from .adapter_io import AdapterMismatchError
from .fingerprint import weights_fingerprint
from .heads import as_head_list
from .install import install, is_patched, uninstall
from .models import module_device, spec_for
from .placement import check_materialised
from .slices import PARTS, ModulePlan, SlicePlan, normalize_parts, plan_slices

__all__ = [
    "PARTS",
    "AdapterMismatchError",
    "PinpointAdapter",
    "attach",
    "normalize_parts",
    "random_heads",
    "weights_fingerprint",
]


def random_heads(model, k: int, *, seed: int = 0, exclude=()) -> tuple[tuple[int, int], ...]:
    """``k`` distinct (layer, head) pairs drawn uniformly (seeded), for the random-heads baseline."""
    spec = spec_for(model)
    excluded = set(as_head_list(exclude, n_layers=spec.n_layers, n_heads=spec.n_heads, where="exclude",
                                allow_empty=True))
    pool = sorted({(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads)} - excluded)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= len(pool):
        raise ValueError(f"random_heads: k must be an int in 1..{len(pool)}, got {k!r}")
    return tuple(sorted(random.Random(seed).sample(pool, k)))


def _patched_forward(mp: ModulePlan, index: SliceIndex, deltas: nn.ParameterDict):
    """What a patched module computes: the stock op on W + scatter(Δ), [.., in] -> [.., out]."""

    def forward(mod, x):
        ds = [deltas[n] for n in mp.names]
        delta = ds[0] if len(ds) == 1 else torch.cat(ds, 0)
        db = None
        if mp.bias_names is not None:
            bs = [deltas[n] for n in mp.bias_names]
            db = bs[0] if len(bs) == 1 else torch.cat(bs, 0)
        return head_slice_linear(x, mod.weight, mod.bias, delta, index, by=mp.by, layout=mp.kind, delta_bias=db)

    return forward


class PinpointAdapter(nn.Module):
    """Trainable fp32 head-slice deltas attached to a frozen stock model. Build with ``attach``.

    Attributes: ``model`` (the patched model), ``plan`` (the :class:`~pinpoint.slices.SlicePlan`),
    ``heads`` (sorted (layer, head) pairs, query heads), ``parts`` ("qkvo" subset), ``kv``
    ("whole" | "group" | "none"), ``bias`` (whether q/k/v bias entries are trained),
    ``deltas`` (``nn.ParameterDict``: ``l{layer}_{part}`` -> [S, D, in] for q/k/v, [S, out, D]
    for o; ``l{layer}_{part}_bias`` -> [S, D]), ``slices`` (name -> (part, layer, head indices
    in the projection)), ``state`` ("attached" | "merged" | "detached"), ``lowest_layer``.
    ``adapter(...)`` calls the model.
    """

    def __init__(self, model: nn.Module, heads, parts: str = "qkvo", kv: str = "whole", *, bias: bool = True):
        super().__init__()
        spec = spec_for(model)
        check_materialised(spec)  # a weight on "meta" with nothing to load it would train garbage
        plan = plan_slices(spec, heads, parts, kv, bias=bias)
        for layer in spec.layers:  # any layer: two adapters on one model would not compose
            if any(is_patched(proj.module) for proj in (layer.q, layer.k, layer.v, layer.o)):
                raise RuntimeError(f"{type(model).__name__} already has a pinpoint adapter attached "
                                   f"(layer {layer.index}); merge() or detach() it first")
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_spec", spec)
        self.plan: SlicePlan = plan
        self.heads, self.parts, self.kv, self.bias = plan.heads, plan.parts, plan.kv, plan.bias
        self.lowest_layer = plan.lowest_layer
        self.state = "attached"
        self.history: list[dict] = []
        self._fingerprint: str | None = None
        self.deltas = nn.ParameterDict()
        self.slices = {s.name: (s.part, s.layer, s.heads) for s in plan.slices}
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        with torch.no_grad():
            for p, _ in self._flags:
                p.requires_grad_(False)
        for s in plan.slices:  # each delta where its layer computes (accelerate's execution device)
            device = module_device(getattr(spec.layers[s.layer], s.part).module)
            self.deltas[s.name] = nn.Parameter(torch.zeros(s.shape, dtype=torch.float32, device=device))
        self._installed = []
        for mp in plan.modules:
            index = SliceIndex(torch.tensor(mp.blocks, dtype=torch.int64, device=module_device(mp.module)),
                               spec.head_dim, mp.n_blocks)
            self._installed.append(install(mp.module, _patched_forward(mp, index, self.deltas)))

    def _uninstall(self) -> None:
        for record in self._installed:
            uninstall(record)
        with torch.no_grad():
            for p, flag in self._flags:
                p.requires_grad_(flag)

    def _require(self, *states: str, action: str) -> None:
        if self.state not in states:
            raise RuntimeError(f"cannot {action}: the adapter is already {self.state}")

    # ---- public API --------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def spec(self):
        """The model's :class:`~pinpoint.models.ModelSpec`."""
        return self._spec

    @property
    def geometry(self) -> dict:
        return adapter_io.geometry(self._spec)

    def kv_changes(self) -> dict:
        """Whose keys/values training changes: see :meth:`pinpoint.slices.SlicePlan.kv_changes`
        (``unselected`` lists the query heads that are not selected but read a trained KV head)."""
        return self.plan.kv_changes()

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def num_trainable(self) -> int:
        """Number of trained elements (= sum(p.numel() for p in self.parameters()))."""
        return sum(p.numel() for p in self.deltas.values())

    def _base_view(self, name: str) -> torch.Tensor:
        """[S, D, in] / [S, out, D] / [S, D]: the frozen base entries under delta ``name`` (a copy)."""
        part, l, local = self.slices[name]
        proj = getattr(self._spec.layers[l], part)
        D = self._spec.head_dim
        if name.endswith("_bias"):
            b = proj.bias()
            return torch.stack([b[h * D:(h + 1) * D] for h in local])
        w = proj.weight()
        return torch.stack([w[:, h * D:(h + 1) * D] if part == "o" else w[h * D:(h + 1) * D] for h in local])

    @torch.no_grad()
    def base_slices(self) -> dict[str, torch.Tensor]:
        """fp32 copies of the frozen base weights under each delta (same names and shapes)."""
        return {name: self._base_view(name).float() for name in self.slices}

    def fingerprint(self) -> str:
        """Fingerprint of the base weights (computed once; the weights are never written while attached)."""
        if self._fingerprint is None:
            if self.state == "merged":
                raise RuntimeError("the base weights are gone after merge(); the fingerprint was not computed before")
            self._fingerprint = weights_fingerprint(self._model)
        return self._fingerprint

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the deltas into the weights and return the plain ``transformers`` model.

        Each slice becomes round(W + Δ) (fp32 sum, one rounding), the same weight the
        attached forward used, so logits are unchanged bit for bit. The adapter is spent.
        """
        self._require("attached", action="merge")
        self.fingerprint()  # keep the base fingerprint for save() after merging
        for name, (part, l, local) in self.slices.items():
            proj = getattr(self._spec.layers[l], part)
            delta = self.deltas[name].detach()
            if name.endswith("_bias"):
                head_slice_apply(proj.bias()[:, None], delta[..., None], list(local), self._spec.head_dim, by="rows")
            else:
                head_slice_apply(proj.weight(), delta, list(local), self._spec.head_dim,
                                 by="cols" if part == "o" else "rows")
        self._uninstall()
        self.state = "merged"
        return self._model

    def detach(self) -> nn.Module:
        """Remove the adapter; the model's weights and requires_grad flags are exactly as before."""
        self._require("attached", action="detach")
        self._uninstall()
        self.state = "detached"
        return self._model

    def config_dict(self) -> dict:
        """What ``save`` writes as the adapter's config (heads, parts, kv, geometry, fingerprint...)."""
        return adapter_io.config_dict(self)

    def save(self, directory):
        """Write the fp32 slices and the config into ``directory``: see :func:`pinpoint.adapter_io.save`."""
        return adapter_io.save(self, directory)

    def save_peft(self, directory):
        """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose
        update equals these deltas exactly: see :func:`pinpoint.adapter_io.save_peft`."""
        return adapter_io.save_peft(self, directory)

    @classmethod
    def load(cls, directory, model: nn.Module, *, check_fingerprint: bool = True) -> "PinpointAdapter":
        """Attach the adapter saved in ``directory`` to ``model``: see :func:`pinpoint.adapter_io.load`."""
        return adapter_io.load(cls, directory, model, check_fingerprint=check_fingerprint)

    def extra_repr(self) -> str:
        return (f"model={type(self._model).__name__}, heads={len(self.heads)}, parts={self.parts!r}, "
                f"kv={self.kv!r}, bias={self.bias}, trainable={self.num_trainable():,}, state={self.state!r}")


def attach(model: nn.Module, heads, parts="qkvo", kv: str = "whole", *, bias: bool = True) -> PinpointAdapter:
    """Freeze ``model`` and add trainable fp32 deltas for the selected heads' slices only.

    ``heads``: a HeadSet or any iterable of (layer, head) pairs (query heads). ``parts``: a
    subset of "qkvo". ``kv``: which K/V rows under GQA (:mod:`pinpoint.slices`): "whole"
    (the default: only KV heads whose every reader is selected, so no unselected head's keys
    or values change), "group" (the KV heads the selected heads read, shared ones included,
    so unselected heads of a partly selected group see changed keys/values; see
    ``adapter.kv_changes()``) or "none". Under MHA "group" and "whole" agree.
    ``bias``: also train the q/k/v bias entries of those rows when the model has them.
    """
    return PinpointAdapter(model, heads, parts, kv, bias=bias)
