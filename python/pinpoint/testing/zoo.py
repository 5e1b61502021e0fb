"""A zoo of tiny offline replicas of real chat-model families.

``replica(family)`` writes (once, then from the cache) a standard Hugging Face directory:
a tiny random model (2 layers, hidden 64-96) whose config carries the real family's keys and
quirks, saved in the family's on-disk dtype; a tokenizer of the family's kind trained offline
on a small built-in corpus (see ``corpus.py``); the family's chat template as its
``tokenizer_config.json`` carries it. ``load_replica(family)`` loads it back through
``AutoModelForCausalLM`` / ``AutoTokenizer`` with the default attention (sdpa).

    import pinpoint as pp
    from pinpoint.testing import replica
    path = replica("llama3.1")           # ~/.cache/pinpoint/replicas/llama3.1-seed0-<hash>
    model = AutoModelForCausalLM.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)

``FAMILIES`` maps each name to its :class:`Family` (what it mimics and whether pinpoint
supports it; ``Family.refusal`` is the reason a refused family is refused).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import replace_dir, staging_dir
from .corpus import corpus
from .family_tokenizers import LLAMA3_PATTERN, QWEN2_PATTERN, byte_level_bpe, sentencepiece_bpe

__all__ = ["FAMILIES", "Family", "replica", "load_replica", "ZOO_VERSION", "chat_template"]

ZOO_VERSION = 1
_HERE = Path(__file__).parent


def chat_template(name: str) -> str:
    """The text of a shipped template file ``<name>.jinja`` (as tokenizer_config.json holds it)."""
    return (_HERE / f"{name}.jinja").read_text(encoding="utf-8")


# Phi-3-mini-instruct's template as its tokenizer_config.json carries it.
_PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# OLMo-2 and Granite (refused families) ship long templates (tools, dates): these keep their
# turn markers only.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_GRANITE_TEMPLATE = (
    "{%- for message in messages %}{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + "
    "message['content'] + '<|end_of_text|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}")


@dataclass(frozen=True)
class Family:
    """One replica family.

    ``config_class``/``config``: the transformers config class name and its tiny keyword
    arguments (token ids are filled in from the tokenizer); ``dtype``: on-disk dtype;
    ``tokenizer``: "sp" (SentencePiece-style BPE), "sp-gemma" (no dummy prefix) or
    "bytelevel"; ``pattern``: the byte-level split regex (None: GPT-2's); ``specials``,
    ``bos``/``eos``/``pad``/``unk``: special tokens; ``template``: the chat template text or
    None (GPT-2 has none); ``tokenizer_class``: what the real tokenizer_config.json names;
    ``refusal``: None when pinpoint supports the family, else the words the refusal contains.
    """

    name: str
    mimics: str
    config_class: str
    config: dict
    dtype: torch.dtype
    tokenizer: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    template: str | None
    tokenizer_class: str
    pad: str | None = None
    unk: str | None = None
    pattern: str | None = None
    add_bos: bool = False
    eos_ids: tuple[str, ...] = ()
    refusal: str | None = None
    vocab_size: int = 1200
    extra_tokenizer_config: dict = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return self.refusal is None


_SP = ("<unk>", "<s>", "</s>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
_LLAMA_BLOCK = dict(hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)


def _families() -> dict[str, Family]:
    fams = [
        Family("llama2-chat", "meta-llama/Llama-2-7b-chat-hf", "LlamaConfig",
               dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0, pretraining_tp=1,
                    tie_word_embeddings=False, **_LLAMA_BLOCK),
               torch.float16, "sp", _SP, "<s>", "</s>", chat_template("llama2_chat"), "LlamaTokenizer",
               unk="<unk>", add_bos=True, extra_tokenizer_config={"legacy": False, "add_eos_token": False}),
        Family("mistral-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "MistralConfig",
               dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0,
                    tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-5),
               torch.bfloat16, "sp", _SP, "<s>", "</s>", chat_template("mistral_instruct"), "LlamaTokenizer",
               unk="<unk>", add_bos=True, extra_tokenizer_config={"legacy": True, "add_eos_token": False}),
        Family("mistral-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "MistralConfig",
               dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=32768, sliding_window=None, rope_theta=1e6,
                    tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-5),
               torch.bfloat16, "sp", _SP, "<s>", "</s>", chat_template("mistral_instruct"), "LlamaTokenizer",
               unk="<unk>", add_bos=True, extra_tokenizer_config={"legacy": False, "add_eos_token": False}),
        Family("llama3.1", "meta-llama/Llama-3.1-8B-Instruct", "LlamaConfig",
               dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    tie_word_embeddings=False, pretraining_tp=1, **_LLAMA_BLOCK),
               torch.bfloat16, "bytelevel", _LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
               chat_template("llama3_1_instruct"), "PreTrainedTokenizerFast", pattern=LLAMA3_PATTERN, add_bos=True,
               eos_ids=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
        Family("qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2Config",
               dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                    sliding_window=32768, use_sliding_window=False, max_window_layers=21, tie_word_embeddings=True,
                    hidden_act="silu"),
               torch.bfloat16, "bytelevel", _QWEN_SPECIALS, None, "<|im_end|>", chat_template("qwen2_5_instruct"),
               "Qwen2Tokenizer", pad="<|endoftext|>", pattern=QWEN2_PATTERN,
               eos_ids=("<|im_end|>", "<|endoftext|>")),
        Family("gemma2", "google/gemma-2-2b-it", "Gemma2Config",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=8192,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
               torch.bfloat16, "sp-gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
               "<bos>", "<eos>", chat_template("gemma2_it"), "GemmaTokenizer", pad="<pad>", unk="<unk>",
               add_bos=True, eos_ids=("<eos>", "<end_of_turn>"),
               refusal="soft-caps attention logits"),
        Family("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "LlamaConfig",
               dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, **_LLAMA_BLOCK),
               torch.bfloat16, "bytelevel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>",
               "<|im_end|>", chat_template("smollm2_instruct"), "GPT2Tokenizer", pad="<|im_end|>",
               unk="<|endoftext|>"),
        Family("gpt2", "openai-community/gpt2", "GPT2Config",
               dict(n_embd=64, n_head=4, n_layer=2, n_positions=1024, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True),
               torch.float32, "bytelevel", ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None,
               "GPT2Tokenizer", unk="<|endoftext|>"),
        Family("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "LlamaConfig",
               dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=1, max_position_embeddings=2048, rope_theta=10000.0,
                    tie_word_embeddings=False, **_LLAMA_BLOCK),
               torch.bfloat16, "sp", _SP, "<s>", "</s>", chat_template("zephyr"), "LlamaTokenizer", unk="<unk>",
               pad="</s>", add_bos=True, extra_tokenizer_config={"legacy": False, "add_eos_token": False}),
        Family("gemma3", "google/gemma-3-1b-it", "Gemma3TextConfig",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=512,
                    max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
               torch.bfloat16, "sp-gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
               "<bos>", "<eos>", chat_template("gemma3_it"), "GemmaTokenizer", pad="<pad>", unk="<unk>",
               add_bos=True, eos_ids=("<eos>", "<end_of_turn>"), refusal="q/k norms"),
        Family("mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", "MixtralConfig",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=32768, sliding_window=None, rope_theta=1e6, tie_word_embeddings=False),
               torch.bfloat16, "sp", _SP, "<s>", "</s>", chat_template("mistral_instruct"), "LlamaTokenizer",
               unk="<unk>", add_bos=True, extra_tokenizer_config={"legacy": True, "add_eos_token": False},
               refusal="mixture-of-experts"),
        # Beyond the paper. Qwen3 (per-head q/k norms, head_dim != hidden/heads) and Phi-3 (fused
        # qkv_proj) are supported; the others are refused by name.
        Family("qwen3", "Qwen/Qwen3-0.6B", "Qwen3Config",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=40960, rope_theta=1e6,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu"),
               torch.bfloat16, "bytelevel", _QWEN_SPECIALS + ("<think>", "</think>"), None, "<|im_end|>",
               chat_template("qwen3"), "Qwen2Tokenizer", pad="<|endoftext|>", pattern=QWEN2_PATTERN,
               eos_ids=("<|im_end|>", "<|endoftext|>")),
        Family("olmo2", "allenai/OLMo-2-1124-7B-Instruct", "Olmo2Config",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=4096, rope_theta=500000.0,
                    tie_word_embeddings=False),
               torch.float32, "bytelevel", ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"),
               "<|endoftext|>", "<|endoftext|>", _CHATML_TEMPLATE, "GPT2Tokenizer", pad="<|pad|>",
               refusal="olmo2"),
        Family("phi3", "microsoft/Phi-3-mini-4k-instruct", "Phi3Config",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096,
                    sliding_window=2047, rope_theta=10000.0, tie_word_embeddings=False),
               torch.bfloat16, "sp", _SP + ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
               "<s>", "<|endoftext|>", _PHI3_TEMPLATE, "LlamaTokenizer", unk="<unk>", pad="<|endoftext|>",
               eos_ids=("<|endoftext|>", "<|end|>")),
        Family("granite", "ibm-granite/granite-3.1-2b-instruct", "GraniteConfig",
               dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=131072, rope_theta=5e6,
                    embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                    logits_scaling=8.0, tie_word_embeddings=True),
               torch.bfloat16, "bytelevel", ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"),
               "<|end_of_text|>", "<|end_of_text|>", _GRANITE_TEMPLATE, "GPT2Tokenizer", pad="<|end_of_text|>",
               refusal="granite"),
    ]
    return {f.name: f for f in fams}


FAMILIES: dict[str, Family] = _families()


# Other spellings users reach for (lower case, '-', '_' and '.' ignored) -> the family name.
_ALIASES = {"llama2": "llama2-chat", "llama2chat": "llama2-chat", "mistral": "mistral-v0.2",
            "mistralv01": "mistral-v0.1", "mistralv02": "mistral-v0.2", "llama3": "llama3.1", "llama31": "llama3.1",
            "qwen2": "qwen2.5", "qwen25": "qwen2.5", "gemma2it": "gemma2", "smollm": "smollm2", "gemma3it": "gemma3"}


def _family(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    if not isinstance(family, str):
        raise TypeError(f"family must be a name in pinpoint.testing.FAMILIES, got {type(family).__name__}")
    key = "".join(c for c in family.lower() if c not in "-_.")
    name = family if family in FAMILIES else _ALIASES.get(key) or next(
        (n for n in FAMILIES if "".join(c for c in n if c not in "-_.") == key), None)
    if name is None:
        raise ValueError(f"unknown replica family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _tokenizer(fam: Family):
    """A ``PreTrainedTokenizerFast`` of the family's kind, trained on ``corpus()``."""
    from transformers import PreTrainedTokenizerFast

    lines = corpus()
    bos = fam.bos if fam.add_bos else None
    if fam.tokenizer in ("sp", "sp-gemma"):
        tok = sentencepiece_bpe(lines, specials=list(fam.specials), vocab_size=fam.vocab_size,
                                dummy_prefix=fam.tokenizer == "sp", bos=bos)
    else:
        tok = byte_level_bpe(lines, specials=list(fam.specials), vocab_size=fam.vocab_size, pattern=fam.pattern,
                             nfc=fam.pattern == QWEN2_PATTERN, bos=bos)
    named = {"bos_token": fam.bos, "eos_token": fam.eos, "pad_token": fam.pad, "unk_token": fam.unk}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048,
                                   clean_up_tokenization_spaces=False,
                                   **{k: v for k, v in named.items() if v is not None})
    if fam.template is not None:
        fast.chat_template = fam.template
    return fast


def _config(fam: Family, tok):
    import transformers as tf

    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("bos_token_id", fam.bos), ("pad_token_id", fam.pad)) if t is not None}
    eos = [tok.convert_tokens_to_ids(t) for t in (fam.eos_ids or (fam.eos,))]
    kw = dict(fam.config, vocab_size=len(tok), eos_token_id=eos[0] if len(eos) == 1 else eos,
              initializer_range=0.2, **ids)
    return getattr(tf, fam.config_class)(**kw)


def _model(fam: Family, tok, seed: int):
    """The random model in the family's on-disk dtype. Biases and norm weights are randomised
    (stock init zeroes / ones them), so bias or norm handling bugs show as numeric errors."""
    from transformers import AutoModelForCausalLM

    config = _config(fam, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
                elif p.ndim == 1:
                    p.add_(torch.randn_like(p), alpha=0.1)
    return model.to(fam.dtype).eval()


def _write(fam: Family, out: Path, seed: int, build: str) -> None:
    tok = _tokenizer(fam)
    model = _model(fam, tok, seed)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    # The real checkpoints name their tokenizer class and carry a few class-specific keys.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = fam.tokenizer_class
    if fam.tokenizer in ("sp", "sp-gemma"):
        cfg.update(add_bos_token=fam.add_bos, add_eos_token=False)
    cfg.update(fam.extra_tokenizer_config)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out / "pinpoint_replica.json").write_text(json.dumps(
        {"family": fam.name, "mimics": fam.mimics, "seed": seed, "zoo_version": ZOO_VERSION, "build": build},
        indent=2))


def _cache_root() -> Path:
    from ..files import cache_root

    return cache_root() / "replicas"


def _build_hash() -> str:
    """Short hash of everything a replica is built from (this package's sources and templates,
    the transformers/tokenizers versions): a cached replica from other code is never reused."""
    import hashlib

    import tokenizers
    import transformers

    h = hashlib.sha256(f"{ZOO_VERSION} {transformers.__version__} {tokenizers.__version__}".encode())
    for f in sorted(_HERE.glob("*.py")) + sorted(_HERE.glob("*.jinja")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


def replica(family: str | Family, dir: str | os.PathLike | None = None, *, seed: int = 0,
            force: bool = False) -> Path:
    """Path of a saved replica of ``family`` (a name in ``FAMILIES``), built offline in seconds.

    ``dir``: where to put it (default: ``<pinpoint cache>/replicas/<family>-seed<seed>-<build hash>``),
    reused when it already holds this replica built by this code (the stamp file
    ``pinpoint_replica.json`` records family, seed and a hash of the builder's sources). The directory is written under a temporary name
    and renamed into place, so a crash never leaves half a replica. ``force`` rebuilds it.
    """
    fam = _family(family)
    build = _build_hash()
    out = Path(dir).expanduser() if dir is not None else _cache_root() / f"{fam.name}-seed{seed}-{build}"
    stamp = out / "pinpoint_replica.json"
    if stamp.exists() and not force:
        meta = json.loads(stamp.read_text())
        if (meta.get("family"), meta.get("seed"), meta.get("build")) == (fam.name, seed, build):
            return out
    if out.exists() and any(out.iterdir()) and not stamp.exists():
        raise FileExistsError(f"{out} exists and is not a pinpoint replica; pass another dir")
    with staging_dir(out) as tmp:   # removed if anything fails
        _write(fam, tmp, seed, build)
        return replace_dir(tmp, out)


def load_replica(family: str | Family, *, dtype: torch.dtype | str = "auto", seed: int = 0,
                 dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a replica, loaded the way a user loads a hub checkpoint:
    ``AutoModelForCausalLM.from_pretrained`` (default attention, ``dtype`` "auto" = as saved)
    and ``AutoTokenizer.from_pretrained``. The model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = replica(family, dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok
