"""Data-parallel SPT on ``torch.distributed``: each rank takes its share of the global batch and
only the trained slices' gradients are all-reduced.

Under ``torchrun`` (or any initialised process group) :func:`pinpoint.tune` trains
data-parallel. Every rank holds the frozen base (whole, or spread over its devices with a
``device_map``) and a replica of the slices and of their AdamW state; there is no DDP wrapper
(the base's parameters are frozen, so there is nothing else to reduce):

* the global batch of step i (``batch_size``, the same on every rank: a pure function of the
  seed and the step) is cut into ``world_size`` equal contiguous shares; rank r takes share r
  and splits it into ``grad_accum`` micro-batches;
* the loss is normalised by the assistant-token count of the whole global batch (each rank
  counts it from the token ids, no communication), so the sum over ranks of the local
  gradients is the 1-process gradient: one ``all_reduce(SUM)`` per optimizer step, of one flat
  buffer holding every slice gradient (4 bytes per trained element in fp32), then clipping and
  AdamW run identically on every rank;
* rank 0 alone writes checkpoints and the adapter (atomically); the others wait at a barrier.
  A checkpoint holds nothing rank-specific, so a run resumes with any world size;
* progress and logs come from rank 0 only.

* ``DataParallel.current(params)``: the active data-parallel group for ``params`` (None
  without an initialised process group of more than one rank); checks that every rank trains
  on the same kind of device.
* ``init_from_env()``: initialise the default group from torchrun's environment (gloo on CPU,
  nccl on CUDA), if it is set and no group exists.
* ``RankFailure``: a collective failed because another rank stopped (killed, crashed).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["DataParallel", "RankFailure", "init_from_env", "is_main_process", "world_size"]


class RankFailure(RuntimeError):
    """Another rank of the process group stopped during a collective."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(timeout_s: float = 600.0) -> bool:
    """Initialise the default process group from torchrun's variables (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) when they are set and no group exists; returns whether a group
    of more than one process is active. nccl when CUDA is visible, else gloo."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return world_size() > 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # modulo: a rank may see only its own GPUs (CUDA_VISIBLE_DEVICES set per rank)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world_size() > 1


class DataParallel:
    """One data-parallel group: ``rank``, ``world``, ``share(batch)`` and the collectives, with
    the bytes they moved (``grad_bytes``: the gradient all-reduces; ``other_bytes``: the loss)."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.grad_bytes = 0
        self.other_bytes = 0
        self.steps = 0

    @classmethod
    def current(cls, params) -> "DataParallel | None":
        """The default group when it has more than one rank (checked for mixed devices), else None."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return None
        dp = cls()
        dp.check_devices(params[0].device if params else torch.device("cpu"))
        return dp

    def _device(self, here: torch.device) -> torch.device:
        """Where collective buffers live: the rank's current CUDA device for nccl (slices spread
        over several GPUs by a device_map are gathered there), the CPU for gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _collective(self, fn, what: str):
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as exc:  # gloo: "Connection closed by peer", timeouts
            raise RankFailure(f"rank {self.rank}: the {what} failed, so another of the {self.world} ranks has "
                              f"stopped (killed or crashed; see its log): {str(exc).strip().splitlines()[0][:200]}. "
                              "Nothing was written for the unfinished step; resume from the last checkpoint "
                              "(any world size)") from exc

    def check_devices(self, here: torch.device) -> None:
        """Refuse a group whose ranks train on different kinds of device (one error on every rank)."""
        kinds = ["cpu", "cuda", "xpu", "mps", "meta"]
        code = torch.tensor([kinds.index(here.type) if here.type in kinds else len(kinds)], dtype=torch.int64)
        gathered = [torch.zeros_like(code) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(gathered, code.to(self._device(here))), "device check")
        got = [int(g) for g in gathered]
        if len(set(got)) > 1:
            names = ", ".join(f"rank {r}: {kinds[c] if c < len(kinds) else 'other'}" for r, c in enumerate(got))
            raise ValueError(f"the process group mixes devices ({names}); data-parallel tuning needs every rank "
                             "on the same kind of device (all CUDA with nccl, or all CPU with gloo)")
        if self.backend == "nccl" and here.type != "cuda":
            raise ValueError(f"the process group uses nccl but rank {self.rank} trains on {here}; use gloo on the CPU")

    def check_batch(self, batch_size: int, grad_accum: int) -> int:
        """The per-rank batch, or a clear error when the world size does not divide the global batch."""
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} is the global batch and must split evenly over the "
                             f"{self.world} ranks; use a multiple of {self.world} (e.g. "
                             f"{(batch_size // self.world + 1) * self.world})")
        per_rank = batch_size // self.world
        if grad_accum > per_rank:
            raise ValueError(f"grad_accum {grad_accum} is more than the {per_rank} dialogues each of the "
                             f"{self.world} ranks gets per step (batch_size {batch_size}); lower grad_accum")
        return per_rank

    def share(self, batch: list) -> list:
        """This rank's contiguous share of the global batch (equal shares; see ``check_batch``)."""
        n = len(batch) // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def all_reduce_grads(self, params) -> None:
        """Sum every parameter's gradient over the ranks: one all-reduce of one flat buffer
        (a parameter without a gradient contributes zeros, so every rank sends the same layout)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        here = params[0].device
        flat = torch.cat([g.reshape(-1).to(self._device(here)) for g in grads])
        self._collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group), "gradient all-reduce")
        self.grad_bytes += flat.numel() * flat.element_size()
        self.steps += 1
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
            offset += n

    def all_reduce_loss(self, loss: float) -> float:
        t = torch.tensor([loss], dtype=torch.float64, device=self._device(torch.device("cpu")))
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group), "loss all-reduce")
        self.other_bytes += t.numel() * t.element_size()
        return float(t)

    def barrier(self) -> None:
        self._collective(lambda: dist.barrier(group=self.group), "barrier")

    def info(self, batch_size: int) -> dict:
        """What the run metadata records about the data-parallel setup."""
        return {"world_size": self.world, "per_rank_batch": batch_size // self.world, "backend": self.backend,
                "grad_allreduce_bytes_per_step": self.grad_bytes // max(1, self.steps)}
