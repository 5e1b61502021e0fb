"""Prompts as users give them, and their token ids.

A prompt is one of:
* ``str`` — tokenized as is (with the tokenizer's usual special tokens);
* chat messages ``[{"role": ..., "content": ...}, ...]`` — rendered with the tokenizer's
  own chat template, generation prompt added (the model is about to answer);
* ``list[int]`` — token ids, used unchanged (no tokenizer needed).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .chat import render_chat  # moved to chat; re-exported: tests/test_data.py imports it from here

Prompt = Union[str, Sequence[Mapping[str, Any]], Sequence[int]]

__all__ = ["Prompt", "PromptPair", "prompt_kind", "render_chat", "to_ids"]


@dataclass(frozen=True)
class PromptPair:
    """A base prompt and its counterfactual source, e.g. "I don't think that's right" vs
    "I do think that's right". They may tokenize to different lengths."""

    base: Prompt
    source: Prompt


def prompt_kind(prompt: Prompt, where: str = "prompt") -> str:
    """"text", "chat" or "ids"; a clear TypeError/ValueError for anything else."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where} is an empty string")
        return "text"
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        if len(prompt) == 0:
            raise ValueError(f"{where} is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return "ids"
        if all(isinstance(m, Mapping) for m in prompt):
            for i, m in enumerate(prompt):
                if "role" not in m or "content" not in m:
                    raise ValueError(f"{where}: message {i} needs 'role' and 'content' keys, got {sorted(m)}")
            return "chat"
    raise TypeError(f"{where} must be a string, a list of chat messages or a list of token ids, "
                    f"got {type(prompt).__name__}")


def to_ids(tokenizer, prompt: Prompt, *, where: str = "prompt", vocab_size: int | None = None) -> list[int]:
    """Token ids of one prompt. `tokenizer` may be None for token-id prompts."""
    kind = prompt_kind(prompt, where)
    if kind == "ids":
        ids = [int(t) for t in prompt]
    elif tokenizer is None:
        raise ValueError(f"{where} is {'text' if kind == 'text' else 'chat messages'}, so a tokenizer "
                         "is needed (tokenizer=None only works when every prompt is token ids)")
    elif kind == "text":
        ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
    else:
        ids = render_chat(tokenizer, prompt, where=where)
    if not ids:
        raise ValueError(f"{where} tokenizes to no tokens")
    if vocab_size is not None:
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(f"{where} has token id {bad[0]} outside the model's vocabulary of {vocab_size}")
    return ids
