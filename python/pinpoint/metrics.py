"""Metrics read on last-position logits: callables from logits [N, vocab] to [N].

The named metrics read the logits of two tokens: the first token the model would emit for
"Apologies" and for "Yes" at the start of its reply. That token depends on the tokenizer's
conventions (SentencePiece's ``▁``, byte-level ``Ġ`` for a leading space, the chat template's
text right before the reply), so it is found by tokenizing the reply in place: the chat
template renders a user turn with the generation prompt, then the same turn followed by an
assistant message holding the word, and the first token where the two token sequences part is
the one the model emits first (``metric_tokens``). Without a chat template the word follows
``"Answer:"`` and a space.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .chat import apply_template

Metric = Callable[[torch.Tensor], torch.Tensor]

METRIC_NAMES = ("apology", "apology_ratio")

# |logit(A) + logit(Y)| below this makes the paper's ratio blow up: clamped, with a warning.
RATIO_EPS = 1e-3
# aggregate="relative" leaves out pairs whose |base metric| is below max(REL_EPS_ABS, REL_EPS * max|base|).
REL_EPS, REL_EPS_ABS = 1e-3, 1e-6

__all__ = ["Metric", "METRIC_NAMES", "RATIO_EPS", "MetricTokens", "ResolvedMetric", "first_token", "metric_tokens",
           "word_tokens", "resolve_metric", "apply_metric", "aggregate_scores"]


def first_token(tokenizer, word: str) -> int:
    """Id of the first token of `word` tokenized on its own (no context; see ``word_tokens``)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer turns {word!r} into no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"{word!r} is not in the tokenizer's vocabulary (it maps to the unknown token)")
    return int(ids[0])


def _ids(out) -> list[int]:
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def _reply_texts(tokenizer, word: str) -> tuple[str, str, str]:
    """(prompt text, prompt + reply text, where): the reply ``word`` as the model would write it."""
    if getattr(tokenizer, "chat_template", None) is not None:
        user = [{"role": "user", "content": "Are you sure?"}]
        try:
            prompt = apply_template(tokenizer, user, add_generation_prompt=True, tokenize=False)
            full = apply_template(tokenizer, user + [{"role": "assistant", "content": word}], tokenize=False)
        except Exception:  # a template that cannot render this: fall back to plain text below
            prompt = full = None
        if isinstance(prompt, str) and isinstance(full, str) and full.startswith(prompt) and len(full) > len(prompt):
            return prompt, full, "the chat template's assistant turn"
    return "Answer:", "Answer: " + word, "plain text after 'Answer:'"


def _reply_ids(tokenizer, prompt: str, full: str, word: str) -> tuple[list[int], str]:
    """Ids of ``full`` from the first token that differs from ``prompt``'s, and the text the
    template writes between the prompt and the word (Qwen3's empty "<think>...</think>"). With
    a fast tokenizer's offsets the ids start at the token that holds the word's first character."""
    start = full.find(word, len(prompt))
    before = full[len(prompt):start] if start >= 0 else ""
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = _ids(enc), enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):  # slow tokenizer: no offsets
        ids, offsets = _ids(tokenizer(full, add_special_tokens=False)), None
    if offsets is not None and start >= 0 and before.strip():
        k = next((i for i, (a, b) in enumerate(offsets) if b > start and b > a), len(ids))
        return ids[k:], before
    a = _ids(tokenizer(prompt, add_special_tokens=False))
    k = 0
    while k < min(len(a), len(ids)) and a[k] == ids[k]:
        k += 1
    return ids[k:], ""


def word_tokens(tokenizer, word: str) -> tuple[list[int], str]:
    """(token ids of ``word`` as the start of a reply, where it was placed): tokenize the prompt
    and the prompt followed by the reply, and take the ids from the first one that differs
    (past any text the template writes before the reply, e.g. Qwen3's "<think>\n\n</think>",
    with a warning). A leading token that is only whitespace (a lone ``▁``) is skipped; for
    SentencePiece tokenizers with a dummy prefix the reply keeps its ``▁`` form. Raises a
    one-line ValueError when the tokenizer cannot encode the word."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"metric word must be a non-empty string, got {word!r}")
    prompt, full, where = _reply_texts(tokenizer, word)
    new, before = _reply_ids(tokenizer, prompt, full, word)
    if before.strip():
        where += f" after the template's {before!r}"
        warnings.warn(f"the chat template writes {before!r} before the assistant's words; the metric reads the "
                      f"first token of {word!r} after it, so render the prompts to end with it (for Qwen3-style "
                      "templates: enable_thinking=False)", stacklevel=3)
    while new and not tokenizer.decode(new[:1]).strip() and len(new) > 1:
        new = new[1:]
    unk = getattr(tokenizer, "unk_token_id", None)
    fix = (f"pass metric_tokens=(apology_id, yes_id) or a word the tokenizer knows (apology_word=..., "
           f"yes_word=...)")
    if not new:
        raise ValueError(f"the tokenizer cannot encode {word!r}: it adds no tokens after the prompt; {fix}")
    if unk is not None and new[0] == unk:
        raise ValueError(f"the tokenizer cannot encode {word!r}: it maps to the unknown token "
                         f"{tokenizer.convert_ids_to_tokens(unk)!r}; {fix}")
    # SentencePiece models (Llama-2, Mistral) encode each turn on its own, so a reply starts with
    # the dummy-prefixed "▁Word" even where a template glues it to the prompt ("[/INST]Word").
    alone = _ids(tokenizer(word, add_special_tokens=False))
    if alone and _token_str(tokenizer, alone[0]).startswith("▁") and \
            not _token_str(tokenizer, new[0]).startswith("▁"):
        new, where = alone, where + " (SentencePiece reply: ▁ prefix)"
    # The word's own tokens: as many as it takes to spell it (templates append end-of-turn tokens).
    n = 1
    while n < len(new) and word not in tokenizer.decode(new[:n]):
        n += 1
    return new[:n], where


@dataclass(frozen=True)
class MetricTokens:
    """The two tokens a named metric reads, as chosen by ``metric_tokens``.

    ``apology_id``/``yes_id``: token ids; ``apology_token``/``yes_token``: those tokens as the
    vocabulary spells them (e.g. "▁Apologies", "ĠYes"); ``apology_word``/``yes_word``: the
    words; ``apology_pieces``/``yes_pieces``: every token of each word in that position (more
    than one means the metric reads only the first); ``where``: how the reply was placed.
    """

    apology_id: int
    yes_id: int
    apology_token: str
    yes_token: str
    apology_word: str = "Apologies"
    yes_word: str = "Yes"
    apology_pieces: tuple[str, ...] = ()
    yes_pieces: tuple[str, ...] = ()
    where: str = "given ids"

    @property
    def ids(self) -> tuple[int, int]:
        return self.apology_id, self.yes_id

    def to_dict(self) -> dict:
        """JSON-ready: what results files save under "metric_tokens"."""
        d = asdict(self)
        d["apology_pieces"], d["yes_pieces"] = list(self.apology_pieces), list(self.yes_pieces)
        return d

    def __str__(self) -> str:
        return (f"{self.apology_word!r} -> token {self.apology_id} {self.apology_token!r}, "
                f"{self.yes_word!r} -> token {self.yes_id} {self.yes_token!r}")


def _token_str(tokenizer, i: int) -> str:
    if tokenizer is None:
        return f"<id {i}>"
    tok = tokenizer.convert_ids_to_tokens(int(i))
    return tok if isinstance(tok, str) else str(tok)


def metric_tokens(tokenizer, apology_word: str = "Apologies", yes_word: str = "Yes", *,
                  token_ids: tuple[int, int] | None = None) -> MetricTokens:
    """The tokens of ``apology_word`` and ``yes_word`` the model would emit first in its reply
    (see ``word_tokens``), or the given ``token_ids`` (then ``tokenizer`` may be None). Warns
    when a word splits into several tokens; raises when both start with the same token."""
    if token_ids is not None:
        a, y = (int(t) for t in token_ids)
        tokens = MetricTokens(a, y, _token_str(tokenizer, a), _token_str(tokenizer, y), apology_word, yes_word)
    else:
        if tokenizer is None:
            raise ValueError(f"the metric needs a tokenizer to find the tokens of {apology_word!r} and "
                             f"{yes_word!r}; pass tokenizer= or metric_tokens=(apology_id, yes_id)")
        (ia, where), (iy, _) = word_tokens(tokenizer, apology_word), word_tokens(tokenizer, yes_word)
        pa, py = (tuple(_token_str(tokenizer, i) for i in ids) for ids in (ia, iy))
        tokens = MetricTokens(ia[0], iy[0], pa[0], py[0], apology_word, yes_word, pa, py, where)
        for word, pieces in ((apology_word, pa), (yes_word, py)):
            if len(pieces) > 1:
                warnings.warn(f"{word!r} is {len(pieces)} tokens {list(pieces)} at the start of a reply; the metric "
                              f"reads only the first, {pieces[0]!r}", stacklevel=3)
    if tokens.apology_id == tokens.yes_id:
        raise ValueError(f"{apology_word!r} and {yes_word!r} start with the same token {tokens.apology_id} "
                         f"({tokens.apology_token!r}): the metric would be 0; pass metric_tokens=(apology_id, yes_id)")
    return tokens


class ResolvedMetric(tuple):
    """``(fn, name)`` (so ``fn, name = resolve_metric(...)`` works) plus ``.tokens``: the
    :class:`MetricTokens` a named metric reads (None for a callable metric)."""

    tokens: MetricTokens | None

    def __new__(cls, fn: Metric, name: str, tokens: MetricTokens | None = None):
        self = super().__new__(cls, (fn, name))
        self.tokens = tokens
        return self

    @property
    def fn(self) -> Metric:
        return self[0]

    @property
    def name(self) -> str:
        return self[1]


def resolve_metric(metric, tokenizer=None, *, apology_word: str = "Apologies", yes_word: str = "Yes",
                   token_ids: tuple[int, int] | None = None) -> ResolvedMetric:
    """``(callable, name)`` for a metric given by name or as a callable, with ``.tokens``.

    "apology": logit(A) − logit(Y), A and Y the first tokens the model would emit for
    `apology_word` and `yes_word` (``metric_tokens``). "apology_ratio": the paper's
    logit(A) / (logit(A) + logit(Y)); denominators within ``RATIO_EPS`` of zero are clamped to
    ±``RATIO_EPS`` with a warning, so the ratio stays finite. `token_ids` = (A, Y) skips the
    tokenizer (needed when tokenizer is None). The returned callable also carries the tokens
    as ``fn.metric_tokens``.
    """
    if callable(metric):
        return ResolvedMetric(metric, getattr(metric, "__name__", "custom"), None)
    if not isinstance(metric, str) or metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRIC_NAMES)} or a callable "
                         "from logits [N, vocab] to [N]")
    tokens = metric_tokens(tokenizer, apology_word, yes_word, token_ids=token_ids)
    a, y = tokens.ids

    if metric == "apology":
        def apology(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, a].float() - logits[:, y].float()
        fn = apology
    else:
        def apology_ratio(logits: torch.Tensor) -> torch.Tensor:
            la, ly = logits[:, a].float(), logits[:, y].float()
            return la / _guard_denominator(la + ly)
        fn = apology_ratio
    fn.metric_tokens = tokens
    return ResolvedMetric(fn, metric, tokens)


def _guard_denominator(den: torch.Tensor) -> torch.Tensor:
    """``den`` [N] with entries within RATIO_EPS of zero moved to ±RATIO_EPS (warns once)."""
    tiny = den.abs() < RATIO_EPS
    if bool(tiny.any()):
        warnings.warn(f"apology_ratio: logit(A) + logit(Y) is within {RATIO_EPS:g} of zero for some prompts, "
                      f"where the paper's ratio is unstable; those denominators are clamped to ±{RATIO_EPS:g}. "
                      "Prefer metric='apology' (the plain logit difference)", stacklevel=3)
        sign = torch.where(den < 0, -1.0, 1.0).to(den.dtype)
        den = torch.where(tiny, sign * RATIO_EPS, den)
    return den


def apply_metric(fn: Metric, logits: torch.Tensor, *, what: str) -> torch.Tensor:
    """fn(logits) checked to be a float vector with one value per row."""
    out = fn(logits)
    if not isinstance(out, torch.Tensor) or out.shape != (logits.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the metric must map logits [N, vocab] to [N]; for {what} it got "
                         f"{tuple(logits.shape)} and returned {shape}")
    return out.float()


def aggregate_scores(per_pair: torch.Tensor, base: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Head scores [L, H] from per-pair effects ``per_pair`` [B, L, H] (patched − base) and the
    base metric ``base`` [B]: "diff" = mean over pairs; "relative" = 100 · mean((patched − base) / base)
    over the pairs whose base is not near zero (|base| < max(1e-6, 1e-3 · max|base|); those are
    left out with a warning, and all of them near zero is an error). Never returns NaN or inf:
    non-finite scores raise ValueError naming the heads, so ``HeadScores.top`` never sees them."""
    if aggregate == "diff":
        out = per_pair.float().mean(0)
    elif aggregate == "relative":
        base = base.float().reshape(-1)
        mag = base.abs()
        limit = max(REL_EPS_ABS, REL_EPS * float(mag[torch.isfinite(mag)].max())) if bool(torch.isfinite(mag).any()) \
            else REL_EPS_ABS
        keep = torch.isfinite(base) & (mag >= limit)
        if not bool(keep.any()):
            raise ValueError(f"aggregate='relative' divides by the base metric, which is near zero (below {limit:.3g}) "
                             f"for all {base.numel()} pairs; use aggregate='diff'")
        if not bool(keep.all()):
            dropped = (~keep).nonzero().flatten().tolist()
            warnings.warn(f"aggregate='relative': the base metric is near zero (below {limit:.3g}) for "
                          f"{len(dropped)} of {base.numel()} pairs (pairs {dropped[:8]}); they are left out of the "
                          "mean. aggregate='diff' keeps every pair", stacklevel=3)
        rel = per_pair.float()[keep] / base[keep].view(-1, 1, 1)
        out = 100.0 * rel.mean(0)
    else:
        raise ValueError(f"aggregate must be 'diff' or 'relative', got {aggregate!r}")
    bad = (~torch.isfinite(out)).nonzero().tolist()
    if bad:
        raise ValueError(f"head scores are NaN or inf for {len(bad)} heads (first (layer, head): {tuple(bad[0])}); "
                         "the metric returned non-finite values: check it, or use metric='apology'")
    return out
