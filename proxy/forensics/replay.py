"""Spike kits read back and replayed with the trainer's own step.

A kit (written during training by proxy/train/capture.py) holds the state from a little before a
spike and the batches that followed. :func:`load_kit` reads one (everything with
``weights_only=True``); :func:`restore` rebuilds the model, optimizer and remedy of one of its
states; :func:`replay` re-runs the recorded steps with the trainer's step function
(proxy/train/step.py: schedule -> forward -> backward -> clip -> remedy -> AdamW step), so the
same batches from ``state_before`` reproduce the recorded losses bit for bit on CPU. The
dissection (proxy-inspect, proxy/forensics/dissect.py) is built on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from proxy.config import Config, stored_config
from proxy.data import DataError, TokenSource, build_source
from proxy.model import build_model
from proxy.optim import AdamW, build_optimizer
from proxy.records import KITS_DIR, StateFileError, StoredFileError, load_state, read_json
from proxy.train.capture import BATCHES_FILE, KIT_FORMAT, KIT_JSON, STATE_FILES, find_kits
from proxy.train.remedies import Remedy, SkipStep, build_remedy
from proxy.train.runtime import autocast_for, param_dtype
from proxy.train.step import StepResult, TrainStep


class KitError(ValueError):
    """A path that is not a usable spike kit; the message says what is missing."""


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
    # the data a text or memmap run was trained on, as the user names it here (proxy-inspect
    # --data): a kit's own data.path is never read, it may point anywhere on this machine
    data_path: Optional[str] = None

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


def load_kit(path: str | Path) -> Kit:
    path = Path(path)
    if not (path / KIT_JSON).is_file():
        raise KitError(f"{path} is not a spike kit (no {KIT_JSON})")
    try:
        meta = read_json(path / KIT_JSON)
    except StoredFileError as exc:  # a link, a folder, not a JSON object: one line naming the file
        raise KitError(str(exc)) from None
    if meta.get("format") != KIT_FORMAT:
        raise KitError(f"{path / KIT_JSON}: kit format {meta.get('format')!r}, this proxy reads {KIT_FORMAT}")
    missing = [k for k in KIT_KEYS if k not in meta]
    if missing or not isinstance(meta["states"], dict) or not isinstance(meta["trace"], list):
        what = f"lacks {', '.join(missing)}" if missing else "has malformed states or trace"
        raise KitError(f"{path / KIT_JSON} {what}: not a kit this proxy wrote")
    _check_meta(meta, path / KIT_JSON)
    if not (path / BATCHES_FILE).is_file():
        raise KitError(f"{path} has no {BATCHES_FILE}")
    batches = _load(path / BATCHES_FILE)
    if not isinstance(batches, dict) or not all(isinstance(batches.get(k), Tensor) for k in BATCH_KEYS):
        raise KitError(f"{path / BATCHES_FILE}: expected tensors {', '.join(BATCH_KEYS)}")
    config = stored_config(meta["config"], path / KIT_JSON)
    _check_batches(batches, meta, config, path / BATCHES_FILE)
    return Kit(path=path, meta=meta, config=config, batches=batches)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """KitError (one line) unless kit.json's fields have the types capture writes."""

    def bad(what: str) -> KitError:
        return KitError(f"{where}: {what}: not a kit this proxy wrote")

    if not _is_int(meta["step"]) or not isinstance(meta["trigger"], str):
        raise bad("step must be an integer and trigger a string")
    if not (_is_number(meta["value"]) and _is_number(meta["threshold"])):
        raise bad("value and threshold must be numbers")
    if not _is_int(meta["vocab_size"]) or meta["vocab_size"] < 1:
        raise bad("vocab_size must be a positive integer")
    for name in ("before", "at", "after"):
        state = meta["states"].get(name)
        if state is None and name == "after":
            continue
        if not isinstance(state, dict) or not (_is_int(state.get("step")) and _is_int(state.get("data_position"))):
            raise bad(f"states.{name} must hold an integer step and data_position")
    for row in meta["trace"]:
        if (
            not isinstance(row, dict)
            or not _is_int(row.get("step"))
            or not all(_is_number(row.get(k)) for k in ("lr", "loss", "grad_norm"))
        ):
            raise bad("a trace row must be an object with an integer step and numbers")
        if row.get("event") is not None and not isinstance(row["event"], str):
            raise bad("a trace row's event must be a string")


def _check_batches(batches: dict[str, Tensor], meta: dict[str, Any], config: Config, where: Path) -> None:
    """KitError (one line) unless batches.pt holds what capture writes: integer token ids of the
    kit's vocabulary, one (rows, seq_len) batch per step, the steps and positions beside them."""
    inputs, labels, steps, positions = (batches[k] for k in ("inputs", "labels", "steps", "data_positions"))
    integer = all(t.dtype == torch.long for t in (inputs, labels, steps, positions))
    if not integer or inputs.ndim != 3 or labels.shape != inputs.shape:
        raise KitError(f"{where}: inputs and labels must be int64 tensors of one (steps, rows, seq_len) shape")
    if steps.shape != (inputs.shape[0],) or positions.shape != steps.shape:
        raise KitError(f"{where}: steps and data_positions must hold one entry per batch")
    vocab = meta["vocab_size"]
    if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
        raise KitError(f"{where}: token ids outside the kit's vocabulary of {vocab}")
    real = labels[labels != config.loss.ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise KitError(f"{where}: labels outside the kit's vocabulary of {vocab}")
    if meta["step"] not in steps.tolist():
        raise KitError(f"{where}: no batch for the kit's step {meta['step']}")


KIT_KEYS = ("step", "trigger", "value", "threshold", "states", "trace", "vocab_size", "config")
BATCH_KEYS = ("steps", "inputs", "labels", "data_positions")


def _load(path: Path) -> Any:
    """A kit file through the one state-file loader (weights only; a refused or torn file is
    one line naming it, never torch's hint to load it unsafely)."""
    try:
        return load_state(path)
    except StateFileError as exc:
        raise KitError(str(exc)) from None


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


def restore(
    kit: Kit, name: str = "before", device: str | torch.device = "cpu", cfg: Optional[Config] = None
) -> Training:
    """Model, optimizer and remedy as they were at the start of state ``name``'s step.

    ``cfg`` overrides the kit's config for the model's construction (e.g. a reference attention
    path for double backward); the weights are the same either way.
    """
    cfg = cfg or kit.config
    device = torch.device(device)
    state = kit.state(name)
    with torch.random.fork_rng(devices=[]):  # building draws an init we overwrite at once
        model = build_model(cfg.model, int(kit.meta["vocab_size"])).to(device, param_dtype(cfg))
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(model, cfg.optim)
    optimizer.load_state_dict(state["optimizer"])
    remedy = build_remedy(cfg.remedy, grad_clip=cfg.optim.grad_clip)
    if remedy is not None and state.get("remedy"):
        remedy.load_state_dict(state["remedy"])
    return Training(model, optimizer, remedy, cfg, device, kit.state_step(name))


def trainer_step(
    t: Training, x: Tensor, y: Tensor, use_remedy: bool = True, collect_stats: bool = False, apply: bool = True
) -> StepResult:
    """One step exactly as the trainer takes it: the trainer's own step function
    (proxy/train/step.py), with the restored model, optimizer and remedy.

    ``use_remedy=False`` steps as if the run had no remedy; where the run's remedy decided on the
    device (skip-step), its update still goes through the same masked arithmetic, never skipping,
    so a step the run kept is the run's bits on any device. A ``rollback`` event cannot be
    replayed in a short window, so it skips the update like a ``skip_step``. ``apply=False``
    stops before the optimizer step, leaving the clipped gradients in place for the caller.
    """
    step = TrainStep(t.cfg, t.model, t.optimizer, autocast=t.autocast, device=t.device)
    lr = step.schedule(t.step)
    result = step.compute(
        t.step, lr, x.to(t.device), y.to(t.device), t.remedy if use_remedy else None, collect_stats=collect_stats
    )
    if not use_remedy and isinstance(t.remedy, SkipStep):
        result.skip_t = torch.zeros((), dtype=torch.bool, device=t.device)
    if apply:
        step.apply(result)
        t.step += 1
    return result


@dataclass
class Replay:
    """What a replay did, step by step; ``training`` holds the final state. ``probe_losses`` (when
    a held-out batch was given) is its loss at the start of each step, before the step's update,
    as the trainer measures probe/loss."""

    variant: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    events: list[Optional[str]] = field(default_factory=list)
    probe_losses: list[float] = field(default_factory=list)
    training: Optional[Training] = None


def replay(
    kit: Kit,
    batches: Optional[Sequence[tuple[Tensor, Tensor]]] = None,
    variant: str = "same",
    start: str = "before",
    device: str | torch.device = "cpu",
    use_remedy: bool = True,
    until: Optional[int] = None,
    probe: Optional[tuple[Tensor, Tensor]] = None,
    training: Optional[Training] = None,
) -> Replay:
    """Re-run steps from state ``start`` (or from ``training``, a state already restored and
    perhaps changed) through step ``until``: the recorded batches by default; given ``batches``,
    one per step from the state's step on, as many as given (past the kit's window too, with
    :func:`fresh_batches`). ``probe`` (a held-out batch, :func:`held_out_batch`) adds its loss at
    each step's start to the result."""
    t = training if training is not None else restore(kit, start, device)
    if batches is None:
        steps = [s for s in kit.steps if s >= t.step]
        batches = [kit.batch(s) for s in steps]
    steps = [t.step + i for i in range(len(batches)) if until is None or t.step + i <= until]
    result = Replay(variant)
    for step, (x, y) in zip(steps, batches):
        if probe is not None:
            result.probe_losses.append(held_out_loss(t, probe))
        r = trainer_step(t, x, y, use_remedy=use_remedy)
        result.steps.append(step)
        result.losses.append(r.loss)
        result.grad_norms.append(r.grad_norm)
        result.events.append(r.event.kind if r.event is not None else None)
    result.training = t
    return result


@torch.no_grad()
def held_out_loss(t: Training, batch: tuple[Tensor, Tensor]) -> float:
    """The model's mean cross-entropy on ``batch`` in eval mode, as the trainer's evaluation and
    probe compute it (proxy/train/engine.py); the model is left in train mode."""
    x, y = batch
    t.model.eval()
    try:
        with t.autocast():
            out = t.model(x.to(t.device), y.to(t.device), ignore_index=t.cfg.loss.ignore_index)
        return float(out.ce_loss.item())
    finally:
        t.model.train()


def fresh_batches(
    kit: Kit, steps: Sequence[int], offset: int, notes: Optional[list[str]] = None
) -> Optional[list[tuple[Tensor, Tensor]]]:
    """For each of ``steps``, the train batch ``offset`` positions further on in the run's data
    stream (``offset=0``: the batch the run read at that step; a rollback that skips data reads
    further on). A step past the kit's window continues the stream one batch per step from the
    kit's last batch, as a run without rollbacks reads it. None, with a note, when the data source
    cannot be opened here."""
    try:
        source = kit_source(kit)
    except KitError as exc:
        if notes is not None:
            notes.append(f"no fresh batches: {exc}")
        return None
    by_step = dict(zip(kit.steps, kit.batches["data_positions"].tolist()))
    last = max(by_step)
    rows, seq_len = kit.batches["inputs"].shape[1:]
    positions = [by_step[s] if s in by_step else by_step[last] + (s - last) for s in steps]
    return [source.batch("train", p + offset, rows, seq_len) for p in positions]


def kit_source(kit: Kit) -> TokenSource:
    """The run's data source, rebuilt from the kit's config (and the run's tokenizer); KitError,
    one line, when it cannot be opened here."""
    data = kit.config.data
    if data.path:  # text or memmap: read only what the user names here, never the kit's own path
        if not kit.data_path:
            kind = getattr(data.source, "value", data.source)
            raise KitError(
                f"{kit.path}: the run read {kind} data at {data.path!r}; name it here to "
                "use it (proxy-inspect --data PATH): a kit's own paths are not followed"
            )
        data = dataclasses.replace(data, path=str(kit.data_path))
    try:
        return build_source(data, run_dir=kit_run_dir(kit))
    except (DataError, OSError) as exc:
        raise KitError(f"{kit.path}: the run's data source cannot be opened here ({exc})") from exc


def held_out_batch(kit: Kit, batches: int) -> tuple[Tensor, Tensor]:
    """The run's first ``batches`` validation batches (its eval set, in the kit's batch shape) as
    one batch: a fixed sample of the data distribution, the same at every step, on which a loss
    stands in for the full-data loss. Raises KitError when the data source cannot be opened."""
    if batches < 1:
        raise KitError(f"held_out_batch: need batches >= 1, got {batches}")
    source = kit_source(kit)
    rows, seq_len = kit.batches["inputs"].shape[1:]
    pairs = [source.batch("val", i, rows, seq_len) for i in range(batches)]
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def kit_run_dir(kit: Kit) -> Path:
    """The run a kit belongs to (``<run_dir>/spike_kits/step_N``), whose files (its tokenizer.json)
    rebuild the run's data source; a kit kept elsewhere is its own folder."""
    return kit.path.parent.parent if kit.path.parent.name == KITS_DIR else kit.path


def states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Bitwise equality of two model state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


__all__ = [
    "BATCHES_FILE",
    "KIT_JSON",
    "Kit",
    "KitError",
    "Replay",
    "STATE_FILES",
    "Training",
    "find_kits",
    "load_kit",
    "replay",
    "restore",
    "fresh_batches",
    "held_out_batch",
    "held_out_loss",
    "states_equal",
    "trainer_step",
]
