"""Remedies wired into the loop: their actions are events in metrics.jsonl and change the run."""

import json

import pytest
import torch

from proxy.records import load_run
from proxy.train import train
from tests.train.test_trainer import tiny_cfg


def _hair_trigger(kind: str, **extra) -> dict:
    """A detector so sensitive (0.5 sigma over 5 steps) that ordinary noise sets it off."""
    return dict(kind=kind, detector=dict(sigma=0.5, window=5, min_history=3), **extra)


def test_skip_step_events_and_skipped_updates(tmp_path):
    cfg = tiny_cfg(remedy=_hair_trigger("skip_step"), train=dict(steps=30))
    summary = train(cfg, tmp_path / "skip")
    run = load_run(tmp_path / "skip")
    skips = [e for e in run.events if e["event"] == "skip_step"]
    assert summary["status"] == "completed" and skips
    for e in skips:
        assert e["trigger"] in ("loss", "grad_norm") and e["value"] > e["threshold"]
    # the same run without the remedy ends elsewhere: skipped updates really were not applied
    plain = train(tiny_cfg(train=dict(steps=30)), tmp_path / "plain")
    assert plain["final_val_loss"] != summary["final_val_loss"]


def _rollback(**extra) -> dict:
    return _hair_trigger(
        "rollback",
        rollback_every=5,
        rollback_keep=3,
        rollback_min_age=5,
        rollback_skip_batches=7,
        **{"rollback_max": 2, **extra},
    )


def test_rollback_rewinds_and_skips_data(tmp_path):
    summary = train(tiny_cfg(remedy=_rollback(), train=dict(steps=30, log_every=1)), tmp_path / "rb")
    run = load_run(tmp_path / "rb")
    rollbacks = [e for e in run.events if e["event"] == "rollback"]
    assert summary["status"] == "completed"
    assert 1 <= len(rollbacks) <= 2
    first = rollbacks[0]
    assert first["restore_step"] <= first["step"] - 5 and first["restore_step"] % 5 == 0
    # the record keeps one trajectory: each step once, the rolled-back steps set apart
    steps = [row["step"] for row in run.metrics if "train/loss" in row]
    assert steps == list(range(30))
    assert len(run.abandoned) == len(rollbacks)
    for branch, event in zip(run.abandoned, rollbacks):
        assert branch.rollback is event
        b_steps = [r["step"] for r in branch.rows if "train/loss" in r]
        # from the snapshot's step up to the spike itself, whose row ends the branch
        assert b_steps == list(range(event["restore_step"], event["step"] + 1))
        assert branch.rows[-1]["optim/grad_norm"] == event["value"] or branch.rows[-1]["train/loss"] == event["value"]
    # the data stream only moves forward: each rollback resumes past the batch that spiked
    spike_batches = [e["step"] for e in rollbacks]
    assert all(e["data_position"] > spike_batches[0] for e in rollbacks)
    assert [e["data_position"] for e in rollbacks] == sorted(e["data_position"] for e in rollbacks)
    assert summary["steps_completed"] == 30
    assert not (tmp_path / "rb" / "rollback").exists()  # memory snapshots: no files


def _crash_point(run_dir, ckpt_every: int) -> tuple[int, dict]:
    """(train_step call to crash at, its rollback event): the spike step of a rollback whose
    branch passed a checkpoint after its snapshot, so that a run killed there and resumed from
    that checkpoint has to roll back to a snapshot taken before it."""
    calls = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            calls += 1  # log_every=1: one row per train_step call, a rollback's spike included
        elif row.get("event") == "rollback":
            restore, spike = row["restore_step"], row["step"]
            if restore > 0 and any(restore < c <= spike for c in range(ckpt_every, spike + 1, ckpt_every)):
                return calls, row
    raise AssertionError("no rollback crossed a checkpoint: make the trigger more sensitive")


@pytest.mark.parametrize("when", ["at_the_spike", "right_after_the_rollback"])
def test_rollback_from_disk_snapshots_resumes_bitwise_after_a_crash(tmp_path, monkeypatch, when):
    """A run killed mid-way and resumed ends exactly where the uninterrupted run ends: killed at
    the spike, it resumes from a checkpoint newer than the snapshot and rolls back to the disk
    snapshot; killed right after the rollback, it must not resume from the abandoned branch's
    checkpoints."""
    import proxy.train as train_module

    def cfg(**train_extra):
        remedy = _rollback(rollback_storage="disk", rollback_max=10)
        remedy.update(detector=dict(baseline="mean", sigma=1.5, window=10, min_history=5))
        return tiny_cfg(
            remedy=remedy, train=dict(steps=40, log_every=1, ckpt_every=5, keep_checkpoints=10, **train_extra)
        )

    full = train(cfg(), tmp_path / "full")
    a = load_run(tmp_path / "full")
    assert not (tmp_path / "full" / "rollback").exists()  # a finished run deletes its snapshots
    crash_at, event = _crash_point(tmp_path / "full", ckpt_every=5)
    crash_at += when == "right_after_the_rollback"

    real_step = train_module.Trainer.train_step
    calls = {"n": 0}

    def crashing_step(self, step, logging_step):
        calls["n"] += 1
        if calls["n"] == crash_at:  # before the step runs
            assert step == (event["step"] if when == "at_the_spike" else event["restore_step"])
            raise KeyboardInterrupt("killed")
        return real_step(self, step, logging_step)

    monkeypatch.setattr(train_module.Trainer, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), tmp_path / "crashed")
    monkeypatch.setattr(train_module.Trainer, "train_step", real_step)
    snapshot = tmp_path / "crashed" / "rollback" / f"step_{event['restore_step']:07d}.pt"
    ckpts = [int(p.stem.split("_")[1]) for p in (tmp_path / "crashed" / "checkpoints").glob("step_*.pt")]
    if when == "at_the_spike":
        assert snapshot.is_file() and max(ckpts) > event["restore_step"]  # older than the checkpoint
    else:
        assert max(ckpts) <= event["restore_step"]  # the abandoned branch's checkpoints are gone
    resumed = train(cfg(resume=True), tmp_path / "crashed")
    b = load_run(tmp_path / "crashed")
    assert resumed["status"] == "completed"
    assert a.series("train/loss") == b.series("train/loss")  # bitwise
    assert a.series("val/loss") == b.series("val/loss")
    assert full["final_val_loss"] == resumed["final_val_loss"]

    def strip(events: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "rolled_back"} for e in events]

    assert strip(a.events) == strip(b.events)


def test_zclip_runs_and_reports(tmp_path):
    remedy = dict(kind="zclip", zclip_z=0.1, zclip_warmup=3)
    summary = train(tiny_cfg(remedy=remedy, train=dict(steps=20)), tmp_path / "zc")
    events = [e for e in load_run(tmp_path / "zc").events if e["event"] == "zclip"]
    assert summary["status"] == "completed" and events
    assert all(e["clipped_to"] < e["value"] for e in events)


def test_wandb_rows_carry_the_trainer_step_so_replayed_steps_are_kept(tmp_path, monkeypatch):
    """wandb drops a row logged at a step= lower than one it has seen; a rollback re-runs
    steps, so every row carries the trainer's step as its own x-axis metric instead."""
    import wandb

    calls = {"define": [], "log": []}

    class FakeRun:
        summary: dict = {}

        def define_metric(self, name, **kw):
            calls["define"].append((name, kw))

        def log(self, row, **kw):
            calls["log"].append((row, kw))

        def finish(self, **kw):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    cfg = tiny_cfg(remedy=_rollback(), train=dict(steps=30, log_every=1), wandb=dict(mode="offline"))
    train(cfg, tmp_path / "rb")
    assert ("*", {"step_metric": "trainer/step"}) in calls["define"]
    assert all(kw == {} and "trainer/step" in row for row, kw in calls["log"])
    steps = [row["trainer/step"] for row, _ in calls["log"] if "train/loss" in row]
    assert any(b < a for a, b in zip(steps, steps[1:])), "a rollback should have replayed steps"
    assert sorted(set(steps)) == list(range(30))


@pytest.mark.parametrize("limit, log_every", [(3, 1), (3, 4), (0, 4)])
def test_a_remedy_that_skips_every_step_ends_the_run_after_the_configured_limit(
    tmp_path, monkeypatch, limit, log_every
):
    """From step 5 on the detector calls every step a spike; with the steps judged on the device
    between read-backs (log_every 4), the run ends where a per-step check ends it."""
    from proxy.train.device_detector import DeviceSpikeDetector

    observe, calls = DeviceSpikeDetector.observe, []

    def spikes_from_5(self, loss, grad_norm, live=None):
        judged = observe(self, loss, grad_norm, live)
        calls.append(len(calls))
        return judged._replace(spike=torch.ones_like(judged.spike)) if len(calls) > 5 else judged

    monkeypatch.setattr(DeviceSpikeDetector, "observe", spikes_from_5)
    cfg = tiny_cfg(
        remedy=dict(kind="skip_step", max_consecutive_skips=limit), train=dict(steps=12, log_every=log_every)
    )
    summary = train(cfg, tmp_path / "run")
    events = load_run(tmp_path / "run").events
    if limit:
        assert summary["status"] == "diverged" and summary["diverged_at_step"] == 5 + limit - 1
        assert summary["tokens"] == (5 + limit - 1) * 4 * 32
        assert "max_consecutive_skips" in events[-1]["reason"]
        assert [e["step"] for e in events if e["event"] == "skip_step"] == [5, 6, 7]
    else:
        assert summary["status"] == "completed"
        assert [e["step"] for e in events if e["event"] == "skip_step"] == list(range(5, 12))


def test_a_remedy_deciding_on_the_device_is_refused_on_mps_in_one_line(tmp_path, monkeypatch):
    """Skip-step and ZClip judge in float64 on the device; MPS has none: refused before any file."""
    from proxy.config import ConfigError
    from proxy.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "resolve_device", lambda name, rank=0: torch.device("mps"))
    for kind in ("skip_step", "zclip"):
        with pytest.raises(ConfigError, match=f"remedy.kind={kind} decides on the device in float64"):
            train(tiny_cfg(remedy=dict(kind=kind)), tmp_path / kind)
        assert not (tmp_path / kind).exists()
