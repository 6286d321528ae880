"""Remedies wired into the loop: their actions are events in metrics.jsonl and change the run."""

from proxy.records import load_run
from proxy.train import train
from tests.test_train import tiny_cfg


def _hair_trigger(kind: str, **extra) -> dict:
    """A detector so sensitive (0.5 sigma over 5 steps) that ordinary noise sets it off."""
    return dict(kind=kind, spike_sigma=0.5, spike_window=5, spike_min_history=3, **extra)


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


def test_rollback_rewinds_and_skips_data(tmp_path):
    remedy = _hair_trigger("rollback", rollback_every=5, rollback_keep=3, rollback_min_age=5,
                           rollback_skip_batches=7, rollback_max=2)
    summary = train(tiny_cfg(remedy=remedy, train=dict(steps=30)), tmp_path / "rb")
    run = load_run(tmp_path / "rb")
    rollbacks = [e for e in run.events if e["event"] == "rollback"]
    assert summary["status"] == "completed"
    assert 1 <= len(rollbacks) <= 2
    first = rollbacks[0]
    assert first["restore_step"] <= first["step"] - 5 and first["restore_step"] % 5 == 0
    # after a rollback the loop re-runs steps from the snapshot: some step is logged twice
    steps = [row["step"] for row in run.metrics if "train/loss" in row]
    assert len(steps) > len(set(steps))
    assert summary["steps_completed"] == 30


def test_zclip_runs_and_reports(tmp_path):
    remedy = dict(kind="zclip", zclip_z=0.1, zclip_warmup=3)
    summary = train(tiny_cfg(remedy=remedy, train=dict(steps=20)), tmp_path / "zc")
    events = [e for e in load_run(tmp_path / "zc").events if e["event"] == "zclip"]
    assert summary["status"] == "completed" and events
    assert all(e["clipped_to"] < e["value"] for e in events)
