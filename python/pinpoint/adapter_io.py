"""Adapter files: pinpoint's own format (``save``/``load``) and an exact PEFT LoRA export.

Pinpoint's format, in one directory:

* ``pinpoint_adapter.json``: heads, parts, kv, bias, the model's head geometry and config,
  the base-weights fingerprint (:mod:`pinpoint.fingerprint`), the slice shapes;
* ``adapter.safetensors``: the fp32 deltas under their names (``l{layer}_{part}[_bias]``).

The config was called ``adapter_config.json`` before, which is PEFT's file name. ``load``
still reads that name when it holds a pinpoint config, and ``save`` still writes a copy under
it (for readers of the old layout) unless the directory already holds PEFT's file of that
name, which it never overwrites.

``save_peft(adapter, dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained(base_model, dir)`` loads as a LoRA adapter whose
update is the adapter's, exactly: per patched module, rank r = (number of head slices) ·
head_dim, ``lora_alpha == r`` so the scaling is 1, and

* rows (q/k/v, and GPT-2's fused c_attn): ``B`` [out, r] is a 0/1 selector putting row i of
  ``A`` [r, in] (= the stacked row deltas) onto the slice's output row, so B·A = scatter(Δ);
* columns (o_proj): ``A`` [r, in] selects the slice's input columns and ``B`` [out, r] holds
  the column deltas, so B·A places Δ on those columns;
* bias deltas (Qwen2, GPT-2): ``lora_bias=True``; ``lora_B.bias`` holds them on their rows,
  zeros elsewhere (and on modules without a trained bias).

``rank_pattern``/``alpha_pattern`` give each module its own r. With fp32 weights PEFT's
``W x + B(A x)`` equals the merged model's ``(W + Δ) x`` up to float summation order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write_bytes
from .fingerprint import matches, weights_fingerprint
from .models import ModelSpec, spec_for

__all__ = ["AdapterMismatchError", "CONFIG_NAME", "LEGACY_CONFIG_NAME", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME",
           "WEIGHTS_NAME", "config_dict", "geometry", "load", "peft_tensors", "save", "save_peft"]

ADAPTER_FORMAT = "pinpoint-adapter"
ADAPTER_VERSION = 1
CONFIG_NAME = "pinpoint_adapter.json"
LEGACY_CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the model it is being loaded onto."""


def geometry(spec: ModelSpec) -> dict:
    return {"arch": spec.arch, "n_layers": spec.n_layers, "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads,
            "head_dim": spec.head_dim, "hidden_size": spec.hidden_size, "has_qkv_bias": bool(spec.has_qkv_bias)}


def _model_config(model: nn.Module) -> dict:
    cfg = model.config
    try:
        return json.loads(cfg.to_json_string(use_diff=False))
    except Exception:  # pragma: no cover - exotic configs
        return {"model_type": getattr(cfg, "model_type", None)}


def config_dict(adapter) -> dict:
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "heads": [list(h) for h in adapter.heads],
        "parts": adapter.parts,
        "kv": adapter.kv,
        "bias": adapter.bias,
        "model_class": type(adapter.model).__name__,
        "geometry": adapter.geometry,
        "base_fingerprint": adapter.fingerprint(),
        "slices": {n: list(p.shape) for n, p in adapter.deltas.items()},
        "num_trainable": adapter.num_trainable(),
        "model_config": _model_config(adapter.model),
    }


def save(adapter, directory) -> Path:
    """Write ``adapter.safetensors`` (fp32 slices) and ``pinpoint_adapter.json`` (heads, parts,
    kv, model config, base-weights fingerprint) into ``directory``; each file atomically."""
    from safetensors.torch import save as st_save

    directory = Path(directory)
    cfg = json.dumps(config_dict(adapter), indent=2).encode()
    tensors = {n: p.detach().cpu().contiguous() for n, p in adapter.deltas.items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, st_save(tensors, metadata={"format": ADAPTER_FORMAT}))
    atomic_write_bytes(directory / CONFIG_NAME, cfg)  # never PEFT's adapter_config.json (that name is read only)
    return directory


def _read_config(directory: Path) -> dict:
    for name in (CONFIG_NAME, LEGACY_CONFIG_NAME):
        path = directory / name
        if not path.exists():
            continue
        cfg = json.loads(path.read_text())
        if cfg.get("format") == ADAPTER_FORMAT:
            return cfg
        if name == LEGACY_CONFIG_NAME and "peft_type" in cfg:
            raise AdapterMismatchError(f"{directory} holds a PEFT adapter ({path.name} has peft_type "
                                       f"{cfg['peft_type']!r}), not a pinpoint adapter; load it with "
                                       "peft.PeftModel.from_pretrained")
        raise AdapterMismatchError(f"{path} is not a pinpoint adapter config (format={cfg.get('format')!r})")
    raise FileNotFoundError(f"no pinpoint adapter in {directory}: {CONFIG_NAME} is missing")


def _check_model(directory: Path, cfg: dict, model: nn.Module, check_fingerprint: bool) -> str | None:
    """Refuse a model of another geometry or (when checked) other base weights; returns its fingerprint."""
    geo = geometry(spec_for(model))
    diffs = [f"{k}: adapter {cfg['geometry'].get(k)!r} vs model {v!r}"
             for k, v in geo.items() if cfg["geometry"].get(k) != v]
    if diffs:
        raise AdapterMismatchError(f"the adapter in {directory} was made for a different model "
                                   f"({cfg.get('model_class')}): " + "; ".join(diffs))
    if not check_fingerprint:
        return None
    fp = weights_fingerprint(model)
    if not matches(model, cfg["base_fingerprint"], fp):
        raise AdapterMismatchError(
            f"the base weights of this {type(model).__name__} differ from those the adapter in {directory} "
            f"was trained on (fingerprint {fp[-12:]}… vs {cfg['base_fingerprint'][-12:]}…); load the same "
            "base checkpoint, or pass check_fingerprint=False to attach anyway")
    return fp


def load(cls, directory, model: nn.Module, *, check_fingerprint: bool = True):
    """Attach the adapter saved in ``directory`` to ``model`` (an instance of ``cls``).

    Refuses (``AdapterMismatchError``) a model whose head geometry, slice shapes or base
    weights (fingerprint) differ from the one the adapter was trained on.
    ``check_fingerprint=False`` skips only the weights check (shapes are always checked).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = _read_config(directory)
    fp = _check_model(directory, cfg, model, check_fingerprint)
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
    adapter._fingerprint = fp
    return adapter


# --------------------------------------------------------------------------------------------
# PEFT export.


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@torch.no_grad()
def _lora_pair(adapter, mp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A [r, in], B [out, r], B's bias [out] or None) with B·A = the module's scattered deltas."""
    D = adapter.spec.head_dim
    w = mp.module.weight
    out_f, in_f = w.shape if mp.kind == "linear" else (w.shape[1], w.shape[0])
    deltas = torch.cat([adapter.deltas[n].detach().float().cpu() for n in mp.names], 0)
    r = len(mp.blocks) * D
    # feature index of each of the r ranks: block b's d-th feature is b*D + d
    feats = (torch.tensor(mp.blocks)[:, None] * D + torch.arange(D)[None, :]).reshape(-1)
    ranks = torch.arange(r)
    bias = None
    if mp.by == "rows":
        A = deltas.reshape(r, in_f)
        B = torch.zeros(out_f, r)
        B[feats, ranks] = 1.0
    else:
        A = torch.zeros(r, in_f)
        A[ranks, feats] = 1.0
        B = deltas.permute(1, 0, 2).reshape(out_f, r)  # [S, out, D] -> [out, S*D]
    if mp.bias_names is not None:
        bias = torch.zeros(out_f)
        bias[feats] = torch.cat([adapter.deltas[n].detach().float().cpu() for n in mp.bias_names], 0).reshape(-1)
    return A.contiguous(), B.contiguous(), bias


def peft_tensors(adapter) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT state dict (``base_model.model.<module>.lora_A.weight`` ...) and LoraConfig fields."""
    names = _module_names(adapter.model)
    use_bias = any(mp.bias_names is not None for mp in adapter.plan.modules)
    tensors, ranks, kinds = {}, {}, set()
    for mp in adapter.plan.modules:
        name = names[id(mp.module)]
        A, B, bias = _lora_pair(adapter, mp)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = A
        tensors[f"{key}.lora_B.weight"] = B
        if use_bias:
            tensors[f"{key}.lora_B.bias"] = bias if bias is not None else torch.zeros(B.shape[0])
        ranks[re.escape(name)] = A.shape[0]
        kinds.add(mp.kind)
    if len(kinds) > 1:  # fan_in_fan_out is one flag per PEFT config
        raise ValueError(f"{type(adapter.model).__name__} mixes Linear and Conv1D projections; one PEFT LoRA "
                         "config cannot describe both")
    first = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
        "base_model_name_or_path": getattr(adapter.model.config, "_name_or_path", None) or None,
        "r": first, "lora_alpha": first, "rank_pattern": ranks, "alpha_pattern": dict(ranks),
        "target_modules": sorted(names[id(mp.module)] for mp in adapter.plan.modules),
        "lora_dropout": 0.0, "bias": "none", "lora_bias": use_bias, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": kinds == {"conv1d"}, "init_lora_weights": True, "modules_to_save": None,
    }
    return tensors, config


def save_peft(adapter, directory) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA, exact; see the
    module docstring) into ``directory``. The adapter applies to the base model (before any
    merge), in any of the adapter's states."""
    from safetensors.torch import save as st_save

    directory = Path(directory)
    tensors, config = peft_tensors(adapter)
    # PEFT warns about config keys it does not know, so pinpoint's provenance goes in the metadata
    pinpoint_info = {"heads": [list(h) for h in adapter.heads], "parts": adapter.parts, "kv": adapter.kv,
                     "note": "exact LoRA form of a pinpoint head-slice adapter (scaling 1: lora_alpha == r)"}
    atomic_write_bytes(directory / PEFT_WEIGHTS_NAME,
                        st_save(tensors, metadata={"format": "pt", "pinpoint": json.dumps(pinpoint_info)}))
    atomic_write_bytes(directory / PEFT_CONFIG_NAME, json.dumps(config, indent=2).encode())
    return directory
