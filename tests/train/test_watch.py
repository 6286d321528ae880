"""The divergence rule judged on the device (proxy/train/watch.py): a non-logging step asks the
device for nothing, and the records are those of a per-step check (train.check_every_step=true),
diverging members included."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from proxy.records import load_run
from proxy.train import Trainer, train, train_ensemble
from tests.train.test_trainer import tiny_cfg

# what makes the host wait for the device (on a GPU), called on a tensor from Python
SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
VOLATILE = ("started_at", "updated_at", "wall_time_s", "run_name", "threads", "overrides", "config", "sweep_id")


@contextmanager
def syncs_on_quiet_steps(monkeypatch) -> Iterator[list[str]]:
    """Every syncing call made while Trainer.train_step runs a non-logging step, as 'name at
    file:line' of the caller."""
    calls: list[str] = []
    quiet = [False]

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if quiet[0]:
                frame = sys._getframe(1)
                calls.append(f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    train_step = Trainer.train_step

    def step(self, step, logging_step):
        quiet[0] = not logging_step
        try:
            return train_step(self, step, logging_step)
        finally:
            quiet[0] = False

    monkeypatch.setattr(Trainer, "train_step", step)
    yield calls


def test_a_non_logging_step_never_waits_for_the_device(tmp_path, monkeypatch):
    with syncs_on_quiet_steps(monkeypatch) as calls:
        train(tiny_cfg(train=dict(steps=12, log_every=4)), tmp_path / "run")
        train_ensemble(tiny_cfg(sweep=dict(lrs=[1e-3, 3e-3]), train=dict(steps=12, log_every=4)), tmp_path / "sweep")
    assert calls == []
    # the counter sees what a per-step check reads (the test can fail)
    with syncs_on_quiet_steps(monkeypatch) as calls:
        train(tiny_cfg(train=dict(steps=12, log_every=4, check_every_step=True)), tmp_path / "per_step")
    assert any(call.startswith(("item", "__float__")) for call in calls)


def record(run_dir: Path) -> dict:
    run = load_run(run_dir)
    rows = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in run.metrics]
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in VOLATILE}
    return {"rows": rows, "events": run.events, "summary": summary}


def test_a_run_diverging_between_logging_steps_is_recorded_as_a_per_step_check_records_it(tmp_path):
    # LR 3 without clipping: the loss passes 3 x its value at init a few steps in, between logs
    cfg = dict(optim=dict(lr=3.0, grad_clip=0.0), schedule=dict(warmup_steps=0))
    deferred = train(tiny_cfg(**cfg, train=dict(steps=40, log_every=7, eval_every=20)), tmp_path / "deferred")
    per_step = train(
        tiny_cfg(**cfg, train=dict(steps=40, log_every=7, eval_every=20, check_every_step=True)), tmp_path / "per_step"
    )
    assert per_step.status == "diverged" and per_step.diverged_at_step % 7 != 0  # between two logging steps
    assert record(tmp_path / "deferred") == record(tmp_path / "per_step")
    assert deferred.tokens == per_step.tokens == per_step.diverged_at_step * 4 * 32


def test_a_sweep_member_diverging_between_logging_steps_matches_a_per_step_check(tmp_path):
    cfg = dict(sweep=dict(lrs=[1e-3, 1e30, 3e-3]), schedule=dict(warmup_steps=0))
    train_ensemble(tiny_cfg(**cfg, train=dict(steps=12, eval_every=6)), tmp_path / "deferred")
    train_ensemble(tiny_cfg(**cfg, train=dict(steps=12, eval_every=6, check_every_step=True)), tmp_path / "per_step")
    for label in ("lr=0.001", "lr=1e+30", "lr=0.003"):
        assert record(tmp_path / "deferred" / label) == record(tmp_path / "per_step" / label), label
    assert load_run(tmp_path / "deferred" / "lr=1e+30").summary.diverged_at_step == 1


def test_a_crash_after_a_pending_divergence_still_records_the_divergence(tmp_path, monkeypatch):
    cfg = dict(optim=dict(lr=3.0, grad_clip=0.0), schedule=dict(warmup_steps=0))
    per_step = train(
        tiny_cfg(**cfg, train=dict(steps=40, log_every=7, eval_every=20, check_every_step=True)), tmp_path / "per_step"
    )
    crash_at = per_step.diverged_at_step + 1
    assert crash_at % 7 != 0  # still before the next read-back
    train_step = Trainer.train_step

    def crashing(self, step, logging_step):
        if step == crash_at:
            raise RuntimeError("a kernel failed")
        return train_step(self, step, logging_step)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    try:
        train(tiny_cfg(**cfg, train=dict(steps=40, log_every=7, eval_every=20)), tmp_path / "deferred")
    except RuntimeError:
        pass
    deferred = load_run(tmp_path / "deferred").summary
    assert (deferred.status, deferred.diverged_at_step, deferred.tokens) == (
        "diverged",
        per_step.diverged_at_step,
        per_step.tokens,
    )


def test_a_remedy_set_after_the_trainer_was_built_reads_every_step(tmp_path):
    from proxy.config import RemedyConfig, to_config
    from proxy.train import RunInfo
    from proxy.train.remedies import build_remedy

    cfg = to_config(tiny_cfg(train=dict(steps=12, log_every=4)))
    trainer = Trainer(cfg, RunInfo(tmp_path / "run", "run"))
    assert trainer.watch is not None  # built without a remedy
    trainer.remedy = build_remedy(RemedyConfig(kind="skip_step"))
    try:
        (summary,) = trainer.run()
    finally:
        trainer.release()
    assert summary["status"] == "completed"


@pytest.mark.parametrize(
    "remedy, event",
    [
        (dict(kind="zclip", zclip_warmup=3, zclip_z=0.5, zclip_alpha=0.8), "zclip"),
        (dict(kind="skip_step", detector=dict(sigma=0.5, window=5, min_history=3)), "skip_step"),
    ],
)
def test_a_device_remedy_records_what_a_per_step_check_records(tmp_path, monkeypatch, remedy, event):
    """ZClip and skip-step between logging steps: no sync, and the same rows, events and summary
    as reading every step back; a low z threshold after a short warmup, or a hair-trigger
    detector, acts between logs, for a run and per member."""
    single = dict(remedy=remedy, train=dict(steps=24, log_every=5, eval_every=12))
    sweep = dict(remedy=remedy, sweep=dict(lrs=[1e-3, 1e-2]), train=dict(steps=24, log_every=5, eval_every=12))
    with syncs_on_quiet_steps(monkeypatch) as calls:
        train(tiny_cfg(**single), tmp_path / "deferred")
        train_ensemble(tiny_cfg(**sweep), tmp_path / "deferred_sweep")
    assert calls == []
    single["train"]["check_every_step"] = sweep["train"]["check_every_step"] = True
    train(tiny_cfg(**single), tmp_path / "per_step")
    train_ensemble(tiny_cfg(**sweep), tmp_path / "per_step_sweep")
    deferred = record(tmp_path / "deferred")
    assert deferred == record(tmp_path / "per_step")
    assert any(e["event"] == event and e["step"] % 5 for e in deferred["events"])  # acted between logs
    for label in ("lr=0.001", "lr=0.01"):
        got = record(tmp_path / "deferred_sweep" / label)
        assert got == record(tmp_path / "per_step_sweep" / label), label
        assert any(e["event"] == event and e["step"] % 5 for e in got["events"]), label
