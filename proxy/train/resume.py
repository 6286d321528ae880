"""What a resume continues, and what it may change: the stored run's config against a resume's.

A resume continues the run stored in its directory. ``proxy-train train.resume=true out_dir=<run>``
with no other override trains on the stored ``config.yaml``; an override on a resume sets only
the key it names (:func:`continue_stored`, called by proxy/train/cli.py). Then, whichever way the
config came (the CLI or the Python API), the run ledger compares it with the stored one key by
key before it writes anything (:func:`check_resume`, called by ``RunLedger.claim``):

- a key of :data:`RESUME_MAY_CHANGE` says where and how the run executes, how often it is
  measured and where it is shown, not what is trained: it may differ, and the summary records it
  as ``resumed_with: {key: [stored, new]}`` (with any change of device, backends or threads);
- ``train.steps`` may grow (:data:`RESUME_MAY_GROW`): a longer plan. The LR schedule decays over
  ``train.steps``, so unless it is constant the LR from the resume on follows the longer plan;
- any other difference refuses the resume in one line naming the keys (:class:`ResumeRefused`,
  exit 2, the run directory untouched), unless ``train.resume_override=true``: then the summary
  keeps them as ``resume_override: {key: [stored, new]}``, for good (later resumes add to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from proxy.analysis import parse_override
from proxy.config import Config, ConfigError, Schedule, as_dict, stored_config, to_config
from proxy.records import CONFIG, SUMMARY, StoredFileError, Summary, UnsafePathError, checkpoints, read_json, read_yaml

log = logging.getLogger("proxy.train")

# The keys a resume may change: where the run executes and with which kernels (the same
# computation, other rounding), how often it is measured and its state kept, where it is shown,
# and the spike kits that only watch (proxy/train/capture.py). A name ending in "." covers its
# whole section. Not here, on purpose: train.dtype (precision is part of a stability recipe; note
# that dtype=auto follows the device, and a device change records the resolved dtype in
# resumed_with), train.eval_batches (it changes what val/loss means), train.diverge_* (when a run
# counts as diverged), data.path (other data), experiment (the study the run belongs to).
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "out_dir",
    "run_name",  # where the record is, what the report calls the run
    "train.resume",
    "train.resume_override",  # this command's own switches
    "train.device",
    "train.compile",
    "train.check_every_step",
    "model.attention",
    "model.loss_impl",  # where, which kernels
    "train.log_every",
    "train.stats_every",
    "train.eval_every",  # how often it is measured
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.save_final",  # which states are kept
    "train.progress",
    "wandb.",
    "tensorboard.",  # where it is shown
    "capture.",  # spike kits: they only watch
)
# keys that may only grow
RESUME_MAY_GROW: tuple[str, ...] = ("train.steps",)
# keys that belong to the command, never to the stored run: on a resume they come from the
# command line, and the summary does not list them as changes
COMMAND_KEYS: tuple[str, ...] = ("train.resume", "train.resume_override", "out_dir")
OVERRIDE_KEY = "train.resume_override"

Changes = dict[str, list]  # {key: [stored, new]}: JSON as it stands


class ResumeRefused(ConfigError):
    """A resume whose config differs from the stored run's beyond what a resume may change."""


@dataclass
class ResumeCheck:
    """What :func:`check_resume` found: allowed changes, and those train.resume_override forced."""

    resumed_with: Changes = field(default_factory=dict)
    forced: Changes = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Comparing two configs
# --------------------------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 30}} -> {"train.steps": 30}; lists and empty dicts are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _covered(key: str, names: Iterable[str]) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in names)


def may_change(key: str, stored: Any, new: Any) -> bool:
    """Whether a resume may change ``key`` from ``stored`` to ``new`` without an override."""
    if _covered(key, RESUME_MAY_GROW):
        return isinstance(stored, (int, float)) and isinstance(new, (int, float)) and new >= stored
    return _covered(key, RESUME_MAY_CHANGE)


def config_changes(stored: dict, new: dict) -> Changes:
    """{key: [stored, new]} of every leaf that differs (None where one side lacks it)."""
    a, b = flatten(stored), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe(changes: Changes) -> str:
    """``key (stored -> new), ...``: the keys of one refusal line."""
    parts = []
    for key, (old, new) in changes.items():
        grow = " may only grow" if _covered(key, RESUME_MAY_GROW) else ""
        parts.append(f"{key} ({old!r} -> {new!r}{grow})")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The check (RunLedger.claim): before anything is written
# --------------------------------------------------------------------------------------------
def load_stored_config(run_dir: Path) -> dict:
    """The run's config.yaml as a plain dict, read through today's schema (a key added since
    the run was made takes its default). Stored configs are data: no interpolation is resolved,
    no alias expands past a small bound (proxy/records/files.py). ConfigError, one line naming
    the file, if it does not load."""
    path = Path(run_dir) / CONFIG
    try:
        return as_dict(stored_config(read_yaml(path), path))
    except (OSError, StoredFileError, UnsafePathError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(first if str(path) in first else f"{path} does not load: {first}") from None


def trained_config(path: Path, state: dict) -> Optional[dict]:
    """The config a checkpoint was trained with (as :func:`load_stored_config` gives it); None
    for a checkpoint written before checkpoints carried one."""
    if state.get("config") is None:
        return None
    return as_dict(stored_config(state["config"], path))


def check_resume(
    run_dir: Path, cfg: Config, trained: Optional[dict] = None, source: str = CONFIG, absent_ok: bool = False
) -> ResumeCheck:
    """Compare ``cfg`` with the config the run was trained with: ``trained`` (what its
    checkpoint carries, named ``source``), else the run's stored config.yaml. Raise
    ResumeRefused (one line) where it differs beyond :data:`RESUME_MAY_CHANGE` and
    train.resume_override is not set. ``absent_ok``: a missing config.yaml is no refusal (the
    checkpoint's config is compared next)."""
    override = bool(cfg.train.resume_override)
    if trained is None:
        path = Path(run_dir) / CONFIG
        if not path.exists() and not path.is_symlink() and (absent_ok or not checkpoints(run_dir)):
            return ResumeCheck()  # nothing stored here: the checkpoint is compared, or says there is none
        try:
            trained = load_stored_config(run_dir)
        except ConfigError as exc:
            if not override:
                raise ResumeRefused(
                    f"cannot compare this resume with the stored run: {exc} "
                    f"({OVERRIDE_KEY}=true resumes with this config)"
                ) from None
            return ResumeCheck(forced={CONFIG: [f"unreadable: {exc}", None]})
    changes = {k: v for k, v in config_changes(trained, as_dict(cfg)).items() if k not in COMMAND_KEYS}
    allowed = {k: v for k, v in changes.items() if may_change(k, *v)}
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused and not override:
        where = f"the run's stored {CONFIG}" if source == CONFIG else f"the config {source} was trained with"
        edited = _edited(run_dir, trained, refused) if source != CONFIG else []
        if edited:  # retyping nothing would continue from the edited file: say what to put back
            advice = (
                f"{CONFIG} was edited after that checkpoint ({', '.join(edited)}): put it back as the "
                f"checkpoint has it, or add {OVERRIDE_KEY}=true to train on with the edited values "
                "(recorded in the summary)"
            )
        else:
            advice = (
                f"give train.resume=true out_dir=... alone to continue the stored run, or add "
                f"{OVERRIDE_KEY}=true to change them anyway (recorded in the summary)"
            )
        raise ResumeRefused(f"resume refused: this config differs from {where} in {describe(refused)}; {advice}")
    _warn_if_schedule_stretches(cfg, allowed)
    return ResumeCheck(resumed_with=allowed, forced=refused)


def _edited(run_dir: Path, trained: dict, refused: Changes) -> list[str]:
    """The refused keys where the run's config.yaml itself says otherwise than its checkpoint:
    the file was edited (``key=checkpoint's value``)."""
    try:
        stored = flatten(load_stored_config(run_dir))
    except ConfigError:
        return []
    flat = flatten(trained)
    return [f"{k}={flat.get(k)!r}" for k in refused if k in stored and stored.get(k) != flat.get(k)]


def _warn_if_schedule_stretches(cfg: Config, allowed: Changes) -> None:
    if "train.steps" in allowed and Schedule(cfg.schedule.name) != Schedule.constant:
        old, new = allowed["train.steps"]
        log.warning(
            "resume: train.steps %s -> %s: the %s schedule now decays over %s steps, so the LR "
            "from here on is not the stored plan's",
            old,
            new,
            Schedule(cfg.schedule.name).value,
            new,
        )


def runtime_changes(previous: dict, now: dict) -> Changes:
    """Device, backends and threads that differ from the stored summary's (flattened keys);
    a key the stored summary lacks (an older run) is not a change."""
    old, new = flatten(previous), flatten(now)
    return {k: [old[k], new.get(k)] for k in sorted(new) if k in old and old[k] != new.get(k)}


def accumulate(previous: Optional[Changes], forced: Changes) -> Changes:
    """Forced changes over several resumes: each key keeps its first stored value."""
    merged = dict(previous or {})
    for key, (old, new) in forced.items():
        merged[key] = [merged[key][0] if key in merged else old, new]
    return merged


# --------------------------------------------------------------------------------------------
# The config a resume trains with (proxy-train): the stored one, plus what the command sets
# --------------------------------------------------------------------------------------------
@dataclass
class Continued:
    """What ``proxy-train train.resume=true`` continues: the config, the run's overrides (the
    stored ones, with what this command sets), and the run's stored name."""

    cfg: Config
    overrides: tuple[str, ...]
    run_name: Optional[str]


def touched_keys(fresh: dict, defaults: dict, overrides: Iterable[str]) -> set[str]:
    """The keys a command's overrides set: where its config differs from the defaults, and
    every key an override names (``model=5m``, a group, names all of model.*), even when it
    sets a key to its default."""
    a, b = flatten(fresh), flatten(defaults)
    touched = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    for item in overrides:
        key, _ = parse_override(item)
        touched |= {k for k in a if k == key or k.startswith(key + ".")}
    return touched


def merge_overrides(stored: Iterable[str], new: Iterable[str]) -> tuple[str, ...]:
    """The stored overrides with those of the same key replaced in place by the new ones, then
    the new ones that set other keys: the command line that gives the resumed run's config."""
    pending = {parse_override(o)[0]: o for o in new}
    merged = []
    for item in stored:
        key = parse_override(item)[0]
        merged.append(pending.pop(key) if key in pending else item)
    return tuple(merged + list(pending.values()))


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def continue_stored(fresh: Config, defaults: Config, run_dir: Path, overrides: tuple[str, ...]) -> Optional[Continued]:
    """The stored run's config with only the keys this command's overrides set (taken from
    ``fresh``, the config the command composed; ``defaults`` is the one no override gives),
    and the command's own keys (:data:`COMMAND_KEYS`). None where ``run_dir`` holds no config
    that loads: the ledger's check then says why."""
    if not (Path(run_dir) / CONFIG).is_file():
        return None
    try:
        stored = load_stored_config(run_dir)
    except ConfigError:
        return None
    new = flatten(as_dict(fresh))
    for key in touched_keys(as_dict(fresh), as_dict(defaults), overrides) | set(COMMAND_KEYS):
        if key in new:
            _set(stored, key, new[key])
    summary = _stored_summary(run_dir)
    return Continued(to_config(stored), merge_overrides(list(summary.overrides or ()), overrides), summary.run_name)


def _stored_summary(run_dir: Path) -> Summary:
    """The run's summary; an empty one where it cannot be read (the ledger's checks say why)."""
    try:
        return Summary.of(read_json(Path(run_dir) / SUMMARY), str(Path(run_dir) / SUMMARY))
    except (OSError, ValueError):
        return Summary()


__all__ = [
    "COMMAND_KEYS",
    "RESUME_MAY_CHANGE",
    "RESUME_MAY_GROW",
    "Continued",
    "ResumeCheck",
    "ResumeRefused",
    "accumulate",
    "check_resume",
    "load_stored_config",
    "trained_config",
    "config_changes",
    "continue_stored",
    "merge_overrides",
    "may_change",
    "runtime_changes",
    "touched_keys",
]
