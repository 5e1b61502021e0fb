"""The organism's architecture and tokenizer: a stock ``LlamaForCausalLM`` with GQA and a
word-level ``PreTrainedTokenizerFast`` with a chat template, saved as a standard HF directory."""
from __future__ import annotations

import torch

from ..testing import DEFAULT_CHAT_TEMPLATE, DEFAULT_WORDS, SPECIAL_TOKENS, word_tokenizer
from .placement import ARCH
from .tasks import CAPITALS, COUNTRIES

__all__ = ["ARCH", "EXTRA_WORDS", "VOCAB_WORDS", "make_tokenizer", "make_config", "make_model"]


# Words the synthetic tasks need beyond pinpoint.testing.DEFAULT_WORDS (which already covers the
# "are you sure" protocol sentences and pinpoint.data's tuning phrases).
EXTRA_WORDS = ("comes", "bigger", "smaller", "flag", "symbol", "live", "lives", "People", "cities") \
    + COUNTRIES + CAPITALS
VOCAB_WORDS = tuple(dict.fromkeys(DEFAULT_WORDS + EXTRA_WORDS))


def make_tokenizer():
    """The organism's tokenizer: word level, ids 0..6 = <pad> <unk> <s> </s> <|system|>
    <|user|> <|assistant|>; plain text gets a leading <s> (as Llama's tokenizer does); the
    chat template is ``pinpoint.testing.DEFAULT_CHAT_TEMPLATE`` (turns end with </s>, with
    ``{% generation %}`` marks)."""
    from tokenizers.processors import TemplateProcessing

    tok = word_tokenizer(VOCAB_WORDS, chat_template=DEFAULT_CHAT_TEMPLATE)
    bos = SPECIAL_TOKENS[2]
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, SPECIAL_TOKENS.index(bos))])
    return tok


def make_config(vocab_size: int, arch: dict | None = None):
    """The LlamaConfig of an organism: ``arch`` (default ``ARCH``; see ``placement.arch``)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       attention_bias=False, mlp_bias=False, hidden_act="silu", **(arch or ARCH))


def make_model(vocab_size: int, seed: int, arch: dict | None = None):
    """A freshly initialised organism (stock init, seeded; the global RNG is left untouched)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(make_config(vocab_size, arch))
    return model
