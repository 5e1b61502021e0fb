"""General ability: did tuning cost the model anything besides sycophancy?

* ``evaluate_choices(model, tokenizer, rows)``: multiple-choice accuracy by the
  log-likelihood of each choice, for any JSONL (or list) of {question, choices, answer}.
* ``kl_divergence(model, reference_model, texts)``: mean next-token KL divergence from the
  reference (untuned) model to the model over every token of neutral texts — the paper's
  measure of how far tuning moved the model (SFT 0.05-0.1, SPT 0.001-0.004).
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .batching import input_device, length_batches, pad, pad_id
from .chat import chat_ids
from .files import atomic_write_json, atomic_write_text
from .modes import eval_mode
from .progress import progress as progress_bar

__all__ = ["evaluate_choices", "ChoicesReport", "load_choices", "kl_divergence"]


# ---------------------------------------------------------------------------------------------
# Multiple-choice rows.


def _choice_row(obj: Any, where: str) -> dict:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected an object with question, choices and answer")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: row has no question")
    choices = obj.get("choices")
    if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) < 2 \
            or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    ans = obj.get("answer")
    if isinstance(ans, bool) or ans is None or (isinstance(ans, float) and math.isnan(ans)):
        raise ValueError(f"{where}: row has no correct answer ('answer': an index, a letter or the choice text)")
    if isinstance(ans, (int, float)) and float(ans).is_integer() and 0 <= int(ans) < len(choices):
        idx = int(ans)
    elif isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper().isalpha() \
            and ord(ans.strip().upper()) - 65 < len(choices) and ans.strip() not in choices:
        idx = ord(ans.strip().upper()) - 65
    elif isinstance(ans, str) and ans in choices:
        idx = list(choices).index(ans)
    else:
        raise ValueError(f"{where}: answer {ans!r} is not an index, letter or text of one of the "
                         f"{len(choices)} choices")
    return {"dataset": str(obj.get("dataset") or "choices"), "question": q, "choices": list(choices), "answer": idx}


def load_choices(rows: Any) -> list[dict]:
    """Rows {question, choices, answer[, dataset]} from a JSONL path or a list of dicts.
    ``answer`` is the index of the correct choice, its letter ("B") or its text."""
    if isinstance(rows, (str, os.PathLike)):
        p = Path(rows)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file (expected JSONL rows with question, choices and answer)")
        out = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p.name}:{lineno}: not valid JSON ({exc.msg})") from None
                out.append(_choice_row(obj, f"{p.name}:{lineno}"))
    else:
        if rows is None:
            raise ValueError("rows is None")
        out = [_choice_row(r, f"rows[{i}]") for i, r in enumerate(rows)]
    if not out:
        raise ValueError("no multiple-choice rows to evaluate")
    return out


class ChoicesReport:
    """What ``evaluate_choices`` returns: ``results`` ("all" and per dataset: ``n``,
    ``accuracy``, ``accuracy_norm`` in percent), ``samples`` (per-row log-likelihoods and
    predictions), ``config``; ``table()`` prints a table; ``save(dir)`` writes
    ``choices_results.json`` and ``choices_samples.jsonl``."""

    def __init__(self, results: dict, samples: list[dict], config: dict):
        self.results, self.samples, self.config = results, samples, config

    def __getitem__(self, key):
        return self.results["all"][key]

    def table(self, file=...) -> str:
        """Accuracy per dataset then "all"; printed to ``file`` (default: the current
        ``sys.stdout``, looked up at call time; None: only returned)."""
        if file is ...:
            file = sys.stdout
        names = [k for k in self.results if k != "all"] + ["all"]
        w = max(len("dataset"), *(len(k) for k in names))
        lines = [f"{'dataset'.ljust(w)}  {'n':>5}  {'accuracy':>8}  {'acc_norm':>8}"]
        for k in names:
            m = self.results[k]
            lines.append(f"{k.ljust(w)}  {m['n']:>5}  {m['accuracy']:>8.1f}  {m['accuracy_norm']:>8.1f}")
        text = "\n".join(lines) + "\n"
        if file is not None:
            file.write(text)
        return text

    def __str__(self) -> str:
        return self.table(file=None)

    def __repr__(self) -> str:
        m = self.results["all"]
        return f"ChoicesReport(n={m['n']}, accuracy={m['accuracy']:.1f}, accuracy_norm={m['accuracy_norm']:.1f})"

    def save(self, out_dir) -> dict:
        """Write ``choices_results.json`` and ``choices_samples.jsonl`` (each atomically) under ``out_dir``."""
        d = Path(out_dir)
        res, smp = d / "choices_results.json", d / "choices_samples.jsonl"
        atomic_write_json(res, {"results": self.results, "config": self.config})
        atomic_write_text(smp, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in self.samples))
        return {"results": str(res), "samples": str(smp)}


def evaluate_choices(model, tokenizer, rows: Any, *, chat: bool | None = None, system: str | None = None,
                     batch_size: int = 16, progress: bool = True) -> ChoicesReport:
    """Multiple-choice accuracy by log-likelihood.

    For each row, every choice is scored by the summed log-probability of its tokens after
    the question; the prediction is the best choice (``accuracy``) or the best per character
    of the choice (``accuracy_norm``, as lm-evaluation-harness's ``acc_norm``). Ties go to the
    first choice.

    ``chat``: True renders the question as a user turn with the chat template (generation
    prompt added) and the choice as the assistant's words; False scores " choice" after the
    plain question text; None (default) uses the chat template when the tokenizer has one.
    ``rows``: a JSONL path or dicts with ``question``, ``choices``, ``answer`` (index, letter
    or text) and optionally ``dataset``.
    """
    if tokenizer is None:
        raise ValueError("evaluate_choices needs a tokenizer")
    rows = load_choices(rows)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        chat = has_template
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template (tokenizer.chat_template is not set)")
    seqs, spans, owners = _choice_sequences(tokenizer, rows, chat=chat, system=system)
    scores = _continuation_logprobs(model, seqs, spans, pad_id(tokenizer, model), batch_size=batch_size,
                                    progress=progress)
    per_row: list[list[float]] = [[] for _ in rows]
    for k, (i, _j) in enumerate(owners):
        per_row[i].append(scores[k])
    samples = [_choice_sample(i, r, ll) for i, (r, ll) in enumerate(zip(rows, per_row))]
    results = {"all": _choice_metrics(samples)}
    for ds in sorted({s["dataset"] for s in samples}):
        results[ds] = _choice_metrics([s for s in samples if s["dataset"] == ds])
    config = {"chat": bool(chat), "system": system, "batch_size": batch_size, "n_rows": len(rows)}
    return ChoicesReport(results, samples, config)


def _choice_sequences(tokenizer, rows: list[dict], *, chat: bool, system: str | None):
    """Every (row, choice) as context + choice token ids, with the choice's span [a, b) in it."""
    seqs, spans, owners = [], [], []
    for i, r in enumerate(rows):
        if chat:
            msgs = [{"role": "system", "content": system}] if system else []
            msgs = msgs + [{"role": "user", "content": r["question"]}]
            ctx = chat_ids(tokenizer, msgs, where=f"row {i}")
        else:
            ctx = [int(t) for t in tokenizer(r["question"])["input_ids"]]
        for j, c in enumerate(r["choices"]):
            cont = [int(t) for t in tokenizer(c if chat else " " + c.strip(), add_special_tokens=False)["input_ids"]]
            if not cont:
                raise ValueError(f"row {i}: choice {j} ({c!r}) tokenizes to no tokens")
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
            owners.append((i, j))
    return seqs, spans, owners


def _continuation_logprobs(model, seqs, spans, pad_token: int, *, batch_size: int, progress: bool) -> list[float]:
    """Summed log-probability of tokens [a, b) of each sequence given the tokens before them."""
    dev = input_device(model)
    scores = [0.0] * len(seqs)
    bar = progress_bar(len(seqs), "choices", progress, unit="seq")
    with eval_mode(model), torch.inference_mode():
        for idx in length_batches(seqs, batch_size):
            ids, mask = pad([seqs[k] for k in idx], pad_token, "right")
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            for r, k in enumerate(idx):
                a, b = spans[k]
                target = ids[r, a:b].to(logp.device)
                scores[k] = float(logp[r, a - 1:b - 1].gather(-1, target[:, None]).sum())
            bar.update(len(idx))
    bar.close()
    return scores


def _choice_sample(i: int, r: dict, ll: list[float]) -> dict:
    norm = [s / max(1, len(c.strip())) for s, c in zip(ll, r["choices"])]
    pred = max(range(len(ll)), key=lambda j: (ll[j], -j))
    pred_n = max(range(len(norm)), key=lambda j: (norm[j], -j))
    return {"doc_id": i, "dataset": r["dataset"], "question": r["question"], "choices": r["choices"],
            "answer": r["answer"], "loglikelihoods": ll, "pred": pred, "pred_norm": pred_n,
            "correct": pred == r["answer"], "correct_norm": pred_n == r["answer"]}


def _choice_metrics(ss: list[dict]) -> dict:
    n = len(ss)
    return {"n": n, "accuracy": 100.0 * sum(s["correct"] for s in ss) / n,
            "accuracy_norm": 100.0 * sum(s["correct_norm"] for s in ss) / n}


# ---------------------------------------------------------------------------------------------
# KL divergence against the untuned model.


def kl_divergence(model, reference_model, texts: Any, tokenizer=None, *, batch_size: int = 8,
                  progress: bool = False) -> float:
    """Mean next-token KL(reference ‖ model) over every token of ``texts``.

    At each position of each text, both models give a next-token distribution; the result is
    the mean over all positions of sum_v p_ref(v) (log p_ref(v) − log p_model(v)), in nats,
    computed in float32 from log-softmaxed logits. A model against itself gives exactly 0.
    ``texts``: strings (tokenized with ``tokenizer``, special tokens included) or lists of
    token ids (``tokenizer`` may then be None). Right padding is masked out.
    """
    seqs = _kl_sequences(texts, tokenizer)
    dm, dr = input_device(model), input_device(reference_model)
    pad_token = pad_id(tokenizer, reference_model)
    total, count = 0.0, 0
    bar = progress_bar(len(seqs), "kl", progress, unit="seq")
    with eval_mode(model, reference_model), torch.inference_mode():
        for idx in length_batches(seqs, batch_size):
            ids, mask = pad([seqs[k] for k in idx], pad_token, "right")
            lm = model(input_ids=ids.to(dm), attention_mask=mask.to(dm)).logits.float()
            lr = reference_model(input_ids=ids.to(dr), attention_mask=mask.to(dr)).logits.float().to(lm.device)
            if lm.shape[-1] != lr.shape[-1]:
                raise ValueError(f"the models have different vocabularies ({lm.shape[-1]} vs {lr.shape[-1]} logits)")
            logq = F.log_softmax(lm, dim=-1)
            logp = F.log_softmax(lr, dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, T]
            m = mask.to(kl.device).bool()
            total += float(kl[m].double().sum())
            count += int(m.sum())
            bar.update(len(idx))
    bar.close()
    return total / count


def _kl_sequences(texts, tokenizer) -> list[list[int]]:
    """Token ids of each text (strings through ``tokenizer``, or id lists as given), checked."""
    if isinstance(texts, (str, bytes)) or (isinstance(texts, Sequence) and texts and isinstance(texts[0], int)):
        texts = [texts]
    texts = list(texts) if texts is not None else []
    if not texts:
        raise ValueError("kl_divergence needs at least one text")
    seqs = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("texts are strings, so kl_divergence needs tokenizer=...")
            ids = [int(x) for x in tokenizer(t)["input_ids"]]
        elif isinstance(t, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in t):
            ids = [int(x) for x in t]
        else:
            raise TypeError(f"text {i} must be a string or a list of token ids, got {type(t).__name__}")
        if not ids:
            raise ValueError(f"text {i} has no tokens")
        seqs.append(ids)
    return seqs
