"""Chat conversations through the tokenizer's own chat template: the one place for rendering,
prefilling the assistant, marking assistant tokens for the loss, and batched greedy generation.

* ``apply_template(tokenizer, messages, **kw)``: the one call of ``apply_chat_template``
  (thinking off; a template that rejects the conversation is one clear error).
* ``require_chat_template(tokenizer, what)``: a clear error when there is no template.
* ``render_chat(tokenizer, messages, add_generation_prompt=True)``: token ids of messages.
* ``chat_ids(tokenizer, messages, prefill=None)``: ids of a prompt the model answers next,
  its assistant turn opened (and started with ``prefill`` when given).
* ``render_dialogue(tokenizer, messages)``: (ids, labels) with labels on assistant tokens only
  (``pinpoint.batching.IGNORE`` elsewhere); ``message_span`` finds one assistant message's tokens;
  ``tokenize_dialogues`` renders a list of dialogues with a length policy.
* ``generate_texts(model, tokenizer, prompts)``: greedy continuations of token-id prompts in
  left-padded batches.

Importing this module loads neither torch nor transformers (the data layer and the judges
import it); generation imports them when it runs.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Mapping, Sequence

__all__ = ["apply_template", "require_chat_template", "render_chat", "chat_ids", "dialogue_messages", "render_dialogue",
           "message_span", "tokenize_dialogues", "generate_texts", "eos_ids", "max_positions"]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _ids(out) -> list[int]:
    """Token ids from ``apply_chat_template``'s result (transformers >= 5 returns a BatchEncoding)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def apply_template(tokenizer, messages, *, where: str = "prompt", **kwargs):
    """``tokenizer.apply_chat_template(messages, **kwargs)``, the one call site of it.

    Templates with a thinking switch (Qwen3) render with ``enable_thinking=False``, so a prompt
    ends where the answer starts (other templates ignore the variable). A template that rejects
    the conversation (Mistral's and Gemma's raise on a system message) becomes one
    ``InputError`` saying what to do, instead of a raw Jinja traceback."""
    from .errors import InputError

    kwargs.setdefault("enable_thinking", False)
    try:
        return tokenizer.apply_chat_template(list(messages), **kwargs)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "jinja2":
            raise
        roles = ", ".join(dict.fromkeys(m.get("role", "?") for m in messages))
        hint = (" This template has no system role: drop the system message or merge it into the first user turn."
                if any(m.get("role") == "system" for m in messages) else "")
        raise InputError(f"{where}: the chat template rejected a conversation with roles [{roles}]: {str(exc).rstrip('.')}.{hint} "
                         "Or give another template (--chat-template FILE, or tokenizer.chat_template).") from exc


def require_chat_template(tokenizer, what: str) -> None:
    if tokenizer is None:
        raise ValueError(f"{what} needs a tokenizer with a chat template, got tokenizer=None")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{what} renders chat conversations, but the tokenizer has no chat template "
                         "(tokenizer.chat_template is not set); set one, e.g. from the model's instruct "
                         "checkpoint (on the command line: --chat-template FILE)")


# ---------------------------------------------------------------------------------------------
# Prompts.


def render_chat(tokenizer, messages, *, add_generation_prompt: bool = True, where: str = "prompt") -> list[int]:
    """Token ids of chat messages through the tokenizer's own chat template (messages passed
    as given, extra keys included)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where} is a chat conversation but the tokenizer has no chat template; "
                         "set tokenizer.chat_template or pass plain text / token ids")
    return _ids(apply_template(tokenizer, messages, where=where, add_generation_prompt=add_generation_prompt,
                               tokenize=True))


def chat_ids(tokenizer, messages: Sequence[Mapping], *, prefill: str | None = None, where: str = "prompt") -> list[int]:
    """Token ids of ``messages`` (only their role and content) through the tokenizer's chat
    template, generation prompt added. With ``prefill`` the assistant's turn is opened and
    starts with that text (``continue_final_message``; templates that cannot continue a
    message get the generation prompt, then the prefill's tokens)."""
    require_chat_template(tokenizer, where)
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if prefill:
        try:
            ids = _ids(apply_template(tokenizer, msgs + [{"role": "assistant", "content": prefill}], where=where,
                                      tokenize=True, continue_final_message=True))
        except (ValueError, TypeError) as exc:
            if type(exc).__name__ == "InputError":  # the template rejected the messages themselves
                raise
            text = apply_template(tokenizer, msgs, where=where, tokenize=False, add_generation_prompt=True)
            ids = _ids(tokenizer(text + prefill, add_special_tokens=False))
    else:
        ids = render_chat(tokenizer, msgs, where=where)
    if not ids:
        raise ValueError(f"{where} renders to no tokens")
    return ids


# ---------------------------------------------------------------------------------------------
# Dialogues with a loss on the assistant's tokens.


def dialogue_messages(dialogue, i: int) -> list[dict]:
    """The messages of dialogue ``i`` (a list of messages, or a dict with "messages"), checked:
    each has a role and content, and at least one is the assistant's."""
    if isinstance(dialogue, Mapping) and "messages" in dialogue:
        dialogue = dialogue["messages"]
    if isinstance(dialogue, (str, bytes)) or not isinstance(dialogue, Sequence) or not dialogue:
        raise TypeError(f"dialogue {i} must be a non-empty list of chat messages "
                        f"[{{'role': ..., 'content': ...}}, ...], got {type(dialogue).__name__}")
    out = []
    for j, m in enumerate(dialogue):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"dialogue {i}, message {j} must be a dict with 'role' and 'content', got {m!r}")
        out.append(dict(m))
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"dialogue {i} has no assistant turn; the loss is on assistant turns only, so "
                         "every dialogue needs at least one {'role': 'assistant', ...} message")
    return out


def render_dialogue(tokenizer, messages: list[dict], *, where: str = "dialogue") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat dialogue: labels are the ids on assistant tokens and
    ``IGNORE`` (-100) elsewhere; an assistant message with ``"train": False`` (e.g. the
    deliberately wrong first answer of a "revise" dialogue) is context only. Uses the
    template's ``{% generation %}`` marks when present, else renders growing prefixes and labels
    what each assistant message adds after the generation prompt."""
    from .batching import IGNORE  # here, not at the top: importing chat must not load torch

    template = getattr(tokenizer, "chat_template", None)
    if tokenizer is None or template is None:
        raise ValueError(f"{where}: the tokenizer has no chat template, so dialogues cannot be rendered; set "
                         "tokenizer.chat_template (the model's own template) before tuning")
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        out = apply_template(tokenizer, messages, where=where, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = _ids(out)
        mask = [int(m) for m in out["assistant_masks"]]
        # transformers 4.x derives the mask from character offsets, and leaves it all zero for
        # tokenizers without them (e.g. word-level ones): then the growing-prefix spans below decide.
        trainable = any(m["role"] == "assistant" and m.get("train", True) is not False and m.get("content")
                        for m in messages)
        if any(mask) or not trainable:
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
            for k, m in enumerate(messages):  # assistant turns marked "train": False carry no loss
                if m["role"] == "assistant" and m.get("train", True) is False:
                    start, stop = message_span(tokenizer, messages, k, ids, where)
                    labels[start:stop] = [IGNORE] * (stop - start)
            return ids, labels
    full = _ids(apply_template(tokenizer, messages, where=where, tokenize=True))
    labels = [IGNORE] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("train", True) is False:
            continue
        start, stop = message_span(tokenizer, messages, k, full, where)
        labels[start:stop] = full[start:stop]
    return full, labels


def message_span(tokenizer, messages, k: int, full: list[int], where: str = "dialogue") -> tuple[int, int]:
    """Token span [start, stop) of assistant message k in the rendering ``full`` of all
    messages: what the message adds after the generation prompt."""
    before = _ids(apply_template(tokenizer, messages[:k], where=where, tokenize=True,
                                 add_generation_prompt=True)) if k else []
    upto = _ids(apply_template(tokenizer, messages[: k + 1], where=where, tokenize=True))
    if full[: len(upto)] != upto or upto[: len(before)] != before:
        raise ValueError(f"{where}: the chat template does not render message {k} as an extension of the "
                         "earlier messages, so the assistant tokens cannot be found; add {% generation %} "
                         "marks to the template")
    return len(before), len(upto)


def tokenize_dialogues(tokenizer, dialogues, *, max_length: int, too_long: str = "truncate"):
    """Render every dialogue; returns a list of (ids, labels). Long ones are truncated (with
    one warning) or rejected, by ``too_long``."""
    from .batching import IGNORE

    if too_long not in ("truncate", "error"):
        raise ValueError(f"too_long must be 'truncate' (keep the first max_length tokens, with a warning) "
                         f"or 'error', got {too_long!r}")
    if isinstance(dialogues, (str, bytes, Mapping)) or not isinstance(dialogues, Sequence):
        raise TypeError(f"dialogues must be a list of chat dialogues, got {type(dialogues).__name__}")
    if len(dialogues) == 0:
        raise ValueError("dialogues is empty")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template, so dialogues cannot be rendered; set "
                         "tokenizer.chat_template (the model's own template) before tuning")
    rows, truncated = [], []
    for i, d in enumerate(dialogues):
        ids, labels = render_dialogue(tokenizer, dialogue_messages(d, i), where=f"dialogue {i}")
        if len(ids) > max_length:
            if too_long == "error":
                raise ValueError(f"dialogue {i} is {len(ids)} tokens, longer than max_length={max_length} "
                                 "(default: the model's context); shorten it, raise max_length, or pass too_long='truncate'")
            truncated.append(i)
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(t != IGNORE for t in labels[1:]):
            raise ValueError(f"dialogue {i} has no assistant token to train on"
                             + (f" within its first {max_length} tokens" if i in truncated else ""))
        rows.append((ids, labels))
    if truncated:
        warnings.warn(f"{len(truncated)} dialogue(s) longer than max_length={max_length} tokens were truncated "
                      f"(first: {truncated[:5]}); pass too_long='error' to refuse them", stacklevel=3)
    return rows


# ---------------------------------------------------------------------------------------------
# Greedy generation.


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config's, then the tokenizer's (deduplicated)."""
    ids: list[int] = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if v is None:
            continue
        ids.extend([v] if isinstance(v, int) else list(v))
    return list(dict.fromkeys(int(i) for i in ids))


def max_positions(model) -> int | None:
    """The model's context length (``max_position_embeddings`` / ``n_positions``), if it says."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence generate's notices about sampling flags of the model's own generation config
    (greedy decoding ignores them on purpose)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _check_prompts(model, prompts, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
    limit = max_positions(model)
    longest = max((len(p) for p in prompts), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"{limit} positions; lower max_new_tokens or shorten the prompts")
    return prompts


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[:k]
    return tokens


class Continuations(list):
    """``generate_texts``' texts (a list of str), with ``cut``: per text, whether generation
    stopped at ``max_new_tokens`` before an end-of-sequence token (the text may be unfinished)."""

    def __init__(self, texts=(), cut=None):
        super().__init__(texts)
        self.cut = [False] * len(self) if cut is None else list(cut)
        if len(self.cut) != len(self):
            raise ValueError(f"{len(self.cut)} cut flags for {len(self)} texts")


def generate_texts(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   batch_size: int = 16, progress: bool = True, desc: str = "generate") -> Continuations:
    """Greedy continuations of token-id prompts, decoded, in the order given (a list of str
    whose ``.cut`` says which ones the token budget cut before they ended).

    Prompts are grouped by length into batches of ``batch_size``, left-padded (attention mask
    and positions follow the real tokens) and run through ``model.generate`` with its KV
    cache. A continuation ends at the first end-of-sequence token (the model's and the
    tokenizer's); special tokens are dropped and surrounding spaces stripped. The model is
    put in eval mode for the call and restored.

    Batch invariance (a batch gives what each prompt gives alone): exact in fp32, eager and
    sdpa (tested on every tiny architecture). In bf16 with sdpa it is NOT exact: padding
    changes the shapes of the matmuls and attention reductions, so logits differ in their last
    bits and a near-tie can flip a greedy token, after which the continuations part. Measured
    on random tiny Llamas (pinpoint.testing.tiny_model, hidden 64, sdpa, bf16, seeds 0-2, the
    42 shipped are-you-sure prompts of 10-47 tokens, 12 new tokens; 2-core CPU, torch 2.13):
    6 of 126 continuations differed at batch_size=16 and 2 of 126 at batch_size 2 and 4, each
    only from its 5th word or later; the first new token always agreed (fp32: 0 of 126).
    ``tests/test_chat.py`` holds these bounds. Compare runs at one batch size in half precision.
    """
    import torch
    from transformers import GenerationConfig

    from .batching import input_device, length_batches, pad, pad_id
    from .modes import eval_mode
    from .progress import progress as progress_bar

    prompts = _check_prompts(model, prompts, max_new_tokens, batch_size)
    if not prompts:
        return Continuations()
    eos = eos_ids(model, tokenizer)
    pad_token = pad_id(tokenizer, model)
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=int(max_new_tokens),
                               pad_token_id=pad_token, eos_token_id=eos or None, use_cache=True)
    device = input_device(model)
    outs = Continuations([""] * len(prompts))
    bar = progress_bar(len(prompts), desc, progress, unit="seq")
    try:
        with eval_mode(model), torch.inference_mode(), _quiet_transformers():
            for idx in length_batches(prompts, batch_size):
                ids, mask = pad([prompts[i] for i in idx], pad_token, "left")
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg)
                for r, toks in zip(idx, out[:, ids.shape[1]:].tolist()):
                    kept = _until_eos(toks, eos)
                    outs[r] = tokenizer.decode(kept, skip_special_tokens=True).strip()
                    outs.cut[r] = len(kept) == len(toks)   # no end-of-sequence: stopped by the budget
                bar.update(len(idx))
    finally:
        bar.close()
    return outs
