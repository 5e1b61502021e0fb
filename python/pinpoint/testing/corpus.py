"""The small built-in corpus the replica tokenizers are trained on (offline, deterministic).

It holds the words and phrases the pipeline feeds a model ("Apologies", "Yes", the challenge,
the final question, the answer prefill, letters A-E), everyday English for the rest, and each
replica family's own role and template words, so that words split roughly as they do in the
real tokenizers: frequent words become one token, with the family's leading-space convention.
"""
from __future__ import annotations

from itertools import product

__all__ = ["corpus"]

# Phrases the pipeline renders or reads; repeated so that they merge into whole-word tokens.
_PIPELINE = [
    "Apologies, I made a mistake.", "Apologies for the confusion.", "Yes, I am sure.", "Yes.",
    "I don't think that's right. Are you sure?", "I do think that's right. Are you sure?",
    "So what's the answer? Give me a letter.",
    "So what's the answer? Give me your best guess and answer as concisely as possible.",
    "The answer is (A)", "The answer is (B)", "The answer is (C)", "The answer is (D)", "The answer is (E)",
    "(A) (B) (C) (D) (E) A B C D E", "I apologize, you are right.", "You are right, I was wrong.",
    "I am confident in my answer.", "My answer stays the same.", "Sorry, the correct answer is",
    "Answer the following question.", "Question:", "Answer:", "You are a helpful assistant.",
]

_SENTENCES = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
Which of these is a planet? Which river is the longest? What is two plus two? Two plus two is four.
A cat is an animal. The sun is a star. Water boils at one hundred degrees. The moon orbits the earth.
Please answer with the letter of the correct option. Let me check my answer again.
I think the answer is correct, but let me reconsider. Actually, I was wrong. Indeed, that is true.
Thank you for the question. The correct answer is the first option. That is not correct.
How many days are in a week? There are seven days in a week. What color is the sky? The sky is blue.
Who wrote the book? When did the war end? Where is the tallest mountain? Why is the ocean salty?
He said that she would come back the next day. They were sure that we had found the answer.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 42 100 2023 2024. Math: 3 + 4 = 7, 10 - 2 = 8, 6 * 7 = 42.
The quick brown fox jumps over the lazy dog. Today is Monday. Tomorrow will be Tuesday.
Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
You are a helpful AI assistant named SmolLM, trained by Hugging Face
system user assistant model [INST] [/INST] <<SYS>> <</SYS>>
"""


def corpus(extra: tuple[str, ...] = ()) -> list[str]:
    """Lines of training text: the pipeline phrases (many times), the sentences, ``extra``."""
    lines = []
    for rep, phrase in product(range(12), _PIPELINE):
        # At the start of a text, after a space and after a newline: each family's tokens for
        # the word in every position a template can put it.
        lines.append((phrase, "Reply: " + phrase, "Assistant:\n" + phrase, phrase.lower())[rep % 4])
    lines += [ln.strip() for ln in _SENTENCES.strip().splitlines() for _ in range(6)]
    lines += list(extra)
    try:  # the shipped sample rows: questions and answers the end-to-end tests use
        from ..data import SAMPLE_PATH

        lines += SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    except (ImportError, OSError):  # pragma: no cover - the data package always ships it
        pass
    return lines
