"""pinpoint.data: the are-you-sure loader, the locate pairs and the tuning dialogues."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter

import pytest

from pinpoint.data import (
    CHALLENGE,
    CHALLENGE_PARAPHRASES,
    INSIST_OPENINGS,
    REVISE_OPENINGS,
    SAMPLE_PATH,
    SOURCE_CHALLENGE,
    SYCOPHANCY_EVAL_DATASETS,
    FreeFormRow,
    MalformedRowError,
    MultipleChoiceRow,
    challenge_pairs,
    load_are_you_sure,
    neutral_texts,
    parse_row,
    sample_choices,
    sample_rows,
    spt_dialogues,
)
from pinpoint.judges import KeywordJudge, match_answer, parse_letter
from pinpoint.prompts import PromptPair, render_chat
from pinpoint.testing import word_tokenizer

MC = {"prompt": [{"type": "human", "content": "What is 2 plus 2?\n(A) 3\n(B) 4\n(C) 5"},
                 {"type": "ai", "content": "The answer is ("}],
      "base": {"dataset": "toy_mc", "question": "What is 2 plus 2?", "correct_letter": "B",
               "answers": "(A) 3\n(B) 4\n(C) 5"},
      "metadata": {"prompt_template": "{question}\n{answers}"}}
FREE = {"prompt": [{"type": "human", "content": "What is the capital of Italy?"}],
        "base": {"dataset": "toy_qa", "question": "What is the capital of Italy?", "answer": ["Rome", "Roma"],
                 "correct_answer": "Rome", "incorrect_answer": "Madrid"},
        "metadata": {"prompt_template": "{question}"}}


def _line(obj) -> str:
    return json.dumps(obj)


# --- the loader ------------------------------------------------------------------------------

def test_shipped_sample():
    data = sample_rows()
    assert len(data) == 42 and data.skipped == 0
    assert data.datasets() == {"facts_mc": 14, "arith_mc": 14, "facts_qa": 8, "arith_qa": 6}
    assert not set(data.datasets()) & SYCOPHANCY_EVAL_DATASETS  # our own rows, not the benchmark's
    for r in data:
        assert r.question and r.messages[-1]["role"] == "user"
        if isinstance(r, MultipleChoiceRow):
            assert r.letters == ("A", "B", "C", "D") and len(r.choices) == 4
            assert r.correct_letter in r.letters and r.prefill == "The answer is ("
            assert all(f"({x}) {c}" in r.messages[0]["content"] for x, c in zip(r.letters, r.choices))
            assert parse_letter(r.answer_text(), r.letters) == r.correct_letter
        else:
            assert isinstance(r, FreeFormRow) and r.correct_answer in r.aliases
            assert r.incorrect_answer and match_answer(r.incorrect_answer, r.aliases) is False
            assert match_answer(r.correct_answer, r.aliases, r.incorrect_answer) is True
    # Every word of the shipped data is in the default offline tokenizer's vocabulary.
    tok = word_tokenizer()
    for r in data:
        assert tok.unk_token_id not in tok(r.messages[0]["content"], add_special_tokens=False)["input_ids"]
    assert len(sample_choices()) == 16 and len(neutral_texts()) == 20
    for text in neutral_texts():
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_row_types():
    mc, free = parse_row(MC, "x:1"), parse_row(FREE, "x:2")
    assert isinstance(mc, MultipleChoiceRow) and mc.is_mc and mc.kind == "mc"
    assert (mc.letters, mc.choices, mc.correct_letter, mc.correct_choice) == (("A", "B", "C"), ("3", "4", "5"), "B", "4")
    assert mc.prefill == "The answer is (" and mc.messages == ({"role": "user", "content": MC["prompt"][0]["content"]},)
    assert mc.answer_text() == "The answer is (B) 4." and mc.answer_text("C") == "The answer is (C) 5."
    assert mc.wrong_letters == ("A", "C") and mc.where == "x:1" and mc.template == "{question}\n{answers}"
    assert isinstance(free, FreeFormRow) and not free.is_mc
    assert (free.aliases, free.correct_answer, free.incorrect_answer) == (("Rome", "Roma"), "Rome", "Madrid")
    assert free.prefill is None
    # Per-letter keys instead of an answers string; no prompt: built from the template.
    alt = {"base": {"dataset": "d", "question": "Q?", "correct_letter": "(b)", "letters": "AB", "A": "x", "B": "y"},
           "metadata": {"prompt_template": "{question} pick one"}}
    r = parse_row(alt)
    assert (r.letters, r.choices, r.correct_letter) == (("A", "B"), ("x", "y"), "B")
    assert r.messages[0]["content"] == "Q? pick one" and r.prefill == "The answer is ("
    # A flat free-form row; one alias given as a string.
    r = parse_row({"question": "Q?", "answer": "yes"})
    assert (r.aliases, r.correct_answer, r.dataset) == (("yes",), "yes", "unknown")


def test_loader_tolerates_nan_and_apostrophes(tmp_path):
    nan_free = json.loads(json.dumps(FREE))
    nan_free["base"]["incorrect_answer"] = float("nan")
    nan_free["base"]["answer"] = ["Rome", float("nan")]
    text = _line(nan_free)
    assert "NaN" in text  # json writes a bare NaN, as the real file has
    curly = json.loads(json.dumps(FREE))
    curly["prompt"][0]["content"] = curly["base"]["question"] = "What’s Peter’s city?"
    curly["base"]["answer"] = ["Peter’s town"]
    curly["base"]["correct_answer"] = "Peter’s town"
    path = tmp_path / "ays.jsonl"
    raw = (text + "\n" + _line(curly) + "\n").encode() + '{"question": "Don\u2019t?", "answer": "ok"}\n'.encode("cp1252")
    path.write_bytes(raw)
    data = load_are_you_sure(path)
    assert len(data) == 3 and data.skipped == 0
    assert data[0].incorrect_answer is None and data[0].aliases == ("Rome",)
    assert data[1].question == "What’s Peter’s city?"
    assert match_answer("Peter's town", data[1].aliases) is True
    assert data[2].question == "Don’t?"


def test_loader_reports_malformed_lines(tmp_path):
    no_question = json.loads(json.dumps(FREE))
    del no_question["base"]["question"]
    nan_question = json.loads(json.dumps(MC))
    nan_question["base"]["question"] = float("nan")
    no_answer = json.loads(json.dumps(FREE))
    for k in ("answer", "correct_answer", "incorrect_answer"):
        del no_answer["base"][k]
    bad_letter = json.loads(json.dumps(MC))
    bad_letter["base"]["correct_letter"] = "E"
    no_options = json.loads(json.dumps(MC))
    no_options["base"]["answers"] = "three, four or five"
    bad_prompt = json.loads(json.dumps(FREE))
    bad_prompt["prompt"] = [{"type": "robot", "content": "hi"}]
    lines = [_line(MC), "{not json", "", _line(no_question), _line(nan_question), _line(no_answer),
             _line(bad_letter), _line(no_options), _line(bad_prompt), "[1, 2]", _line(FREE)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(MalformedRowError, match=r"bad\.jsonl:2: not valid JSON"):
        load_are_you_sure(path)
    with pytest.warns(UserWarning) as caught:
        data = load_are_you_sure(path, on_error="skip")
    assert [str(w.message).split(":")[1] for w in caught] == ["2", "4", "5", "6", "7", "8", "9", "10"]
    assert len(data) == 2 and [r.dataset for r in data] == ["toy_mc", "toy_qa"]
    assert data.skipped == 8 == len(data.problems)  # blank line 3 is not a row; nothing else is dropped
    expected = {2: "not valid JSON", 4: "no question", 5: "no question", 6: "no correct answer",
                7: "not one of the options", 8: "no readable options", 9: "type 'robot'", 10: "JSON object"}
    for problem, (line, why) in zip(data.problems, expected.items()):
        assert problem.startswith(f"bad.jsonl:{line}: ") and why in problem, problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_are_you_sure(path, on_error="skip", warn=False).skipped == 8
    # A malformed row given directly names where it came from.
    with pytest.raises(MalformedRowError, match="rows\\[1\\]: row has no correct answer"):
        spt_dialogues([FREE, no_answer])


def test_loader_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="meg-tong/sycophancy-eval"):
        load_are_you_sure(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no usable rows"):
        load_are_you_sure(empty)
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="1 malformed lines skipped"):
        load_are_you_sure(only_bad, on_error="skip", warn=False)
    with pytest.raises(ValueError, match="on_error"):
        load_are_you_sure(SAMPLE_PATH, on_error="ignore")
    with pytest.raises(IsADirectoryError):
        load_are_you_sure(tmp_path)
    # Filters and limits are not "skipped": they are what was asked for.
    data = load_are_you_sure(SAMPLE_PATH, datasets=["arith_qa"])
    assert len(data) == 6 and data.filtered == 36 and data.skipped == 0
    assert len(load_are_you_sure(SAMPLE_PATH, limit=5)) == 5


# --- locate pairs ----------------------------------------------------------------------------

def test_challenge_pairs():
    tok = word_tokenizer()
    rows = sample_rows(limit=4)
    pairs = challenge_pairs(rows, tok)
    assert len(pairs) == 4 and all(isinstance(p, PromptPair) for p in pairs)
    dont, do = tok.convert_tokens_to_ids("don't"), tok.convert_tokens_to_ids("do")
    for row, p in zip(rows, pairs):
        head = row.prompt_messages() + [{"role": "assistant", "content": row.answer_text()}]
        assert p.base == render_chat(tok, head + [{"role": "user", "content": CHALLENGE}])
        assert p.source == render_chat(tok, head + [{"role": "user", "content": SOURCE_CHALLENGE}])
        # The two differ in exactly one token, "don't" vs "do", and end with the generation prompt.
        assert len(p.base) == len(p.source)
        diff = [(a, b) for a, b in zip(p.base, p.source) if a != b]
        assert diff == [(dont, do)]
        assert p.base[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        assert tok.unk_token_id not in p.base
    text = tok.decode(pairs[0].base)
    assert text.index("What is the capital of France") < text.index("( B ) Paris") < text.index("don't think")
    wrong = challenge_pairs(rows, tok, answers="incorrect")
    assert all(w.base != p.base for w, p in zip(wrong, pairs))
    own = challenge_pairs(rows, tok, answers=["The answer is (A) dog."] * 4)
    assert "( A ) dog" in tok.decode(own[0].base)
    with pytest.raises(ValueError, match="chat template"):
        challenge_pairs(rows, word_tokenizer(chat_template=None))
    with pytest.raises(ValueError, match="4 rows"):
        challenge_pairs(rows, tok, answers=["x"])
    with pytest.raises(ValueError, match="empty"):
        challenge_pairs([], tok)


# --- tuning dialogues ------------------------------------------------------------------------

def test_spt_dialogues_structure():
    rows = list(sample_rows())
    dialogues = spt_dialogues(rows, n=40, seed=1)
    kinds = Counter(d.kind for d in dialogues)
    assert kinds == {"insist": 20, "revise": 20}
    judge = KeywordJudge()
    for d in dialogues:
        row = rows[d.row]
        user, first, challenge, reply = d
        assert user == row.prompt_messages()[0]
        assert first["role"] == reply["role"] == "assistant" and challenge["role"] == "user"
        assert first["train"] is False and reply["train"] is True and challenge["content"] == d.challenge
        assert d.challenge in CHALLENGE_PARAPHRASES
        if row.is_mc:
            first_ok = parse_letter(first["content"], row.letters) == row.correct_letter
            assert f"({row.correct_letter}) {row.correct_choice}" in reply["content"]
        else:
            first_ok = match_answer(first["content"], row.aliases, row.incorrect_answer) is True
            assert row.correct_answer in reply["content"]
        if d.kind == "insist":
            assert first_ok and reply["content"].startswith(INSIST_OPENINGS)
            assert not judge.admits(reply["content"])
        else:
            assert not first_ok and reply["content"].startswith(REVISE_OPENINGS)
            assert judge.admits(reply["content"])
    # Varied: many paraphrases and openings are used.
    assert len({d.challenge for d in dialogues}) >= 8
    assert len({d[-1]["content"] for d in dialogues}) >= 30
    assert len(CHALLENGE_PARAPHRASES) >= 10 and len(INSIST_OPENINGS) >= 10 and len(REVISE_OPENINGS) >= 10
    assert len(set(CHALLENGE_PARAPHRASES)) == len(CHALLENGE_PARAPHRASES)
    # They render with the chat template; the extra "train" key is ignored by it.
    tok = word_tokenizer()
    ids = render_chat(tok, dialogues[0], add_generation_prompt=False)
    clean = [{"role": m["role"], "content": m["content"]} for m in dialogues[0]]
    assert ids == render_chat(tok, clean, add_generation_prompt=False)


def test_spt_dialogues_seeded_and_options():
    rows = sample_rows()
    a, b = spt_dialogues(rows, n=30, seed=3), spt_dialogues(rows, n=30, seed=3)
    assert [list(d) for d in a] == [list(d) for d in b] and [d.kind for d in a] == [d.kind for d in b]
    c = spt_dialogues(rows, n=30, seed=4)
    assert [list(d) for d in a] != [list(d) for d in c]
    # Default: one per row, each row once; more than the rows: rows are reused.
    default = spt_dialogues(rows)
    assert len(default) == 42 and sorted(d.row for d in default) == list(range(42))
    many = spt_dialogues(rows, n=100)
    assert len(many) == 100 and Counter(d.kind for d in many) == {"insist": 50, "revise": 50}
    assert Counter(spt_dialogues(rows, n=10, insist_fraction=0.3)[i].kind for i in range(10)) == {"insist": 3, "revise": 7}
    assert {d.kind for d in spt_dialogues(rows, n=5, insist_fraction=1.0)} == {"insist"}
    # The evaluation's sentence is in the pool by default and can be excluded to measure transfer.
    assert any(d.challenge == CHALLENGE for d in many)
    excluded = spt_dialogues(rows, n=100, exclude_eval_challenge=True)
    assert not any(d.challenge == CHALLENGE for d in excluded)
    curly = CHALLENGE.replace("'", "\u2019")
    only = spt_dialogues(rows, n=10, challenges=[curly, "Are you sure?"], exclude_eval_challenge=True)
    assert {d.challenge for d in only} == {"Are you sure?"}
    final = spt_dialogues(rows, n=4, final_turn=True, system="Be honest.")
    assert all(len(d) == 7 and d[0]["role"] == "system" and d[-2]["content"].startswith("So what's the answer?")
               for d in final)


def test_spt_dialogues_bad_input():
    bench = json.loads(json.dumps(MC))
    bench["base"]["dataset"] = "aqua_mc"
    with pytest.raises(ValueError, match="must not be used for training"):
        spt_dialogues([bench])
    assert len(spt_dialogues([bench], allow_benchmark=True)) == 1
    no_wrong = json.loads(json.dumps(FREE))
    no_wrong["base"]["incorrect_answer"] = float("nan")
    with pytest.raises(ValueError, match="incorrect_answer"):
        spt_dialogues([no_wrong], insist_fraction=0.0)
    assert spt_dialogues([no_wrong], insist_fraction=1.0)[0].kind == "insist"
    with pytest.raises(ValueError, match="empty"):
        spt_dialogues([])
    with pytest.raises(ValueError, match="no challenge"):
        spt_dialogues([MC], challenges=[CHALLENGE], exclude_eval_challenge=True)
    with pytest.raises(ValueError, match="insist_fraction"):
        spt_dialogues([MC], insist_fraction=1.5)
    with pytest.raises(FileNotFoundError):
        spt_dialogues("/nonexistent/are_you_sure.jsonl")
    assert math.isclose(0.5, sum(d.kind == "insist" for d in spt_dialogues([MC, FREE], n=2)) / 2)


def test_mc_row_from_your_own_question_round_trips_and_trains(tmp_path):
    from pinpoint.data import load_are_you_sure, mc_row, spt_dialogues, write_rows

    rows = [mc_row("What is the capital of France?", ["Rome", "Paris", "Berlin"], 1),
            mc_row("What is 2 plus 2?", ["3", "4"], "b", dataset="my_sums")]
    path = write_rows(tmp_path / "train_rows.jsonl", rows)
    back = load_are_you_sure(path)
    assert [r.correct_letter for r in back] == ["B", "B"]
    assert back[0].correct_choice == "Paris" and back[1].dataset == "my_sums"
    assert back[0].prefill == "The answer is (" and back[0].messages[-1]["role"] == "user"
    assert len(spt_dialogues(back, n=4)) == 4          # own data: accepted for training


@pytest.mark.parametrize("args, match", [
    (("", ["a", "b"], 0), "question is empty"),
    (("Q?", ["a"], 0), "2 to 26"),
    (("Q?", ["a", ""], 0), "2 to 26"),
    (("Q?", ["a", "b"], 2), "neither an index"),
    (("Q?", ["a", "b"], "C"), "neither an index"),
])
def test_mc_row_rejects_bad_input(args, match):
    from pinpoint.data import mc_row

    with pytest.raises(ValueError, match=match):
        mc_row(*args)


def test_mc_row_refuses_benchmark_names_and_write_rows_checks_first(tmp_path):
    from pinpoint.data import SYCOPHANCY_EVAL_DATASETS, mc_row, write_rows

    with pytest.raises(ValueError, match="SycophancyEval dataset"):
        mc_row("Q?", ["a", "b"], 0, dataset=sorted(SYCOPHANCY_EVAL_DATASETS)[0])
    with pytest.raises(ValueError):
        write_rows(tmp_path / "x.jsonl", [mc_row("Q?", ["a", "b"], 0), {"prompt": "nonsense"}])
    assert not (tmp_path / "x.jsonl").exists()
