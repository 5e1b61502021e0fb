"""pinpoint.recipe: k, learning rate and steps chosen by a rule, never from evaluation rows."""
from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

import pinpoint.recipe as recipe
from pinpoint.heads import HeadScores
from pinpoint.testing import tiny_model, word_tokenizer

tune_mod = importlib.import_module("pinpoint.tune")  # the module, not pp.tune the function

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [("What is the capital of France ?", "Paris"), ("What is the capital of Japan ?", "Tokyo"),
             ("What is the capital of Italy ?", "Rome"), ("What is the capital of Egypt ?", "Cairo"),
             ("What is the capital of Spain ?", "Madrid"), ("What is the capital of India ?", "Delhi")]
DIALOGUES = [[{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a} ."},
              {"role": "user", "content": "I don't think that's right . Are you sure ?"},
              {"role": "assistant", "content": f"Yes , I am sure . The answer is {a} ."}]
             for _ in range(2) for q, a in QUESTIONS]   # 12 distinct objects (the test tracks them by id)


def _scores(values):
    return HeadScores(torch.as_tensor(values, dtype=torch.float32))


def test_choose_k_cuts_at_the_largest_drop_and_keeps_every_head_within_a_quarter_of_the_top():
    v = torch.zeros(4, 8)
    v[2, 2:6] = torch.tensor([1.0, 0.9, 0.8, 0.7])
    v[0, 1] = 0.26   # within 25 % of the top: always counted
    v[1, 1] = 0.1    # below 25 %, but above the largest drop (0.1 -> the 1 % floor): counted
    v[1, 5] = 0.004  # noise (< 1 % of the top): never makes a drop
    v[3, 0] = -5.0   # the other direction: never counted
    assert recipe.choose_k(_scores(v), largest=True) == 6
    # top()'s default orientation: the most negative scores are the heads that carry the behaviour
    assert recipe.choose_k(_scores(-v)) == 6
    assert recipe.choose_k(_scores(v)) == 1          # only (3, 0) points that way: alone, it is 100 % of itself
    s = _scores(-v)
    assert set(s.top(recipe.choose_k(s))) == {(2, 2), (2, 3), (2, 4), (2, 5), (0, 1), (1, 1)}
    # the largest drop inside the quarter: the quarter still counts (never fewer)
    w = torch.zeros(2, 8)
    w[0, :3] = torch.tensor([1.0, 0.3, 0.29])
    assert recipe.choose_k(_scores(w), largest=True) == 3


def test_one_dominant_head_does_not_hide_the_others():
    """Measured on a full seed-3 organism: the planted heads scored -3.28, -0.70, -0.57, -0.41,
    every other head at most -0.02; a 25 %-of-top cut kept one head, the largest drop keeps 4."""
    v = torch.zeros(4, 8)
    v[3, 0], v[3, 5], v[1, 6], v[1, 1] = -3.28, -0.70, -0.57, -0.41
    v[3, 4], v[2, 4] = -0.02, -0.01
    s = _scores(v)
    assert recipe.choose_k(s) == 4 and set(s.top(4)) == {(3, 0), (3, 5), (1, 6), (1, 1)}


def test_choose_k_ignores_non_finite_and_negative_scores_and_is_capped():
    v = torch.full((4, 8), -1.0)
    v[0, 0] = float("nan")
    v[0, 1] = float("inf")
    v[1, 3] = 2.0
    assert recipe.choose_k(_scores(v), largest=True) == 1
    assert recipe.choose_k(_scores(torch.full((2, 4), -0.5)), largest=True) == 1   # nothing pushes: one head
    assert recipe.choose_k(_scores(torch.full((2, 4), 0.5))) == 1
    # 100 equal heads of 400: capped at max(8, 5 % of 400 = 20)
    v = torch.zeros(20, 20)
    v.view(-1)[:100] = -1.0
    assert recipe.choose_k(_scores(v)) == 20
    v = -torch.ones(4, 8)
    assert recipe.choose_k(_scores(v)) == 8


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(50))
    tr, va = recipe.split_dialogues(items, seed=3)
    assert len(va) == 10 and len(tr) == 40
    assert sorted(tr + va) == items
    assert (tr, va) == recipe.split_dialogues(items, seed=3)
    assert va != recipe.split_dialogues(items, seed=4)[1]
    with pytest.raises(ValueError, match="at least 2 dialogues"):
        recipe.split_dialogues(items[:1])


def test_steps_are_four_epochs_of_the_training_part():
    assert recipe.rule_steps(3072, 128) == 96        # the paper's data, 80 % kept for training
    assert recipe.rule_steps(205, 16) == 52
    assert recipe.rule_steps(10, 16) == recipe.MIN_STEPS


def test_one_standard_error_rule_takes_the_smallest_indistinguishable_rate():
    losses = {1e-4: (0.60, 0.03), 3e-4: (0.40, 0.02), 1e-3: (0.31, 0.014), 3e-3: (0.30, 0.011)}
    assert recipe.one_se_choice(losses) == 1e-3
    losses[1e-3] = (0.32, 0.014)
    assert recipe.one_se_choice(losses) == 3e-3
    assert recipe.one_se_choice({1e-3: (0.5, 0.0)}) == 1e-3


def test_bad_grid_is_refused_before_any_training(monkeypatch):
    monkeypatch.setattr(recipe, "_train", lambda *a, **k: pytest.fail("trained before checking the grid"))
    with pytest.raises(ValueError, match="positive"):
        recipe.choose_lr(tiny_model("llama"), word_tokenizer(), DIALOGUES, grid=[1e-3, 0.0])
    with pytest.raises(ValueError, match="positive"):
        recipe.choose_lr(tiny_model("llama"), word_tokenizer(), DIALOGUES, grid=[-1e-3])


def test_choose_lr_trains_on_the_split_validates_on_the_rest_and_restores_between_trials(monkeypatch):
    """The rule sees only the dialogues it is given: the trial runs train on the training part,
    the validation loss reads the rest, and (full fine-tuning) every trial starts from the
    original weights."""
    data = importlib.import_module("pinpoint.data")
    evaluate = importlib.import_module("pinpoint.evaluate")

    for mod, name in ((evaluate, "evaluate"), (data, "load_are_you_sure")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("the recipe read evaluation rows"))
    model, tok = tiny_model("llama"), word_tokenizer()
    start = [p.detach().clone() for p in model.parameters()]
    seen, real_train = [], recipe._train

    def spy(m, t, dialogues, **kw):
        same = all(torch.equal(p, s) for p, s in zip(m.parameters(), start))
        seen.append((list(map(id, dialogues)), kw["lr"], same))
        return real_train(m, t, dialogues, **kw)

    monkeypatch.setattr(recipe, "_train", spy)
    val_seen = []
    real_val = recipe.validation_loss
    monkeypatch.setattr(recipe, "validation_loss",
                        lambda m, t, d, **kw: (val_seen.append(list(map(id, d))), real_val(m, t, d, **kw))[1])
    choice = recipe.choose_lr(model, tok, DIALOGUES, grid=[1e-4, 1e-2, 3e-2], full=True, batch_size=4)
    train_ids = seen[0][0]
    assert all(ids == train_ids for ids, _, _ in seen)                 # every run: the same training part
    assert all(v == val_seen[0] for v in val_seen)
    assert not set(train_ids) & set(val_seen[0])                       # validation is held out
    assert len(train_ids) + len(val_seen[0]) == len(DIALOGUES)
    assert all(same for _, _, same in seen)                            # each run starts from the original
    assert [lr for _, lr, _ in seen[:-1]] == sorted(choice.val_loss)   # ascending sweep
    assert seen[-1][1] == choice.lr and choice.lr in choice.val_loss   # then the chosen rate, once more
    assert choice.steps == recipe.rule_steps(len(train_ids), 4)
    assert isinstance(choice.result, tune_mod.FullTuning)
    d = choice.to_dict()
    assert d["lr"] == choice.lr and d["n_val"] == len(val_seen[0]) and "one standard error" in d["rule"]


def test_choose_lr_spt_leaves_the_trials_detached_and_returns_the_chosen_run():
    model, tok = tiny_model("llama"), word_tokenizer()
    before = [p.detach().clone() for p in model.parameters()]
    choice = recipe.choose_lr(model, tok, DIALOGUES, grid=[1e-3, 1e-2], heads=[(0, 1), (1, 2)], batch_size=4)
    assert choice.result.state == "attached"
    assert all(math.isfinite(loss) and se >= 0 for loss, se in choice.val_loss.values())
    choice.result.detach()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _FakeRun:
    """What recipe._train returns, for sweeps whose validation loss is a given function of the rate."""

    history: list = []

    def __init__(self, lr):
        self.lr = lr

    def detach(self):
        return self

    def state_dict(self):
        return {"lr": torch.tensor([self.lr])}   # what the trial trained, to tell trials apart


def _fake_sweep(monkeypatch, loss_of):
    """recipe._train records the rate it is given; validation_loss answers loss_of(that rate), with a
    standard error of 0.001 (so the one-standard-error rule picks the lowest loss unless two tie)."""
    tried = []
    monkeypatch.setattr(recipe, "_train", lambda m, t, d, *, lr, **kw: (tried.append(lr), _FakeRun(lr))[1])
    monkeypatch.setattr(recipe, "validation_loss", lambda m, t, d, **kw: (loss_of(tried[-1]), 1e-3))
    return tried


@pytest.mark.parametrize("lowest, grid, walked", [
    (3e-2, recipe.LR_GRID, [1e-2, 3e-2, 1e-1]),        # past the top: on until the loss rises
    (1e-2, recipe.LR_GRID, [1e-2, 3e-2]),              # ... and no further once it has
    (3e-6, recipe.LR_GRID, [3e-6, 1e-6]),              # the same past the bottom
    (1.0, recipe.LR_GRID, [1e-2, 3e-2, 1e-1]),         # at most EDGE_STEPS past an end
    (1e-6, recipe.LR_GRID, [3e-6, 1e-6, 3e-7]),        # past the bottom (the grid's sweep stopped after two rises)
    (2e-4, recipe.LR_GRID, []),                        # inside the grid: the grid alone
    (5e-2, (1e-3, 4e-3), [4e-3 * 10 ** 0.5, 4e-2, 4e-2 * 10 ** 0.5]),   # off the 1-3 ladder: sqrt(10) steps
])
def test_the_sweep_goes_past_an_end_of_the_grid_while_the_lowest_loss_sits_there(monkeypatch, lowest, grid, walked):
    """The loss is a V in log(rate) with its bottom at ``lowest``: the rule must not choose an
    end of its grid as the lowest loss while the loss still falls past that end."""
    tried = _fake_sweep(monkeypatch, lambda lr: abs(math.log10(lr) - math.log10(lowest)))
    choice = recipe.choose_lr(object(), None, DIALOGUES, grid=grid, batch_size=4)
    assert choice.extended == pytest.approx(walked, rel=1e-5)
    assert tried[-1] == choice.lr                                   # the chosen rate, trained once more
    assert tried[:-1] == list(choice.val_loss)                      # every trial is recorded, in sweep order
    assert tried[len(tried) - 1 - len(walked):-1] == choice.extended   # the walk comes after the grid
    on_ladder = min(choice.val_loss, key=lambda lr: choice.val_loss[lr][0])
    assert choice.lr == on_ladder                                   # SE 0.001: the lowest loss
    if walked and len(walked) < recipe.EDGE_STEPS:
        assert choice.lr != max(choice.val_loss) and choice.lr != min(choice.val_loss)   # the minimum is inside
    assert choice.to_dict()["extended"] == choice.extended and "half-decades" in choice.to_dict()["rule"]


def test_reuse_puts_back_the_walked_trial_the_rule_chose(monkeypatch):
    """With reuse=True (the demo's and tune_auto's path) a rate found by the walk is put back from
    its own trial: no run is trained again."""
    tried = _fake_sweep(monkeypatch, lambda lr: abs(math.log10(lr) - math.log10(3e-2)))
    monkeypatch.setattr(recipe, "_put_back", lambda model, trial, state, history, *, seed: state)
    choice = recipe.choose_lr(object(), None, DIALOGUES, batch_size=4, reuse=True)
    assert choice.lr == 3e-2 and choice.lr in choice.extended
    assert len(tried) == len(choice.val_loss)                        # every rate once, none again
    assert float(choice.result["lr"]) == pytest.approx(3e-2)          # the walked trial's own tensors


def test_no_walk_past_the_grid_without_edge_steps_or_with_one_rate(monkeypatch):
    tried = _fake_sweep(monkeypatch, lambda lr: -lr)   # falls for ever: the walk would go on
    fixed = recipe.choose_lr(object(), None, DIALOGUES, batch_size=4, edge_steps=0)
    assert fixed.extended == [] and max(tried) == recipe.LR_GRID[-1]
    assert "not extended" in fixed.rule and "half-decades" not in fixed.rule
    assert "at most 2 each way" in recipe.choose_lr(object(), None, DIALOGUES, batch_size=4, edge_steps=2).rule
    assert recipe.choose_lr(object(), None, DIALOGUES, grid=[1e-3], batch_size=4).extended == []
    with pytest.raises(ValueError, match="edge_steps"):
        recipe.choose_lr(object(), None, DIALOGUES, batch_size=4, edge_steps=-1)


def test_ladder_steps():
    assert recipe.ladder_step(3e-3, up=True) == 1e-2 and recipe.ladder_step(1e-2, up=True) == 3e-2
    assert recipe.ladder_step(1e-5, up=False) == 3e-6 and recipe.ladder_step(3e-6, up=False) == 1e-6
    assert recipe.ladder_step(2e-3, up=True) == pytest.approx(2e-3 * 10 ** 0.5, rel=1e-5)
    just_below = 1e-2 * (1 - 1e-9)   # log10 a hair under -2: still the ladder's 1e-2
    assert recipe.ladder_step(just_below, up=True) == 3e-2 and recipe.ladder_step(just_below, up=False) == 3e-3


def test_turn_budget_is_the_longest_turn_of_the_tuning_dialogues_plus_the_margin():
    tok = word_tokenizer()
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    final = [{"role": "user", "content": "So what is the answer ?"}, {"role": "assistant", "content": "Paris"}]
    with_final = [DIALOGUES[0] + final, DIALOGUES[1]]
    answers = [d[1]["content"] for d in DIALOGUES]
    replies = [d[3]["content"] for d in DIALOGUES]
    longest = (max(map(n, answers[:2])), max(map(n, replies[:2])), n("Paris"))
    assert recipe.turn_budget(tok, with_final) == tuple(x + recipe.BUDGET_MARGIN for x in longest)
    assert recipe.turn_budget(tok, with_final, margin=0) == longest
    # without the final turn, the final answer gets the first answer's budget
    assert recipe.turn_budget(tok, DIALOGUES, margin=1)[2] == max(map(n, answers)) + 1
    # system turns, turns without a role and empty assistant turns do not shift which turn is which
    extra = [{"role": "system", "content": "You are terse ."}, {"content": "no role"}] + DIALOGUES[0]
    extra[3] = {**extra[3], "content": None}
    assert recipe.turn_budget(tok, [extra, DIALOGUES[0]], margin=0)[:2] == (n(answers[0]), n(replies[0]))
    with pytest.raises(ValueError, match="margin"):
        recipe.turn_budget(tok, DIALOGUES, margin=-1)
    with pytest.raises(ValueError, match="two assistant turns"):
        recipe.turn_budget(tok, [DIALOGUES[0][:2]])


# --- the dialogue mix -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    from pinpoint import organism

    path = organism.build()
    return path, *organism.load(path)


def test_insist_fraction_is_the_models_first_answer_accuracy_on_a_seeded_sample(shipped):
    """The rule's fraction equals what the evaluation itself reads as first-answer correct on
    the same sampled rows; it reads only the rows it is given (the training rows)."""
    import random

    from pinpoint.data import as_rows
    from pinpoint.evaluate import evaluate

    path, model, tok = shipped
    rows = as_rows(path / "spt_rows.jsonl")[:40]
    choice = recipe.choose_insist_fraction(model, tok, rows, max_rows=24, seed=3, max_new_tokens=6)
    picked = sorted(random.Random(3).sample(range(len(rows)), 24))
    ref = evaluate(model, tok, [rows[i] for i in picked], max_new_tokens=(6, 1, 1), progress=False)
    want = sum(s["first_correct"] for s in ref.samples)
    assert (choice.n_rows, choice.n_correct) == (24, want) and choice.fraction == want / 24
    assert choice.to_dict()["insist_fraction"] == choice.fraction

    # rows whose "correct" letter is never the one the model gives: the mix becomes all "revise"
    answered = evaluate(model, tok, rows[:8], max_new_tokens=(6, 1, 1), progress=False).samples
    flipped = [dataclasses.replace(r, correct_letter=next(x for x in r.letters if x != s["first_pred"]))
               for r, s in zip(rows[:8], answered)]
    assert recipe.choose_insist_fraction(model, tok, flipped, max_new_tokens=6).fraction == 0.0


def test_tuning_dialogues_follow_the_mix_given_or_chosen(shipped, monkeypatch):
    from pinpoint.data import as_rows

    path, model, tok = shipped
    rows = as_rows(path / "spt_rows.jsonl")[:20]
    dialogues, mix = recipe.tuning_dialogues(model, tok, rows, n=40, insist_fraction=0.25)
    assert mix == {"insist_fraction": 0.25, "rule": "given", "final_turn": True}
    assert sum(d.kind == "insist" for d in dialogues) == 10
    # the recipe's default: each dialogue ends with the protocol's final question and the correct answer
    assert all(d[-2]["content"] != d.challenge and d[-1]["role"] == "assistant" and d[-1]["train"] for d in dialogues)
    bare, mix = recipe.tuning_dialogues(model, tok, rows, n=40, insist_fraction=0.25, final_turn=False)
    assert mix["final_turn"] is False
    assert [list(d) for d in bare] == [list(d)[:-2] for d in dialogues]
    monkeypatch.setattr(recipe, "choose_insist_fraction",
                        lambda *a, **k: recipe.InsistChoice(fraction=0.9, n_rows=20, n_correct=18))
    dialogues, mix = recipe.tuning_dialogues(model, tok, rows, n=40)
    assert mix["insist_fraction"] == 0.9 and mix["n_correct"] == 18
    assert sum(d.kind == "insist" for d in dialogues) == 36


def test_insist_fraction_refuses_empty_input_and_a_bad_sample_size(shipped):
    _, model, tok = shipped
    with pytest.raises(ValueError, match="rows is empty"):
        recipe.choose_insist_fraction(model, tok, [])
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        recipe.choose_insist_fraction(model, tok, [{"prompt": [{"type": "human", "content": "Q?"}],
                                                    "base": {"dataset": "x", "question": "Q?",
                                                             "correct_answer": "A"}}], max_rows=0)


class _Curve:   # what knockout_k reads of a KnockoutCurve
    def __init__(self, values):
        self.values = torch.tensor(values)


def test_knockout_k_is_the_fewest_heads_making_90_percent_of_the_largest_fall():
    # measured on the s3 sibling (planted 1.1 1.6 3.0 3.5): the scores kept 2 heads; the curve needs 4
    s3 = _Curve([3.32, 3.14, 0.87, 0.02, -0.68, -0.44, -0.45, -0.62, -0.59])
    assert recipe.knockout_k(s3) == 4
    assert recipe.knockout_k(s3, complete=0.8) == 3            # 3.32 - 0.02 = 3.30 >= 0.8 * 4.00
    assert recipe.knockout_k(_Curve([1.0, 1.2, 1.1])) == 0      # ablating never lowers the metric
    assert recipe.knockout_k(_Curve([1.0, 1.2, 3.0]), largest=True) == 2   # positive heads: a rise
    assert recipe.knockout_k(_Curve([1.0, float("nan")])) == 0
    with pytest.raises(ValueError, match=r"complete must be in \(0, 1\], got 0"):
        recipe.knockout_k(s3, complete=0)


def test_choose_k_with_a_curve_never_goes_below_the_scores_and_stays_capped():
    v = torch.zeros(4, 8)
    v[3, 0], v[3, 5], v[1, 1], v[1, 6] = -3.3, -3.0, -0.3, -0.2   # the scores alone: the two strong heads
    s = _scores(v)
    assert recipe.choose_k(s) == 2
    assert recipe.choose_k(s, curve=_Curve([3.32, 3.14, 0.87, 0.02, -0.68])) == 4
    assert recipe.choose_k(s, curve=_Curve([3.0, -1.0, -1.0])) == 2          # the curve never lowers k
    assert recipe.choose_k(s, curve=_Curve([10.0] + [9.0] * 20 + [0.0])) == 8   # cap: max(8, 5 % of 32)


def test_choose_k_by_ablation_finds_heads_the_scores_rank_low(shipped):
    """The shipped organism's four planted heads back each other up (ablating three of them
    leaves the apology metric near its base): with scores that rank two of them high and two
    barely above noise, the scores alone give k = 2 and the ablation check gives 4."""
    from pinpoint.data import as_rows, challenge_pairs

    path, model, tok = shipped
    pairs = challenge_pairs(as_rows(path / "are_you_sure.jsonl")[:12], tok)
    v = torch.zeros(4, 8)
    v[2, 2], v[2, 3], v[2, 4], v[2, 5] = -3.0, -2.8, -0.2, -0.15
    v[0, 0] = -0.001
    s = _scores(v)
    assert recipe.choose_k(s) == 2
    k, curve = recipe.choose_k_by_ablation(model, tok, pairs, s)
    assert curve.heads.to_list() == s.top(4).to_list()         # the window: min(2k, cap) heads in score order
    assert k == 4 and set(s.top(k)) == {(2, 2), (2, 3), (2, 4), (2, 5)}
    assert float(curve.values[2]) > 0.5 * float(curve.values[0])   # two of them ablated: the apology stays


def test_final_turn_falls_back_to_bare_dialogues_when_the_template_rewrites_history(shipped):
    """Qwen3's and Phi-3's templates render an earlier assistant turn differently from the last
    one, so without {% generation %} marks the reply's tokens cannot be found once a final turn
    follows it: the default then builds the bare dialogues and says why; asked for explicitly,
    the final turn stays (and tuning would name the problem)."""
    import copy

    from pinpoint.data import as_rows

    path, model, tok = shipped
    rows = as_rows(path / "spt_rows.jsonl")[:10]
    rewrites = copy.deepcopy(tok)
    rewrites.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
        "{% if m.role == 'assistant' and not loop.last %} (earlier){% endif %}"
        "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    bare, mix = recipe.tuning_dialogues(model, rewrites, rows, n=8, insist_fraction=0.5)
    assert mix["final_turn"] is False and "does not render message" in mix["final_turn_note"], mix
    assert all(d[-2]["content"] == d.challenge for d in bare)
    recipe.tuning_dialogues(model, tok, rows, n=8, insist_fraction=0.5)   # the organism's own template renders it
    kept, mix = recipe.tuning_dialogues(model, rewrites, rows, n=8, insist_fraction=0.5, final_turn=True)
    assert mix == {"insist_fraction": 0.5, "rule": "given", "final_turn": True}
    assert all(d[-2]["content"] != d.challenge for d in kept)
