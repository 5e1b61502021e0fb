"""``tune``: supervised pinpoint tuning (SPT) of the selected heads, and the SFT baseline.

``tune(model, tokenizer, dialogues, heads=..., parts=..., lr=3e-5, steps=...)`` renders chat
dialogues with the tokenizer's own chat template, puts the loss on assistant tokens only,
and trains with AdamW on the slices ``attach`` creates (or, with ``full=True`` /
``heads="all"``, on every parameter: the SFT baseline; ``heads="random"`` with ``random_k``
gives the random-heads baseline). It returns the adapter.

Semantics, precisely:

* **Batches.** ``batch_size`` dialogues per optimizer step, drawn from a seeded stream of
  per-epoch permutations (a pure function of ``seed`` and the step, so resuming needs no data
  state). ``grad_accum`` splits each step's batch into that many micro-batches; it changes
  memory, not the maths: the loss is the sum of assistant-token cross-entropies over the
  whole step's batch divided by its number of assistant tokens, so 2 half batches give the
  full batch's gradient (up to float summation order).
* **Loss.** Next-token cross-entropy (fp32) on the tokens of assistant turns only, as the
  template renders them (content and end-of-turn token; not the role header).
* **Optimizer.** ``torch.optim.AdamW`` over the trained parameters only. Weight decay with
  ``decay_to="base"`` (default) is AdamW's decoupled decay applied to the *deltas*: it pulls
  the trained slices back towards the pretrained weights and touches nothing else. The
  paper instead trained whole matrices with hook-zeroed gradients, so AdamW's decay shrank
  every row of those matrices towards zero, frozen ones included. ``decay_to="zero"``
  reproduces that decay on the selected slices only (W_s + Δ shrinks towards 0); unselected
  weights are never touched in either mode. For ``full=True`` it is plain AdamW decay.
* **Schedule.** Linear warm-up over ``warmup`` steps (a fraction of ``steps`` if < 1), then
  ``schedule`` = "cosine" (to 0), "linear" (to 0) or "constant".
* **Determinism.** The global RNG is seeded per step inside ``torch.random.fork_rng`` (so
  dropout, if any, is reproducible and the caller's RNG is untouched); data order is seeded.
* **Checkpoints.** With ``checkpoint_dir``, every ``checkpoint_every`` steps and at the end a
  single file ``checkpoint.pt`` is written atomically (temp file, fsync, rename). It holds
  the trained slices, the optimizer state, the step, the loss history and a signature of
  the run (hyper-parameters, heads, data hash, base-weights fingerprint) but no model
  weights (except with ``full=True``, whose trained parameters are the weights).
  ``resume=True`` loads it into a freshly loaded base model and continues to the same final
  slices as an uninterrupted run; a checkpoint from a different run or base model is
  refused with the differing keys named.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import PinpointAdapter, attach, normalize_heads, normalize_parts, random_heads
from .models import spec_for

__all__ = ["FullTuning", "accumulate_gradients", "batch_indices", "batch_loss_sum", "lr_at", "render_dialogue",
           "tokenize_dialogues", "tune"]

CHECKPOINT_NAME = "checkpoint.pt"
IGNORE = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# --------------------------------------------------------------------------------------------
# Data.


def _messages(dialogue, i: int) -> list[dict]:
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


def _ids(x) -> list[int]:
    if isinstance(x, Mapping) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(t) for t in x]


def render_dialogue(tokenizer, messages: list[dict], *, where: str = "dialogue") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat dialogue: labels are the ids on assistant tokens and -100
    elsewhere; an assistant message with ``"train": False`` (e.g. the deliberately wrong first
    answer of a "revise" dialogue) is context only. Uses the template's ``{% generation %}`` marks when present, else renders
    growing prefixes and labels what each assistant message adds after the generation prompt."""
    template = getattr(tokenizer, "chat_template", None)
    if tokenizer is None or template is None:
        raise ValueError(f"{where}: the tokenizer has no chat template, so dialogues cannot be rendered; set "
                         "tokenizer.chat_template (the model's own template) before tuning")
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = _ids(out)
        mask = [int(m) for m in out["assistant_masks"]]
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        for k, m in enumerate(messages):  # assistant turns marked "train": False carry no loss
            if m["role"] == "assistant" and m.get("train", True) is False:
                start, stop = _message_span(tokenizer, messages, k, ids, where)
                labels[start:stop] = [IGNORE] * (stop - start)
        return ids, labels
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("train", True) is False:
            continue
        start, stop = _message_span(tokenizer, messages, k, full, where)
        labels[start:stop] = full[start:stop]
    return full, labels


def _message_span(tokenizer, messages, k: int, full: list[int], where: str) -> tuple[int, int]:
    """Token span of assistant message k in the rendering `full` of all messages: what the
    message adds after the generation prompt."""
    before = _ids(tokenizer.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True)) if k else []
    upto = _ids(tokenizer.apply_chat_template(messages[: k + 1], tokenize=True))
    if full[: len(upto)] != upto or upto[: len(before)] != before:
        raise ValueError(f"{where}: the chat template does not render message {k} as an extension of the "
                         "earlier messages, so the assistant tokens cannot be found; add {% generation %} "
                         "marks to the template")
    return len(before), len(upto)


def tokenize_dialogues(tokenizer, dialogues, *, max_length: int, too_long: str = "truncate"):
    """Render every dialogue; returns a list of (ids, labels). Long ones are truncated (with
    one warning) or rejected, by ``too_long``."""
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
        ids, labels = render_dialogue(tokenizer, _messages(d, i), where=f"dialogue {i}")
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


def _collate(rows, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def batch_loss_sum(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Sum over assistant tokens of the next-token cross-entropy (fp32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    tgt = labels[:, 1:]
    sel = tgt != IGNORE
    return F.cross_entropy(logits[:, :-1][sel].float(), tgt[sel], reduction="sum")


def accumulate_gradients(model, batch, *, grad_accum: int = 1, pad_id: int = 0,
                         autocast_dtype: torch.dtype | None = None) -> float:
    """Backward of one optimizer step's loss over ``batch`` (a list of (ids, labels)), run as
    ``grad_accum`` micro-batches. The loss is the sum of assistant-token cross-entropies over
    the whole batch divided by the batch's assistant-token count, so the accumulated gradient
    does not depend on ``grad_accum``. Returns that loss."""
    n_tok = sum(sum(1 for t in lab[1:] if t != IGNORE) for _, lab in batch)
    device = next(model.parameters()).device
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype is not None else nullcontext
    total = 0.0
    for chunk in _split(batch, grad_accum):
        ids, mask, labels = _collate(chunk, pad_id, device)
        with amp():
            loss = batch_loss_sum(model, ids, mask, labels) / n_tok
        loss.backward()
        total += float(loss.detach())
    return total


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Dialogue indices of optimizer step ``step`` (0-based): a slice of the stream of seeded
    per-epoch permutations of range(n)."""
    out, pos = [], step * batch_size
    perms: dict[int, list[int]] = {}
    for p in range(pos, pos + batch_size):
        epoch = p // n
        if epoch not in perms:
            g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][p % n])
    return out


def lr_at(step: int, *, lr: float, steps: int, warmup: int, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup) / max(1, steps - warmup))  # 0 at the first decay step, < 1 at the last
    if schedule == "linear":
        return lr * (1.0 - t)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------------
# The SFT baseline's handle.


class FullTuning:
    """What ``tune(..., full=True)`` returns: every parameter was trained in place.

    Same surface as :class:`PinpointAdapter` where it makes sense: ``parameters()``,
    ``merge()`` (returns the model, restoring the requires_grad flags), ``save(dir)``
    (``save_pretrained``), ``history``, ``heads == "all"``. ``detach()`` is impossible: the
    weights themselves were trained; keep a copy of the base model to compare against.
    """

    heads = "all"
    parts = "all"

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = "attached"
        self.history: list[dict] = []
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(True)

    def parameters(self):
        return iter([p for p, _ in self._flags])

    def named_parameters(self):
        return self.model.named_parameters()

    def num_trainable(self) -> int:
        return sum(p.numel() for p, _ in self._flags)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        return self.model.load_state_dict(sd)

    def merge(self) -> nn.Module:
        if self.state == "attached":
            for p, flag in self._flags:
                p.requires_grad_(flag)
            self.state = "merged"
        return self.model

    def detach(self):
        raise RuntimeError("full fine-tuning trained the model's own weights in place; there is nothing to "
                           "detach. Keep a copy of the base model to compare against.")

    def save(self, directory) -> Path:
        self.model.save_pretrained(directory)
        return Path(directory)

    def __repr__(self) -> str:
        return f"FullTuning(model={type(self.model).__name__}, trainable={self.num_trainable():,})"


# --------------------------------------------------------------------------------------------
# Checkpoints.


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _data_hash(rows) -> str:
    h = hashlib.sha256()
    for ids, labels in rows:
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The trainer.


def _check_positive(name, value, kind=float, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        need = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} {need}, got {value!r}")


def tune(
    model: nn.Module,
    tokenizer,
    dialogues,
    *,
    heads=None,
    parts="qkvo",
    kv: str = "group",
    bias: bool = True,
    full: bool = False,
    random_k: int | None = None,
    lr: float = 3e-5,
    steps: int = 120,
    batch_size: int = 8,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    decay_to: str = "base",
    warmup: float = 0.1,
    schedule: str = "cosine",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    max_length: int | None = None,
    too_long: str = "truncate",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> PinpointAdapter | FullTuning:
    """Train the selected heads' slices (or everything, ``full=True``) on chat dialogues.

    ``heads``: a HeadSet / iterable of (layer, head) pairs (query heads), ``"all"`` (= full
    fine-tuning, the SFT baseline) or ``"random"`` (``random_k`` heads drawn with ``seed``: the
    random-heads baseline). ``parts``/``kv``/``bias``: as for :func:`attach`. ``lr``, ``steps``:
    peak learning rate and optimizer steps (both > 0). ``batch_size``: dialogues per step;
    ``grad_accum``: micro-batches per step (same result, less memory). ``dtype``: compute
    dtype through autocast (e.g. ``torch.bfloat16``), default the model's. ``max_length``:
    default the model's context; ``too_long``: "truncate" (warn) or "error".
    ``callback(step, loss)`` runs after each optimizer step (``step`` counts from 1).
    Returns the :class:`PinpointAdapter` (attached; ``.history`` holds step/loss/lr), or a
    :class:`FullTuning` for the SFT baseline. See the module docstring for the semantics.
    """
    # ---- arguments ----------------------------------------------------------------------
    _check_positive("lr", lr)
    _check_positive("steps", steps, int)
    _check_positive("batch_size", batch_size, int)
    _check_positive("grad_accum", grad_accum, int)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    if grad_accum > batch_size:
        raise ValueError(f"grad_accum={grad_accum} splits a batch of {batch_size} dialogues into more micro-batches "
                         "than it has dialogues")
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
    if decay_to not in ("base", "zero"):
        raise ValueError(f"decay_to must be 'base' (decay the deltas) or 'zero' (decay the whole selected slices, "
                         f"like the paper), got {decay_to!r}")
    if not isinstance(warmup, (int, float)) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be a number ≥ 0 (steps, or a fraction of steps if < 1), got {warmup!r}")
    warmup_steps = int(math.ceil(warmup * steps)) if warmup < 1 else int(warmup)
    warmup_steps = min(warmup_steps, steps)
    if max_grad_norm is not None:
        _check_positive("max_grad_norm", max_grad_norm)
    if checkpoint_every is not None:
        _check_positive("checkpoint_every", checkpoint_every, int)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")

    ad = spec_for(model)
    if isinstance(heads, str):
        if heads == "all":
            full = True
        elif heads == "random":
            if random_k is None:
                raise ValueError("heads='random' needs random_k (how many heads to draw)")
            heads = random_heads(model, random_k, seed=seed)
        else:
            raise ValueError(f"heads must be a HeadSet, an iterable of (layer, head) pairs, 'all' or 'random', "
                             f"got {heads!r}")
    if full:
        if heads not in (None, "all"):
            raise ValueError("full=True trains every parameter; do not also pass heads")
        head_list, parts_n = "all", "all"
    else:
        if heads is None:
            raise ValueError("tune needs heads= (a HeadSet or (layer, head) pairs), or heads='all' / full=True "
                             "for the SFT baseline")
        head_list = normalize_heads(heads, ad.n_layers, ad.n_heads)
        parts_n = normalize_parts(parts)
    if max_length is None:
        max_length = ad.max_seq_len
        tml = getattr(tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 10**8:
            max_length = min(max_length, tml)
    _check_positive("max_length", max_length, int)

    # ---- data ---------------------------------------------------------------------------
    rows = tokenize_dialogues(tokenizer, dialogues, max_length=max_length, too_long=too_long)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = ad.device
    model_dtype = ad.dtype
    cdt = model_dtype if dtype is None else dtype
    use_autocast = cdt != model_dtype

    signature = {
        "full": bool(full), "heads": head_list if full else [list(h) for h in head_list], "parts": parts_n,
        "kv": kv, "bias": bias, "lr": float(lr), "steps": steps, "batch_size": batch_size,
        "weight_decay": float(weight_decay), "decay_to": decay_to, "warmup": warmup_steps, "schedule": schedule,
        "betas": [float(b) for b in betas], "eps": float(eps),
        "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
        "max_length": max_length, "dtype": str(cdt), "seed": seed, "data": _data_hash(rows),
        "model_class": type(model).__name__,
    }

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists; pass resume=True to continue that run, or use another "
                              "checkpoint_dir")
    if checkpoint_every is None:
        checkpoint_every = max(1, steps // 10)

    # ---- trainable parameters and optimizer ----------------------------------------------
    if full:
        handle: PinpointAdapter | FullTuning = FullTuning(model)
    else:
        handle = attach(model, head_list, parts_n, kv, bias=bias)
    start = 0
    try:
        params = list(handle.parameters())
        adamw_wd = weight_decay if (full or decay_to == "base") else 0.0
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=adamw_wd)
        base_slices = None
        if not full and decay_to == "zero" and weight_decay > 0:
            base_slices = handle.base_slices()

        if ckpt_path is not None and resume and ckpt_path.exists():
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
            if ck.get("format") != "pinpoint-tune-checkpoint":
                raise ValueError(f"{ckpt_path} is not a pinpoint tune checkpoint")
            diff = [k for k in sorted(set(signature) | set(ck["signature"]))
                    if signature.get(k) != ck["signature"].get(k)]
            if diff:
                detail = "; ".join(f"{k}: checkpoint {ck['signature'].get(k)!r} vs now {signature.get(k)!r}"
                                   for k in diff if k != "data")
                if "data" in diff:
                    detail += ("; " if detail else "") + "data: the dialogues differ"
                raise ValueError(f"cannot resume from {ckpt_path}: it belongs to a different run ({detail})")
            if not full and ck.get("base_fingerprint") != handle.fingerprint():
                raise ValueError(f"cannot resume from {ckpt_path}: the base model's weights differ from those the "
                                 "checkpoint was trained on")
            handle.load_state_dict(ck["trainable"])
            opt.load_state_dict(ck["optimizer"])
            start = int(ck["step"])
            handle.history = list(ck["history"])

        def save_checkpoint(step: int) -> None:
            _atomic_torch_save({
                "format": "pinpoint-tune-checkpoint", "version": 1, "step": step, "signature": signature,
                "base_fingerprint": None if full else handle.fingerprint(),
                "trainable": {k: v.detach() for k, v in handle.state_dict().items()},
                "optimizer": opt.state_dict(), "history": handle.history,
            }, ckpt_path)

        if start >= steps:
            return handle

        from tqdm.auto import tqdm

        was_training = model.training
        model.train()
        bar = tqdm(total=steps, initial=start, desc="SFT (all parameters)" if full else "pinpoint tune",
                   disable=not progress, dynamic_ncols=True)
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                for step in range(start, steps):
                    torch.manual_seed((seed * 1_000_003 + step) % (2**63))
                    cur_lr = lr_at(step, lr=lr, steps=steps, warmup=warmup_steps, schedule=schedule)
                    for g in opt.param_groups:
                        g["lr"] = cur_lr
                    idx = batch_indices(len(rows), batch_size, seed, step)
                    batch = [rows[i] for i in idx]
                    opt.zero_grad(set_to_none=True)
                    total = accumulate_gradients(model, batch, grad_accum=grad_accum, pad_id=pad_id,
                                                 autocast_dtype=cdt if use_autocast else None)
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    if base_slices is not None:  # decay_to="zero": Δ -= lr·wd·(W_s + Δ), before the Adam step
                        with torch.no_grad():
                            for name, p in handle.deltas.items():
                                p.sub_(cur_lr * weight_decay * (base_slices[name] + p))
                    opt.step()
                    handle.history.append({"step": step + 1, "loss": total, "lr": cur_lr})
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.4f}", lr=f"{cur_lr:.2e}")
                    done = step + 1
                    if ckpt_path is not None and (done % checkpoint_every == 0 or done == steps):
                        save_checkpoint(done)
                    if callback is not None:
                        callback(done, total)
        finally:
            bar.close()
            model.train(was_training)
            opt.zero_grad(set_to_none=True)
    except BaseException:
        # Leave the caller's model as it was given: unpatched, original requires_grad flags.
        if isinstance(handle, PinpointAdapter):
            if handle.state == "attached":
                handle.detach()
        else:
            handle.merge()
        raise
    return handle


def _split(batch, parts: int):
    n = len(batch)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [batch[bounds[i]:bounds[i + 1]] for i in range(parts) if bounds[i + 1] > bounds[i]]
