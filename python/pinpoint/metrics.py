"""Metrics read on last-position logits: callables from logits [N, vocab] to [N]."""
from __future__ import annotations

from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]

METRIC_NAMES = ("apology", "apology_ratio")


def first_token(tokenizer, word: str) -> int:
    """Id of the first token of `word` as the model would emit it to start a reply."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer turns {word!r} into no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"{word!r} is not in the tokenizer's vocabulary (it maps to the unknown token)")
    return int(ids[0])


def resolve_metric(metric, tokenizer=None, *, apology_word: str = "Apologies", yes_word: str = "Yes",
                   token_ids: tuple[int, int] | None = None) -> tuple[Metric, str]:
    """(callable, name) for a metric given by name or as a callable.

    "apology": logit(first token of `apology_word`) − logit(first token of `yes_word`).
    "apology_ratio": the paper's logit(A) / (logit(A) + logit(Y)).
    `token_ids` = (A, Y) skips the tokenizer (needed when tokenizer is None).
    """
    if callable(metric):
        return metric, getattr(metric, "__name__", "custom")
    if not isinstance(metric, str) or metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRIC_NAMES)} or a callable "
                         "from logits [N, vocab] to [N]")
    if token_ids is None:
        if tokenizer is None:
            raise ValueError(f"metric {metric!r} needs a tokenizer to find the tokens of {apology_word!r} and "
                             f"{yes_word!r}; pass tokenizer= or metric_tokens=(apology_id, yes_id)")
        token_ids = (first_token(tokenizer, apology_word), first_token(tokenizer, yes_word))
    a, y = (int(t) for t in token_ids)
    if a == y:
        raise ValueError(f"{apology_word!r} and {yes_word!r} start with the same token {a}: the metric would be 0")

    if metric == "apology":
        def apology(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, a].float() - logits[:, y].float()
        return apology, "apology"

    def apology_ratio(logits: torch.Tensor) -> torch.Tensor:
        la, ly = logits[:, a].float(), logits[:, y].float()
        return la / (la + ly)
    return apology_ratio, "apology_ratio"


def apply_metric(fn: Metric, logits: torch.Tensor, *, what: str) -> torch.Tensor:
    """fn(logits) checked to be a float vector with one value per row."""
    out = fn(logits)
    if not isinstance(out, torch.Tensor) or out.shape != (logits.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the metric must map logits [N, vocab] to [N]; for {what} it got "
                         f"{tuple(logits.shape)} and returned {shape}")
    return out.float()
