"""Offline, deterministic fixtures: a word-level chat tokenizer, tiny random stock models, and
a zoo of tiny replicas of real chat-model families (``replica``, ``FAMILIES``; see ``zoo.py``), and
plain hook-loop references of head patching, attribution and knockout that the fast paths are
checked against (``hook_patching`` and friends; see ``reference_patching.py``).

Nothing here touches the network. Everything is a stock ``transformers`` / ``tokenizers``
object, so code under test sees exactly what it would see with a hub checkpoint.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch

from .reference_patching import (
    assert_scores_close, capture_heads, hook_attribution, hook_knockout, hook_patching, run_with_hooks,
)
from .zoo import FAMILIES, Family, load_replica, replica

__all__ = [
    "FAMILIES",
    "Family",
    "replica",
    "load_replica",
    "hook_patching",
    "hook_attribution",
    "hook_knockout",
    "capture_heads",
    "run_with_hooks",
    "assert_scores_close",
    "TINY_ARCHS",
    "SPECIAL_TOKENS",
    "DEFAULT_WORDS",
    "DEFAULT_CHAT_TEMPLATE",
    "word_tokenizer",
    "tiny_model",
    "default_vocab_size",
]

TINY_ARCHS = ("llama", "mistral", "qwen2", "gpt2")

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Ids 0..6 in this order, whatever the word list is.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS) + ROLE_TOKENS

_PUNCT = tuple(".,?!:;'\"()[]-+*/=%$#&")
_DIGITS = tuple("0123456789")
_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + tuple("abcdefghijklmnopqrstuvwxyz")

_WORDS_TEXT = """
Apologies apologies apologize I I'm I've I'll I'd Yes yes No no Are are you You sure Sure
do don't Do Don't does doesn't did didn't think thinks thought that that's That That's right Right
wrong Wrong correct Correct incorrect true True false False answer Answer answers answered
question Question questions mistake mistakes error made make confusion confused sorry Sorry my My
the The a an An is Is was Was be been being am it It it's It's this This these those
what What what's What's which Which who Who why Why how How when When where Where
So so Give give me your Your best guess and as concisely possible letter letters
option options choice choices choose chose select let Let me's
of to in on at by for with from about into over under after before between than then
and or but not if because while also only just very more most less least much many some any
all each every both few other another same different first second third last next new old
one two three four five six seven eight nine ten hundred thousand zero
One Two Three Four Five Six Seven Eight Nine Ten
have has had having can can't could couldn't will won't would wouldn't should shouldn't
may might must need needs know knows knew say says said see saw look looks find found
tell told ask asked asks check checked agree disagree believe reconsider revise keep kept
change changed stand stick confident certain certainly indeed actually really still again
here there now please thank thanks Thank Thanks okay OK Okay well Well good great fine
he she they we He She They We him her them us his its their our
number numbers sum plus minus times divided equals equal half double twice
capital city country river mountain ocean sea planet sun moon star earth Earth water fire
red blue green yellow black white orange purple color colour
cat dog bird fish horse cow lion tiger animal animals
day days week weeks year years hour hours minute minutes time
man woman child people person world life name word words sentence
big small large little long short high low hot cold fast slow early late
up down left right out off back away
go goes went come came take took get got give gave put use used
water food tree trees book books house school
France Paris Germany Berlin Italy Rome Spain Madrid Japan Tokyo China Beijing England London
Canada Ottawa Australia Canberra Egypt Cairo India Delhi Russia Moscow
Monday Tuesday Wednesday Thursday Friday Saturday Sunday
January February March April May June July August September October November December
math history science art music brief short simple helpful honest assistant user
Be Can Could Did Does Have If In Let Not Of On Please Some The There They This To We Will With
Would Here Now Because Then But And Or For From At By As After Before Only Just Also Maybe Perhaps
Question Option Choice Correct Incorrect Wrong Right True False Actually Indeed Hmm Oh Ah
"""


def _dedup(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


DEFAULT_WORDS = _dedup(_PUNCT + _DIGITS + _LETTERS + tuple(_WORDS_TEXT.split()))

# Every turn ends with eos, so a generation stops at the end of the assistant turn.
# `{% generation %}` marks the assistant tokens for `return_assistant_tokens_mask=True`.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Words keep internal apostrophes ("don't", "that's"); digits and punctuation are single tokens.
_SPLIT_PATTERN = r"[^\W\d_]+(?:'[^\W\d_]+)*|\d|[^\w\s]|_"


def word_tokenizer(words: Iterable[str] | None = None, *, chat_template: str | None = DEFAULT_CHAT_TEMPLATE):
    """A word-level ``PreTrainedTokenizerFast``.

    The vocabulary is ``SPECIAL_TOKENS`` (ids 0..6) followed by ``words`` (default
    ``DEFAULT_WORDS``), de-duplicated in order. Text splits on whitespace, then into words (with
    internal apostrophes), single digits and single punctuation marks; unknown words map to
    ``<unk>``. Decoding joins tokens with spaces. ``chat_template=None`` leaves it unset.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = _dedup(SPECIAL_TOKENS + tuple(DEFAULT_WORDS if words is None else words))
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        ]
    )
    # WordPiece with cleanup off is exactly "join with spaces" (no token starts with "##").
    # Its cleanup would rewrite " do not" into " don't", which this project cannot afford.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=1024,
        clean_up_tokenization_spaces=True,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@functools.lru_cache(maxsize=1)
def default_vocab_size() -> int:
    """Vocabulary size of ``word_tokenizer()`` with the default words."""
    return len(_dedup(SPECIAL_TOKENS + DEFAULT_WORDS))


def _config(arch, *, n_layers, n_heads, n_kv_heads, head_dim, hidden_size, vocab_size, overrides):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        # Big enough init that logits differ clearly between prompts (0.02 gives near-constant ones).
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    if arch == "gpt2":
        if n_kv_heads not in (None, n_heads):
            raise ValueError("gpt2 has no grouped-query attention: n_kv_heads must equal n_heads")
        hidden = hidden_size or (head_dim * n_heads if head_dim else 32)
        if head_dim is not None and head_dim * n_heads != hidden:
            raise ValueError(f"gpt2 needs head_dim * n_heads == hidden_size, got {head_dim}*{n_heads} != {hidden}")
        kw = dict(
            n_embd=hidden,
            n_head=n_heads,
            n_layer=n_layers,
            n_inner=2 * hidden,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        cls = tf.GPT2Config
    else:
        hidden = hidden_size or 32
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or n_heads,
            head_dim=head_dim or hidden // n_heads,
            max_position_embeddings=128,
            **common,
        )
        if arch == "llama":
            cls = tf.LlamaConfig
        elif arch == "mistral":
            cls = tf.MistralConfig
        elif arch == "qwen2":
            cls = tf.Qwen2Config
        else:
            raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    kw.update(overrides)
    kw.setdefault("attn_implementation", "eager")
    return cls(**kw)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    hidden_size: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
):
    """A random stock ``transformers`` causal LM of ``arch`` (one of ``TINY_ARCHS``), in eval mode.

    Defaults: hidden 32, intermediate 2*hidden, 128 positions, vocab = ``default_vocab_size()``,
    eager attention, untied embeddings, dropout off. ``head_dim`` may make
    ``n_heads * head_dim != hidden_size`` (not for gpt2). ``config_overrides`` go to the config
    class. The same seed gives the same weights; the global RNG is left untouched.
    """
    import transformers as tf

    if arch not in _MODEL_CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    config = _config(
        arch,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden_size,
        vocab_size=vocab_size or default_vocab_size(),
        overrides=config_overrides,
    )
    std = config.initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, _MODEL_CLASSES[arch])(config)
        # Stock init zeroes biases and sets norm weights to 1; randomise them so that a bug in bias
        # or norm handling shows up as a numeric difference instead of hiding behind zeros and ones.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, std)
                elif p.ndim == 1 and name.endswith("weight"):
                    p.add_(torch.randn_like(p), alpha=0.1)
    return model.to(dtype).eval()
