"""Trainable head slices on a frozen stock model: ``attach`` and ``PinpointAdapter``.

``attach(model, heads, parts="qkvo", kv="group")`` freezes every parameter of ``model`` and
adds packed fp32 *deltas*, zero-initialised, over the frozen weights of the selected heads
only:

* ``q``: the q_proj rows of each selected query head            [S_l, D, hidden] per layer
* ``k``/``v``: the k_proj/v_proj rows of the KV heads those query heads read (``kv="group"``;
  under MHA that is the head's own rows, under GQA the shared group head, counted once per
  layer); ``kv="none"`` trains no k/v rows, as the paper did for GQA models [G_l, D, hidden]
* ``o``: the o_proj columns of each selected head                [S_l, hidden, D]
* with ``bias=True`` (default) and a model that has q/k/v biases (Qwen2, GPT-2), the bias
  entries of those q/k/v rows, [S_l, D]: a head owns its rows, bias included. o_proj's bias is
  shared by all heads, so it is never trained.

The q/k/v/o modules keep their stock class and parameters; only their ``forward`` is
replaced by a call to :func:`pinpoint_kernels.head_slice_linear.head_slice_linear`, an
autograd Function whose forward is the stock op on W + scatter(Δ) and whose backward
computes only the slices' gradients (``head_slice_grad``). Everything else about the model
is ordinary PyTorch: ``adapter.parameters()`` holds exactly the deltas; any optimizer,
clipping, accumulation, autocast and ``torch.save`` of the optimizer state work. No
``enable_input_require_grads``: autograd stops by itself below the lowest selected layer.

``merge()`` folds the deltas into the weights (fp32 sum, one rounding; the merged model's
logits equal the attached model's bit for bit) and returns the plain model; ``detach()``
removes the patches, leaving the weights exactly as they were (they are never written while
attached). Both restore the parameters' original ``requires_grad`` flags.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import random
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pinpoint_kernels.head_slice import head_slice_apply
from pinpoint_kernels.head_slice_linear import SliceIndex, head_slice_linear

from .models import ModelSpec, spec_for

__all__ = [
    "PARTS",
    "AdapterMismatchError",
    "PinpointAdapter",
    "attach",
    "normalize_heads",
    "normalize_parts",
    "random_heads",
    "weights_fingerprint",
]

PARTS = "qkvo"
_KV_MODES = ("group", "none")
ADAPTER_FORMAT = "pinpoint-adapter"
ADAPTER_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the model it is being loaded onto."""


# --------------------------------------------------------------------------------------------
# Argument normalisation.


def normalize_heads(heads, n_layers: int, n_heads: int, *, what: str = "heads") -> tuple[tuple[int, int], ...]:
    """Sorted, validated (layer, head) pairs from a HeadSet or any iterable of 2-tuples.

    Heads are counted as query heads. Raises ValueError for an empty set, a duplicate, or a
    pair out of range; TypeError for anything that is not pairs of ints.
    """
    if isinstance(heads, (str, bytes)):
        raise TypeError(f"{what} must be a HeadSet or an iterable of (layer, head) pairs, got the string {heads!r}")
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    if not isinstance(heads, Iterable):
        raise TypeError(f"{what} must be a HeadSet or an iterable of (layer, head) pairs, got {type(heads).__name__}")
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i, item in enumerate(heads):
        if hasattr(item, "layer") and hasattr(item, "head") and not isinstance(item, tuple):
            item = (item.layer, item.head)  # a Head-like record
        try:
            pair = tuple(item)
        except TypeError:
            raise TypeError(f"{what}[{i}] = {item!r} is not a (layer, head) pair") from None
        if len(pair) != 2:
            raise TypeError(f"{what}[{i}] = {item!r} is not a (layer, head) pair")
        try:
            layer, head = (operator.index(v.item() if isinstance(v, torch.Tensor) else v) for v in pair)
        except TypeError:
            raise TypeError(f"{what}[{i}] = {item!r}: layer and head must be ints") from None
        if isinstance(pair[0], bool) or isinstance(pair[1], bool):
            raise TypeError(f"{what}[{i}] = {item!r}: layer and head must be ints, not bools")
        if not 0 <= layer < n_layers:
            raise ValueError(f"{what}[{i}] = ({layer}, {head}): layer {layer} is out of range; the model has "
                             f"{n_layers} layers (0..{n_layers - 1})")
        if not 0 <= head < n_heads:
            raise ValueError(f"{what}[{i}] = ({layer}, {head}): head {head} is out of range; each layer has "
                             f"{n_heads} query heads (0..{n_heads - 1})")
        if (layer, head) in seen:
            raise ValueError(f"{what}[{i}] = ({layer}, {head}) is a duplicate; each head may appear once")
        seen.add((layer, head))
        out.append((layer, head))
    if not out:
        raise ValueError(f"{what} is empty; select at least one (layer, head)")
    return tuple(sorted(out))


def normalize_parts(parts) -> str:
    """Canonical subset of "qkvo" (in that order) from e.g. "qo", "oq" or ["q", "o"]."""
    if isinstance(parts, str):
        letters = list(parts)
    elif isinstance(parts, Iterable):
        letters = list(parts)
    else:
        raise TypeError(f"parts must be a string of q/k/v/o letters, got {type(parts).__name__}")
    for p in letters:
        if not isinstance(p, str) or p not in PARTS:
            raise ValueError(f"parts: {p!r} is not a part; use letters from 'qkvo' "
                             "(q/k/v rows of a head, o_proj columns of a head)")
    if len(set(letters)) != len(letters):
        raise ValueError(f"parts {parts!r} repeats a letter")
    if not letters:
        raise ValueError("parts is empty; choose at least one of 'q', 'k', 'v', 'o'")
    return "".join(p for p in PARTS if p in letters)


def random_heads(model, k: int, *, seed: int = 0, exclude=()) -> tuple[tuple[int, int], ...]:
    """``k`` distinct (layer, head) pairs drawn uniformly (seeded), for the random-heads baseline."""
    ad = spec_for(model)
    pool = sorted(set((l, h) for l in range(ad.n_layers) for h in range(ad.n_heads))
                  - set(normalize_heads(exclude, ad.n_layers, ad.n_heads, what="exclude") if exclude else ()))
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= len(pool):
        raise ValueError(f"random_heads: k must be an int in 1..{len(pool)}, got {k!r}")
    return tuple(sorted(random.Random(seed).sample(pool, k)))


# --------------------------------------------------------------------------------------------
# Fingerprint of the base weights.


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (tied weights once)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        t = t.contiguous().cpu()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def _geometry(ad: ModelSpec) -> dict:
    return {"arch": ad.arch, "n_layers": ad.n_layers, "n_heads": ad.n_heads, "n_kv_heads": ad.n_kv_heads,
            "head_dim": ad.head_dim, "hidden_size": ad.hidden_size, "has_qkv_bias": bool(ad.has_qkv_bias)}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# The adapter.


class _Patch:
    """One patched module: which delta parameters it reads, in what order, and how."""

    __slots__ = ("module", "by", "layout", "index", "names", "bias_names", "saved_forward")

    def __init__(self, module, by, layout, index, names, bias_names):
        self.module, self.by, self.layout, self.index = module, by, layout, index
        self.names, self.bias_names = names, bias_names
        self.saved_forward = None


class PinpointAdapter(nn.Module):
    """Trainable fp32 head-slice deltas attached to a frozen stock model. Build with ``attach``.

    Attributes: ``model`` (the patched model), ``heads`` (sorted (layer, head) pairs, query
    heads), ``parts`` ("qkvo" subset), ``kv`` ("group" | "none"), ``bias`` (whether q/k/v bias
    entries are trained), ``deltas`` (``nn.ParameterDict``: ``l{layer}_{part}`` ->
    [S, D, hidden] for q/k/v, [S, hidden, D] for o; ``l{layer}_{part}_bias`` -> [S, D]),
    ``slices`` (name -> (part, layer, head indices in the projection)), ``state``
    ("attached" | "merged" | "detached"), ``lowest_layer``.
    ``adapter(...)`` calls the model.
    """

    def __init__(self, model: nn.Module, heads, parts: str = "qkvo", kv: str = "group", *, bias: bool = True):
        super().__init__()
        ad = spec_for(model)
        heads = normalize_heads(heads, ad.n_layers, ad.n_heads)
        parts = normalize_parts(parts)
        if kv not in _KV_MODES:
            raise ValueError(f"kv must be 'group' (train the k/v rows of the KV heads the selected heads read) "
                             f"or 'none' (no k/v rows, as the paper did for GQA models), got {kv!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        for layer in ad.layers:
            for proj in (layer.q, layer.k, layer.v, layer.o):
                fwd = proj.module.__dict__.get("forward")
                if fwd is not None and getattr(fwd, "_pinpoint_patch", False):
                    raise RuntimeError(f"{type(model).__name__} already has a pinpoint adapter attached "
                                       f"(layer {layer.index}); merge() or detach() it first")
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_ad", ad)
        self.heads = heads
        self.parts = parts
        self.kv = kv
        self.bias = bias
        self.state = "attached"
        self.history: list[dict] = []
        self._fingerprint: str | None = None
        self.deltas = nn.ParameterDict()
        self.slices: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        self._patches: list[_Patch] = []
        self._flags = [(p, p.requires_grad) for p in model.parameters()]

        D = ad.head_dim
        device = ad.device
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        self.lowest_layer = min(by_layer)

        with torch.no_grad():
            for p, _ in self._flags:
                p.requires_grad_(False)

        # Build the slices and group them per module (GPT-2's c_attn holds q, k and v).
        module_plan: dict[int, dict] = {}
        for l, qheads in sorted(by_layer.items()):
            spec = ad.layers[l]
            kvheads = sorted({h // ad.group_size for h in qheads})
            for part in parts:
                if part in "kv" and kv == "none":
                    continue
                proj = getattr(spec, part)
                local = qheads if part in "qo" else kvheads
                name = f"l{l}_{part}"
                if part == "o":
                    shape = (len(local), proj.out_size, D)
                    by, offset = "cols", 0
                else:
                    shape = (len(local), D, proj.in_features)
                    by, offset = "rows", proj.out_offset // D
                self.deltas[name] = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
                self.slices[name] = (part, l, tuple(local))
                bname = None
                if part != "o" and bias and proj.bias() is not None:
                    bname = f"{name}_bias"
                    self.deltas[bname] = nn.Parameter(torch.zeros(len(local), D, dtype=torch.float32, device=device))
                    self.slices[bname] = (part, l, tuple(local))
                plan = module_plan.setdefault(id(proj.module), {
                    "module": proj.module, "by": by, "kind": proj.kind, "heads": [], "names": [], "bias": []})
                plan["heads"].extend(offset + h for h in local)
                plan["names"].append(name)
                plan["bias"].append(bname)

        for plan in module_plan.values():
            module, by = plan["module"], plan["by"]
            w = module.weight
            out_f, in_f = (w.shape if plan["kind"] == "linear" else (w.shape[1], w.shape[0]))
            n = (out_f if by == "rows" else in_f) // D
            index = SliceIndex(torch.tensor(plan["heads"], dtype=torch.int64, device=w.device), D, n)
            bnames = plan["bias"]
            if any(b is None for b in bnames):
                bnames = None
            self._patches.append(_Patch(module, by, plan["kind"], index, plan["names"], bnames))
        for patch in self._patches:
            self._install(patch)

    # ---- patching ----------------------------------------------------------------------

    def _install(self, patch: _Patch) -> None:
        module = patch.module
        patch.saved_forward = module.__dict__.get("forward")
        deltas = self.deltas

        def forward(mod, x):
            ds = [deltas[n] for n in patch.names]
            delta = ds[0] if len(ds) == 1 else torch.cat(ds, 0)
            db = None
            if patch.bias_names is not None:
                bs = [deltas[n] for n in patch.bias_names]
                db = bs[0] if len(bs) == 1 else torch.cat(bs, 0)
            return head_slice_linear(x, mod.weight, mod.bias, delta, patch.index, by=patch.by,
                                     layout=patch.layout, delta_bias=db)

        forward._pinpoint_patch = True
        # Bound to the module (a deepcopy of the model rebinds it to the copy's weights; the copy
        # still reads this adapter's deltas: merge or detach before copying a model).
        module.forward = types.MethodType(forward, module)

    def _uninstall(self) -> None:
        for patch in self._patches:
            module = patch.module
            if patch.saved_forward is not None:
                module.forward = patch.saved_forward
            else:
                module.__dict__.pop("forward", None)
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
    def geometry(self) -> dict:
        return _geometry(self._ad)

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def num_trainable(self) -> int:
        """Number of trained elements (= sum(p.numel() for p in self.parameters()))."""
        return sum(p.numel() for p in self.deltas.values())

    def base_slices(self) -> dict[str, torch.Tensor]:
        """fp32 copies of the frozen base weights under each delta (same names and shapes)."""
        out = {}
        ad = self._ad
        for name, (part, l, local) in self.slices.items():
            proj = getattr(ad.layers[l], part)
            D = ad.head_dim
            with torch.no_grad():
                if name.endswith("_bias"):
                    b = proj.bias()
                    out[name] = torch.stack([b[h * D:(h + 1) * D] for h in local]).float()
                elif part == "o":
                    w = proj.weight()
                    out[name] = torch.stack([w[:, h * D:(h + 1) * D] for h in local]).float()
                else:
                    w = proj.weight()
                    out[name] = torch.stack([w[h * D:(h + 1) * D] for h in local]).float()
        return out

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
        ad = self._ad
        for name, (part, l, local) in self.slices.items():
            proj = getattr(ad.layers[l], part)
            delta = self.deltas[name].detach()
            heads = list(local)
            if name.endswith("_bias"):
                head_slice_apply(proj.bias()[:, None], delta[..., None], heads, ad.head_dim, by="rows")
            else:
                head_slice_apply(proj.weight(), delta, heads, ad.head_dim, by="cols" if part == "o" else "rows")
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
        cfg = self._model.config
        try:
            model_config = json.loads(cfg.to_json_string(use_diff=False))
        except Exception:  # pragma: no cover - exotic configs
            model_config = {"model_type": getattr(cfg, "model_type", None)}
        return {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "heads": [list(h) for h in self.heads],
            "parts": self.parts,
            "kv": self.kv,
            "bias": self.bias,
            "model_class": type(self._model).__name__,
            "geometry": self.geometry,
            "base_fingerprint": self.fingerprint(),
            "slices": {n: list(p.shape) for n, p in self.deltas.items()},
            "num_trainable": self.num_trainable(),
            "model_config": model_config,
        }

    def save(self, directory) -> Path:
        """Write ``adapter.safetensors`` (fp32 slices) and ``adapter_config.json`` (heads, parts,
        kv, model config, base-weights fingerprint) into ``directory``; each file atomically."""
        from safetensors.torch import save as st_save

        directory = Path(directory)
        cfg = self.config_dict()
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.deltas.items()}
        _atomic_write_bytes(directory / WEIGHTS_NAME, st_save(tensors, metadata={"format": ADAPTER_FORMAT}))
        _atomic_write_bytes(directory / CONFIG_NAME, json.dumps(cfg, indent=2).encode())
        return directory

    @classmethod
    def load(cls, directory, model: nn.Module, *, check_fingerprint: bool = True) -> "PinpointAdapter":
        """Attach the adapter saved in ``directory`` to ``model``.

        Refuses (``AdapterMismatchError``) a model whose head geometry, slice shapes or base
        weights (fingerprint) differ from the one the adapter was trained on.
        ``check_fingerprint=False`` skips only the weights check (shapes are always checked).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"no pinpoint adapter in {directory}: {CONFIG_NAME} is missing")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != ADAPTER_FORMAT:
            raise AdapterMismatchError(f"{cfg_path} is not a pinpoint adapter config (format={cfg.get('format')!r})")
        ad = spec_for(model)
        geo = _geometry(ad)
        diffs = [f"{k}: adapter {cfg['geometry'].get(k)!r} vs model {v!r}"
                 for k, v in geo.items() if cfg["geometry"].get(k) != v]
        if diffs:
            raise AdapterMismatchError(f"the adapter in {directory} was made for a different model "
                                       f"({cfg.get('model_class')}): " + "; ".join(diffs))
        if check_fingerprint:
            fp = weights_fingerprint(model)
            if fp != cfg["base_fingerprint"]:
                raise AdapterMismatchError(
                    f"the base weights of this {type(model).__name__} differ from those the adapter in {directory} "
                    f"was trained on (fingerprint {fp[:19]}… vs {cfg['base_fingerprint'][:19]}…); load the same "
                    "base checkpoint, or pass check_fingerprint=False to attach anyway")
        else:
            fp = None
        tensors = load_file(str(directory / WEIGHTS_NAME))
        adapter = cls(model, [tuple(h) for h in cfg["heads"]], cfg["parts"], cfg["kv"], bias=cfg["bias"])
        try:
            want = {n: tuple(p.shape) for n, p in adapter.deltas.items()}
            got = {n: tuple(t.shape) for n, t in tensors.items()}
            if want != got:
                raise AdapterMismatchError(f"the slices in {directory} do not fit this model: expected {want}, "
                                           f"found {got}")
            with torch.no_grad():
                for n, p in adapter.deltas.items():
                    p.copy_(tensors[n].to(torch.float32))
        except BaseException:
            adapter.detach()
            raise
        adapter._fingerprint = fp if fp is not None else None
        return adapter

    def extra_repr(self) -> str:
        return (f"model={type(self._model).__name__}, heads={len(self.heads)}, parts={self.parts!r}, "
                f"kv={self.kv!r}, bias={self.bias}, trainable={self.num_trainable():,}, state={self.state!r}")


def attach(model: nn.Module, heads, parts="qkvo", kv: str = "group", *, bias: bool = True) -> PinpointAdapter:
    """Freeze ``model`` and add trainable fp32 deltas for the selected heads' slices only.

    ``heads``: a HeadSet or any iterable of (layer, head) pairs (query heads). ``parts``: a
    subset of "qkvo". ``kv="group"`` trains the k/v rows of the KV heads the selected heads
    read (under MHA: their own), ``kv="none"`` none. ``bias``: also train the q/k/v bias
    entries of those rows when the model has them. See :class:`PinpointAdapter`.
    """
    return PinpointAdapter(model, heads, parts, kv, bias=bias)
