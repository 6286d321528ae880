"""Spike forensics: capture every spike as a study kit, and replay it exactly.

LLM360 released K2 checkpoints from before and during its loss spikes; PaLM found that
replaying the spiking batches from an earlier state did not spike again. Both need the same
thing: the state from a little before the spike and the batches that followed. With
``capture.enabled`` the trainer keeps them in memory and, when its own spike detector fires
(:class:`proxy.remedies.SpikeDetector` on the loss and/or the grad norm), writes::

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

The second half of the module reads kits back (:func:`load_kit`) and replays them with the
trainer's own step arithmetic (:func:`trainer_step`: schedule -> forward -> backward -> clip ->
remedy -> AdamW step), so the same batches from ``state_before`` reproduce the recorded losses
bit for bit on CPU. proxy/inspect.py builds the dissection on top.
"""

from __future__ import annotations

import copy
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from proxy.config import CaptureConfig, CaptureTrigger, Config, as_dict, to_config
from proxy.model import build_model
from proxy.optim import AdamW, apply_lr, build_optimizer, clip_grad_norm, schedule_multiplier
from proxy.records import RunRecord, read_json, write_json
from proxy.remedies import Remedy, SpikeDetector, ZClip, build_remedy
from proxy.train import StepObserver, autocast_for

KITS_DIR = "spike_kits"
KIT_JSON = "kit.json"
BATCHES_FILE = "batches.pt"
STATE_FILES = {"before": "state_before.pt", "at": "state_at.pt", "after": "state_after.pt"}
KIT_FORMAT = 1
MAX_LATER_SPIKES = 100  # spikes listed in a kit.json after its own


class KitError(ValueError):
    """A path that is not a usable spike kit; the message says what is missing."""


# ============================================================================================
# Capture
# ============================================================================================
@dataclass
class _Snapshot:
    """The trainer's state at the start of ``step`` (CPU copies)."""

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

    Wire it with ``trainer.observers.append(SpikeCapture(cfg.capture))``. A kit is written in two
    goes so a spike that kills the run still leaves one: at the spike (before, at, the batches so
    far) and ``steps_after`` steps later (the after state, the remaining batches). Spikes while a
    kit is open, or once ``max_kits`` kits exist, are listed in the newest kit's ``later_spikes``.
    A step that never finished because the run diverged is captured at ``close`` with trigger
    ``diverged``. Under data parallelism only rank 0 captures, and its batches are its own shard.
    """

    def __init__(self, cfg: CaptureConfig):
        self.cfg = cfg
        self.detector = SpikeDetector(cfg.sigma, cfg.window, cfg.min_history)
        self.states: deque[_Snapshot] = deque()
        self.batches: deque[_Batch] = deque(maxlen=cfg.steps_before + 1)
        self.trace: deque[dict[str, Any]] = deque(maxlen=cfg.steps_before + 1)
        self.open: Optional[_OpenKit] = None
        self.last_kit: Optional[Path] = None  # the newest kit and its kit.json contents
        self.last_meta: Optional[dict[str, Any]] = None
        self._later_dirty = False  # last_meta has later spikes not yet on disk
        self.kits_written: Optional[int] = None  # counted on first use (a resumed run has some)
        self._last_step: Optional[int] = None

    # -- the observer hooks --------------------------------------------------------------------
    def on_batch(self, trainer, step: int, inputs: Tensor, labels: Tensor) -> None:
        if not trainer.dist.is_main:
            return
        if self.kits_written is None:
            self.kits_written = len(find_kits(trainer.info.run_dir))
        if self._last_step is not None and step != self._last_step + 1:
            self._timeline_broke(trainer, step)  # a rollback (or resume) rewound the loop
        self._last_step = step
        if self.open is None and self.kits_written >= self.cfg.max_kits:
            return  # nothing more to capture: stop paying for copies
        snapshot = self._snapshot(trainer, step)
        batch = _Batch(step, trainer.data_position, inputs.detach().to("cpu", copy=True),
                       labels.detach().to("cpu", copy=True))
        self.batches.append(batch)
        if self.open is not None:
            if step == self.open.after_step:
                self._close_kit(snapshot, reason=None)
            else:
                self.open.batches.append(batch)

    def on_step_end(self, trainer, step: int, loss: float, grad_norm: float,
                    event: Optional[dict]) -> None:
        if not trainer.dist.is_main:
            return
        row = {"step": step, "lr": self._lr(trainer, step), "loss": loss, "grad_norm": grad_norm,
               "event": event["kind"] if event else None}
        self.trace.append(row)
        if self.open is not None:
            self.open.meta["trace"].append(row)
        watched = self._watched(loss, grad_norm)
        spike = self.detector.test(*watched)
        if spike is None:
            self.detector.accept(*watched)
            return
        found = {"step": step, "trigger": spike.trigger, "value": spike.value,
                 "threshold": spike.threshold}
        if self._can_open():
            self._open_kit(trainer, found, event)
        else:
            self._note_later_spike(found)

    def close(self, trainer) -> None:
        if not trainer.dist.is_main:
            return
        summary = trainer.record.summary
        step = summary.get("diverged_at_step") if summary.get("status") == "diverged" else None
        captured = self.open is not None and self.open.step == step
        diverged = step is not None and step == self._last_step and not captured
        if diverged:  # the divergence check ended the run at a step the detector let pass
            held = self.batches[-1] if self.batches and self.batches[-1].step == step else None
            loss = _forward_loss(trainer, held) if held is not None else math.nan
            if self.trace and self.trace[-1]["step"] == step:
                self.trace.pop()  # replaced by the row that names the divergence
            found = {"step": step, "trigger": "diverged", "value": loss,
                     "threshold": _divergence_bound(trainer)}
            row = {"step": step, "lr": self._lr(trainer, step), "loss": loss, "grad_norm": math.nan,
                   "event": "diverged"}
            self.trace.append(row)
            if self.open is not None:
                self.open.meta["trace"].append(row)
            if self._can_open():
                self._open_kit(trainer, found, None)
            else:
                self._note_later_spike(found)
        if self.open is not None:
            end = "diverged" if trainer.record.summary.get("status") == "diverged" else "ended"
            self._close_kit(None, reason=f"the run {end} at step {self._last_step}, before step "
                                         f"{self.open.after_step}")
        elif self._later_dirty:
            write_json(self.last_kit / KIT_JSON, self.last_meta)

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _lr(trainer, step: int) -> float:
        cfg = trainer.cfg
        return cfg.optim.lr * schedule_multiplier(step, cfg.train.steps, cfg.schedule)

    def _can_open(self) -> bool:
        return (self.open is None and bool(self.states) and self.kits_written is not None
                and self.kits_written < self.cfg.max_kits)

    def _watched(self, loss: float, grad_norm: float) -> tuple[Optional[float], Optional[float]]:
        trigger = CaptureTrigger(self.cfg.trigger)
        return (loss if trigger != CaptureTrigger.grad_norm else None,
                grad_norm if trigger != CaptureTrigger.loss else None)

    def _snapshot(self, trainer, step: int) -> _Snapshot:
        """Copy the state at the start of ``step`` into the ring, reusing the evicted slot's buffers."""
        recycled = self.states.popleft().state if len(self.states) > self.cfg.steps_before else None
        live = {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "remedy": trainer.remedy.state_dict() if trainer.remedy is not None else {},
            "rng_cpu": torch.get_rng_state(),
        }
        snapshot = _Snapshot(step, trainer.data_position, _copy_into(recycled, live))
        self.states.append(snapshot)
        return snapshot

    def _open_kit(self, trainer, found: dict[str, Any], event: Optional[dict]) -> None:
        step = found["step"]
        path = trainer.info.run_dir / KITS_DIR / f"step_{step:07d}"
        path.mkdir(parents=True, exist_ok=True)
        before, at = self.states[0], self.states[-1]
        meta = {
            "format": KIT_FORMAT,
            **found,
            "remedy_event": event,
            "detector": {"sigma": self.cfg.sigma, "window": self.cfg.window,
                         "min_history": self.cfg.min_history,
                         "watching": CaptureTrigger(self.cfg.trigger).value},
            "states": {"before": _state_meta(before), "at": _state_meta(at), "after": None},
            "trace": list(self.trace),
            "later_spikes": [],
            "complete": False,
            "incomplete_reason": f"waiting for step {step + self.cfg.steps_after}",
            "vocab_size": trainer.source.vocab_size,
            "loss_at_init": trainer.loss_at_init,
            "device": str(trainer.device),
            "world_size": trainer.dist.world_size,
            "torch": torch.__version__,
            "config": as_dict(trainer.cfg),
        }
        _save(path / STATE_FILES["before"], before.state)
        _save(path / STATE_FILES["at"], at.state)
        batches = [b for b in self.batches if b.step >= before.step]
        _save(path / BATCHES_FILE, _stack_batches(batches))
        write_json(path / KIT_JSON, meta)
        self.open = _OpenKit(step, step + self.cfg.steps_after, path, meta, batches)
        self.kits_written += 1
        self.last_kit, self.last_meta, self._later_dirty = path, meta, False
        fields = {k: found[k] for k in ("trigger", "value", "threshold")}
        relative = path.relative_to(trainer.info.run_dir).as_posix()
        _record_event(trainer, step, path=relative, **fields)

    def _close_kit(self, after: Optional[_Snapshot], reason: Optional[str]) -> None:
        kit, self.open = self.open, None
        if after is not None:
            _save(kit.path / STATE_FILES["after"], after.state)
            kit.meta["states"]["after"] = _state_meta(after)
        _save(kit.path / BATCHES_FILE, _stack_batches(kit.batches))
        kit.meta["complete"] = after is not None
        kit.meta["incomplete_reason"] = reason
        write_json(kit.path / KIT_JSON, kit.meta)
        self._later_dirty = False

    def _note_later_spike(self, found: dict[str, Any]) -> None:
        """Listed in the newest kit's kit.json, written when that kit closes or at the end."""
        if self.last_meta is not None and len(self.last_meta["later_spikes"]) < MAX_LATER_SPIKES:
            self.last_meta["later_spikes"].append(found)
            self._later_dirty = self.open is None

    def _timeline_broke(self, trainer, step: int) -> None:
        """The loop jumped (a rollback): states and batches held belong to another trajectory."""
        if self.open is not None:
            self._close_kit(None, reason=f"a rollback at step {self._last_step} rewound the run "
                                         f"to step {step}")
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


def _save(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _forward_loss(trainer, batch: _Batch) -> float:
    """The loss of the step that diverged (its weights were never updated)."""
    x, y = batch.inputs.to(trainer.device), batch.labels.to(trainer.device)
    with trainer.autocast():
        out = trainer.model(x, y, z_loss=trainer.cfg.loss.z_loss, ignore_index=trainer.cfg.loss.ignore_index)
    return float(out.ce_loss)


def _divergence_bound(trainer) -> float:
    """The train loss above which the trainer calls a run diverged (nan: only non-finite)."""
    t, at_init = trainer.cfg.train, trainer.loss_at_init
    bounds = [t.diverge_loss] if t.diverge_loss > 0 else []
    bounds += [t.diverge_factor * at_init] if t.diverge_factor > 0 and at_init else []
    return min(bounds, default=math.nan)


def _record_event(trainer, step: int, **fields: Any) -> None:
    try:
        trainer.record.event(step, "spike_kit", **fields)
    except ValueError:  # the record was closed already (the loop ended by diverging)
        record = RunRecord(trainer.info.run_dir, resume=True)
        record.event(step, "spike_kit", **fields)
        record.close()


# ============================================================================================
# Reading kits
# ============================================================================================
@dataclass
class Kit:
    """A spike kit on disk. States are loaded on demand (they can be large)."""

    path: Path
    meta: dict[str, Any]
    config: Config
    batches: dict[str, Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def trigger(self) -> str:
        return self.meta["trigger"]

    def has_state(self, name: str) -> bool:
        return self.meta["states"].get(name) is not None and (self.path / STATE_FILES[name]).exists()

    def state(self, name: str) -> dict[str, Any]:
        """A fresh copy of state ``name`` (before | at | after), safe to load into an optimizer."""
        if name not in STATE_FILES:
            raise KitError(f"state {name!r} must be one of {', '.join(STATE_FILES)}")
        if not self.has_state(name):
            reason = self.meta.get("incomplete_reason") or "not written"
            raise KitError(f"{self.path} has no '{name}' state ({reason})")
        return _load(self.path / STATE_FILES[name])

    def state_step(self, name: str) -> int:
        return int(self.meta["states"][name]["step"])

    @property
    def steps(self) -> list[int]:
        return self.batches["steps"].tolist()

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        i = self.steps.index(step)
        return self.batches["inputs"][i], self.batches["labels"][i]

    def recorded(self, step: int) -> Optional[dict[str, Any]]:
        """The trace row (lr, loss, grad_norm, event) the run recorded for ``step``."""
        return next((row for row in self.meta["trace"] if row["step"] == step), None)


def find_kits(path: str | Path) -> list[Path]:
    """Kit directories at ``path``: a kit itself, a run's spike_kits/ folder, or a run directory."""
    path = Path(path)
    if (path / KIT_JSON).is_file():
        return [path]
    root = path / KITS_DIR if (path / KITS_DIR).is_dir() else path
    return sorted(p.parent for p in root.glob(f"step_*/{KIT_JSON}"))


def load_kit(path: str | Path) -> Kit:
    path = Path(path)
    if not (path / KIT_JSON).is_file():
        raise KitError(f"{path} is not a spike kit (no {KIT_JSON})")
    meta = read_json(path / KIT_JSON)
    if meta.get("format") != KIT_FORMAT:
        raise KitError(f"{path / KIT_JSON}: kit format {meta.get('format')!r}, this proxy reads {KIT_FORMAT}")
    if not (path / BATCHES_FILE).is_file():
        raise KitError(f"{path} has no {BATCHES_FILE}")
    return Kit(path=path, meta=meta, config=to_config(meta["config"]),
               batches=_load(path / BATCHES_FILE))


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which, in one line
        raise KitError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


# ============================================================================================
# Replay: the trainer's step, step for step
# ============================================================================================
@dataclass
class Training:
    """A model, its optimizer and the run's remedy, restored from a kit state."""

    model: nn.Module
    optimizer: AdamW
    remedy: Optional[Remedy]
    cfg: Config
    device: torch.device
    step: int  # the next step to take

    @property
    def autocast(self):
        return autocast_for(self.cfg, self.device)


def restore(kit: Kit, name: str = "before", device: str | torch.device = "cpu",
            cfg: Optional[Config] = None) -> Training:
    """Model, optimizer and remedy as they were at the start of state ``name``'s step.

    ``cfg`` overrides the kit's config for the model's construction (e.g. a reference attention
    path for double backward); the weights are the same either way.
    """
    cfg = cfg or kit.config
    device = torch.device(device)
    state = kit.state(name)
    with torch.random.fork_rng(devices=[]):  # building draws an init we overwrite at once
        model = build_model(cfg.model, int(kit.meta["vocab_size"])).to(device)
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(model, cfg.optim)
    optimizer.load_state_dict(state["optimizer"])
    remedy = build_remedy(cfg.remedy, grad_clip=cfg.optim.grad_clip)
    if remedy is not None and state.get("remedy"):
        remedy.load_state_dict(state["remedy"])
    return Training(model, optimizer, remedy, cfg, device, kit.state_step(name))


@dataclass
class StepResult:
    step: int
    lr: float
    loss: float
    grad_norm: float  # before clipping
    event: Optional[str]  # the remedy's action, if any
    applied: bool  # whether the optimizer step was taken
    out: Any = None  # the forward pass's ModelOutput


def trainer_step(t: Training, x: Tensor, y: Tensor, use_remedy: bool = True,
                 collect_stats: bool = False, apply: bool = True) -> StepResult:
    """One step exactly as ``Trainer.train_step`` takes it (same calls, same order).

    ``use_remedy=False`` steps as if the run had no remedy. A ``rollback`` event cannot be
    replayed in a short window, so it is treated like a ``skip_step``. ``apply=False`` stops
    before the optimizer step, leaving the clipped gradients in place for the caller.
    """
    cfg = t.cfg
    lr = apply_lr(t.optimizer, schedule_multiplier(t.step, cfg.train.steps, cfg.schedule))
    x, y = x.to(t.device), y.to(t.device)
    with t.autocast():
        out = t.model(x, y, z_loss=cfg.loss.z_loss, ignore_index=cfg.loss.ignore_index,
                      collect_stats=collect_stats)
    out.loss.backward()
    params = list(t.model.parameters())
    remedy = t.remedy if use_remedy else None
    clip = 0.0 if isinstance(remedy, ZClip) else cfg.optim.grad_clip
    grad_norm = float(clip_grad_norm(params, clip))
    loss = out.ce_loss.item()
    event = None
    if isinstance(remedy, ZClip):
        event = remedy.clip(params, grad_norm, t.step)
    elif remedy is not None:
        event = remedy.check(t.step, loss, grad_norm)
    skipped = event is not None and event["kind"] in ("skip_step", "rollback")
    result = StepResult(t.step, lr, loss, grad_norm, event["kind"] if event else None,
                        applied=apply and not skipped, out=out)
    if not apply:
        return result
    if not skipped:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    return result


@dataclass
class Replay:
    """What a replay did, step by step; ``training`` holds the final state."""

    variant: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    events: list[Optional[str]] = field(default_factory=list)
    training: Optional[Training] = None


def replay(kit: Kit, batches: Optional[Sequence[tuple[Tensor, Tensor]]] = None,
           variant: str = "same", start: str = "before", device: str | torch.device = "cpu",
           use_remedy: bool = True, until: Optional[int] = None) -> Replay:
    """Re-run the kit's steps from state ``start`` with ``batches`` (default: the recorded ones),
    through step ``until`` (default: the last recorded batch)."""
    t = restore(kit, start, device)
    steps = [s for s in kit.steps if s >= t.step and (until is None or s <= until)]
    if batches is None:
        batches = [kit.batch(s) for s in steps]
    if len(batches) < len(steps):
        raise KitError(f"replay '{variant}': {len(batches)} batches for {len(steps)} steps")
    result = Replay(variant)
    for step, (x, y) in zip(steps, batches):
        r = trainer_step(t, x, y, use_remedy=use_remedy)
        result.steps.append(step)
        result.losses.append(r.loss)
        result.grad_norms.append(r.grad_norm)
        result.events.append(r.event)
    result.training = t
    return result


def states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Bitwise equality of two model state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


__all__ = [
    "BATCHES_FILE",
    "KITS_DIR",
    "KIT_JSON",
    "Kit",
    "KitError",
    "Replay",
    "STATE_FILES",
    "SpikeCapture",
    "StepResult",
    "Training",
    "find_kits",
    "load_kit",
    "replay",
    "restore",
    "states_equal",
    "trainer_step",
]
