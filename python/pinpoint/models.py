"""Model specs: where the heads of a stock ``transformers`` causal LM live.

A ``ModelSpec`` never reimplements a model. It records which modules hold the q/k/v/o projections,
norms, MLPs and unembedding, the head geometry, and the softmax scale, after checking that the
model's attention is plain causal multi-head (or grouped-query) attention that pinpoint's
kernels reproduce exactly. Anything else raises ``UnsupportedArchitectureError`` naming the
model class and the missing or unsupported attribute.

Two module layouts are understood:

- Llama family (Llama, Mistral, Qwen2 and relatives): ``model.model.layers[i]`` with
  ``self_attn.{q,k,v,o}_proj`` (``nn.Linear``; Phi-3 fuses q/k/v into ``qkv_proj``), ``input_layernorm``,
  ``post_attention_layernorm``, ``mlp``; ``model.model.norm``, ``model.model.embed_tokens``,
  rotary position embeddings.
- GPT-2 family: ``model.transformer.h[i]`` with a fused ``attn.c_attn`` (``Conv1D``, output
  ``[q | k | v]``), ``attn.c_proj``, ``ln_1``, ``ln_2``, ``mlp``; ``transformer.ln_f``,
  ``transformer.wte``, learned positions ``transformer.wpe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "UnsupportedArchitectureError",
    "Projection",
    "LayerSpec",
    "ModelSpec",
    "spec_for",
    "ModelAdapter",
    "adapter_for",
]


class UnsupportedArchitectureError(ValueError):
    """The model is not one whose attention heads pinpoint can address exactly."""


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@dataclass(frozen=True)
class Projection:
    """One of q/k/v/o: a slice of the output features of a linear-like module.

    ``kind`` is ``"linear"`` (``nn.Linear``, weight ``[out, in]``) or ``"conv1d"``
    (``transformers`` ``Conv1D``, weight ``[in, out]``). Output features
    ``out_offset : out_offset + out_size`` of ``module`` belong to this projection (GPT-2's
    fused ``c_attn`` holds q at 0, k at E, v at 2E). ``weight()`` and ``bias()`` are views of
    the module's parameters, so in-place edits through them edit the model.
    """

    module: nn.Module
    kind: str
    out_offset: int
    out_size: int
    in_features: int

    @property
    def out_slice(self) -> slice:
        """Slice of the module's output features that belong to this projection."""
        return slice(self.out_offset, self.out_offset + self.out_size)

    @property
    def fused(self) -> bool:
        """Whether the module's output holds more than this projection."""
        return self.out_offset != 0 or self.out_size != self.module_out_features

    @property
    def module_out_features(self) -> int:
        w = self.module.weight
        return w.shape[0] if self.kind == "linear" else w.shape[1]

    def weight(self) -> torch.Tensor:
        """View ``[out_size, in_features]`` (out-in layout) aliasing the module's weight."""
        w = self.module.weight
        if self.kind == "linear":
            return w[self.out_slice]
        return w[:, self.out_slice].t()

    def bias(self) -> torch.Tensor | None:
        """View ``[out_size]`` of the module's bias, or None."""
        b = getattr(self.module, "bias", None)
        return None if b is None else b[self.out_slice]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_size]``, equal to the module's output slice."""
        return F.linear(x, self.weight(), self.bias())


@dataclass(frozen=True)
class LayerSpec:
    """Modules of one decoder layer.

    ``q``: ``[*, hidden] -> [*, n_heads*head_dim]``; ``k``, ``v``: ``-> [*, n_kv_heads*head_dim]``;
    ``o``: ``[*, n_heads*head_dim] -> [*, hidden]`` (input = concatenated head outputs, head h
    at ``adapter.head_slice(h)``). ``input_norm`` runs before attention, ``post_attn_norm``
    before the MLP; both are pre-norm residual blocks.
    """

    index: int
    block: nn.Module
    attn: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    mlp: nn.Module
    input_norm: nn.Module
    post_attn_norm: nn.Module


class ModelSpec:
    """Head geometry, module locations and placement of a supported causal LM. Build with ``spec_for``.

    Attributes: ``arch`` (``config.model_type``, e.g. "llama", "mistral", "qwen2", "gpt2"),
    ``family`` ("llama" | "gpt2": the module layout), ``model``, ``config``, ``n_layers``,
    ``n_heads`` (query heads), ``n_kv_heads``, ``group_size`` (= n_heads // n_kv_heads),
    ``head_dim``, ``hidden_size``, ``vocab_size``, ``attn_scale`` (softmax scale),
    ``max_positions``, ``max_seq_len`` (longest sequence pinpoint computes exactly: the smallest
    of ``max_positions``, a limit given to ``spec_for`` and the smallest sliding window; see
    ``check_length``), ``sliding_window`` (smallest configured window or None) and
    ``window_layer`` (a layer that uses it), ``has_qkv_bias``, ``layers``
    (``list[LayerSpec]``), ``decoder`` (the layers' ``nn.ModuleList``), ``body`` (the base
    model: ``model.model`` / ``model.transformer``), ``embed``, ``final_norm``, ``lm_head``,
    ``positions`` ("rope" | "learned"), ``rotary_emb`` (rope module or None), ``pos_embed``
    (learned position ``nn.Embedding`` or None).
    """

    arch: str
    family: str
    model: nn.Module
    config: Any
    n_layers: int
    n_heads: int
    n_kv_heads: int
    group_size: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    attn_scale: float
    max_positions: int
    max_seq_len: int
    sliding_window: int | None
    window_layer: int | None
    has_qkv_bias: bool
    layers: list[LayerSpec]
    decoder: nn.ModuleList
    body: nn.Module
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Module
    positions: str
    rotary_emb: nn.Module | None
    pos_embed: nn.Embedding | None

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)

    def check_length(self, n_tokens: int, where: str = "the prompt") -> None:
        """Raise ValueError when a sequence of ``n_tokens`` is longer than pinpoint can compute
        exactly: longer than the smallest sliding window (naming it), or than the context."""
        from .errors import InputError   # a ValueError the CLI prints in one line

        if n_tokens <= self.max_seq_len:
            return
        if self.sliding_window is not None and self.max_seq_len == self.sliding_window:
            raise InputError(
                f"{where} is {n_tokens} tokens, longer than the sliding window of {self.sliding_window} tokens that "
                f"layer {self.window_layer} attends through (config.sliding_window); pinpoint's fused kernels "
                f"compute full causal attention and cannot honour the window, so keep prompts to at most "
                f"{self.sliding_window} tokens")
        raise InputError(f"{where} is {n_tokens} tokens, longer than the model's context of {self.max_seq_len} "
                         "tokens")

    def head_slice(self, h: int) -> slice:
        """Features of query head ``h`` in the q output and in the o input (``[n_heads*head_dim]``)."""
        if not 0 <= h < self.n_heads:
            raise IndexError(f"query head {h} out of range for {self.n_heads} heads")
        return slice(h * self.head_dim, (h + 1) * self.head_dim)

    def kv_head_of(self, h: int) -> int:
        """The key/value head that query head ``h`` reads (grouped-query attention)."""
        if not 0 <= h < self.n_heads:
            raise IndexError(f"query head {h} out of range for {self.n_heads} heads")
        return h // self.group_size

    def kv_head_slice(self, g: int) -> slice:
        """Features of key/value head ``g`` in the k and v outputs (``[n_kv_heads*head_dim]``)."""
        if not 0 <= g < self.n_kv_heads:
            raise IndexError(f"key/value head {g} out of range for {self.n_kv_heads} heads")
        return slice(g * self.head_dim, (g + 1) * self.head_dim)

    # Placement. accelerate's dispatch (``device_map``) leaves offloaded weights on "meta" and
    # moves them to the hook's execution device per call, so that device wins over the weight's.
    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device."""
        return self.embed_device

    @property
    def embed_device(self) -> torch.device:
        return module_device(self.embed)

    @property
    def unembed_device(self) -> torch.device:
        """Where the final norm and ``lm_head`` run."""
        return module_device(self.lm_head)

    def layer_device(self, i: int) -> torch.device:
        """Where decoder layer ``i`` runs (its attention, MLP and norms)."""
        return module_device(self.layers[i].block)

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices the model runs on, in layer order."""
        seen = [self.embed_device, *(self.layer_device(i) for i in range(self.n_layers)), self.unembed_device]
        return list(dict.fromkeys(seen))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def __repr__(self) -> str:
        return (
            f"ModelSpec(arch={self.arch!r}, model={type(self.model).__name__}, n_layers={self.n_layers}, "
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"hidden_size={self.hidden_size}, attn_scale={self.attn_scale:.6g})"
        )


# --------------------------------------------------------------------------------------------
# Checks shared by both layouts.

# model_type -> why it differs from the plain pre-norm transformer even with a matching layout.
_INCOMPATIBLE_MODEL_TYPES = {
    "gemma": "scales embeddings by sqrt(hidden_size) inside the model's forward",
    "gemma2": ("soft-caps attention logits (config.attn_logit_softcapping), which pinpoint's fused knockout kernel "
               "does not implement, soft-caps the output logits, and adds norms after attention and after the MLP "
               "that path patching's incremental tail does not model"),
    "gemma3": "uses extra norms, q/k norms and sliding windows",
    "gemma3_text": "uses extra norms, q/k norms and sliding windows",
    "granite": "scales residuals, embeddings and logits by config multipliers",
    "granitemoe": "scales residuals, embeddings and logits by config multipliers",
    "smollm3": "skips rotary embeddings on some layers (no_rope_layers)",
    "cohere": "runs attention and MLP in parallel from one norm",
    "cohere2": "runs attention and MLP in parallel from one norm",
    "minicpm": "scales residuals by scale_depth",
    "llama4": "uses chunked attention, temperature tuning and MoE layers",
    "olmo2": ("normalises queries and keys across all heads together (q_norm over n_heads*head_dim), so one head's "
              "q/k rows are not separable, and normalises after attention and after the MLP (post-norm blocks)"),
    "olmo3": "normalises queries and keys across all heads together and uses post-norm blocks",
    "phimoe": "fuses q, k and v into one qkv_proj matrix and routes MLPs through experts",
    "phi": "runs attention and MLP in parallel from one norm and rotates only part of each head",
}

# Attention implementations whose math is plain scaled-dot-product attention (pinpoint's own
# fused kernel included). A custom registered function could compute anything: refuse it.
_KNOWN_ATTENTION = {None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention",
                    "pinpoint_patched"}


def _differs(default: Any) -> Callable[[Any], bool]:
    return lambda v: v is not None and v != default


# config option -> (is it active?, what it does). Checked for every model type.
_NONSTANDARD_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "add_cross_attention": (bool, "adds cross-attention blocks"),
    "scale_attn_by_inverse_layer_idx": (bool, "scales each layer's attention by 1/(layer+1)"),
    "attn_logit_softcapping": (_differs(None), "soft-caps attention logits"),
    "final_logit_softcapping": (_differs(None), "soft-caps output logits"),
    "query_pre_attn_scalar": (_differs(None), "rescales queries before attention"),
    "residual_multiplier": (_differs(1.0), "scales residual branches"),
    "embedding_multiplier": (_differs(1.0), "scales embeddings"),
    "logits_scaling": (_differs(1.0), "scales output logits"),
    "clip_qkv": (_differs(None), "clips q/k/v activations"),
    "use_qk_norm": (bool, "normalises queries and keys"),
    "qk_layernorm": (bool, "normalises queries and keys"),
    "parallel_attn": (bool, "runs attention and MLP in parallel"),
    "use_parallel_residual": (bool, "runs attention and MLP in parallel"),
    "partial_rotary_factor": (_differs(1.0), "rotates only part of each head"),
    "attention_chunk_size": (_differs(None), "restricts attention to chunks"),
    "alibi": (bool, "uses ALiBi position biases"),
}


def _fail(model: nn.Module, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"{type(model).__name__}: {what}")


def _check_config(model: nn.Module, config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type in _INCOMPATIBLE_MODEL_TYPES:
        raise _fail(model, f"model_type {model_type!r} is not supported: it {_INCOMPATIBLE_MODEL_TYPES[model_type]}")
    if getattr(config, "is_encoder_decoder", False):
        raise _fail(model, "config.is_encoder_decoder is set; only decoder-only causal LMs are supported")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _KNOWN_ATTENTION:
        raise _fail(model, f"attention implementation {impl!r} is not one pinpoint has checked (it may compute "
                           "something other than plain causal attention); load the model with "
                           "attn_implementation='sdpa' or 'eager'")
    rope = getattr(config, "rope_parameters", None)
    for name, (active, what) in _NONSTANDARD_OPTIONS.items():
        value = getattr(config, name, None)
        if value is None and isinstance(rope, dict):
            value = rope.get(name)
        if value is not None and active(value):
            raise _fail(model, f"config.{name}={value!r} is not supported: it {what}")


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__name__ if t.__module__.startswith(("torch.", "transformers.")) else f"{t.__module__}.{t.__qualname__}"


def _get(model: nn.Module, owner: Any, attr: str, where: str, types: tuple[type, ...] | type | None = None):
    """``owner.attr`` or a clear error naming ``where.attr`` (and the expected type)."""
    value = getattr(owner, attr, None)
    if value is None:
        raise _fail(model, f"missing `{where}.{attr}`")
    if types is not None and not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _fail(model, f"`{where}.{attr}` is a {_type_name(value)}, expected {names}")
    return value


def _check_not_wrapped(model: nn.Module) -> None:
    """Wrappers forward attribute lookups, so they would half-work; ask for the model itself."""
    inner = {
        "DataParallel": "model.module",
        "DistributedDataParallel": "model.module",
        "OptimizedModule": "model._orig_mod (adapt before torch.compile)",
        "FullyShardedDataParallel": "the unwrapped model",
    }.get(type(model).__name__)
    if inner is None and type(model).__name__.startswith("Peft"):
        inner = "model.merge_and_unload() or model.get_base_model() without active adapters"
    if inner is not None:
        raise _fail(model, f"is a wrapper; pass the causal LM itself: {inner}")


def _check_children(model: nn.Module, module: nn.Module, expected: set[str], where: str) -> None:
    """Reject parameters or parameter-holding submodules that the plain layout does not have."""
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:
        kind = type(module).__name__
        raise _fail(model, f"`{where}` ({kind}) has its own parameters {own}; unsupported attention variant")
    for name, child in module.named_children():
        if name not in expected and any(True for _ in child.parameters()):
            raise _fail(
                model,
                f"unexpected submodule `{where}.{name}` ({type(child).__name__}); "
                f"supported layout has only {sorted(expected)}",
            )


def _expect_shape(model: nn.Module, tensor: torch.Tensor, shape: tuple[int, ...], where: str, why: str) -> None:
    if tuple(tensor.shape) != shape:
        raise _fail(model, f"`{where}` has shape {tuple(tensor.shape)} but the config implies {shape} ({why})")


def _linear_projection(model, module, offset, size, where) -> Projection:
    if not isinstance(module, nn.Linear):
        raise _fail(model, f"`{where}` is a {_type_name(module)}, expected nn.Linear")
    return Projection(module, "linear", offset, size, module.in_features)


# --------------------------------------------------------------------------------------------
# Layouts.


# Model types whose q_norm/k_norm are known to run per head, before RoPE, inside the attention
# module's own forward (checked exact on their replicas).
_PER_HEAD_QK_NORM_TYPES = {"qwen3", "qwen3_moe"}


def _per_head_qk_norms(model, attn, wa: str, head_dim: int) -> set[str]:
    """Names of Qwen3-style q/k norms on ``attn`` (``q_norm``/``k_norm``, one weight of
    ``head_dim`` shared by all heads and applied to each head on its own, before RoPE): heads
    stay separable, and every path runs them through the model's own modules. A norm over all
    heads together (OLMo-2: weight ``[n_heads*head_dim]``) mixes heads: refused by name."""
    if getattr(model.config, "model_type", None) not in _PER_HEAD_QK_NORM_TYPES:
        return set()  # q/k norms elsewhere are unexpected submodules: refused unless checked here
    found = set()
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is None:
            continue
        shapes = [tuple(p.shape) for p in norm.parameters()]
        if not shapes or any(sh != (head_dim,) for sh in shapes):
            raise _fail(model, f"`{wa}.{name}` normalises across all heads together (parameters {shapes}, head_dim "
                               f"{head_dim}), so one head's q/k rows are not separable; unsupported")
        found.add(name)
    return found


def _llama_projections(model, attn, wa: str, n_heads: int, n_kv: int, head_dim: int, hidden: int):
    """(q, k, v, o) of a Llama-layout attention module: separate ``q_proj``/``k_proj``/``v_proj``,
    or Phi-3's fused ``qkv_proj`` (rows ``[q | k | v]``: each head's slice is a block of rows of
    the fused matrix), and ``o_proj``. Shapes are checked against the config."""
    why = f"{n_heads} heads, {n_kv} kv heads, head_dim {head_dim}, hidden {hidden}"
    nq, nk = n_heads * head_dim, n_kv * head_dim
    norms = _per_head_qk_norms(model, attn, wa, head_dim)
    if getattr(attn, "qkv_proj", None) is not None:
        _check_children(model, attn, {"qkv_proj", "o_proj"} | norms, wa)
        fused = _get(model, attn, "qkv_proj", wa)
        q = _linear_projection(model, fused, 0, nq, f"{wa}.qkv_proj")
        k = _linear_projection(model, fused, nq, nk, f"{wa}.qkv_proj")
        v = _linear_projection(model, fused, nq + nk, nk, f"{wa}.qkv_proj")
        _expect_shape(model, fused.weight, (nq + 2 * nk, hidden), f"{wa}.qkv_proj.weight", why)
    else:
        _check_children(model, attn, {"q_proj", "k_proj", "v_proj", "o_proj"} | norms, wa)
        mods = {p: _get(model, attn, p, wa) for p in ("q_proj", "k_proj", "v_proj")}
        q = _linear_projection(model, mods["q_proj"], 0, nq, f"{wa}.q_proj")
        k = _linear_projection(model, mods["k_proj"], 0, nk, f"{wa}.k_proj")
        v = _linear_projection(model, mods["v_proj"], 0, nk, f"{wa}.v_proj")
        _expect_shape(model, q.module.weight, (nq, hidden), f"{wa}.q_proj.weight", why)
        _expect_shape(model, k.module.weight, (nk, hidden), f"{wa}.k_proj.weight", why)
        _expect_shape(model, v.module.weight, (nk, hidden), f"{wa}.v_proj.weight", why)
    o = _linear_projection(model, _get(model, attn, "o_proj", wa), 0, hidden, f"{wa}.o_proj")
    _expect_shape(model, o.module.weight, (hidden, nq), f"{wa}.o_proj.weight", why)
    return q, k, v, o


def _llama_family(model: nn.Module, config: Any, body: nn.Module) -> dict:
    decoder = _get(model, body, "layers", "model", nn.ModuleList)
    hidden = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    if n_heads % n_kv:
        raise _fail(model, f"config.num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    if len(decoder) == 0:
        raise _fail(model, "`model.layers` is empty")
    attn0 = _get(model, decoder[0], "self_attn", "model.layers[0]")
    # The attention module's own head_dim is what its forward uses; the config may omit it.
    head_dim = getattr(attn0, "head_dim", None) or getattr(config, "head_dim", None) or hidden // n_heads
    head_dim = int(head_dim)
    cfg_head_dim = getattr(config, "head_dim", None)
    if cfg_head_dim is not None and int(cfg_head_dim) != head_dim:
        raise _fail(model, f"config.head_dim={cfg_head_dim} but the attention modules use head_dim={head_dim}")

    model_type = getattr(config, "model_type", None)
    layer_types = getattr(config, "layer_types", None)
    layers, scales, windows = [], set(), []
    for i, block in enumerate(decoder):
        w = f"model.layers[{i}]"
        attn = _get(model, block, "self_attn", w)
        # Mixtral, Qwen2/3-MoE, ERNIE-MoE ... (transformers 4.x names Mixtral's `block_sparse_moe`)
        mlp_name = "block_sparse_moe" if hasattr(block, "block_sparse_moe") and not hasattr(block, "mlp") else "mlp"
        mlp = _get(model, block, mlp_name, w)
        if getattr(mlp, "experts", None) is not None:
            raise _fail(model, f"`{w}.{mlp_name}` ({type(mlp).__name__}) routes tokens through mixture-of-experts "
                               "MLPs, which path patching's one-token MLP reruns do not support yet")
        in_norm = _get(model, block, "input_layernorm", w)
        post_norm = _get(model, block, "post_attention_layernorm", w)
        _check_children(model, block, {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}, w)
        wa = f"{w}.self_attn"
        q, k, v, o = _llama_projections(model, attn, wa, n_heads, n_kv, head_dim, hidden)
        groups = getattr(attn, "num_key_value_groups", None)
        if groups is not None and groups != n_heads // n_kv:
            raise _fail(model, f"`{wa}.num_key_value_groups`={groups} but config implies {n_heads // n_kv}")
        if getattr(attn, "head_dim", head_dim) != head_dim:
            raise _fail(model, f"`{wa}.head_dim`={attn.head_dim} differs from layer 0 ({head_dim})")
        if getattr(attn, "is_causal", True) is not True:
            raise _fail(model, f"`{wa}.is_causal` is False; only causal self-attention is supported")
        scales.add(float(getattr(attn, "scaling", head_dim**-0.5)))

        # Which layers slide: config.layer_types when present (Qwen2 and newer), else a per-layer
        # attribute, else Mistral style (config.sliding_window for all layers; Llama ignores it).
        if layer_types is not None:
            if layer_types[i] not in ("full_attention", "sliding_attention"):
                raise _fail(model, f"config.layer_types[{i}]={layer_types[i]!r} is not supported")
            if layer_types[i] == "sliding_attention":
                windows.append((i, getattr(attn, "sliding_window", None) or config.sliding_window))
        elif hasattr(attn, "sliding_window"):
            windows.append((i, attn.sliding_window))
        elif model_type != "llama" and getattr(config, "use_sliding_window", True) is not False:
            windows.append((i, getattr(config, "sliding_window", None)))
        layers.append(LayerSpec(i, block, attn, q, k, v, o, mlp, in_norm, post_norm))

    rotary = getattr(body, "rotary_emb", None)
    if rotary is None:
        raise _fail(model, "missing `model.rotary_emb` (rotary position embeddings)")
    return dict(
        family="llama",
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        layers=layers,
        decoder=decoder,
        embed=_get(model, body, "embed_tokens", "model", nn.Embedding),
        final_norm=_get(model, body, "norm", "model"),
        positions="rope",
        rotary_emb=rotary,
        pos_embed=None,
        scales=scales,
        windows=windows,
    )


def _gpt2_family(model: nn.Module, config: Any, body: nn.Module) -> dict:
    Conv1D = _conv1d_type()
    decoder = _get(model, body, "h", "transformer", nn.ModuleList)
    hidden = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    if len(decoder) == 0:
        raise _fail(model, "`transformer.h` is empty")
    head_dim = int(getattr(getattr(decoder[0], "attn", None), "head_dim", None) or hidden // n_heads)
    if head_dim * n_heads != hidden:
        raise _fail(model, f"GPT-2 layout needs hidden_size == n_head * head_dim, got {hidden} != {n_heads}*{head_dim}")

    layers, scales = [], set()
    for i, block in enumerate(decoder):
        w = f"transformer.h[{i}]"
        if hasattr(block, "crossattention"):
            msg = f"`{w}.crossattention` exists (config.add_cross_attention); cross-attention is unsupported"
            raise _fail(model, msg)
        attn = _get(model, block, "attn", w)
        mlp = _get(model, block, "mlp", w)
        ln1 = _get(model, block, "ln_1", w)
        ln2 = _get(model, block, "ln_2", w)
        _check_children(model, block, {"attn", "mlp", "ln_1", "ln_2"}, w)
        wa = f"{w}.attn"
        if getattr(attn, "is_cross_attention", False):
            raise _fail(model, f"`{wa}.is_cross_attention` is True; cross-attention is not supported")
        _check_children(model, attn, {"c_attn", "c_proj"}, wa)
        c_attn = _get(model, attn, "c_attn", wa, Conv1D)
        c_proj = _get(model, attn, "c_proj", wa, Conv1D)
        why = f"{n_heads} heads, hidden {hidden}"
        _expect_shape(model, c_attn.weight, (hidden, 3 * hidden), f"{wa}.c_attn.weight", why)
        _expect_shape(model, c_proj.weight, (hidden, hidden), f"{wa}.c_proj.weight", why)
        if getattr(attn, "num_heads", n_heads) != n_heads or getattr(attn, "head_dim", head_dim) != head_dim:
            got = f"num_heads={attn.num_heads}, head_dim={attn.head_dim}"
            raise _fail(model, f"`{wa}` has {got}; config implies {n_heads}, {head_dim}")
        q = Projection(c_attn, "conv1d", 0, hidden, hidden)
        k = Projection(c_attn, "conv1d", hidden, hidden, hidden)
        v = Projection(c_attn, "conv1d", 2 * hidden, hidden, hidden)
        o = Projection(c_proj, "conv1d", 0, hidden, hidden)
        default = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        scales.add(float(getattr(attn, "scaling", default)))
        layers.append(LayerSpec(i, block, attn, q, k, v, o, mlp, ln1, ln2))

    return dict(
        family="gpt2",
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        layers=layers,
        decoder=decoder,
        embed=_get(model, body, "wte", "transformer", nn.Embedding),
        final_norm=_get(model, body, "ln_f", "transformer"),
        positions="learned",
        rotary_emb=None,
        pos_embed=_get(model, body, "wpe", "transformer", nn.Embedding),
        scales=scales,
        windows=[],
    )


def _one_scale(model: nn.Module, scales: set) -> float:
    """The softmax scale all layers share (pinpoint supports one)."""
    if len(scales) != 1:
        raise _fail(model, f"attention scale differs between layers ({sorted(scales)}); only one scale is supported")
    (attn_scale,) = scales
    if not math.isfinite(attn_scale) or attn_scale <= 0:
        raise _fail(model, f"attention scale {attn_scale} is not a positive number")
    return attn_scale


def _lengths(model: nn.Module, config: Any, pos_embed, max_seq_len) -> tuple[int, int]:
    """(max_positions, the longest sequence allowed before any sliding window)."""
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    if pos_embed is not None:
        max_positions = pos_embed.num_embeddings
    if max_positions <= 0:
        raise _fail(model, "missing config.max_position_embeddings")
    if max_seq_len is not None and int(max_seq_len) < 1:
        raise ValueError(f"max_seq_len must be a positive number of tokens, got {max_seq_len}")
    return max_positions, max_positions if max_seq_len is None else min(int(max_seq_len), max_positions)


def _narrowest_window(model: nn.Module, windows) -> tuple[int | None, int | None]:
    """(window, layer) of the narrowest sliding window, or (None, None). A sliding window is
    irrelevant to sequences that fit in it: there attention is plain causal attention.
    pinpoint's fused kernel computes full causal attention, so longer sequences are refused
    (ModelSpec.check_length names the window) instead of silently computed without it."""
    window, window_layer = None, None
    for i, w in windows:
        if w is None:
            continue
        if not isinstance(w, int) or w < 1:
            raise _fail(model, f"layer {i} has sliding window {w!r}; expected a positive number of tokens")
        if window is None or w < window:
            window, window_layer = int(w), i
    return window, window_layer


def spec_for(model: nn.Module, *, max_seq_len: int | None = None) -> ModelSpec:
    """Describe ``model`` (a stock ``transformers`` causal LM) for pinpoint.

    ``max_seq_len``: promise that sequences never exceed this many tokens. A sliding attention
    window (Mistral-7B-v0.1's 4096) needs no promise: sequences up to the window are exact, longer
    ones are refused by ``ModelSpec.check_length``. Raises
    ``UnsupportedArchitectureError`` naming the class and the missing or unsupported feature.
    Returns ``model`` unchanged if it already is a ``ModelSpec``.
    """
    if isinstance(model, ModelSpec):
        return model
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise UnsupportedArchitectureError(f"{name} is not a torch.nn.Module")
    _check_not_wrapped(model)
    config = getattr(model, "config", None)
    if config is None:
        raise _fail(model, "missing `config`; pass a transformers PreTrainedModel")
    _check_config(model, config)

    body = getattr(model, "model", None)
    if isinstance(getattr(body, "layers", None), nn.ModuleList):
        parts = _llama_family(model, config, body)
    elif isinstance(getattr(getattr(model, "transformer", None), "h", None), nn.ModuleList):
        body = model.transformer
        parts = _gpt2_family(model, config, body)
    elif any(isinstance(getattr(model, a, None), nn.ModuleList) for a in ("layers", "h")):
        raise _fail(model, "missing `lm_head`: this is a base model; pass its causal-LM class (e.g. LlamaForCausalLM)")
    else:
        raise _fail(
            model,
            "no supported decoder layout: expected `model.layers[i].self_attn.q_proj` (Llama/Mistral/Qwen2) "
            "or `transformer.h[i].attn.c_attn` (GPT-2 family)",
        )

    lm_head = _get(model, model, "lm_head", "model", nn.Linear)
    embed = parts["embed"]
    hidden, vocab = parts["hidden_size"], embed.num_embeddings
    _expect_shape(model, embed.weight, (vocab, hidden), "embed.weight", f"hidden {hidden}")
    _expect_shape(model, lm_head.weight, (vocab, hidden), "lm_head.weight", f"vocab {vocab}, hidden {hidden}")
    cfg_vocab = getattr(config, "vocab_size", vocab)
    if cfg_vocab != vocab:
        raise _fail(model, f"config.vocab_size={cfg_vocab} but the embedding has {vocab} rows")

    n_layers = len(parts["decoder"])
    cfg_layers = getattr(config, "num_hidden_layers", n_layers)
    if cfg_layers != n_layers:
        raise _fail(model, f"config.num_hidden_layers={cfg_layers} but the model has {n_layers} decoder layers")

    attn_scale = _one_scale(model, parts.pop("scales"))
    max_positions, limit = _lengths(model, config, parts["pos_embed"], max_seq_len)
    window, window_layer = _narrowest_window(model, parts.pop("windows"))

    q0 = parts["layers"][0].q
    return ModelSpec(
        arch=getattr(config, "model_type", None) or parts["family"],
        model=model,
        config=config,
        n_layers=n_layers,
        group_size=parts["n_heads"] // parts["n_kv_heads"],
        vocab_size=vocab,
        attn_scale=attn_scale,
        max_positions=max_positions,
        max_seq_len=limit if window is None else min(limit, window),
        sliding_window=window,
        window_layer=window_layer,
        has_qkv_bias=q0.bias() is not None,
        body=body,
        lm_head=lm_head,
        **parts,
    )


def accelerate_hooks(module: nn.Module) -> list:
    """accelerate's hooks on ``module`` (a SequentialHook's members flattened; [] without)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _hook_device(module: nn.Module) -> torch.device | None:
    for hook in accelerate_hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's hook execution device if it has one,
    else that of its first parameter or buffer (CPU for a module with neither). A module whose
    weights sit on "meta" without a hook of its own (``accelerate.cpu_offload`` hooks only the
    leaf modules) runs where its submodules' hooks put it."""
    dev = _hook_device(module)
    if dev is not None:
        return dev
    for t in (*module.parameters(), *module.buffers()):
        dev = t.device
        break
    else:
        return torch.device("cpu")
    if dev.type == "meta":
        for sub in module.modules():
            hooked = _hook_device(sub)
            if hooked is not None:
                return hooked
    return dev


# Deprecated names, kept for one release: the word "adapter" now means only PinpointAdapter.
def adapter_for(model: nn.Module, *, max_seq_len: int | None = None) -> ModelSpec:
    """Deprecated alias of ``spec_for``."""
    import warnings

    warnings.warn("pinpoint.models.adapter_for is deprecated; use spec_for", DeprecationWarning, stacklevel=2)
    return spec_for(model, max_seq_len=max_seq_len)


ModelAdapter = ModelSpec  # deprecated alias of ModelSpec
