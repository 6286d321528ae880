"""Step observers: things that watch the training loop without changing it.

Spike capture (proxy/train/capture.py) is one. The trainer calls, for every step,

    on_batch(run, step, inputs, labels)      the batch is drawn; the state is still as it was
                                             at the start of the step
    on_step_end(run, step, loss, grad_norm, event)
                                             after the backward pass, before the divergence
                                             check: a diverging step is seen too

and ``close(run)`` once when the loop ends, however it ends. By then ``run.outcome`` says how:
``"completed"``, ``"diverged"`` (``run.diverged_at`` holds the step) or ``"crashed"``; the run
record is still open, so an observer may still write events. ``run`` is one member of the
run (proxy/train/trainer.py's MemberRun: a standalone run has one), seen through
:class:`ObservedRun`: what an observer may read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

import torch
from torch import Tensor, nn

from proxy.config import Config
from proxy.train.distributed import DistInfo
from proxy.train.ledger import RunLedger
from proxy.train.remedies import Event, Remedy


class ObservedRun(Protocol):
    # read-only (properties): what an observer may read; only the loop changes the run
    @property
    def cfg(self) -> Config: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def dist(self) -> DistInfo: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def autocast(self) -> Callable[[], ContextManager]: ...

    @property
    def model(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def remedy(self) -> Optional[Remedy]: ...

    @property
    def source(self) -> Any: ...  # proxy.data.TokenSource

    @property
    def ledger(self) -> RunLedger: ...

    @property
    def data_position(self) -> int: ...  # the next train batch to read

    @property
    def lr(self) -> float: ...  # the base LR of the step in progress (the schedule times the peak LR)

    @property
    def loss_at_init(self) -> Optional[float]: ...

    @property
    def outcome(self) -> Optional[str]: ...  # None while the loop runs

    @property
    def diverged_at(self) -> Optional[int]: ...


class StepObserver:
    def on_batch(self, run: ObservedRun, step: int, inputs: Tensor, labels: Tensor) -> None:
        pass

    def on_step_end(self, run: ObservedRun, step: int, loss: float, grad_norm: float, event: Optional[Event]) -> None:
        pass

    def on_probe(self, run: ObservedRun, step: int, value: float) -> None:
        """probe/loss measured at the start of ``step`` (before its batch and update)."""
        pass

    def close(self, run: ObservedRun) -> None:
        pass
