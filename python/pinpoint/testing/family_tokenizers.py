"""Family tokenizers trained offline with the ``tokenizers`` library.

Two kinds, built the way the real checkpoints' ``tokenizer.json`` files are:

* SentencePiece-style BPE (Llama-2, Mistral, Gemma): spaces become ``▁``, a dummy ``▁`` prefix
  at the start of the text (not for Gemma), byte fallback (``<0x00>`` .. ``<0xFF>`` right after
  the special tokens, so any text encodes), decoder ``▁ -> space, bytes, fuse``.
* Byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2): a split regex, then bytes mapped to
  printable characters (``Ġ`` is a leading space); special tokens after the learned vocabulary.
"""
from __future__ import annotations

import json

__all__ = ["sentencepiece_bpe", "byte_level_bpe", "LLAMA3_PATTERN", "QWEN2_PATTERN"]

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train(tok, lines: list[str], vocab_size: int, alphabet: list[str]):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def sentencepiece_bpe(lines: list[str], *, specials: list[str], vocab_size: int, dummy_prefix: bool = True,
                      bos: str | None = None):
    """A ``tokenizers.Tokenizer``: SentencePiece-style BPE with byte fallback.

    Ids: ``specials`` (0..), then the 256 byte tokens, then the learned pieces. ``bos``: the
    token the post-processor puts in front of every encoding (``add_special_tokens=True``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    scheme = "first" if dummy_prefix else "never"
    trainer_tok = Tokenizer(models.BPE())
    # SentencePiece splits pieces at spaces, between letters and punctuation and between digits.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True),
        pre_tokenizers.Split(Regex(r"▁?[^\W\d_]+|▁?\d|▁?[^\w▁]|▁"), behavior="isolated"),
    ])
    learned, merges = _train(trainer_tok, lines, vocab_size, [])
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>" if "<unk>" in vocab else None,
                               byte_fallback=True, fuse_unk=True))
    if dummy_prefix:  # Llama-2 / Mistral as their hub tokenizer.json has it: every text run gets a ▁ prefix
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:  # Gemma: spaces become ▁ with no dummy prefix
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tok


def byte_level_bpe(lines: list[str], *, specials: list[str], vocab_size: int, pattern: str | None,
                   nfc: bool = False, bos: str | None = None):
    """A ``tokenizers.Tokenizer``: byte-level BPE. ``pattern`` None is GPT-2's built-in split;
    otherwise the given regex (Llama-3's, Qwen2's) splits first. ``specials`` get ids after the
    learned vocabulary; ``bos`` as in :func:`sentencepiece_bpe`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    def pre():
        if pattern is None:
            return pre_tokenizers.ByteLevel(add_prefix_space=False)
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre()
    if nfc:
        trainer_tok.normalizer = normalizers.NFC()
    vocab, merges = _train(trainer_tok, lines, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
