"""Placement checks for models spread over devices (accelerate ``device_map``, CPU or disk offload).

accelerate's ``dispatch_model`` / ``from_pretrained(device_map=...)`` leaves offloaded weights on
the "meta" device and attaches an ``AlignDevicesHook`` that loads them onto the module's
execution device for each call. A weight on "meta" with no such hook has no values at all: every
result computed with it would be garbage (or a confusing "Tensor on device meta" error deep in a
kernel). ``check_materialised`` finds that case up front and names the module.

* ``check_materialised(spec)``: raise ``ValueError`` naming the first module whose weights are
  on "meta" with nothing to load them (or whose execution device is "meta").
* ``layer_devices(spec)``: ``[torch.device]`` per decoder layer (where its tensors must live).
* ``parse_max_memory(text)``, ``device_map_kwargs(device_map, max_memory, offload_dir)``: the
  CLI's ``--device-map``/``--max-memory``/``--offload-dir`` as ``from_pretrained`` keywords.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .models import ModelSpec, accelerate_hooks

__all__ = ["DEVICE_MAPS", "check_materialised", "device_map_kwargs", "layer_devices", "parse_max_memory"]


def _loads_weights(hook) -> bool:
    """Whether an accelerate hook materialises offloaded weights before each call."""
    dev = getattr(hook, "execution_device", None)
    return (bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None
            and dev is not None and torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}").type != "meta")


def _offloaded_by_ancestor(chain: list[nn.Module]) -> bool:
    """Whether a hook on ``chain[-1]`` or on an ancestor that places its submodules loads the weights."""
    own = chain[-1]
    for i, mod in enumerate(chain):
        for hook in accelerate_hooks(mod):
            if _loads_weights(hook) and (mod is own or getattr(hook, "place_submodules", False)):
                return True
    return False


def check_materialised(spec: ModelSpec) -> None:
    """Refuse a model with weights on "meta" that nothing will load (a ``device_map`` entry of
    "meta", or "disk" without ``offload_dir``/weights map), naming the first such module."""
    def walk(module: nn.Module, name: str, chain: list[nn.Module]):
        chain = chain + [module]
        for pname, p in module.named_parameters(recurse=False):
            if p.device.type == "meta" and not _offloaded_by_ancestor(chain):
                raise ValueError(
                    f"{name + '.' if name else ''}{pname} of {type(spec.model).__name__} is on the 'meta' device and "
                    "no accelerate offload hook loads it: the device_map leaves it without weights. Map it to a "
                    "device, to 'cpu', or to 'disk' with offload_dir= (accelerate.dispatch_model / from_pretrained)")
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, chain)

    walk(spec.model, "", [])
    for i, dev in enumerate(layer_devices(spec)):
        if dev.type == "meta":
            raise ValueError(f"decoder layer {i} of {type(spec.model).__name__} executes on the 'meta' device "
                             "(its accelerate hook's execution_device): map it to a real device")


def layer_devices(spec: ModelSpec) -> list[torch.device]:
    """The execution device of every decoder layer, in order (``spec.layer_device``)."""
    return [spec.layer_device(i) for i in range(spec.n_layers)]


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_max_memory(text: str) -> dict:
    """``"0=10GiB,cpu=30GiB"`` -> ``{0: "10GiB", "cpu": "30GiB"}`` (accelerate's ``max_memory``):
    keys are GPU indices, "cpu" or "disk"; values a size with an optional unit (B, KB, KiB, ... TiB)."""
    out: dict = {}
    for part in (p.strip() for p in str(text).split(",")):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"max_memory entry {part!r} is not DEVICE=SIZE (e.g. 0=10GiB,cpu=30GiB)")
        if not (key.isdigit() or key in ("cpu", "disk")):
            raise ValueError(f"max_memory device {key!r} is not a GPU index, 'cpu' or 'disk'")
        if not _SIZE.match(value):
            raise ValueError(f"max_memory size {value!r} for {key} is not a size such as 10GiB, 512MB or 1000000")
        k = int(key) if key.isdigit() else key
        if k in out:
            raise ValueError(f"max_memory names device {key} twice")
        out[k] = value if not value.isdigit() else int(value)
    return out


def device_map_kwargs(device_map: str | None, max_memory: str | None, offload_dir: str | None = None) -> dict:
    """``from_pretrained`` keywords for ``device_map`` (one of ``DEVICE_MAPS``) and ``max_memory``
    (``parse_max_memory`` text); {} when neither is given. Offloaded weights go to ``offload_dir``."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory needs a device_map (e.g. device_map='auto')")
        return {}
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    kw: dict = {"device_map": device_map}
    if max_memory is not None:
        kw["max_memory"] = parse_max_memory(max_memory)
    if offload_dir is not None:
        kw["offload_folder"] = str(offload_dir)
    return kw
