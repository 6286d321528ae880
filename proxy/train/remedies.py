"""Spike remedies: what the trainer does when the loss or the gradient norm jumps.

Each remedy looks at numbers the trainer already has and returns an :class:`Event` when it acts;
the trainer records it and obeys it (``event.skips_update``, ``event.rewinds``). The trainer
talks to every remedy through one interface, :class:`Remedy`; it never asks which remedy it has.
Three remedies, one per run (``remedy.kind``):

- :class:`SkipStep` (OLMo-core's SkipStepOptimizer, llm.c's z-score skip): drop the update when
  the loss or grad norm is a spike. Event kind ``skip_step``: do not call ``optimizer.step()``.
- :class:`Rollback` (PaLM §5.1, LLM360 K2): on a spike, go back to a snapshot (in memory or on
  disk) at least ``rollback_min_age`` steps old and skip ``rollback_skip_batches`` batches. Event kind
  ``rollback``: call :meth:`Rollback.restore` instead of stepping. When no snapshot is old enough
  or the rollback budget is spent it falls back to a ``skip_step`` event.
- :class:`ZClip` (Kumar et al. 2025): clip the gradients of outlier steps to an adaptive bound
  from an EMA of the grad-norm mean and variance. Event kind ``zclip``: the update goes ahead
  with the clipped gradients.

Rollback takes plain floats (or 0-dim tensors, read once with ``float``): one host sync per
step, which the loop then pays to watch the loss. Skip-step and ZClip decide on the device
(``decides_on_device``): between the loop's read-backs each judges every step with
:meth:`Remedy.defer` and hands its events over with :meth:`Remedy.settle` (proxy/train/watch.py
does the same for the divergence rule). Skip-step's ``defer`` returns the step's skip as a device
flag, which the optimizer obeys without reading it (proxy.optim.AdamW.step(skip=...)).

Order in the loop (proxy/train/step.py and trainer.py)::

    remedy.before_step(step, model, optimizer, data_position, extra)    # rollback: snapshot
    grad_norm = clip_grad_norm(params, remedy.clip_threshold(cfg.optim.grad_clip))
    event = remedy.after_backward(step, loss, grad_norm, params, data_position)
    optimizer.step() unless event.skips_update
    if event.rewinds: restored = remedy.restore(model, optimizer)       # rollback
"""

from __future__ import annotations

import copy
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union, overload

import numpy as np
import torch
from torch import Tensor, nn

from proxy.config import RemedyConfig, RemedyKind, SnapshotStorage
from proxy.optim import HasGrad, scale_grads
from proxy.records import ROLLBACK, SKIP_STEP, STATE_NAME, ZCLIP, UnsafePathError, confined, load_state, save_state
from proxy.spikes import Number, Spike, SpikeDetector
from proxy.train.device_detector import DeviceSpikeDetector
from proxy.train.lanes import MemberLanes
from proxy.train.runtime import to_device, values_on


# --------------------------------------------------------------------------------------------
# Events and the interface
# --------------------------------------------------------------------------------------------
class Event(Mapping):
    """The record of one action: ``step``, ``kind`` (a proxy.records event kind), ``trigger``
    (the series that spiked), ``value``, ``threshold`` and the remedy's own fields. Reads like the
    event row it becomes (``event["restore_step"]``); says what the loop must do."""

    __slots__ = ("_fields",)

    def __init__(self, step: int, kind: str, trigger: str, value: float, threshold: float, **extra: Any):
        self._fields = {
            "step": int(step),
            "kind": kind,
            "trigger": trigger,
            "value": float(value),
            "threshold": float(threshold),
            **extra,
        }

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Event({self._fields!r})"

    @property
    def step(self) -> int:
        return self._fields["step"]

    @property
    def kind(self) -> str:
        return self._fields["kind"]

    @property
    def skips_update(self) -> bool:
        """The optimizer must not apply this step's gradients."""
        return self.kind in (SKIP_STEP, ROLLBACK)

    @property
    def rewinds(self) -> bool:
        """The loop must call :meth:`Remedy.restore` and go on from the state it returns."""
        return self.kind == ROLLBACK

    def record_fields(self) -> dict[str, Any]:
        """What the event row holds beside its step and kind."""
        return {k: v for k, v in self._fields.items() if k not in ("step", "kind")}


def make_event(step: int, kind: str, trigger: str, value: float, threshold: float, **extra: Any) -> Event:
    return Event(step, kind, trigger, value, threshold, **extra)


@dataclass
class Restored:
    """What :meth:`Remedy.restore` hands back: continue the loop at ``step`` reading batch
    ``data_position``; ``extra_state`` is the caller's own state as it was at the snapshot."""

    step: int
    data_position: int
    extra_state: Any


@dataclass(frozen=True)
class SweepStep:
    """One step of a sweep's K members as their remedies judge it: ``losses`` and ``grad_norms``
    ``(K,)`` on the device, ``grads`` the member-stacked gradients ``(K, ...)``, ``member_params(k)``
    member k's gradients as a model's parameters, ``active`` the members still training."""

    step: int
    losses: Tensor
    grad_norms: Tensor
    grads: Sequence[Tensor]
    member_params: Callable[[int], Iterable[HasGrad]]
    active: Sequence[bool]


class Remedy(ABC):
    """What the trainer asks of a remedy, in the order of one step (see the module doc)."""

    def before_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, data_position: int, extra_state: Any = None
    ) -> None:
        """At the start of ``step``, before its batch is drawn (most remedies: nothing)."""
        return None

    def clip_threshold(self, grad_clip: float) -> float:
        """The fixed clipping applied before :meth:`after_backward` sees the grad norm."""
        return grad_clip

    # A remedy that decides on the device (skip-step, ZClip) judges a step without reading it
    # back: the loop calls defer() on every step and settle() when it next reads.
    decides_on_device: bool = False
    # the device state of a remedy that decides there, as lane k of MemberLanes (proxy/train/lanes.py):
    # a sweep's members share one; a run's remedy holds one lane of its own (_own_lane)
    _lane: Optional[tuple[MemberLanes, int]] = None
    _own_lane: bool = False

    def _solo_lane(self, device: torch.device, build: Callable[[], Any]) -> MemberLanes:
        """This remedy's own one-lane state on ``device`` (``build()`` makes it from the stored
        state); refused for a sweep member, whose steps its sweep judges (defer_members)."""
        if self._lane is not None and not self._own_lane:
            raise RuntimeError(f"{type(self).__name__}.defer: a sweep member's steps are judged with its sweep")
        if self._lane is None or self._lane[0].state.device != device:
            self._lane, self._own_lane = (MemberLanes(build(), 1), 0), True
        return self._lane[0]

    def _read_lane(self) -> list[tuple[int, list[float]]]:
        """The verdicts of this remedy's steps since its last settle (one read of the device)."""
        return self._lane[0].read(self._lane[1]) if self._lane is not None else []

    def _check_settled(self, what: str) -> None:
        if self._lane is not None and self._lane[0].pending(self._lane[1]):
            raise RuntimeError(f"{type(self).__name__}.{what}: steps judged on the device are not settled yet")

    def defer(
        self, step: int, loss: Optional[Tensor], grad_norm: Tensor, params: Iterable[HasGrad]
    ) -> Optional[Tensor]:
        """Judge ``step`` from device tensors (``loss``: the rank-mean cross-entropy, 0-dim) without
        waiting for the device. Returns a 0-dim bool on the device if the step's update must be
        left out (skip-step), else None: the update goes ahead."""
        raise NotImplementedError(f"{type(self).__name__} decides on the host: it reads every step")

    def settle(self) -> list[Event]:
        """The events of the steps judged with :meth:`defer` since the last settle, in step order."""
        return []

    def settle_step(self, step: int) -> Optional[Event]:
        """The event of ``step``, the one step judged since the last settle (a step read at once)."""
        events = self.settle()
        if any(e.step != step for e in events):
            raise RuntimeError(f"{type(self).__name__}: step {step} read while earlier deferred steps were not settled")
        return events[0] if events else None

    @classmethod
    def defer_members(cls, remedies: Sequence[Optional[Remedy]], at: SweepStep) -> list[Optional[Tensor]]:
        """:meth:`defer` for each active member of a sweep at step ``at``: each member's skip flag or
        None. A remedy may judge the members together as lanes of one state
        (proxy/train/lanes.py: skip-step's detector, ZClip's statistics)."""
        return [
            r.defer(at.step, at.losses[k], at.grad_norms[k], at.member_params(k))
            if r is not None and at.active[k]
            else None
            for k, r in enumerate(remedies)
        ]

    @abstractmethod
    def after_backward(
        self, step: int, loss: Number, grad_norm: Number, params: Sequence[HasGrad], data_position: Optional[int] = None
    ) -> Optional[Event]:
        """The step's numbers (grad norm before any clipping by the remedy, ``data_position`` the
        next unread batch); an event if the remedy acts, else None."""

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Restored:
        """After an event that rewinds: put the earlier state back."""
        raise RuntimeError(f"{type(self).__name__} never rewinds")

    def close(self) -> None:
        """The run has ended: release what the remedy holds (files, memory), if anything."""
        return None

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------
# Spike detection (shared by skip-step and rollback)
# --------------------------------------------------------------------------------------------
def _detector(cfg: RemedyConfig) -> SpikeDetector:
    return SpikeDetector.of(cfg.detector)


# --------------------------------------------------------------------------------------------
# Skip-step
# --------------------------------------------------------------------------------------------
class SkipStep(Remedy):
    """Skip the optimizer update on a spike (OLMo-core SkipStepOptimizer: 6 sigma over 128).

    The skipped step still counts: the schedule and the data move on, the weights and the
    optimizer state (moments, step count) stay as they were.

    Decided on the device (issue 29): the one spike definition's rule (proxy/spikes.py) judged by
    :class:`proxy.train.device_detector.DeviceSpikeDetector`, the skip handed to the optimizer as
    a device flag, each step's verdict kept as a row that :meth:`settle` reads back with the
    loop's next read-back. :meth:`check` judges host numbers and reads its event at once.
    """

    decides_on_device = True

    def __init__(self, cfg: RemedyConfig):
        SpikeDetector.of(cfg.detector)  # a bad detector is refused when the run is built
        self.detector_cfg = cfg.detector
        self.skipped = 0  # skip events settled so far
        self._stored: dict[str, Any] = {"loss": [], "grad_norm": []}  # the history, until a device is known

    def after_backward(
        self, step: int, loss: Number, grad_norm: Number, params: Sequence[HasGrad], data_position: Optional[int] = None
    ) -> Optional[Event]:
        return self.check(step, loss, grad_norm)

    def check(self, step: int, loss: Optional[Number], grad_norm: Optional[Number]) -> Optional[Event]:
        """A ``skip_step`` event if this step must not be applied; else None (and remember it).
        Reads the device back: steps judged with :meth:`defer` must be settled first."""
        self._check_settled("check")
        if grad_norm is None:
            raise ValueError("SkipStep.check: the grad norm is judged too")
        device = grad_norm.device if isinstance(grad_norm, Tensor) else None
        self.defer(step, _as_tensor(loss, device), _as_tensor(grad_norm, device), [])
        return self.settle_step(step)

    @classmethod
    def defer_members(cls, remedies: Sequence[Optional[Remedy]], at: SweepStep) -> list[Optional[Tensor]]:
        """The members judged together: one detector with a lane per member (one set of small
        kernels per step, not one per member), each member's verdicts read back with its settle."""

        def build(members: list[Optional[SkipStep]]) -> DeviceSpikeDetector:
            first = next(m for m in members if m is not None)
            detector = DeviceSpikeDetector(first.detector_cfg, len(members), at.losses.device)
            for k, member in enumerate(members):
                if member is not None:
                    detector.load_state_dict(k, member.state_dict()["detector"])
            return detector

        lanes = _lanes_of(remedies, SkipStep, lambda r: r.detector_cfg, build)
        if lanes is None:
            return super().defer_members(remedies, at)
        live = values_on([a and r is not None for a, r in zip(at.active, remedies)], at.losses.device)
        judged = lanes.state.observe(at.losses, at.grad_norms, live)
        lanes.add(at.step, live, *judged)
        return [judged.spike[k] if r is not None and at.active[k] else None for k, r in enumerate(remedies)]

    def defer(self, step: int, loss: Optional[Tensor], grad_norm: Tensor, params: Iterable[HasGrad]) -> Tensor:
        """Judge ``step`` on the device; returns its skip flag (0-dim bool). Nothing is read back."""
        if loss is None:
            raise ValueError("SkipStep.defer: the loss is judged too")

        def build() -> DeviceSpikeDetector:
            detector = DeviceSpikeDetector(self.detector_cfg, 1, grad_norm.device)
            detector.load_state_dict(0, self.state_dict()["detector"])
            return detector

        lanes = self._solo_lane(grad_norm.device, build)
        judged = lanes.state.observe(loss.reshape(1), grad_norm.reshape(1))
        lanes.add(step, torch.ones_like(judged.spike), *judged)
        return judged.spike[0]

    def settle(self) -> list[Event]:
        """The ``skip_step`` events of the steps judged since the last settle, in step order (one read)."""
        events = []
        for step, (spike, trigger, value, bar) in self._read_lane():
            if spike:
                self.skipped += 1
                series = SpikeDetector.SERIES[int(trigger)]
                events.append(make_event(step, SKIP_STEP, series, value, bar, skipped=self.skipped))
        return events

    @property
    def detector(self) -> SpikeDetector:
        """The history so far in the one spike definition's detector (a copy; reads the device)."""
        detector = SpikeDetector.of(self.detector_cfg)
        detector.load_state_dict(self.state_dict()["detector"])
        return detector

    def state_dict(self) -> dict[str, Any]:
        self._check_settled("state_dict")
        history = self._lane[0].state.state_dict(self._lane[1]) if self._lane is not None else self._stored
        return {"detector": {k: list(v) for k, v in history.items()}, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stored = {name: list(state["detector"].get(name, [])) for name in SpikeDetector.SERIES}
        if self._lane is not None:
            lanes, k = self._lane
            lanes.state.load_state_dict(k, self._stored)
            lanes.forget(k)
        self.skipped = int(state["skipped"])


def _lanes_of(
    remedies: Sequence[Optional[Remedy]], kind: type, same: Callable[[Any], Any], build: Callable[[list[Any]], Any]
) -> Optional[MemberLanes]:
    """The lanes a sweep's remedies of ``kind`` share (built at their first step by ``build`` from
    the members, None for a member without a remedy), or None where they cannot share one: another
    kind among them, or settings (``same``) that differ."""
    members = [r for r in remedies if r is not None]
    if not members or not all(isinstance(r, kind) for r in members):
        return None
    built = {id(r._lane[0]) if r._lane is not None and not r._own_lane else None for r in members}
    if built != {None}:  # built at an earlier step: every member must be in it
        lane = members[0]._lane
        return lane[0] if len(built) == 1 and lane is not None else None
    if any(same(r) != same(members[0]) for r in members):
        return None
    lanes = MemberLanes(build(list(remedies)), len(remedies))
    for k, r in enumerate(remedies):
        if r is not None:
            r._lane, r._own_lane = (lanes, k), False
    return lanes


@overload
def _as_tensor(value: None, device: Optional[torch.device]) -> None: ...


@overload
def _as_tensor(value: Number, device: Optional[torch.device]) -> Tensor: ...


def _as_tensor(value: Optional[Number], device: Optional[torch.device]) -> Optional[Tensor]:
    """A host number (or a 0-dim tensor) as a float64 0-dim tensor on ``device``."""
    if value is None or isinstance(value, Tensor):
        return value
    return torch.tensor(float(value), dtype=torch.float64, device=device)


# --------------------------------------------------------------------------------------------
# Rollback and skip data
# --------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """Everything the loop needs to redo training from the *start* of ``step``.

    ``state`` holds the model, optimizer, RNG and caller's states (CPU copies) in memory; with
    disk storage it is None and ``path`` names the file that holds them.
    """

    step: int
    data_position: int  # index of the next train batch to read after restoring
    state: Optional[dict[str, Any]] = None
    path: Optional[Path] = None

    def load(self) -> dict[str, Any]:
        if self.state is not None:
            return self.state
        # a file on disk is untrusted like every other: tensors and plain containers only (the
        # RNG states are stored as such, see _rng_state)
        assert self.path is not None  # a snapshot holds its state in memory or names its file
        return load_state(self.path)


class Rollback(Remedy):
    """PaLM-style rollback: restore an earlier state and skip the batches around the spike.

    Semantics, with e = ``rollback_every``, R = ``rollback_min_age``, S = ``rollback_skip_batches``:

    - ``maybe_snapshot(step, ...)`` at the start of every step (before the batch is drawn) copies
      the model, optimizer, data position, the global RNGs, the spike detector's history and
      ``extra_state`` to CPU memory, or
      to ``<directory>/step_*.pt`` with ``rollback_storage=disk``, when ``step % e == 0``; the
      last ``rollback_keep`` snapshots are kept (older files are deleted).
    - ``check(step, loss, grad_norm, data_position)`` after the backward pass, with the position
      of the next unread batch: on a spike it picks the newest snapshot from step <= step - R and
      returns a ``rollback`` event; the step must not be applied. Without such a snapshot, or
      after ``rollback_max`` rollbacks, it returns ``skip_step``.
    - ``restore(model, optimizer)`` copies the snapshot back (bitwise; the same tensors are kept,
      so references to the parameters stay valid), drops the newer snapshots, and returns the
      snapshot's step and the data position to go on from: the snapshot's position + S, but never
      a batch before ``data_position`` of the spiking step. The data stream only moves forward:
      no batch read on an abandoned branch is read again, however far back a later rollback goes.

    Disk snapshots outlive the process: :meth:`state_dict` lists them, so a resumed run can still
    roll back to a snapshot taken before the checkpoint. :meth:`close` deletes them.
    """

    def __init__(self, cfg: RemedyConfig, directory: Optional[Union[str, Path]] = None):
        self.every, self.min_age = cfg.rollback_every, cfg.rollback_min_age
        self.skip_batches, self.max_rollbacks = cfg.rollback_skip_batches, cfg.rollback_max
        self.on_disk = SnapshotStorage(cfg.rollback_storage) == SnapshotStorage.disk
        if self.on_disk and directory is None:
            raise ValueError("Rollback: rollback_storage=disk needs a directory for the snapshots")
        self.directory = Path(directory) if directory is not None else None
        self.keep = cfg.rollback_keep
        self.detector = _detector(cfg)
        self.snapshots: deque[Snapshot] = deque()
        self.rollbacks = 0
        self.skipped = 0
        self._pending: Optional[tuple[Snapshot, int]] = None  # (target, data position to go on from)

    def before_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, data_position: int, extra_state: Any = None
    ) -> None:
        self.maybe_snapshot(step, model, optimizer, data_position, extra_state)

    def after_backward(
        self, step: int, loss: Number, grad_norm: Number, params: Sequence[HasGrad], data_position: Optional[int] = None
    ) -> Optional[Event]:
        return self.check(step, loss, grad_norm, data_position)

    def maybe_snapshot(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, data_position: int, extra_state: Any = None
    ) -> bool:
        """Snapshot the state at the start of ``step`` if it is due; True when one was taken."""
        if step % self.every or (self.snapshots and self.snapshots[-1].step >= step):
            return False  # not due, or already held (the loop came back here after a restore)
        state = {
            "model": _copy_tensors(model.state_dict(), "cpu"),
            "optimizer": _copy_tensors(optimizer.state_dict(), "cpu"),
            "rng": _rng_state(),
            "extra": copy.deepcopy(extra_state),
            # the spike detector goes back too: replayed steps are judged against the history
            # before the snapshot, not against the later (lower-loss) steps of the abandoned branch
            "detector": self.detector.state_dict(),
        }
        snap = Snapshot(step=step, data_position=int(data_position))
        if self.on_disk:
            assert self.directory is not None  # __init__ refuses disk storage without a directory
            self.directory.mkdir(parents=True, exist_ok=True)
            snap.path = self.directory / f"step_{step:07d}.pt"
            save_state(snap.path, state)  # atomic: a crash mid-write leaves no torn snapshot behind
        else:
            snap.state = state
        self.snapshots.append(snap)
        while len(self.snapshots) > self.keep:
            self._discard(self.snapshots.popleft())
        return True

    def check(
        self, step: int, loss: Optional[Number], grad_norm: Optional[Number], data_position: Optional[int] = None
    ) -> Optional[Event]:
        """A ``rollback`` event (then call :meth:`restore`), a ``skip_step`` event, or None.

        ``data_position``: the next unread batch (the spiking batch's index + 1), below which a
        rollback never resumes.
        """
        spike = self.detector.test(loss, grad_norm)
        if spike is None:
            self.detector.accept(loss, grad_norm)
            return None
        target = next((s for s in reversed(self.snapshots) if s.step <= step - self.min_age), None)
        if target is None or self.rollbacks >= self.max_rollbacks:
            self.skipped += 1
            reason = "no snapshot old enough" if target is None else "rollback budget spent"
            return make_event(step, SKIP_STEP, spike.trigger, spike.value, spike.threshold, reason=reason)
        resume_at = target.data_position + self.skip_batches
        if data_position is not None:
            resume_at = max(resume_at, int(data_position))
        self._pending = (target, resume_at)
        return make_event(
            step,
            ROLLBACK,
            spike.trigger,
            spike.value,
            spike.threshold,
            restore_step=target.step,
            data_position=resume_at,
            rollbacks=self.rollbacks + 1,
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Restored:
        """Put the snapshot chosen by the last ``rollback`` event back into model and optimizer."""
        if self._pending is None:
            raise RuntimeError("Rollback.restore: nothing to restore; check() gave no rollback")
        (snap, resume_at), self._pending = self._pending, None
        state = snap.load()
        model.load_state_dict(state["model"])  # copy_ into the live tensors
        # load_state_dict may alias same-device tensors: hand it copies, keep the snapshot intact
        optimizer.load_state_dict(_copy_tensors(state["optimizer"], "cpu"))
        _set_rng_state(state["rng"])
        self.detector.load_state_dict(state["detector"])
        while self.snapshots and self.snapshots[-1].step > snap.step:
            self._discard(self.snapshots.pop())  # taken on the abandoned trajectory
        snap.data_position = resume_at  # rolling back here again skips further still
        self.rollbacks += 1
        return Restored(step=snap.step, data_position=resume_at, extra_state=copy.deepcopy(state["extra"]))

    def _discard(self, snap: Snapshot) -> None:
        if snap.path is not None:
            snap.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete the disk snapshots (the run is over); memory snapshots are just dropped."""
        while self.snapshots:
            self._discard(self.snapshots.pop())
        if self.directory is not None and self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def state_dict(self) -> dict[str, Any]:
        """Counters, detector history and, on disk, the snapshot files for a checkpoint (memory
        snapshots are not saved: a resumed run takes new ones)."""
        listed = [
            {"step": s.step, "data_position": s.data_position, "file": s.path.name}
            for s in self.snapshots
            if s.path is not None
        ]
        return {
            "detector": self.detector.state_dict(),
            "rollbacks": self.rollbacks,
            "skipped": self.skipped,
            "snapshots": listed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters, detector and the disk snapshots a checkpoint lists. The list comes from a
        file: each entry must be a snapshot file name (``step_XXXXXXX.pt``) inside this run's
        snapshot folder, or the whole state is refused (UnsafePathError) before anything is
        touched: a checkpoint must not be able to point the cleanup at another file."""
        listed = []
        if self.on_disk:
            assert self.directory is not None  # __init__ refuses disk storage without a directory
            if self.directory.is_symlink():
                raise UnsafePathError(f"{self.directory} is a link; snapshots live in a real folder of the run dir")
            for item in state.get("snapshots", []):
                name = str(item["file"])
                if not STATE_NAME.fullmatch(name):
                    raise UnsafePathError(f"rollback snapshot {name!r} is not a snapshot file name (step_XXXXXXX.pt)")
                path = confined(self.directory, name)
                if path.is_file():
                    listed.append(Snapshot(int(item["step"]), int(item["data_position"]), path=path))
        self.detector.load_state_dict(state["detector"])
        self.rollbacks, self.skipped = int(state["rollbacks"]), int(state["skipped"])
        self.snapshots.clear()
        self.snapshots.extend(listed)


def _copy_tensors(obj: Any, device: str) -> Any:
    """A deep copy of a (nested) state dict with every tensor cloned onto ``device``."""
    if isinstance(obj, Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _copy_tensors(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(v, device) for v in obj)
    return copy.deepcopy(obj)


def _rng_state() -> dict[str, Any]:
    """The global RNGs as tensors and plain containers (so a disk snapshot loads weights-only):
    Python's state is a tuple of ints, NumPy's key array becomes a tensor."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy_state = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state["numpy"] = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    key = np.asarray(numpy_state["state"]["key"].numpy(), dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})


# --------------------------------------------------------------------------------------------
# ZClip
# --------------------------------------------------------------------------------------------
class ZClip(Remedy):
    """Z-score adaptive gradient clipping (Kumar et al. 2025, arXiv 2504.02507).

    Keeps an exponential moving average of the grad norm's mean ``mu`` and variance ``var``
    (weight ``alpha`` on the past), started from the plain mean and variance of the first
    ``warmup_steps`` norms. With ``z = (g - mu) / (std + eps)``, a step with ``z > z_threshold``
    is clipped to the paper's reciprocal bound::

        g* = mu + (z_threshold**2 / z) * std        (= mu + z_threshold * std at z = z_threshold)

    so the further out the spike, the harder the clip, and the bound is continuous at the
    threshold. The statistics are then updated with ``g*``, not ``g``, so a spike does not
    inflate the bound for the steps after it. ``max_norm`` > 0 is a fixed cap applied on top
    (``optim.grad_clip``), also during warmup. A non-finite norm is left alone (no statistics
    update, no event): clipping cannot repair it, and the trainer's divergence check sees it.

    Decided on the device (issue 29): the statistics are float64 tensors beside the gradients,
    the clip is a multiplication by a device factor (1 where nothing is clipped: exact), and each
    step's test is kept as a row that :meth:`settle` reads back with the loop's next read-back.
    :meth:`defer` judges a step without waiting for the device; :meth:`clip` judges it and reads
    its event at once.
    """

    decides_on_device = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float = 0.0,
        eps: float = 1e-6,
    ):
        if not 0.0 < alpha < 1.0 or z_threshold <= 0 or warmup_steps < 0 or max_norm < 0:
            raise ValueError(
                "ZClip: need 0 < alpha < 1, z_threshold > 0, warmup_steps >= 0, max_norm >= 0; "
                f"got alpha={alpha}, z_threshold={z_threshold}, warmup_steps={warmup_steps}, "
                f"max_norm={max_norm}"
            )
        self.alpha, self.z_threshold, self.warmup_steps = alpha, z_threshold, warmup_steps
        self.max_norm, self.eps = max_norm, eps
        self._stored: dict[str, Any] = {"warmup_norms": [], "mean": None, "var": None}  # until a device is known

    @classmethod
    def from_config(cls, cfg: RemedyConfig, max_norm: float = 0.0) -> "ZClip":
        return cls(cfg.zclip_alpha, cfg.zclip_z, cfg.zclip_warmup, max_norm)

    def clip_threshold(self, grad_clip: float) -> float:
        return 0.0  # ZClip sees the raw norm; optim.grad_clip is its fixed cap (max_norm)

    def after_backward(
        self, step: int, loss: Number, grad_norm: Number, params: Sequence[HasGrad], data_position: Optional[int] = None
    ) -> Optional[Event]:
        return self.clip(params, grad_norm, step)

    def clip(self, params: Iterable[HasGrad], grad_norm: Number, step: int) -> Optional[Event]:
        """Clip the gradients of ``params`` (whose global norm is ``grad_norm``) if needed.

        Returns a ``zclip`` event when the z-score test fired (not for the fixed cap alone).
        Reads the device back: steps judged with :meth:`defer` must be settled first.
        """
        params = list(params)
        if not isinstance(grad_norm, Tensor):
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.tensor(float(grad_norm), dtype=torch.float64, device=grads[0].device if grads else None)
        self._check_settled("clip")
        self.defer(step, None, grad_norm, params)
        return self.settle_step(step)

    def defer(self, step: int, loss: Optional[Tensor], grad_norm: Tensor, params: Iterable[HasGrad]) -> None:
        """Judge ``step`` and clip on the device; nothing is read back (see :meth:`settle`)."""

        def build() -> ZClipState:
            state = ZClipState(self.warmup_steps, 1, grad_norm.device)
            state.load(0, self.state_dict())
            return state

        lanes = self._solo_lane(grad_norm.device, build)
        factor, row = self._judge(lanes.state, grad_norm.reshape(1), None)
        scale_grads(params, factor[0])  # x * 1 is x: an unclipped step is untouched
        lanes.add(step, torch.ones_like(row[0]), *row)

    @classmethod
    def defer_members(cls, remedies: Sequence[Optional[Remedy]], at: SweepStep) -> list[Optional[Tensor]]:
        """The members judged together: their statistics in lanes of one state, each member's
        gradients clipped by its own factor in one multiplication per stacked tensor."""

        def build(members: list[Optional[ZClip]]) -> ZClipState:
            first = next(m for m in members if m is not None)
            state = ZClipState(first.warmup_steps, len(members), at.grad_norms.device)
            for k, member in enumerate(members):
                if member is not None:
                    state.load(k, member.state_dict())
            return state

        same = lambda r: (r.alpha, r.z_threshold, r.warmup_steps, r.max_norm, r.eps)  # noqa: E731
        lanes = _lanes_of(remedies, ZClip, same, build)
        if lanes is None:
            return super().defer_members(remedies, at)
        first = next(r for r in remedies if isinstance(r, ZClip))
        live = values_on([a and r is not None for a, r in zip(at.active, remedies)], at.grad_norms.device)
        factor, row = first._judge(lanes.state, at.grad_norms, live)
        for g in at.grads:  # member k's gradients times its factor (1 where nothing is clipped: exact)
            g.mul_(factor.to(g.dtype).view(-1, *([1] * (g.ndim - 1))))
        lanes.add(at.step, live, *row)
        return [None] * len(remedies)

    def _judge(self, t: ZClipState, norms: Tensor, live: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One step of each lane of ``t``: its clip factor and its verdict row (fired, norm, the
        threshold, z, the clip target, ready). A lane not ``live`` is left as it was. No sync."""
        norm = norms.detach().to(torch.float64)
        finite = torch.isfinite(norm) if live is None else torch.isfinite(norm) & live
        ready = t.ready
        if t.warmed_up:  # known from a read-back (ready stays true): the warmup's work is over
            now_ready, warm_mean, warm_var = torch.zeros_like(ready), t.mean, t.var
        else:  # warmup: the first max(1, warmup_steps) finite norms, then their plain mean and variance
            n_warm = t.warm.shape[-1]
            warming = finite & ~ready
            slot = t.count.clamp(max=n_warm - 1)[:, None]
            t.warm.scatter_(1, slot, torch.where(warming, norm, t.warm.gather(1, slot)[:, 0])[:, None])
            t.count += warming.long()
            now_ready = warming & (t.count >= n_warm)
            warm_mean = t.warm.sum(-1) / n_warm
            warm_var = ((t.warm - warm_mean[:, None]) ** 2).sum(-1) / n_warm
        # the z-score test, on statistics that were ready before this step
        mean, var = t.mean, t.var
        std = var.sqrt()
        z = (norm - mean) / (std + self.eps)
        fired = ready & finite & (z > self.z_threshold)
        target = torch.where(fired, mean + (self.z_threshold**2 / z) * std, norm)
        # exponentially weighted mean and variance, updated together (Finch 2009), with g*
        diff = target - mean
        moving = ready & finite
        t.mean = torch.where(moving, mean + (1 - self.alpha) * diff, torch.where(now_ready, warm_mean, mean))
        t.var = torch.where(
            moving, self.alpha * (var + (1 - self.alpha) * diff * diff), torch.where(now_ready, warm_var, var)
        )
        t.ready = ready | now_ready
        bound = torch.clamp(target, max=self.max_norm) if self.max_norm > 0 else target
        factor = torch.where(finite & (bound < norm), bound / norm, torch.ones_like(norm))
        threshold = mean + self.z_threshold * std
        return factor, (fired, norm, threshold, z, target, t.ready)

    def settle(self) -> list[Event]:
        """The ``zclip`` events of the steps judged since the last settle, in step order (one read)."""
        rows = self._read_lane()
        if rows and self._lane is not None:
            lanes, k = self._lane
            lanes.state.known_ready[k] = lanes.state.known_ready[k] or bool(rows[-1][1][5])
        return [
            make_event(step, ZCLIP, "grad_norm", norm, threshold, z=z, clipped_to=target)
            for step, (fired, norm, threshold, z, target, _) in rows
            if fired
        ]

    # the state as numbers (each reads the device): the warmup's norms so far, then the statistics
    @property
    def warmup_norms(self) -> list[float]:
        return self.state_dict()["warmup_norms"]

    @property
    def mean(self) -> Optional[float]:
        return self.state_dict()["mean"]

    @property
    def var(self) -> Optional[float]:
        return self.state_dict()["var"]

    def state_dict(self) -> dict[str, Any]:
        if self._lane is not None:
            return self._lane[0].state.dump(self._lane[1])
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._stored.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stored = {"warmup_norms": list(state["warmup_norms"]), "mean": state["mean"], "var": state["var"]}
        if self._lane is not None:
            lanes, k = self._lane
            lanes.state.load(k, self._stored)
            lanes.forget(k)


class ZClipState:
    """ZClip's statistics for ``n`` lanes (one run, or a sweep's members) as device tensors: the
    warmup's norms ``warm (n, max(1, warmup))`` and their ``count``, whether the statistics are
    ``ready``, the EMA ``mean`` and ``var``; ``known_ready`` what the host last read back of
    each lane: once every lane is known ready (``warmed_up``) the warmup's work is skipped."""

    def __init__(self, warmup_steps: int, n: int, device: torch.device):
        self.device = device
        self.warm = torch.zeros(n, max(1, warmup_steps), dtype=torch.float64, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.ready = torch.zeros(n, dtype=torch.bool, device=device)
        self.mean = torch.zeros(n, dtype=torch.float64, device=device)
        self.var = torch.zeros(n, dtype=torch.float64, device=device)
        self.known_ready = [False] * n

    @property
    def warmed_up(self) -> bool:
        return all(self.known_ready)

    def load(self, k: int, stored: dict[str, Any]) -> None:
        """Lane ``k`` from ZClip's state format."""
        done = list(stored["warmup_norms"])[: self.warm.shape[1]]
        self.warm[k].zero_()
        if done:
            self.warm[k, : len(done)] = to_device(torch.tensor(done, dtype=torch.float64), self.device)  # no wait
        self.count[k] = len(done)
        ready = stored["mean"] is not None
        self.ready[k] = ready
        self.mean[k] = float(stored["mean"]) if ready else 0.0
        self.var[k] = float(stored["var"]) if ready else 0.0
        self.known_ready[k] = ready

    def dump(self, k: int) -> dict[str, Any]:
        """Lane ``k`` in ZClip's state format (reads the device)."""
        if bool(self.ready[k]):
            return {"warmup_norms": [], "mean": float(self.mean[k]), "var": float(self.var[k])}
        return {"warmup_norms": self.warm[k, : int(self.count[k])].tolist(), "mean": None, "var": None}


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def build_remedy(
    cfg: RemedyConfig, grad_clip: float = 0.0, snapshot_dir: Optional[Union[str, Path]] = None
) -> Optional[Remedy]:
    """The remedy ``cfg.kind`` names, or None. ``grad_clip`` is ZClip's fixed cap;
    ``snapshot_dir`` holds a rollback's disk snapshots (the trainer: ``<run_dir>/rollback``)."""
    kind = RemedyKind(cfg.kind)
    if kind == RemedyKind.skip_step:
        return SkipStep(cfg)
    if kind == RemedyKind.rollback:
        return Rollback(cfg, snapshot_dir)
    if kind == RemedyKind.zclip:
        return ZClip.from_config(cfg, max_norm=grad_clip)
    return None


__all__ = [
    "Event",
    "Remedy",
    "Restored",
    "Rollback",
    "SkipStep",
    "Snapshot",
    "Spike",
    "SpikeDetector",
    "SweepStep",
    "ZClip",
    "ZClipState",
    "build_remedy",
    "make_event",
]
