"""Locate on a model larger than memory: decoder layers read from the safetensors files one at a time.

Path patching and activation patching go layer by layer: one recorded pass over the base and
source prompts together, then every variant row advances through the layers together. So a
layer's weights are needed at two moments per batch of pairs, and ``LayerStream`` reads them
from the model's safetensors files just then (``safetensors.safe_open``, memory-mapped and
closed after each read), uses them and drops them (back to the "meta" device). The embeddings,
final norm and unembedding stay resident. Peak memory is about one decoder layer + the
activations + the embedding and unembedding, and each layer is read at most twice per batch
of pairs (``LayerStream.reads`` counts it).

* ``LayerStream(model_dir, dtype=None, attn_implementation=None)``: the model as a skeleton on
  "meta" (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``) with resident
  embeddings/norm/unembedding; ``load(i)``/``drop(i)``, ``layer(i)`` (a context),
  ``streaming()`` (a context in which any forward loads each layer on entry and drops it on
  exit), ``bytes_read`` (decoder layers read so far), ``reads`` [L] (reads per layer),
  ``resident_bytes`` (embeddings, final norm, unembedding: read once).
* ``safetensors_index(model_dir)``: tensor name -> file, or a clear error without safetensors.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .incremental import chunk_size, row_bytes
from .models import spec_for
from .tails import activation_tails, base_metric, check_finite, path_scores

__all__ = ["LayerStream", "NoSafetensorsError", "activation_streamed", "path_streamed", "safetensors_index"]


class NoSafetensorsError(ValueError):
    """``stream=True`` on a directory whose weights are not in safetensors files."""


def safetensors_index(model_dir) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: from ``model.safetensors.index.json``
    (sharded checkpoints) or every ``*.safetensors`` file in ``model_dir``."""
    from safetensors import safe_open

    d = Path(model_dir)
    if not d.is_dir():
        raise NoSafetensorsError(f"stream=True needs a model directory (save_pretrained); {d} is not a directory")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: d / f for k, f in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5"))
        raise NoSafetensorsError(
            f"stream=True reads layers from safetensors files, and {d} has none"
            + (f" (it has {', '.join(found)})" if found else "")
            + "; re-save the model with save_pretrained(dir) (safetensors is its default format)")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def _skeleton(model_dir: Path, dtype, attn_implementation):
    """The causal LM of ``model_dir``'s config with every parameter on "meta" (no memory), and
    its non-persistent buffers (rotary frequencies) rebuilt on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kw)
    if dtype is not None:
        model.to(dtype)
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rot is not None:  # computed from the config, not stored: build it for real
        model.model.rotary_emb = type(rot)(config=model.config)
    return model.eval()


class LayerStream:
    """A causal LM whose decoder layers live in its safetensors files until they are used."""

    def __init__(self, model_dir, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
        self.dir = Path(model_dir)
        self.files = safetensors_index(self.dir)
        self.dtype = dtype
        self.model = _skeleton(self.dir, dtype, attn_implementation)
        self.model.config._name_or_path = str(self.dir)  # what results name as the model, as from_pretrained does
        self.spec = spec_for(self.model)
        self.prefix = next(name for name, m in self.model.named_modules() if m is self.spec.decoder)
        self.bytes_read = 0
        self.reads = [0] * self.spec.n_layers
        self._meta = [{n: torch.empty_like(p, device="meta") for n, p in layer.block.named_parameters()}
                      for layer in self.spec.layers]
        self._load_resident()

    def reset_counts(self) -> None:
        """Zero ``bytes_read`` and ``reads`` (the resident part stays loaded)."""
        self.bytes_read, self.reads = 0, [0] * self.spec.n_layers

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _read(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """{local name: tensor} of file tensors ``names`` {local: full}, each file opened (mapped)
        only while it is read."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for local, full in names.items():
            if full not in self.files:
                raise ValueError(f"{self.dir}: the safetensors files have no tensor {full!r} (a "
                                 f"{type(self.model).__name__} needs it); is the checkpoint complete?")
            by_file.setdefault(self.files[full], []).append((local, full))
        out = {}
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for local, full in items:
                    t = fh.get_tensor(full)
                    out[local] = t if self.dtype is None or not t.is_floating_point() else t.to(self.dtype)
        self.bytes_read += sum(t.nbytes for t in out.values())
        return out

    def _load_resident(self) -> None:
        """Everything but the decoder layers (embeddings, final norm, unembedding) into memory."""
        inside = self.prefix + "."
        want = {n: n for n in self.model.state_dict() if not n.startswith(inside)}
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = [n for n in want if n not in self.files]
        if tied:  # a tied lm_head is not stored: tie_weights() shares the embedding
            missing = [n for n in missing if not n.startswith("lm_head.")]
            want = {n: f for n, f in want.items() if n in self.files}
        if missing:
            raise ValueError(f"{self.dir}: the safetensors files lack {', '.join(missing[:3])}; is the checkpoint "
                             "complete?")
        resident = self._read(want)
        self.resident_bytes = sum(t.nbytes for t in resident.values())
        self.bytes_read = 0  # counts decoder layer reads only
        self.model.load_state_dict(resident, strict=False, assign=True)
        if tied:
            self.model.tie_weights()
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if t.device.type == "meta" and not name.startswith(inside):
                raise ValueError(f"{self.dir}: {name} has no stored value and cannot be rebuilt for streaming")

    def load(self, i: int) -> None:
        """Read decoder layer ``i``'s weights from the files into the model."""
        block = self.spec.layers[i].block
        names = {n: f"{self.prefix}.{i}.{n}" for n in self._meta[i]}
        block.load_state_dict(self._read(names), strict=False, assign=True)
        self.reads[i] += 1

    def drop(self, i: int) -> None:
        """Free layer ``i``'s weights (back to "meta")."""
        self.spec.layers[i].block.load_state_dict(self._meta[i], strict=False, assign=True)

    @contextlib.contextmanager
    def layer(self, i: int):
        """Layer ``i``'s weights are present inside the block, and dropped after it."""
        self.load(i)
        try:
            yield self.spec.layers[i]
        finally:
            self.drop(i)

    @contextlib.contextmanager
    def streaming(self):
        """Within the block, a forward of the model loads each decoder layer as it enters it and
        drops it as it leaves (one read per layer per forward)."""
        handles = []
        try:
            for layer in self.spec.layers:
                i = layer.index
                handles.append(layer.block.register_forward_pre_hook(lambda m, a, i=i: self.load(i)))
                handles.append(layer.block.register_forward_hook(lambda m, a, o, i=i: self.drop(i)))
            yield self
        finally:
            for h in handles:
                h.remove()
            for i in range(self.spec.n_layers):  # a forward that failed midway leaves one loaded
                if not _on_meta(self.spec.layers[i].block):
                    self.drop(i)

    def __repr__(self) -> str:
        return (f"LayerStream({str(self.dir)!r}, {type(self.model).__name__}, {self.spec.n_layers} layers, "
                f"read {self.bytes_read:,} bytes)")


def _on_meta(module: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


# --- the streamed locate algorithms (called by pinpoint.locate with stream=True) -----------------

def _record_both(ls: LayerStream, base, src, pad: int, **what):
    """One streamed forward of base and source rows together: (base batch widened to the
    stacked width, base recording, source recording). Each layer is read once."""
    from .batching import stack
    from .recording import record

    B = base.size
    both = stack(base, src, pad)
    with ls.streaming():
        rec = record(ls.spec, both, **what)
    ib, is_ = torch.arange(B, device=both.last.device), torch.arange(B, 2 * B, device=both.last.device)
    return both.rows(ib), rec.rows(ib), rec.rows(is_)


def path_streamed(spec, fn, base, src, start: int, budget: int, bar, check: bool, *, ls: LayerStream, pad: int):
    """Path patching [B, L, H] and base metric [B] reading each layer twice: the recorded pass,
    then the variants' tails (see :func:`pinpoint.locate.path_tails`)."""
    _, rb, rs = _record_both(ls, base, src, pad, z=True, attn_out=True, resid_pre=True, last_only=True)
    return path_scores(spec, fn, rb, rs, start, budget, bar, check, layer=ls.layer,
                        devices=[ls.device] * spec.n_layers)


def activation_streamed(spec, fn, base, src, start: int, budget: int, bar, check: bool, *, ls: LayerStream,
                        pad: int, positions: str):
    """Activation patching [B, L, H] (head outputs replaced at every position, or at the last
    one) and base metric [B], reading each layer twice: the recorded pass, then every
    variant row advancing through the layers together (:func:`activation_tails`)."""
    base, rb, rs = _record_both(ls, base, src, pad, z=True, resid_pre=True, block_kwargs=True)
    mb = base_metric(spec, fn, rb, start)
    check_finite(rs.logits, start, "source")
    B, T, L, H = base.size, base.T, spec.n_layers, spec.n_heads
    n = chunk_size(budget, row_bytes(spec, "activation_all", T), L * H * B)
    vals = activation_tails(spec, fn, rb, rs, base, n, bar, layer=ls.layer, check=check,
                            last_only=(positions == "last"))
    return vals.to(mb.device).view(L, H, B).permute(2, 0, 1) - mb[:, None, None], mb
