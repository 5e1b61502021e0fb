"""``Trainer``: the optimizer, schedule, step, checkpoint and resume of one tuning run.

A ``Trainer`` drives a handle (a :class:`~pinpoint.adapter.PinpointAdapter` or a
:class:`~pinpoint.full.FullTuning`) over tokenized rows ((ids, labels) pairs) with a
resolved :class:`~pinpoint.tune_config.TuneConfig`:

* ``step(i)``: optimizer step ``i`` (0-based): learning rate ``lr_at(i)``, the batch
  ``batch_indices(...)``, ``accumulate_gradients`` over ``grad_accum`` micro-batches,
  clipping, the ``decay_to="zero"`` decay, AdamW; returns the step's loss;
* ``save(done)`` / ``resume()``: one atomic ``checkpoint.pt`` (trained tensors, optimizer
  state, step, history, the run's signature and base-weights fingerprint); ``resume``
  refuses a checkpoint of another run or base model, naming what differs;
* ``fit(start, progress=, callback=)``: steps ``start..steps-1`` with the seeded RNG, the
  progress bar, checkpoints every ``checkpoint_every`` steps and at the end.

Batches, loss and schedule are pure functions of the config, the rows and the step, so a
resumed run reaches the same final tensors, bit for bit, as an uninterrupted one.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import PinpointAdapter, attach
from .batching import IGNORE, collate, input_device
from .batching import pad_id as pad_id_for
from .chat import tokenize_dialogues
from .distributed import DataParallel
from .full import FullTuning
from .lora import LoraTuning
from .models import spec_for
from .files import atomic_torch_save
from .modes import train_mode
from .progress import progress as progress_bar
from .tune_config import TuneConfig

__all__ = ["CHECKPOINT_NAME", "Trainer", "run", "accumulate_gradients", "batch_indices", "batch_loss_sum", "loss_tokens",
           "lr_at"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "pinpoint-tune-checkpoint"


def batch_loss_sum(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Sum over assistant tokens of the next-token cross-entropy (fp32). Inputs [B, T]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    tgt = labels[:, 1:]
    sel = tgt != IGNORE
    return F.cross_entropy(logits[:, :-1][sel].float(), tgt[sel], reduction="sum")


def _split(batch, parts: int):
    n = len(batch)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [batch[bounds[i]:bounds[i + 1]] for i in range(parts) if bounds[i + 1] > bounds[i]]


def loss_tokens(batch) -> int:
    """How many tokens of ``batch`` (a list of (ids, labels)) carry loss."""
    return sum(sum(1 for t in lab[1:] if t != IGNORE) for _, lab in batch)


def accumulate_gradients(model, batch, *, grad_accum: int = 1, pad_id: int = 0,
                         autocast_dtype: torch.dtype | None = None, n_tok: int | None = None) -> float:
    """Backward of one optimizer step's loss over ``batch`` (a list of (ids, labels)), run as
    ``grad_accum`` micro-batches. The loss is the sum of assistant-token cross-entropies over
    the whole batch divided by the batch's assistant-token count (``n_tok``: the count of the
    global batch when ``batch`` is one rank's share of it), so the accumulated gradient
    does not depend on ``grad_accum``. Returns that loss."""
    n_tok = loss_tokens(batch) if n_tok is None else n_tok
    device = input_device(model)  # the embedding's execution device (accelerate-aware)
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype is not None else nullcontext
    total = 0.0
    for chunk in _split(batch, grad_accum):
        ids, mask, labels = collate(chunk, pad_id, device)
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


class Trainer:
    """One tuning run of ``handle`` on ``rows``; see the module docstring.

    ``config``: a resolved :class:`TuneConfig`; ``signature``: its ``signature(...)``;
    ``pad_id``: the id at padded positions; ``autocast_dtype``: compute dtype through autocast
    (None: the model's own); ``checkpoint``: path of ``checkpoint.pt`` or None; ``dp``: a
    :class:`~pinpoint.distributed.DataParallel` group (this rank takes its share of each global
    batch, gradients are all-reduced, rank 0 writes the checkpoints) or None.
    """

    def __init__(self, handle, rows, config: TuneConfig, *, signature: dict, pad_id: int,
                 autocast_dtype: torch.dtype | None = None, checkpoint: Path | None = None, dp=None):
        self.handle, self.rows, self.config, self.signature = handle, rows, config, signature
        self.pad_id, self.autocast_dtype, self.checkpoint = pad_id, autocast_dtype, checkpoint
        self.params = list(handle.parameters())
        self.dp = dp
        if dp is not None:
            dp.check_batch(config.batch_size, config.grad_accum)
        full, c = config.full, config
        wd = c.weight_decay if (full or c.decay_to == "base") else 0.0  # "zero" decays by hand, in step()
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=wd)
        self.base_slices = None
        if not full and c.decay_to == "zero" and c.weight_decay > 0:
            self.base_slices = handle.base_slices()

    def lr_at(self, step: int) -> float:
        c = self.config
        return lr_at(step, lr=c.lr, steps=c.steps, warmup=c.warmup_steps, schedule=c.schedule)

    def step(self, step: int) -> tuple[float, float]:
        """Optimizer step ``step`` (0-based); returns (loss, learning rate)."""
        c, handle = self.config, self.handle
        cur_lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = cur_lr
        batch = [self.rows[i] for i in batch_indices(len(self.rows), c.batch_size, c.seed, step)]
        self.optimizer.zero_grad(set_to_none=True)
        dp = self.dp
        loss = accumulate_gradients(handle.model, batch if dp is None else dp.share(batch), grad_accum=c.grad_accum,
                                    pad_id=self.pad_id, autocast_dtype=self.autocast_dtype, n_tok=loss_tokens(batch))
        if dp is not None:  # the sum of the ranks' gradients is the global batch's gradient
            dp.all_reduce_grads(self.params)
            loss = dp.all_reduce_loss(loss)
        before, after = getattr(handle, "before_step", None), getattr(handle, "after_step", None)
        if before is not None:
            before()
        if c.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        if self.base_slices is not None:  # decay_to="zero": Δ -= lr·wd·(W_s + Δ), before the Adam step
            with torch.no_grad():
                for name, p in handle.deltas.items():
                    p.sub_(cur_lr * c.weight_decay * (self.base_slices[name] + p))
        self.optimizer.step()
        if after is not None:
            after()
        return loss, cur_lr

    def _fingerprint(self):
        return None if self.config.full else self.handle.fingerprint()

    def save(self, done: int) -> None:
        """Write the checkpoint after ``done`` steps (atomically; rank 0 only, the others wait)."""
        if self.dp is not None and self.dp.rank != 0:
            self.dp.barrier()
            return
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "version": 1, "step": done, "signature": self.signature,
            "base_fingerprint": self._fingerprint(),
            "trainable": {k: v.detach() for k, v in self.handle.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "history": self.handle.history,
            "world_size": 1 if self.dp is None else self.dp.world,  # informative: resuming takes any world size
        }, self.checkpoint)
        if self.dp is not None:
            self.dp.barrier()

    def resume(self) -> int:
        """Load the checkpoint (if there is one) into the handle and optimizer; returns the step to start at."""
        path = self.checkpoint
        if path is None or not path.exists():
            return 0
        ck = torch.load(path, map_location=self.params[0].device, weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a pinpoint tune checkpoint")
        sig, old = self.signature, ck["signature"]
        diff = [k for k in sorted(set(sig) | set(old)) if sig.get(k) != old.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {sig.get(k)!r}" for k in diff if k != "data")
            if "data" in diff:
                detail += ("; " if detail else "") + "data: the dialogues differ"
            raise ValueError(f"cannot resume from {path}: it belongs to a different run ({detail})")
        if not self.config.full:
            from .fingerprint import matches

            if not matches(self.handle.model, ck.get("base_fingerprint") or "", self._fingerprint()):
                raise ValueError(f"cannot resume from {path}: the base model's weights differ from those the "
                                 "checkpoint was trained on")
        self.handle.load_state_dict(ck["trainable"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.handle.history = list(ck["history"])
        return int(ck["step"])

    def fit(self, start: int = 0, *, progress: bool = True, callback: Callable[[int, float], None] | None = None):
        """Steps ``start..steps-1``; the global RNG is seeded per step inside ``fork_rng`` (the
        caller's RNG is untouched); ``callback(done, loss)`` after each step."""
        c, handle = self.config, self.handle
        model = handle.model
        devices = [p.device for p in self.params[:1] if p.device.type == "cuda"]
        progress = progress and (self.dp is None or self.dp.rank == 0)  # one bar: rank 0's
        bar = progress_bar(c.steps, "SFT (all parameters)" if c.full else "pinpoint tune", progress, leave=True,
                           initial=start, dynamic_ncols=True)
        try:
            with train_mode(model), torch.random.fork_rng(devices=devices):
                for step in range(start, c.steps):
                    torch.manual_seed((c.seed * 1_000_003 + step) % (2**63))
                    loss, cur_lr = self.step(step)
                    handle.history.append({"step": step + 1, "loss": loss, "lr": cur_lr})
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{cur_lr:.2e}")
                    done = step + 1
                    if self.checkpoint is not None and (done % c.checkpoint_every == 0 or done == c.steps):
                        self.save(done)
                    if callback is not None:
                        callback(done, loss)
        finally:
            bar.close()
            self.optimizer.zero_grad(set_to_none=True)


def _data_hash(rows) -> str:
    import hashlib
    import json

    h = hashlib.sha256()
    for ids, labels in rows:
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()


def run(model: nn.Module, tokenizer, dialogues, config: TuneConfig, *, checkpoint_dir=None, resume: bool = False,
        progress: bool = True, callback: Callable[[int, float], None] | None = None):
    """:func:`pinpoint.tune` with its hyper-parameters as a :class:`TuneConfig`: builds the
    handle (adapter, full fine-tuning or LoRA), trains it with a :class:`Trainer` (data-parallel
    under torchrun), and on any failure leaves the model as it was given."""
    config = config.resolve(model, tokenizer)
    rows = tokenize_dialogues(tokenizer, dialogues, max_length=config.max_length, too_long=config.too_long)
    model_dtype = spec_for(model).dtype
    compute = model_dtype if config.dtype is None else config.dtype
    signature = config.signature(data=_data_hash(rows), model_class=type(model).__name__, compute_dtype=compute)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists; pass resume=True to continue that run, or use another "
                              "checkpoint_dir")
    if config.full:
        handle: PinpointAdapter | FullTuning | LoraTuning = FullTuning(model)
    elif config.lora_r is not None:
        handle = LoraTuning(model, config.lora_r, seed=config.seed)
    else:
        handle = attach(model, config.heads, config.parts, config.kv, bias=config.bias)
    try:
        dp = DataParallel.current(list(handle.parameters()))  # torchrun / an initialised process group
        trainer = Trainer(handle, rows, config, signature=signature, pad_id=pad_id_for(tokenizer),
                          autocast_dtype=compute if compute != model_dtype else None, checkpoint=ckpt, dp=dp)
        start = trainer.resume() if resume else 0
        if start < config.steps:
            trainer.fit(start, progress=progress, callback=callback)
        handle.training = dp.info(config.batch_size) if dp is not None else \
            {"world_size": 1, "per_rank_batch": config.batch_size}
    except BaseException:
        # Leave the caller's model as it was given: unpatched, original requires_grad flags.
        if isinstance(handle, (PinpointAdapter, LoraTuning)):
            if handle.state == "attached":
                handle.detach()
        else:
            handle.merge()
        raise
    return handle
