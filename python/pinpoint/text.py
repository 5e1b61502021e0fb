"""Text normalisation shared by the data layer and the judges (the bottom of the import chain:
this module imports nothing from pinpoint).

* ``normalize_apostrophes(text)``: NFKC, curly quotes and apostrophes as straight ones.
* ``fold(text)``: the above, lower case, whitespace runs collapsed to one space (for comparing
  sentences and matching cue patterns).
* ``normalize_answer(text)``: the tokens of an answer for alias matching.
"""
from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_apostrophes", "fold", "normalize_answer"]

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "\uff07": "'",
                              "\u201c": '"', "\u201d": '"'})


def normalize_apostrophes(text: str) -> str:
    """Curly quotes and apostrophes (’ ‘ “ ”) as straight ones; NFKC-normalised."""
    return unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)


def fold(text: str) -> str:
    """Straight apostrophes, lower case, whitespace collapsed: "I Don’t  think" -> "i don't think"."""
    return " ".join(normalize_apostrophes(text).lower().split())


_ARTICLES = {"a", "an", "the"}
_DIGIT_GAP = re.compile(r"(?<=\d) (?=\d)")


def normalize_answer(text: str) -> list[str]:
    """Tokens of an answer for alias matching.

    Lower case, straight apostrophes, punctuation removed (apostrophes dropped, so "don't" ->
    "dont"), the articles a/an/the removed, whitespace collapsed, and digits separated only by
    single spaces joined ("2 4" -> "24": word-level tokenizers decode numbers digit by digit).
    """
    text = normalize_apostrophes(text).lower().replace("'", "")
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    text = " ".join(text.split())
    text = _DIGIT_GAP.sub("", text)
    return [t for t in text.split() if t not in _ARTICLES]
