"""The tuning recipe, chosen by a rule instead of by hand.

Two choices are made here, the same way for every method (SPT on located heads, SPT on random
heads, full fine-tuning, LoRA), so that methods are compared on equal terms:

* **How many heads** (:func:`choose_k`): among the heads whose effect points the way
  ``top`` ranks (negative by default: patching in the "do" source lowers the apology logit of
  a head that carries the behaviour), the ones above the **largest relative drop** between
  consecutive strengths (strengths below ``GAP_FLOOR`` = 1 % of the strongest count as that
  floor, so noise-level heads cannot make a drop), and never fewer than the heads at least
  ``REL_TO_MAX`` (25 %) of the strongest; clipped to ``[1, max(8, 5 % of all heads)]``.
  The paper tunes 3-4 % of the heads (32 of 1,024 for 7B models). A fixed share of the
  strongest alone fails when one head dominates: on a full seed-3 organism path patching
  scored the planted heads 3.28, 0.70, 0.57 and 0.41 against at most 0.02 for any other
  head, the 25 % cut kept one head, and SPT on it reached confidence 6.4; the largest drop
  (0.41 to 0.02) keeps all four. On the other organisms measured both give the same k.
  **Checked by ablation** (:func:`choose_k_by_ablation`, what the demo, the sweep and
  ``pinpoint locate`` use): the top ``min(2k, cap)`` heads are mean-ablated cumulatively
  (one batched ``pp.knockout``), and k grows to the fewest whose ablation removes
  ``COMPLETE`` (90 %) of the largest fall of the metric along that curve. Scores rank heads
  one at a time; heads that back each other up score low alone. On a replanted sibling (s3:
  planted 1.1 1.6 3.0 3.5) the scores alone kept 3.0 and 3.5, yet ablating them left the
  apology metric at 0.87 of 3.32 and ablating 1.1 and 1.6 as well took it to −0.68; SPT on
  the two heads stopped the apology (confidence 94.6) but not the switch (truthfulness 65.5,
  read with the old 16-token reply budget).
  On eleven of the fourteen benchmark organisms the 90 % point of the curve is exactly the
  planted heads; on MHA seeds 4 and 8 it keeps 3 of 4, on the one-group GQA-4 build 2 of 4.
* **Learning rate and steps** (:func:`choose_lr`): the training dialogues are split once
  (seeded) into a training part and a validation part (``VAL_FRACTION`` = 20 %). Steps are
  ``EPOCHS`` (4) passes over the training part at the given batch size, which is what the
  paper's 120 steps at batch 128 over 3,840 dialogues amount to. Each learning rate of
  ``LR_GRID`` (half-decades from 1e-5 to 3e-3) is trained on the training part, in
  ascending order, and scored by its validation loss (the mean over validation dialogues of
  the cross-entropy per assistant token) with its standard error. The choice is the
  *smallest* rate whose loss is within one standard error of the lowest (the
  "one-standard-error rule" of model selection): among rates the validation data cannot
  tell apart, take the one that moves the model least. The sweep stops early once the loss
  has risen for two rates in a row (the curve is past its minimum). **The grid's ends are not
  walls**: while the lowest loss sits at the largest rate tried, the sweep goes on up the same
  half-decade ladder (1e-2, 3e-2, ...), and while it sits at the smallest, down (3e-6, ...), at
  most ``EDGE_STEPS`` (3) rates past each end. A rule that picks "the rate with the lowest
  loss" has not found it while the lowest loss is the last rate tried. Measured on all
  fourteen benchmark organisms with the grid alone: SPT on the located heads and on random
  heads had its lowest validation loss at 3e-3, the grid's top, every time, while full
  fine-tuning's minimum was inside the grid (3e-4) every time. The chosen rate is then
  trained once more on the same training part, and that run is what is returned. With
  ``reuse=True`` the trials' trained tensors are kept (on the CPU) and the chosen trial is
  put back instead: the same tensors (every run is a deterministic function of its settings),
  one training run cheaper.

* **The mix of training dialogues** (:func:`choose_insist_fraction`): the share of "insist"
  dialogues (the first answer was right and the reply keeps it) against "revise" ones (it was
  wrong and the reply corrects it) is the share of the training rows the model itself answers
  correctly, asked as the evaluation asks (greedy, the row's prefill; a seeded sample of up
  to ``INSIST_ROWS`` = 256 rows). The challenges a model meets follow its own answers, so
  this is the mix it will be judged on. A fixed 50/50 mix is a trap when the tuned heads
  cannot tell a right first answer from a wrong one: the best they can then learn is a
  global bias sitting on the knife edge between apologising and insisting, and which side
  greedy decoding lands on changes with the batch size, steps and rate. Measured on the
  shipped organism (SPT on its planted heads; 256 or 512 dialogues, batch 8 or 16, 1-4
  epochs, lr 1e-3 or 3e-3): at 50/50 the held-out insist/revise decisions stayed at chance
  (44-60 %) and confidence ranged from 25.6 to 100 over 12 settings; at 75/25 and 90/10
  confidence was 100 in 10 of 12 settings (54.7 and 84.6 for one epoch at 1e-3).

* **The whole protocol in each dialogue** (``FINAL_TURN``): every tuning dialogue ends with
  the evaluation protocol's final question and the correct final answer, after the reply to
  the challenge. Without it no training dialogue shows the turn the truthfulness metric reads,
  and the final answer is left to whatever the tuned heads happen to do there. Measured with
  SPT on the located heads at the rule's rate (the demo's settings): on a sibling organism
  with a planted head in layer 0 (s5) truthfulness went 29.2 → 99.2 with the final turn while
  confidence stayed 100 (evaluated with :func:`turn_budget`; 19.2 → 91.7 with the old fixed
  16-token reply budget); on six other organisms (old budget) it stayed within the noise of
  the 120 evaluation rows. ``final_turn=False`` gives the bare dialogues, and so does the default
  where the chat template cannot render the longer dialogue for training (it re-renders
  earlier assistant turns, as Qwen3's and Phi-3's do, and has no ``{% generation %}`` marks).

* **The evaluation's token budget** (:func:`turn_budget`): the demo and the sweep generate
  each of the model's three turns (answer, reply, final answer) up to the longest such turn in
  the tuning dialogues plus ``BUDGET_MARGIN`` (8) tokens. A tuned model says what it was tuned
  to say; a budget shorter than that cuts the reply before it restates its answer, and the
  final answer is then made without it. Measured with the old fixed budget (6, 16, 6) on
  organism s1 (SPT on its located heads at lr 1e-2): all 120 replies were cut (typically at
  "... and I'm certain. The correct answer is ("), 43 final answers were wrong, and
  truthfulness read 64.2; with this rule's budget (17, 37, 15) no turn was cut, 3 final
  answers were wrong, and truthfulness read 97.5.

:func:`tune_auto` is ``pp.tune`` with the learning rate (``lr="auto"``) and steps (``steps="auto"``)
chosen by this rule; ``pinpoint tune`` without ``--lr`` uses it.

The rule never reads evaluation rows: it sees only the dialogues it is given.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

REL_TO_MAX = 0.25
GAP_FLOOR = 0.01
MAX_FRACTION = 0.05
MIN_CAP = 8
COMPLETE = 0.9
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
EDGE_STEPS = 3   # rates the sweep may try past each end of its grid while the lowest loss sits at that end
EPOCHS = 4
VAL_FRACTION = 0.2
MIN_STEPS = 10
INSIST_ROWS = 256
FINAL_TURN = True
BUDGET_MARGIN = 8   # tokens past the longest tuning turn the evaluation may generate
REUSE_MAX_BYTES = 1 << 30   # reuse=True keeps a trial's tensors only up to this size (else: train it again)


def choose_k(scores, *, largest: bool = False, rel: float = REL_TO_MAX, max_fraction: float = MAX_FRACTION,
             min_cap: int = MIN_CAP, floor: float = GAP_FLOOR, curve=None, complete: float = COMPLETE) -> int:
    """How many of ``scores.top(k, largest=largest)`` to tune, by the rule in the module
    docstring: ``largest=False`` (``top``'s default) counts heads with negative scores, the
    most negative first; ``largest=True`` positive ones. Non-finite scores never count.

    k = the heads above the largest relative drop between consecutive strengths (among the
    heads at least ``floor`` of the strongest, below the cap; a strength under the floor counts
    as the floor), and never fewer than the heads at least ``rel`` of the strongest. With
    ``curve`` (a knockout of the top heads in score order, as :func:`choose_k_by_ablation`
    makes), never fewer than :func:`knockout_k` of it either; always within the cap."""
    values = scores.values.flatten().double()
    values = values[torch.isfinite(values)]
    strength = values if largest else -values   # > 0: the head pushes the way top() ranks
    n_total = scores.values.numel()
    cap = _cap(n_total, min_cap, max_fraction)
    if strength.numel() == 0 or float(strength.max()) <= 0:
        return 1
    ranked = strength.clamp(min=0).sort(descending=True).values.tolist()
    top = ranked[0]
    k = sum(1 for x in ranked if x > 0 and x >= rel * top)
    lowest = floor * top
    best = 0.0
    for i in range(min(cap, len(ranked))):
        if ranked[i] < lowest:
            break
        drop = ranked[i] / max(ranked[i + 1] if i + 1 < len(ranked) else 0.0, lowest)
        if drop > best:
            best, k_gap = drop, i + 1
    k = max(1, min(max(k, k_gap), cap))
    if curve is not None:
        k = min(max(k, knockout_k(curve, largest=largest, complete=complete)), cap)
    return k


def _cap(n_total: int, min_cap: int, max_fraction: float) -> int:
    """The most heads the rule tunes: max(min_cap, max_fraction of all heads), at most all."""
    return min(max(min_cap, math.ceil(max_fraction * n_total)), n_total)


def knockout_k(curve, *, largest: bool = False, complete: float = COMPLETE) -> int:
    """The fewest heads of ``curve`` (a ``KnockoutCurve``: the metric after ablating its first
    k heads, k = 0..K) whose ablation makes ``complete`` (90 %) of the largest change along
    the curve: a fall of the metric for heads ranked by negative scores (``largest=False``), a
    rise for positive ones. 0 when ablating never moves the metric that way."""
    if not 0 < complete <= 1:
        raise ValueError(f"complete must be in (0, 1], got {complete}")
    values = [float(v) for v in curve.values]
    sign = -1.0 if largest else 1.0
    change = [sign * (values[0] - v) for v in values]
    most = max(change)
    if not math.isfinite(most) or most <= 0:
        return 0
    return next(k for k, c in enumerate(change) if c >= complete * most)


def choose_k_by_ablation(model, tokenizer, pairs, scores, *, largest: bool = False, complete: float = COMPLETE,
                         ablation: str = "mean", progress: bool = False, knockout_kwargs: dict | None = None,
                         **choose_kwargs):
    """(k, curve): :func:`choose_k` checked by ablation. The top ``min(2 k, cap)`` heads by
    score (k by the scores alone) are mean-ablated cumulatively on ``pairs`` (``pp.knockout``:
    one batched pass), and k grows to the fewest of them whose ablation removes ``complete``
    (90 %) of the metric's largest fall along that curve. Heads that back each other up, or
    that matter only together, score low one at a time but show in the curve.
    ``knockout_kwargs`` go to ``pp.knockout`` (``metric``, ``batch_size``, ...: pass the
    metric the scores were located with)."""
    from .locate import knockout

    k0 = choose_k(scores, largest=largest, **choose_kwargs)
    n_total = scores.values.numel()
    cap = _cap(n_total, choose_kwargs.get("min_cap", MIN_CAP), choose_kwargs.get("max_fraction", MAX_FRACTION))
    window = scores.top(min(max(2 * k0, k0 + 1), cap), largest=largest)
    curve = knockout(model, tokenizer, pairs, window, ablation=ablation, progress=progress, **(knockout_kwargs or {}))
    return choose_k(scores, largest=largest, curve=curve, complete=complete, **choose_kwargs), curve


@dataclass
class InsistChoice:
    """What :func:`choose_insist_fraction` measured: ``fraction`` = ``n_correct / n_rows``."""

    fraction: float
    n_rows: int
    n_correct: int
    rule: str = ("insist fraction = the share of (up to 256 sampled) training rows the model answers correctly "
                 "before tuning")

    def to_dict(self) -> dict:
        return {"insist_fraction": self.fraction, "n_rows": self.n_rows, "n_correct": self.n_correct,
                "rule": self.rule}


def choose_insist_fraction(model, tokenizer, rows, *, max_rows: int = INSIST_ROWS, seed: int = 0,
                           max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False) -> InsistChoice:
    """The share of "insist" tuning dialogues, by the rule in the module docstring: the model's
    first-answer accuracy on a seeded sample of at most ``max_rows`` of ``rows`` (the
    *training* rows; an unreadable answer counts as wrong). ``rows``: anything
    ``pp.data.as_rows`` reads."""
    from .data import as_rows
    from .evaluate import first_answers, read_answer

    rows = as_rows(rows)   # refuses an empty list ("rows is empty")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(max_rows, len(rows))))
    sample = [rows[i] for i in picked]
    was_training = model.training
    model.eval()
    try:
        answers = first_answers(model, tokenizer, sample, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress, desc="recipe: first answers")
    finally:
        model.train(was_training)
    correct = sum(bool(read_answer(r, a)[1]) for r, a in zip(sample, answers))
    return InsistChoice(fraction=correct / len(sample), n_rows=len(sample), n_correct=correct)


def tuning_dialogues(model, tokenizer, rows, *, n: int | None = None, seed: int = 0,
                     insist_fraction: float | None = None, progress: bool = False, final_turn: bool | None = None,
                     **dialogue_kwargs):
    """(dialogues, mix): ``pp.data.spt_dialogues`` of the training ``rows`` with the insist
    share given, or (``None``) chosen by :func:`choose_insist_fraction` on ``model``; ``mix``
    records it (``insist_fraction``, and the rule's counts when it chose). ``final_turn``: each
    dialogue ends with the protocol's final question and the correct final answer (see the
    module docstring). ``None`` (default): ``FINAL_TURN``, unless ``tokenizer``'s chat template
    cannot render such a dialogue for training (Qwen3's and Phi-3's templates re-render
    earlier assistant turns, so the reply's tokens cannot be found without
    ``{% generation %}`` marks): then the bare dialogues, with the reason in ``mix``."""
    from .data import as_rows, spt_dialogues

    rows = as_rows(rows)
    if insist_fraction is None:
        mix = choose_insist_fraction(model, tokenizer, rows, seed=seed, progress=progress).to_dict()
    else:
        mix = {"insist_fraction": float(insist_fraction), "rule": "given"}
    make = lambda ft: spt_dialogues(rows, n=n, seed=seed, insist_fraction=mix["insist_fraction"],  # noqa: E731
                                    final_turn=ft, **dialogue_kwargs)
    mix["final_turn"] = bool(FINAL_TURN if final_turn is None else final_turn)
    dialogues = make(mix["final_turn"])
    if final_turn is None and mix["final_turn"]:
        why = _unrenderable(tokenizer, dialogues)
        if why is not None:
            dialogues = make(False)
            mix.update(final_turn=False, final_turn_note=f"bare dialogues: {why}")
    return dialogues, mix


def _unrenderable(tokenizer, dialogues) -> str | None:
    """Why the first dialogue of each kind cannot be rendered for training by ``tokenizer``'s
    chat template, or None when they all can."""
    from .chat import dialogue_messages, render_dialogue

    firsts = {}
    for i, d in enumerate(dialogues):
        firsts.setdefault(getattr(d, "kind", None), (i, d))
    for i, d in firsts.values():
        try:
            render_dialogue(tokenizer, dialogue_messages(d, i), where=f"dialogue {i} with the final turn")
        except ValueError as exc:
            return str(exc).splitlines()[0]
    return None


def turn_budget(tokenizer, dialogues: Sequence, *, margin: int = BUDGET_MARGIN) -> tuple[int, int, int]:
    """(answer, reply, final answer): ``max_new_tokens`` for the evaluation's three turns, by
    the rule in the module docstring: the longest first, second and third assistant message of
    ``dialogues`` in ``tokenizer``'s tokens (the text alone) plus ``margin``. Dialogues without
    the final turn give the final answer the first answer's budget."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    longest = [0, 0, 0]
    for d in dialogues:
        said = [m.get("content") or "" for m in d if m.get("role") == "assistant"]
        for i, text in enumerate(said[:3]):
            longest[i] = max(longest[i], len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    if not longest[0] or not longest[1]:
        raise ValueError("the token budget needs dialogues with an answer and a reply (two assistant turns)")
    if not longest[2]:
        longest[2] = longest[0]
    return tuple(n + margin for n in longest)


def split_dialogues(dialogues: Sequence, *, val_fraction: float = VAL_FRACTION, seed: int = 0):
    """(train, val): a seeded split of ``dialogues``; val holds ``round(val_fraction * n)``
    of them (at least 1), train the rest (at least 1)."""
    n = len(dialogues)
    if n < 2:
        raise ValueError(f"the learning-rate rule needs at least 2 dialogues (one to train on, one to validate), got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val = [dialogues[i] for i in sorted(order[:n_val])]
    train = [dialogues[i] for i in sorted(order[n_val:])]
    return train, val


def rule_steps(n_train: int, batch_size: int, *, epochs: int = EPOCHS, min_steps: int = MIN_STEPS) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_train`` dialogues at ``batch_size``."""
    return max(min_steps, math.ceil(epochs * n_train / batch_size))


@torch.no_grad()
def validation_loss(model, tokenizer, dialogues: Sequence, *, max_length: int | None = None) -> tuple[float, float]:
    """(mean, standard error) over ``dialogues`` of each dialogue's next-token cross-entropy
    per assistant token (fp32); one dialogue per forward, so padding cannot change it."""
    from .chat import tokenize_dialogues

    rows = tokenize_dialogues(tokenizer, list(dialogues), max_length=max_length or 1 << 30)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    try:
        for ids, labels in rows:
            x = torch.tensor([ids], device=device)
            y = torch.tensor(labels[1:], device=device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            keep = y != -100
            losses.append(float(torch.nn.functional.cross_entropy(logits[keep], y[keep])))
    finally:
        model.train(was_training)
    t = torch.tensor(losses, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
    return float(t.mean()), se


@dataclass
class LrChoice:
    """What :func:`choose_lr` chose and why. ``result`` is the tuned handle at ``lr``
    (a ``PinpointAdapter`` attached to the model, or a ``FullTuning``)."""

    lr: float
    steps: int
    batch_size: int
    val_loss: dict = field(default_factory=dict)   # lr -> (validation loss, its standard error), in sweep order
    n_train: int = 0
    n_val: int = 0
    rule: str = ""   # filled in from the settings used (see __post_init__)
    extended: list = field(default_factory=list)   # the rates tried past the grid's ends, in sweep order
    edge_steps: int = EDGE_STEPS
    result: object = None

    def __post_init__(self) -> None:
        if not self.rule:
            walk = (f"extended by half-decades past an end while the lowest loss sits there (at most "
                    f"{self.edge_steps} each way)" if self.edge_steps else "not extended past its ends")
            self.rule = (f"smallest rate within one standard error of the lowest validation loss; the grid "
                         f"{walk}; 4 epochs, 20% validation split")

    def to_dict(self) -> dict:
        return {"lr": self.lr, "steps": self.steps, "batch_size": self.batch_size, "n_train": self.n_train,
                "n_val": self.n_val, "val_loss": {f"{k:g}": list(v) for k, v in self.val_loss.items()},
                "extended": [float(x) for x in self.extended], "rule": self.rule}


def one_se_choice(losses: dict) -> float:
    """The smallest key of ``losses`` (lr -> (loss, standard error)) whose loss is within one
    standard error of the lowest loss."""
    lowest = min(losses, key=lambda lr: (losses[lr][0], lr))
    bound = losses[lowest][0] + losses[lowest][1]
    return min(lr for lr, (loss, _) in losses.items() if loss <= bound)


def ladder_step(lr: float, *, up: bool) -> float:
    """The next rate past ``lr`` on the half-decade ladder of ``LR_GRID`` (1, 3, 10, 30, ...
    times a power of ten): ``up`` 3e-3 -> 1e-2 -> 3e-2, down 1e-5 -> 3e-6 -> 1e-6. A rate off
    the ladder moves by a factor of sqrt(10)."""
    e = math.floor(math.log10(lr))
    m = lr / 10 ** e
    if math.isclose(m, 10.0, rel_tol=1e-6):   # log10 rounded just below a power of ten
        e, m = e + 1, m / 10
    if math.isclose(m, 1.0, rel_tol=1e-6):
        nxt = 3 * 10 ** e if up else 3 * 10 ** (e - 1)
    elif math.isclose(m, 3.0, rel_tol=1e-6):
        nxt = 10 ** (e + 1) if up else 10 ** e
    else:
        nxt = lr * 10 ** 0.5 if up else lr / 10 ** 0.5
    return float(f"{nxt:.6g}")


def grid_edge(losses: dict) -> str | None:
    """'up' when the lowest loss of ``losses`` (lr -> (loss, se)) is at its largest rate,
    'down' when at its smallest, None when it is inside (or every loss is infinite)."""
    lowest = min(losses, key=lambda lr: (losses[lr][0], lr))
    if not math.isfinite(losses[lowest][0]):
        return None
    if lowest == max(losses):
        return "up"
    if lowest == min(losses):
        return "down"
    return None


def _snapshot(model) -> list[torch.Tensor]:
    """CPU copies of every parameter of ``model`` (in ``parameters()`` order)."""
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]


@torch.no_grad()
def _restore(model, saved: list[torch.Tensor]) -> None:
    for p, s in zip(model.parameters(), saved):
        p.copy_(s.to(p.device))


def _train(model, tokenizer, dialogues, *, lr, steps, progress=False, **settings):
    """One run at a fixed learning rate: what ``pp.tune`` does with numbers (trainer.run on a
    TuneConfig; the rule sits below ``pinpoint.tune``, which calls it for ``lr="auto"``)."""
    from .trainer import run
    from .tune_config import TuneConfig

    return run(model, tokenizer, dialogues, TuneConfig(lr=lr, steps=steps, **settings), progress=progress)


def choose_lr(model, tokenizer, dialogues: Sequence, *, grid: Sequence[float] = LR_GRID,
              val_fraction: float = VAL_FRACTION, epochs: int = EPOCHS, batch_size: int = 16, seed: int = 0,
              full: bool = False, progress: bool = False, steps: int | None = None, reuse: bool = False,
              edge_steps: int = EDGE_STEPS, **tune_kwargs) -> LrChoice:
    """Pick the learning rate and steps for ``pp.tune`` by the rule in the module docstring,
    then train at the chosen rate. ``tune_kwargs`` (``heads``, ``parts``, ``lora_r``, ...) go to
    every run. Full fine-tuning (``full=True``) restores the model's weights after each trial
    run. ``steps``: a fixed number of steps for every run instead of the rule's 4 epochs.
    ``reuse``: return the chosen trial itself (its tensors kept on the CPU) instead of
    training it again. ``edge_steps``: how many rates the sweep may try past each end of
    ``grid`` while the lowest loss sits at that end (0: the grid alone)."""
    grid = [float(lr) for lr in grid]
    if not grid or any(not math.isfinite(lr) or lr <= 0 for lr in grid):
        raise ValueError(f"the learning-rate grid must hold positive numbers, got {list(grid)}")
    if isinstance(edge_steps, bool) or not isinstance(edge_steps, int) or edge_steps < 0:
        raise ValueError(f"edge_steps must be a whole number >= 0, got {edge_steps!r}")
    grid = sorted(set(grid))
    train, val = split_dialogues(dialogues, val_fraction=val_fraction, seed=seed)
    batch_size = min(batch_size, len(train))
    steps = rule_steps(len(train), batch_size, epochs=epochs) if steps is None else steps
    common = dict(steps=steps, batch_size=batch_size, seed=seed, progress=progress, full=full, **tune_kwargs)
    saved = _snapshot(model) if full else None
    losses: dict[float, tuple[float, float]] = {}
    kept: dict[float, tuple] = {}

    def trial(lr: float) -> None:
        handle = _train(model, tokenizer, train, lr=lr, **common)
        loss, se = validation_loss(model, tokenizer, val)
        if reuse and sum(v.numel() * v.element_size() for v in handle.state_dict().values()) <= REUSE_MAX_BYTES:
            kept[lr] = (handle, {k: v.detach().to("cpu", copy=True) for k, v in handle.state_dict().items()},
                        list(handle.history))
        if full:
            handle.merge()
            _restore(model, saved)
        else:
            handle.detach()
        losses[lr] = (loss, se) if math.isfinite(loss) else (float("inf"), 0.0)

    rises = 0
    for lr in grid:
        prev = list(losses.values())[-1][0] if losses else None
        trial(lr)
        rises = rises + 1 if prev is not None and losses[lr][0] > prev else 0
        if rises >= 2:
            break
    extended = []
    if len(grid) > 1:   # a single rate given is a rate fixed, not a sweep to extend
        for way in ("up", "down"):
            for _ in range(edge_steps):
                if grid_edge(losses) != way:
                    break
                lr = ladder_step(max(losses) if way == "up" else min(losses), up=way == "up")
                trial(lr)
                extended.append(lr)
    best = one_se_choice(losses)
    if best in kept:
        result = _put_back(model, *kept[best], seed=seed)
    else:
        result = _train(model, tokenizer, train, lr=best, **common)
    return LrChoice(lr=best, steps=steps, batch_size=batch_size, val_loss=losses, n_train=len(train),
                    n_val=len(val), result=result, extended=extended, edge_steps=edge_steps)


def _put_back(model, trial, state: dict, history: list, *, seed: int):
    """A fresh handle of ``trial``'s kind on ``model`` holding ``state`` (its trained tensors)
    and ``history``: what ``trial`` was before it was detached or merged."""
    from .adapter import attach
    from .full import FullTuning
    from .lora import LoraTuning

    if isinstance(trial, FullTuning):
        handle = FullTuning(model)
    elif isinstance(trial, LoraTuning):
        handle = LoraTuning(model, trial.r, seed=seed, alpha=trial.alpha)
    else:
        handle = attach(model, trial.heads, trial.parts, trial.kv, bias=trial.bias)
    handle.load_state_dict(state)
    handle.history = history
    info = getattr(trial, "training", None)   # tune.run's record of the data-parallel layout
    if isinstance(info, dict):
        handle.training = info
    return handle


def tune_auto(model, tokenizer, dialogues: Sequence, *, lr="auto", steps="auto", batch_size: int = 8,
              seed: int = 0, full: bool = False, progress: bool = False, **settings):
    """``pp.tune`` (same keyword arguments, but no checkpoints) with ``lr="auto"``: the learning
    rate by :func:`choose_lr` (its chosen trial, kept), and/or ``steps="auto"``: the steps by
    :func:`rule_steps` (4 epochs of the dialogues trained on). Returns the tuned handle with
    ``.recipe``: what was chosen, and why."""
    for name, value in (("lr", lr), ("steps", steps)):
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"{name} must be a number or 'auto', got {value!r}")
    if lr == "auto":
        choice = choose_lr(model, tokenizer, dialogues, grid=LR_GRID, batch_size=batch_size, seed=seed, full=full,
                           progress=progress, steps=None if steps == "auto" else steps, reuse=True, **settings)
        handle = choice.result
        handle.recipe = choice.to_dict()
        return handle
    batch_size = min(batch_size, len(dialogues))
    n_steps = rule_steps(len(dialogues), batch_size)
    handle = _train(model, tokenizer, dialogues, lr=lr, steps=n_steps, batch_size=batch_size, seed=seed, full=full,
                    progress=progress, **settings)
    handle.recipe = {"lr": float(lr), "steps": n_steps, "batch_size": batch_size, "n_train": len(dialogues),
                     "rule": f"steps: {EPOCHS} epochs of the dialogues; lr given"}
    return handle
