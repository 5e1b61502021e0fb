"""``tune``: supervised pinpoint tuning (SPT) of the selected heads, and the SFT baseline.

``tune(model, tokenizer, dialogues, heads=..., parts=..., lr=3e-5, steps=...)`` renders chat
dialogues with the tokenizer's own chat template, puts the loss on assistant tokens only,
and trains with AdamW on the slices ``attach`` creates (or, with ``full=True`` /
``heads="all"``, on every parameter: the SFT baseline; ``heads="random"`` with ``random_k``
gives the random-heads baseline). It returns the adapter. Under GQA the default
``kv="whole"`` trains a KV head's k/v rows only when every query head reading it is
selected, so no unselected head's keys or values change (``kv="group"``: the old default).

Semantics, precisely:

* **Batches.** ``batch_size`` dialogues per optimizer step, drawn from a seeded stream of
  per-epoch permutations (a pure function of ``seed`` and the step, so resuming needs no data
  state). ``grad_accum`` splits each step's batch into that many micro-batches; it changes
  memory, not the maths: the loss is the sum of assistant-token cross-entropies over the
  whole step's batch divided by its number of assistant tokens, so 2 half batches give the
  full batch's gradient (up to float summation order).
* **Loss.** Next-token cross-entropy (fp32) on the tokens of assistant turns only, as the
  template renders them (content and end-of-turn token; not the role header).
* **Optimizer.** ``torch.optim.AdamW`` over the trained parameters only (for ``full=True``
  on a bf16/fp16 model: over fp32 master copies of the weights, rounded into the model after
  each step, so small updates are not lost to bf16 rounding; see :mod:`pinpoint.full`). Weight decay with
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

* **Data parallel.** Under ``torchrun`` (or any initialised process group of more than one
  rank) each rank takes its equal share of every global batch (``batch_size`` stays global and
  must be a multiple of the world size), only the slices' gradients are all-reduced (one flat
  buffer per step: 4 bytes per trained element in fp32), rank 0 alone writes the checkpoint,
  and the progress bar is rank 0's. The result equals a 1-process run on the same global batch
  (up to float summation order), and a checkpoint resumes with any world size. The returned
  handle's ``.training`` records ``world_size`` and ``per_rank_batch``. See
  :mod:`pinpoint.distributed`.

The pieces: :class:`~pinpoint.tune_config.TuneConfig` (the hyper-parameters, validated),
:class:`~pinpoint.trainer.Trainer` (optimizer, schedule, step, checkpoint, resume),
:func:`pinpoint.chat.tokenize_dialogues` (rendering), :class:`~pinpoint.full.FullTuning`.
``tune`` is the one-call façade over them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .adapter import PinpointAdapter
from .chat import render_dialogue, tokenize_dialogues
from .full import FullTuning
from .lora import LoraTuning
from .trainer import CHECKPOINT_NAME, Trainer, accumulate_gradients, batch_indices, batch_loss_sum, lr_at, run
from .tune_config import TuneConfig

__all__ = ["CHECKPOINT_NAME", "FullTuning", "TuneConfig", "Trainer", "accumulate_gradients", "batch_indices",
           "batch_loss_sum", "lr_at", "render_dialogue", "run", "tokenize_dialogues", "tune"]


def tune(
    model: nn.Module,
    tokenizer,
    dialogues,
    *,
    heads=None,
    parts="qkvo",
    kv: str = "whole",
    bias: bool = True,
    full: bool = False,
    random_k: int | None = None,
    lora_r: int | None = None,
    lr: float = 3e-5,
    steps: int | str | None = None,
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
) -> PinpointAdapter | FullTuning | LoraTuning:
    """Train the selected heads' slices (or everything, ``full=True``) on chat dialogues.

    ``heads``: a HeadSet / iterable of (layer, head) pairs (query heads), ``"all"`` (= full
    fine-tuning, the SFT baseline) or ``"random"`` (``random_k`` heads drawn with ``seed``: the
    random-heads baseline). ``parts``/``kv``/``bias``: as for :func:`attach`, except that ``kv``
    defaults to "whole" (K/V rows only of KV heads whose every reader is selected; pass
    ``kv="group"`` for the shared rows of partly selected groups). ``lr``, ``steps``:
    peak learning rate and optimizer steps (both > 0). ``batch_size``: dialogues per step;
    ``grad_accum``: micro-batches per step (same result, less memory). ``dtype``: compute
    dtype through autocast (e.g. ``torch.bfloat16``), default the model's. ``max_length``:
    default the model's context; ``too_long``: "truncate" (warn) or "error".
    ``callback(step, loss)`` runs after each optimizer step (``step`` counts from 1).
    ``lora_r``: the LoRA baseline instead (rank ``lora_r`` on every q/k/v/o projection, through
    ``peft``; :mod:`pinpoint.lora`). ``lr="auto"`` (and ``steps="auto"``) choose the learning
    rate and steps by the rule of :mod:`pinpoint.recipe` (:func:`pinpoint.recipe.tune_auto`), on
    a held-out 20 % of ``dialogues``; the handle's ``.recipe`` says what was chosen and why.
    ``steps=None`` (the default): 120, or the rule's steps with ``lr="auto"``.
    Returns the :class:`PinpointAdapter` (attached; ``.history`` holds step/loss/lr), a
    :class:`FullTuning` for the SFT baseline, or a :class:`~pinpoint.lora.LoraTuning`. See the
    module docstring for the semantics.
    """
    settings = dict(heads=heads, parts=parts, kv=kv, bias=bias, full=full, random_k=random_k, lora_r=lora_r,
                    batch_size=batch_size, grad_accum=grad_accum, weight_decay=weight_decay, decay_to=decay_to,
                    warmup=warmup, schedule=schedule, betas=betas, eps=eps, max_grad_norm=max_grad_norm,
                    max_length=max_length, too_long=too_long, dtype=dtype, seed=seed)
    if steps is None:  # the paper's 120, or the rule's 4 epochs when the rule picks the rate
        steps = "auto" if lr == "auto" else 120
    if "auto" in (lr, steps):
        from .recipe import tune_auto  # recipe trains its trials with trainer.run, not with tune: no cycle

        if checkpoint_dir is not None or resume:
            raise ValueError("lr/steps='auto' cannot checkpoint or resume; pass the learning rate and steps the "
                             "rule chose (handle.recipe) to checkpoint a run")
        return tune_auto(model, tokenizer, dialogues, lr=lr, steps=steps, progress=progress, **settings)
    config = TuneConfig(lr=lr, steps=steps, checkpoint_every=checkpoint_every, **settings)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    return run(model, tokenizer, dialogues, config, checkpoint_dir=checkpoint_dir, resume=resume,
               progress=progress, callback=callback)
