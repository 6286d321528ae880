"""One optimizer step: the arithmetic the trainer and the spike-kit replay share.

    schedule(step)   lr <- the schedule at this step, set on every parameter group
    compute(...)     forward (+ attention / output statistics) -> backward
                     -> gradient RMS per parameter (logging steps, before any clipping)
                     -> grad norm, clipped at the remedy's threshold
                     -> loss, averaged over data-parallel ranks
                     -> the remedy's verdict on the step (an Event, or None)
    ---- the caller decides here: observers look, the divergence rule is checked ----
    apply(result)    optimizer.step() unless the event skips the update; gradients zeroed

The trainer (proxy/train/trainer.py) draws the batch between ``schedule`` and ``compute``;
the replay (proxy/forensics/replay.py) calls the same three with a kit's batches, so a replay from
a kit's state repeats the recorded steps bit for bit. The ensemble's step (ensemble.py) maps one
model over stacked members with its own optimizer; it shares the ledger and the rules instead.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from proxy.config import Config
from proxy.optim import AdamW, apply_lr, clip_grad_norm, schedule_multiplier
from proxy.train import diagnostics, distributed
from proxy.train.remedies import Event, Remedy


@dataclass
class StepResult:
    step: int
    lr: float
    loss: float  # cross-entropy of the batch (mean over ranks); nan where not read back
    grad_norm: float  # global norm before clipping; nan where not read back
    out: Any  # the forward pass's proxy.model.ModelOutput
    event: Optional[Event] = None  # what the remedy did, if anything
    collect: bool = False  # whether the forward pass collected statistics
    grad_stats: dict[str, float] = field(default_factory=dict)  # grad_rms/<param>, if measured
    loss_t: Optional[Tensor] = None  # the loss and norm as device tensors (0-dim fp32)
    grad_norm_t: Optional[Tensor] = None
    skip_t: Optional[Tensor] = None  # a device remedy's skip flag (0-dim bool), obeyed on the device

    @property
    def skips_update(self) -> bool:
        return self.event is not None and self.event.skips_update


class TrainStep:
    """The step of one model: ``model`` owns the parameters, ``forward`` runs it (the model
    itself, or its DDP / compiled wrapper)."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        forward: Optional[Callable] = None,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        device: Optional[torch.device] = None,
    ):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.forward = forward if forward is not None else model
        self.autocast = autocast
        self.device = device if device is not None else next(model.parameters()).device

    def schedule(self, step: int) -> float:
        """Set the LR of ``step`` on the optimizer; returns the base (peak-scaled) LR."""
        cfg = self.cfg
        return apply_lr(self.optimizer, schedule_multiplier(step, cfg.train.steps, cfg.schedule))

    def compute(
        self,
        step: int,
        lr: float,
        x: Tensor,
        y: Tensor,
        remedy: Optional[Remedy] = None,
        *,
        collect_stats: bool = False,
        measure_grads: bool = False,
        data_position: Optional[int] = None,
        read: bool = True,
    ) -> StepResult:
        """Forward, backward, clip and ``remedy``'s verdict; the update is not applied yet.

        ``data_position``: the next unread batch (a rollback never resumes before it). Without a
        remedy nothing is judged and the gradients are clipped at ``optim.grad_clip``.
        ``read=False`` leaves the loss and norm on the device (``loss_t``, ``grad_norm_t``; the
        floats nan): nothing waits for the device (proxy/train/watch.py). Only a remedy that
        decides on the device (skip-step, ZClip) may judge such a step; its event comes with its
        settle, its skip as ``skip_t``. Such a remedy judges every step on the device, read or
        not, so a run's arithmetic does not depend on when it is read back.
        """
        cfg = self.cfg
        with self.autocast():
            out = self.forward(
                x, y, z_loss=cfg.loss.z_loss, ignore_index=cfg.loss.ignore_index, collect_stats=collect_stats
            )
        out.loss.backward()
        grad_stats = diagnostics.grad_stats(self.model) if measure_grads else {}
        params = list(self.model.parameters())
        clip = remedy.clip_threshold(cfg.optim.grad_clip) if remedy is not None else cfg.optim.grad_clip
        norm_t = clip_grad_norm(params, clip)  # of the rank-averaged gradients
        loss_t = out.ce_loss.detach().float()
        on_device = remedy is not None and remedy.decides_on_device
        if not read:
            skip_t = None
            if remedy is not None:
                if not on_device:
                    raise ValueError("TrainStep.compute(read=False): this remedy judges read-back values")
                skip_t = remedy.defer(step, loss_t, norm_t, params)
            nan = math.nan
            return StepResult(step, lr, nan, nan, out, None, collect_stats, grad_stats, loss_t, norm_t, skip_t)
        grad_norm = float(norm_t)
        loss = distributed.mean(out.ce_loss.item(), self.device)
        event, skip_t = None, None
        if remedy is not None and on_device:  # judged as between read-backs, on the ranks' mean loss
            mean_loss = torch.full((), loss, dtype=torch.float64, device=norm_t.device)
            skip_t = remedy.defer(step, mean_loss, norm_t, params)
            event = remedy.settle_step(step)
        elif remedy is not None:
            event = remedy.after_backward(step, loss, grad_norm, params, data_position)
        return StepResult(step, lr, loss, grad_norm, out, event, collect_stats, grad_stats, loss_t, norm_t, skip_t)

    def apply(self, result: StepResult, updates: Optional[diagnostics.UpdateTracker] = None) -> bool:
        """Take the optimizer step unless the remedy said skip; ``updates`` measures it. A skip
        decided on the device (``skip_t``, not read) goes to the optimizer as it is. Returns
        whether the update was applied (True where only the device knows)."""
        applied = not result.skips_update
        if applied:
            if updates is not None:
                updates.before()
            if result.skip_t is not None:
                if not isinstance(self.optimizer, AdamW):
                    raise TypeError(f"a skip decided on the device needs proxy.optim.AdamW, not {type(self.optimizer)}")
                self.optimizer.step(skip=result.skip_t)
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied


__all__ = ["StepResult", "TrainStep"]
