"""The divergence rule judged on the device: no host synchronisation on a non-logging step.

Reading a step's loss and gradient norm back to the host (``.item()``) makes the host wait for
the device at every step, and for a small model on a GPU that wait is most of the step. The loop
judges the ``train.diverge_*`` rule (proxy/train/runtime.py ``divergence_reason``) at every step
all the same, but on the device: each member's first step that broke the rule, with its loss
and gradient norm, is kept in device tensors, and the step's loss in a short list, all read back
in one copy when the loop next needs the host (a logging step, an eval, a probe, a checkpoint,
an interrupt; :meth:`DivergenceWatch.settle`).

What a run records is what a per-step check records: a member that broke the rule at step s
ends ``diverged`` at s with the same reason, its tokens and final train loss counted to s, and
nothing of the steps it took past s (their updates happened on the device and are dropped with
the member: a diverged run keeps no checkpoint). The steps between s and the next settle are
the price (at most ``train.log_every``). ``train.check_every_step=true`` reads every step back
instead; rollback, a spike capture or data parallelism need every step's values on the host and
choose that path themselves (:func:`wants_watch`). Skip-step and ZClip decide on the device too
(proxy/train/remedies.py): their events are read back with the same settle, and a step skip-step
left out is not judged (a per-step check does not judge a skipped step either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from proxy.config import Config
from proxy.train.runtime import divergence_bound


def wants_watch(cfg: Config, device: torch.device, *, remedies: bool, observers: bool, distributed: bool) -> bool:
    """Whether the loop may judge divergence on the device (else it reads every step back).
    ``remedies``: whether a member's remedy decides on the host (rollback)."""
    if cfg.train.check_every_step or remedies or observers or distributed:
        return False
    return device.type in ("cpu", "cuda")  # float64 compares (MPS has none)


@dataclass(frozen=True)
class Settled:
    """What a settle read back: per member, the first step that broke the rule (None: none did)
    with its loss and gradient norm, and the train losses of the steps observed since the last
    settle (in step order, the step that broke the rule and any after it left out): the loss of
    ``steps[i]`` is ``losses[k][i]``."""

    first_bad: list[Optional[int]]
    loss_at: list[float]
    grad_norm_at: list[float]
    losses: list[list[float]]
    steps: list[int] = field(default_factory=list)


class DivergenceWatch:
    """Each of ``n`` members' divergence rule, judged on ``device`` step by step."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device = n, device
        self._reset()
        self._bounds: Optional[Tensor] = None
        self._bounds_for: Optional[tuple] = None

    def _reset(self) -> None:
        self.first = torch.full((self.n,), -1, dtype=torch.int64, device=self.device)
        self.loss_at = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        self.norm_at = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        self.losses: list[Tensor] = []
        self.steps: list[int] = []

    def bounds(self, cfg: Config, loss_at_init: Sequence[Optional[float]]) -> Tensor:
        """Each member's loss bound (nan: only a non-finite value breaks the rule), rebuilt only
        when a loss at init changed (once, at the first eval)."""
        key = tuple(loss_at_init)
        if self._bounds is None or key != self._bounds_for:
            values = [divergence_bound(cfg.train, v) for v in loss_at_init]
            self._bounds = torch.tensor(values, dtype=torch.float64, device=self.device)
            self._bounds_for = key
        return self._bounds

    def observe(
        self, step: int, losses: Tensor, grad_norms: Tensor, bounds: Tensor, skipped: Optional[Tensor] = None
    ) -> None:
        """Judge one step: ``losses`` and ``grad_norms`` are (n,) device tensors; ``skipped`` (bool
        (n,)) the members whose update a remedy left out, which are not judged. No sync."""
        loss, norm = losses.detach().double(), grad_norms.detach().double()
        # a nan bound compares False: only the finiteness test applies (divergence_reason's order)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm)) | (loss > bounds)
        if skipped is not None:
            bad = bad & ~skipped
        new = bad & (self.first < 0)
        self.first = torch.where(new, step, self.first)
        self.loss_at = torch.where(new, loss, self.loss_at)
        self.norm_at = torch.where(new, norm, self.norm_at)
        self.losses.append(loss)
        self.steps.append(step)

    @property
    def pending(self) -> bool:
        return bool(self.steps)

    def settle(self) -> Settled:
        """Read everything observed since the last settle back in one copy, and start afresh."""
        if not self.steps:
            return Settled([None] * self.n, [math.nan] * self.n, [math.nan] * self.n, [[] for _ in range(self.n)])
        rows = torch.stack([self.first.double(), self.loss_at, self.norm_at, *self.losses]).tolist()  # one sync
        first = [int(v) if v >= 0 else None for v in rows[0]]
        per_step = rows[3:]
        losses = [
            [row[k] for step, row in zip(self.steps, per_step) if first[k] is None or step < first[k]]  # type: ignore[operator]
            for k in range(self.n)
        ]
        steps = self.steps
        self._reset()
        return Settled(first, rows[1], rows[2], losses, steps)


__all__ = ["DivergenceWatch", "Settled", "wants_watch"]
