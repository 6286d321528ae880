"""Spike capture: every spike the run's detector sees becomes a study kit on disk.

LLM360 released K2 checkpoints from before and during its loss spikes; PaLM found that
replaying the spiking batches from an earlier state did not spike again. Both need the same
thing: the state from a little before the spike and the batches that followed. With
``capture.enabled`` the trainer keeps them in memory and, when its own spike detector fires
(:class:`proxy.train.remedies.SpikeDetector` on the loss and/or the grad norm, or with
``capture.trigger=probe`` on ``probe/loss``, the loss of a fixed held-out sample where a loss
spike stands clear of batch noise), writes::

    <run_dir>/spike_kits/step_<N>/
        kit.json           trigger, value, threshold, the per-step trace (lr, loss, grad norm,
                           remedy events), later spikes, the run's config
        state_before.pt    model + optimizer + remedy + RNG state at the start of step N - K
        state_at.pt        ... at the start of step N (the spiking step, before its update)
        state_after.pt     ... at the start of step N + A (missing if the run ended first)
        batches.pt         inputs, labels, steps and data positions of steps N - K .. N + A - 1

Everything loads with ``torch.load(weights_only=True)``. Memory: a ring of K + 1 state copies
(K = ``capture.steps_before``), whose buffers are reused, oldest first. Disk: at most
``capture.max_kits`` kits. The run record gets a ``spike_kit`` event (step, path, trigger,
value, threshold). Capture only watches; the run goes on, or its remedy acts, as configured.
This module owns the kit format; proxy/forensics reads kits back, replays and dissects them.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from proxy.config import CaptureConfig, CaptureTrigger, SpikeBaseline, as_dict
from proxy.records import DIVERGED, KITS_DIR, SPIKE_KIT, output_dir, save_state, write_json
from proxy.train.observer import ObservedRun, StepObserver
from proxy.train.remedies import Event, SpikeDetector
from proxy.train.runtime import divergence_bound

log = logging.getLogger("proxy.train")

KIT_JSON = "kit.json"
BATCHES_FILE = "batches.pt"
STATE_FILES = {"before": "state_before.pt", "at": "state_at.pt", "after": "state_after.pt"}
KIT_FORMAT = 1
MAX_LATER_SPIKES = 100  # spikes listed in a kit.json after its own


def find_kits(path: str | Path) -> list[Path]:
    """Kit directories at ``path``: a kit itself, a run's spike_kits/ folder, or a run directory."""
    path = Path(path)
    if (path / KIT_JSON).is_file():
        return [path]
    root = path / KITS_DIR if (path / KITS_DIR).is_dir() else path
    return sorted(p.parent for p in root.glob(f"step_*/{KIT_JSON}"))


@dataclass
class _Snapshot:
    """The run's state at the start of ``step`` (CPU copies)."""

    step: int
    data_position: int
    state: dict[str, Any]  # model, optimizer, remedy, rng_cpu


@dataclass
class _Batch:
    step: int
    data_position: int
    inputs: Tensor
    labels: Tensor


@dataclass
class _OpenKit:
    """A kit written at the spike, waiting for its "after" state."""

    step: int
    after_step: int
    path: Path
    meta: dict[str, Any]
    batches: list[_Batch]


class SpikeCapture(StepObserver):
    """Keeps the recent states and batches; on a spike, writes them as a kit (see module doc).

    The run adds it when ``capture.enabled`` (``run.observers``). A kit is written in two
    goes so a spike that kills the run still leaves one: at the spike (before, at, the batches so
    far) and ``steps_after`` steps later (the after state, the remaining batches). Spikes while a
    kit is open, or once ``max_kits`` kits exist, are listed in the newest kit's ``later_spikes``.
    A step that never finished because the run diverged is captured at ``close`` with trigger
    ``diverged``. Under data parallelism only rank 0 captures, and its batches are its own shard.
    """

    def __init__(self, cfg: CaptureConfig):
        self.cfg = cfg
        self.detector = SpikeDetector.of(cfg.detector)
        self.states: deque[_Snapshot] = deque()
        self.batches: deque[_Batch] = deque(maxlen=cfg.steps_before + 1)
        self.trace: deque[dict[str, Any]] = deque(maxlen=cfg.steps_before + 1)
        self.open: Optional[_OpenKit] = None
        self.last_kit: Optional[Path] = None  # the newest kit and its kit.json contents
        self.last_meta: Optional[dict[str, Any]] = None
        self._later_dirty = False  # last_meta has later spikes not yet on disk
        self.kits_written: Optional[int] = None  # counted on first use (a resumed run has some)
        self._probe_spike: Optional[dict[str, Any]] = None  # trigger=probe: seen at a step's start
        self._last_step: Optional[int] = None
        self._armed_said: Optional[bool] = None  # None: nothing said yet

    # -- the observer hooks --------------------------------------------------------------------
    def on_batch(self, run: ObservedRun, step: int, inputs: Tensor, labels: Tensor) -> None:
        if not run.dist.is_main:
            return
        if self.kits_written is None:
            self.kits_written = len(find_kits(run.run_dir))
        if self._last_step is not None and step != self._last_step + 1:
            self._timeline_broke(run, step)  # a rollback (or resume) rewound the loop
        self._last_step = step
        if self.open is None and self.kits_written >= self.cfg.max_kits:
            return  # nothing more to capture: stop paying for copies
        snapshot = self._snapshot(run, step)
        batch = _Batch(
            step, run.data_position, inputs.detach().to("cpu", copy=True), labels.detach().to("cpu", copy=True)
        )
        self.batches.append(batch)
        if self.open is not None:
            if step == self.open.after_step:
                self._close_kit(snapshot, reason=None)
            else:
                self.open.batches.append(batch)

    def on_step_end(self, run: ObservedRun, step: int, loss: float, grad_norm: float, event: Optional[Event]) -> None:
        if not run.dist.is_main:
            return
        row = {
            "step": step,
            "lr": run.lr,
            "loss": loss,
            "grad_norm": grad_norm,
            "event": event.kind if event is not None else None,
        }
        self.trace.append(row)
        if self.open is not None:
            self.open.meta["trace"].append(row)
        if CaptureTrigger(self.cfg.trigger) == CaptureTrigger.probe:
            found_at_start, self._probe_spike = self._probe_spike, None
            if found_at_start is None:
                self._say_when_armed(step)
                return
            found = found_at_start  # the kit's step N: its start state (snapshotted in on_batch) shows it
        else:
            watched = self._watched(loss, grad_norm)
            spike = self.detector.test(*watched)
            if spike is None:
                self.detector.accept(*watched)
                self._say_when_armed(step)
                return
            found = {"step": step, "trigger": spike.trigger, "value": spike.value, "threshold": spike.threshold}
        if self._can_open():
            self._open_kit(run, found, event)
        else:
            self._note_later_spike(found)

    def on_probe(self, run: ObservedRun, step: int, value: float) -> None:
        """trigger=probe: test probe/loss (measured at the start of ``step``, before its batch); a
        spike opens its kit at this step's end, when the ring holds this step's start state."""
        if not run.dist.is_main or CaptureTrigger(self.cfg.trigger) != CaptureTrigger.probe:
            return
        spike = self.detector.test(value, None)
        if spike is None:
            self.detector.accept(value, None)
            return
        self._probe_spike = {"step": step, "trigger": "probe_loss", "value": spike.value, "threshold": spike.threshold}

    def _say_when_armed(self, step: int) -> None:
        """Log that capture is on but blind until the detector has its history, then when it sees."""
        watched = ["loss"] if CaptureTrigger(self.cfg.trigger) == CaptureTrigger.probe else list(self.detector.history)
        history = min(len(self.detector.history[name]) for name in watched)
        if self._armed_said is None:
            self._armed_said = False
            if history < self.cfg.detector.min_history:
                log.info(
                    "spike capture on: the detector needs %d accepted steps of history and cannot "
                    "fire before then (only a non-finite loss or grad norm is caught)",
                    self.cfg.detector.min_history,
                )
        if not self._armed_said and history >= self.cfg.detector.min_history:
            self._armed_said = True
            log.info(
                "spike capture armed at step %d (%s baseline, %g sigma)",
                step,
                SpikeBaseline(self.cfg.detector.baseline).value,
                self.cfg.detector.sigma,
            )

    def close(self, run: ObservedRun) -> None:
        if not run.dist.is_main:
            return
        step = run.diverged_at if run.outcome == DIVERGED else None
        captured = self.open is not None and self.open.step == step
        diverged = step is not None and step == self._last_step and not captured
        if diverged:  # the divergence check ended the run at a step the detector let pass
            held = self.batches[-1] if self.batches and self.batches[-1].step == step else None
            loss = _forward_loss(run, held) if held is not None else math.nan
            if self.trace and self.trace[-1]["step"] == step:
                self.trace.pop()  # replaced by the row that names the divergence
            found = {
                "step": step,
                "trigger": DIVERGED,
                "value": loss,
                "threshold": divergence_bound(run.cfg.train, run.loss_at_init),
            }
            row = {"step": step, "lr": run.lr, "loss": loss, "grad_norm": math.nan, "event": DIVERGED}
            self.trace.append(row)
            if self.open is not None:
                self.open.meta["trace"].append(row)
            if self._can_open():
                self._open_kit(run, found, None)
            else:
                self._note_later_spike(found)
        if self.open is not None:
            end = "diverged" if run.outcome == DIVERGED else "ended"
            self._close_kit(None, reason=f"the run {end} at step {self._last_step}, before step {self.open.after_step}")
        elif self._later_dirty:
            # only a spike noted in the newest kit's meta sets it: that kit was written
            assert self.last_kit is not None and self.last_meta is not None
            write_json(self.last_kit / KIT_JSON, self.last_meta)

    # -- internals ----------------------------------------------------------------------------
    def _can_open(self) -> bool:
        return (
            self.open is None
            and bool(self.states)
            and self.kits_written is not None
            and self.kits_written < self.cfg.max_kits
        )

    def _watched(self, loss: float, grad_norm: float) -> tuple[Optional[float], Optional[float]]:
        trigger = CaptureTrigger(self.cfg.trigger)
        return (
            loss if trigger != CaptureTrigger.grad_norm else None,
            grad_norm if trigger != CaptureTrigger.loss else None,
        )

    def _snapshot(self, run: ObservedRun, step: int) -> _Snapshot:
        """Copy the state at the start of ``step`` into the ring, reusing the evicted slot's buffers."""
        recycled = self.states.popleft().state if len(self.states) > self.cfg.steps_before else None
        live = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "remedy": run.remedy.state_dict() if run.remedy is not None else {},
            "rng_cpu": torch.get_rng_state(),
        }
        snapshot = _Snapshot(step, run.data_position, _copy_into(recycled, live))
        self.states.append(snapshot)
        return snapshot

    def _open_kit(self, run: ObservedRun, found: dict[str, Any], event: Optional[Event]) -> None:
        assert self.kits_written is not None  # called after _can_open(), which needs the count
        step = found["step"]
        path = output_dir(run.run_dir, KITS_DIR, f"step_{step:07d}", what="a spike kit")
        before, at = self.states[0], self.states[-1]
        meta = {
            "format": KIT_FORMAT,
            **found,
            "remedy_event": dict(event) if event is not None else None,
            "detector": {
                "baseline": SpikeBaseline(self.cfg.detector.baseline).value,
                "sigma": self.cfg.detector.sigma,
                "window": self.cfg.detector.window,
                "min_history": self.cfg.detector.min_history,
                "watching": CaptureTrigger(self.cfg.trigger).value,
            },
            "states": {"before": _state_meta(before), "at": _state_meta(at), "after": None},
            "trace": list(self.trace),
            "later_spikes": [],
            "complete": False,
            "incomplete_reason": f"waiting for step {step + self.cfg.steps_after}",
            "vocab_size": run.source.vocab_size,
            "loss_at_init": run.loss_at_init,
            "device": str(run.device),
            "world_size": run.dist.world_size,
            "torch": torch.__version__,
            "config": as_dict(run.cfg),
        }
        save_state(path / STATE_FILES["before"], before.state)
        save_state(path / STATE_FILES["at"], at.state)
        batches = [b for b in self.batches if b.step >= before.step]
        save_state(path / BATCHES_FILE, _stack_batches(batches))
        write_json(path / KIT_JSON, meta)
        self.open = _OpenKit(step, step + self.cfg.steps_after, path, meta, batches)
        self.kits_written += 1
        self.last_kit, self.last_meta, self._later_dirty = path, meta, False
        fields = {k: found[k] for k in ("trigger", "value", "threshold")}
        relative = path.relative_to(run.run_dir).as_posix()
        run.ledger.event(step, SPIKE_KIT, path=relative, **fields)

    def _close_kit(self, after: Optional[_Snapshot], reason: Optional[str]) -> None:
        kit, self.open = self.open, None
        assert kit is not None  # called only while a kit is open
        if after is not None:
            save_state(kit.path / STATE_FILES["after"], after.state)
            kit.meta["states"]["after"] = _state_meta(after)
        save_state(kit.path / BATCHES_FILE, _stack_batches(kit.batches))
        kit.meta["complete"] = after is not None
        kit.meta["incomplete_reason"] = reason
        write_json(kit.path / KIT_JSON, kit.meta)
        self._later_dirty = False

    def _note_later_spike(self, found: dict[str, Any]) -> None:
        """Listed in the newest kit's kit.json, written when that kit closes or at the end."""
        if self.last_meta is not None and len(self.last_meta["later_spikes"]) < MAX_LATER_SPIKES:
            self.last_meta["later_spikes"].append(found)
            self._later_dirty = self.open is None

    def _timeline_broke(self, run: ObservedRun, step: int) -> None:
        """The loop jumped (a rollback): states and batches held belong to another trajectory."""
        if self.open is not None:
            self._close_kit(None, reason=f"a rollback at step {self._last_step} rewound the run to step {step}")
        self.states.clear()
        self.batches.clear()
        self.trace.clear()


def _state_meta(snapshot: _Snapshot) -> dict[str, int]:
    return {"step": snapshot.step, "data_position": snapshot.data_position}


def _copy_into(old: Any, live: Any) -> Any:
    """A CPU deep copy of ``live``, writing into ``old``'s tensors where shape and dtype match,
    so the ring does not allocate a model's worth of memory every step."""
    if isinstance(live, Tensor):
        if isinstance(old, Tensor) and old.shape == live.shape and old.dtype == live.dtype:
            return old.copy_(live.detach())
        return live.detach().to("cpu", copy=True)
    if isinstance(live, dict):
        old = old if isinstance(old, dict) else {}
        return {k: _copy_into(old.get(k), v) for k, v in live.items()}
    if isinstance(live, (list, tuple)):
        old = old if isinstance(old, (list, tuple)) and len(old) == len(live) else [None] * len(live)
        return type(live)(_copy_into(o, v) for o, v in zip(old, live))
    return copy.deepcopy(live)


def _stack_batches(batches: Sequence[_Batch]) -> dict[str, Tensor]:
    return {
        "steps": torch.tensor([b.step for b in batches], dtype=torch.long),
        "data_positions": torch.tensor([b.data_position for b in batches], dtype=torch.long),
        "inputs": torch.stack([b.inputs for b in batches]),
        "labels": torch.stack([b.labels for b in batches]),
    }


@torch.no_grad()
def _forward_loss(run: ObservedRun, batch: _Batch) -> float:
    """The loss of the step that diverged (its weights were never updated)."""
    x, y = batch.inputs.to(run.device), batch.labels.to(run.device)
    with run.autocast():
        out = run.model(x, y, z_loss=run.cfg.loss.z_loss, ignore_index=run.cfg.loss.ignore_index)
    return float(out.ce_loss)


__all__ = ["BATCHES_FILE", "KIT_FORMAT", "KIT_JSON", "STATE_FILES", "SpikeCapture", "find_kits"]
