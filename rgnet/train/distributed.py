"""The ranks that share a global training step, and the three collectives a pair-sharded step needs.

Plain ``torch.distributed`` (any backend: gloo on CPU, NCCL on GPUs); the process group itself is set up by whoever
starts the processes (Ray Train on Ray).  :data:`SOLO` is the one-process group: every collective is the identity,
so the same step code runs in ``rgnet train --local`` and in every Ray Train worker.

- :meth:`StepGroup.gather`: (B_r, ...) of this rank -> (B, ...) of all ranks in rank order, no gradient (the step's
  positive windows: raw features, lengths, stream keys).
- :meth:`StepGroup.gather_grad`: the same with gradients: the backward pass sums, over ranks, the gradient of every
  rank's loss with respect to this rank's rows (the InfoNCE columns read every rank's context logits).
- :meth:`StepGroup.sum`: the sum over ranks of a detached tensor (the loss shares, for logging).
- :meth:`StepGroup.gather_objects`: every rank's Python object (validation predictions of its share of the videos).

Every rank must call the same collectives in the same order (they are barriers); the step is identical on every
rank, so they do.  The step's collectives use a process group of their own, so they never interleave with the
gradient all-reduce that DDP runs on the default group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradients over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, rank: int, world: int) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # every rank's loss reads every rank's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None, None


@dataclass(frozen=True)
class StepGroup:
    """``world`` ranks computing one global step together; this process is ``rank``."""

    rank: int = 0
    world: int = 1
    group: Any = None  # a torch.distributed process group (None with one rank)

    def gather(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        with torch.no_grad():
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            return torch.cat(parts)

    def gather_grad(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        return _GatherRows.apply(x, self.group, self.rank, self.world)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


SOLO = StepGroup()


def step_group() -> StepGroup:
    """The step group of this process: :data:`SOLO` without ``torch.distributed``, else every rank of the default
    group, with a new process group of the default group's backend for the step's collectives (collective call:
    every rank must call it, once)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SOLO
    return StepGroup(dist.get_rank(), dist.get_world_size(), dist.new_group(backend=dist.get_backend()))
