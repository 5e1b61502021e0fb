"""pinpoint.data: the "are you sure" rows, the locate pairs and the tuning dialogues.

* ``load_are_you_sure(path)`` reads SycophancyEval's ``are_you_sure.jsonl`` format into typed
  rows (``MultipleChoiceRow`` / ``FreeFormRow``).
* ``challenge_pairs(rows, tokenizer)`` builds the ``PromptPair``s for ``pp.locate``.
* ``spt_dialogues(rows)`` builds the "insist" / "revise" tuning dialogues for ``pp.tune``.

Shipped with pinpoint, written for the project (not taken from any benchmark):

* ``SAMPLE_PATH``: ``are_you_sure_mini.jsonl``, 42 rows in the are-you-sure format (four small
  datasets: ``facts_mc``, ``arith_mc``, ``facts_qa``, ``arith_qa``); ``sample_rows()`` loads it.
* ``CHOICES_PATH``: ``choices_mini.jsonl``, multiple-choice rows {question, choices, answer}
  for ``pp.evaluate_choices`` (general ability); ``sample_choices()`` loads it.
* ``NEUTRAL_PATH``: neutral sentences for ``pp.kl_divergence``; ``neutral_texts()`` loads them.

The real SycophancyEval file: ``datasets/are_you_sure.jsonl`` in
https://github.com/meg-tong/sycophancy-eval (Sharma et al., 2023; MIT licence; also the Hugging
Face dataset ``meg-tong/sycophancy-eval``). It holds a canary string: evaluate on it, never
train on it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .are_you_sure import (
    REAL_DATA_URL,
    SYCOPHANCY_EVAL_DATASETS,
    AreYouSureData,
    FreeFormRow,
    MalformedRowError,
    MultipleChoiceRow,
    Row,
    as_rows,
    load_are_you_sure,
    mc_row,
    parse_row,
    write_rows,
)
from .dialogues import (
    CHALLENGE,
    CHALLENGE_PARAPHRASES,
    FINAL_QUESTION_FREE,
    FINAL_QUESTION_MC,
    INSIST_JUSTIFICATIONS,
    INSIST_OPENINGS,
    REVISE_CORRECTIONS,
    REVISE_OPENINGS,
    SOURCE_CHALLENGE,
    Dialogue,
    challenge_pairs,
    final_question,
    spt_dialogues,
)

_HERE = Path(__file__).resolve().parent
SAMPLE_PATH = _HERE / "are_you_sure_mini.jsonl"
CHOICES_PATH = _HERE / "choices_mini.jsonl"
NEUTRAL_PATH = _HERE / "neutral_texts.txt"

__all__ = [
    "load_are_you_sure", "parse_row", "as_rows", "mc_row", "write_rows", "AreYouSureData", "Row", "MultipleChoiceRow", "FreeFormRow",
    "MalformedRowError", "challenge_pairs", "spt_dialogues", "Dialogue", "final_question", "sample_rows",
    "sample_choices", "neutral_texts", "SAMPLE_PATH", "CHOICES_PATH", "NEUTRAL_PATH", "REAL_DATA_URL",
    "SYCOPHANCY_EVAL_DATASETS", "CHALLENGE", "SOURCE_CHALLENGE", "FINAL_QUESTION_MC", "FINAL_QUESTION_FREE",
    "CHALLENGE_PARAPHRASES", "INSIST_OPENINGS", "INSIST_JUSTIFICATIONS", "REVISE_OPENINGS",
    "REVISE_CORRECTIONS",
]  # fmt: skip


def sample_rows(**kwargs) -> AreYouSureData:
    """The shipped sample (``SAMPLE_PATH``) as typed rows; keyword arguments go to
    ``load_are_you_sure`` (e.g. ``datasets=["arith_mc"]``)."""
    return load_are_you_sure(SAMPLE_PATH, **kwargs)


def sample_choices() -> list[dict]:
    """The shipped general-ability multiple-choice rows (``CHOICES_PATH``)."""
    with open(CHOICES_PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def neutral_texts() -> list[str]:
    """The shipped neutral sentences (``NEUTRAL_PATH``), one per line."""
    with open(NEUTRAL_PATH, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
