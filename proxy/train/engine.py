"""The step engines the one training loop (proxy/train/trainer.py) drives.

A run is an ensemble of K >= 1 members that share every batch. The loop asks its engine, with
one entry per member in every answer:

    schedule(step)                     set the step's LR; each member's base LR
    compute(step, lrs, x, y, ...)      forward, backward, gradient RMS (logging steps), each
                                       member's clipping and its remedy's verdict: a Computed
                                       (read=False: loss and norm stay on the device)
    ---- the loop decides: observers look, divergence is checked, skip events counted ----
    apply(computed, update, measure)   the optimizer step for the members whose update goes
                                       ahead; their update RMS and parameter norms if measured
    statistics(computed)               forward statistics and the loss parts of each row
    evaluate(batches)                  each member's mean held-out loss
    member_state(k) / load_member_state(k, state)
                                       model + optimizer in the one checkpoint format

:class:`SingleEngine` (K = 1) is one GPT and proxy.optim.AdamW through proxy/train/step.py, the
step a spike kit's replay repeats bit for bit; data parallelism and torch.compile wrap its
forward. :class:`proxy.train.ensemble.StackedEngine` (K > 1) maps one GPT over member-stacked
parameters. A standalone run is the single engine's one member, so its records are what they
were before the loop was shared (tests/train/test_loop_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from proxy.config import Config
from proxy.model import GPT
from proxy.optim import AdamW
from proxy.train import diagnostics, distributed
from proxy.train.remedies import Event, Remedy
from proxy.train.step import StepResult, TrainStep


@dataclass
class Computed:
    """A step's forward and backward, before its update: one entry per member. Entries of a
    member that no longer trains (diverged) are meaningless."""

    lrs: list[float]  # base LR (the schedule times the member's peak LR)
    losses: list[float]  # cross-entropy of the batch (mean over ranks); [] where not read back
    grad_norms: list[float]  # global norm before clipping; [] where not read back
    events: list[Optional[Event]]  # what each member's remedy did
    grad_stats: list[dict[str, float]]  # grad_rms/<param> on logging steps
    collect: bool  # the forward pass collected attention / output statistics
    out: Any = None  # the forward's output (ModelOutput, or StackedOutput for K > 1)
    results: list[StepResult] = field(default_factory=list)  # the single engine's StepResult
    loss_t: Optional[Tensor] = None  # (K,) fp32 on the device: the losses before any read-back
    grad_norm_t: Optional[Tensor] = None  # (K,) fp32 on the device
    skip_t: Optional[Tensor] = None  # (K,) bool on the device: a device remedy left the update out

    def skips(self, k: int) -> bool:
        event = self.events[k]
        return event is not None and event.skips_update


class Engine(Protocol):
    n_members: int
    device: torch.device
    autocast: Callable[[], ContextManager]

    def schedule(self, step: int) -> list[float]: ...

    def compute(
        self,
        step: int,
        lrs: list[float],
        x: Tensor,
        y: Tensor,
        remedies: Sequence[Optional[Remedy]],
        active: Sequence[bool],
        *,
        collect: bool,
        measure: bool,
        data_position: int,
        read: bool = True,
    ) -> Computed: ...

    def apply(
        self, computed: Computed, update: Sequence[bool], active: Sequence[bool], measure: bool
    ) -> list[dict[str, float]]: ...

    def statistics(self, computed: Computed) -> list[dict[str, float]]: ...

    def loss_parts(self, computed: Computed) -> list[tuple[float, float]]: ...

    def evaluate(self, batches: Iterable[tuple[Tensor, Tensor]], ignore_index: int) -> list[float]: ...

    def member_state(self, k: int) -> dict[str, Any]: ...

    def load_member_state(self, k: int, state: dict[str, Any]) -> None: ...

    def member_module(self, k: int) -> GPT: ...

    def member_optimizer(self, k: int) -> torch.optim.Optimizer: ...

    def flops_per_token(self, seq_len: int) -> float: ...


class SingleEngine:
    """One model: ``model`` owns the parameters, ``forward`` runs it (the model itself, or its
    DDP / compiled wrapper)."""

    n_members = 1

    def __init__(
        self,
        cfg: Config,
        model: GPT,
        optimizer: AdamW,
        forward: Callable,
        autocast: Callable[[], ContextManager],
        device: torch.device,
    ):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.forward, self.autocast, self.device = forward, autocast, device
        self.stepper = TrainStep(cfg, model, optimizer, forward, autocast, device)
        self.updates = diagnostics.UpdateTracker(model, optimizer)

    def schedule(self, step: int) -> list[float]:
        return [self.stepper.schedule(step)]

    def compute(
        self,
        step: int,
        lrs: list[float],
        x: Tensor,
        y: Tensor,
        remedies: Sequence[Optional[Remedy]],
        active: Sequence[bool],
        *,
        collect: bool,
        measure: bool,
        data_position: int,
        read: bool = True,
    ) -> Computed:
        r = self.stepper.compute(
            step,
            lrs[0],
            x,
            y,
            remedies[0],
            collect_stats=collect,
            measure_grads=measure,
            data_position=data_position,
            read=read,
        )
        assert r.loss_t is not None and r.grad_norm_t is not None
        losses, norms = ([r.loss], [r.grad_norm]) if read else ([], [])
        skip_t = r.skip_t[None] if r.skip_t is not None else None
        return Computed(
            [r.lr],
            losses,
            norms,
            [r.event],
            [r.grad_stats],
            r.collect,
            r.out,
            [r],
            r.loss_t[None],
            r.grad_norm_t[None],
            skip_t,
        )

    def apply(
        self, computed: Computed, update: Sequence[bool], active: Sequence[bool], measure: bool
    ) -> list[dict[str, float]]:
        self.optimizer.measure_rms = measure  # RMS_t on logging steps
        self.stepper.apply(computed.results[0], self.updates if measure else None)  # skips on its event
        return [self.updates.after() if measure else {}]

    def statistics(self, computed: Computed) -> list[dict[str, float]]:
        if not computed.collect:
            return [{}]
        return [distributed.reduce_stats(diagnostics.forward_stats(computed.out), self.device)]

    def loss_parts(self, computed: Computed) -> list[tuple[float, float]]:
        out = computed.out
        return [(distributed.mean(out.z_loss.item(), self.device), distributed.mean(out.loss.item(), self.device))]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[Tensor, Tensor]], ignore_index: int) -> list[float]:
        """Mean cross-entropy over the held-out batches (the same at every eval)."""
        self.model.eval()
        total, n = 0.0, 0
        for x, y in batches:
            with self.autocast():
                out = self.forward(x, y, ignore_index=ignore_index)
            total += out.ce_loss.item()
            n += 1
        self.model.train()
        return [distributed.mean(total / n, self.device)]

    def member_state(self, k: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_member_state(self, k: int, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def member_module(self, k: int) -> GPT:
        return self.model

    def member_optimizer(self, k: int) -> torch.optim.Optimizer:
        return self.optimizer

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.flops_per_token(seq_len)


__all__ = ["Computed", "Engine", "SingleEngine"]
