"""What people who live in notebooks, dashboards and terminals see: the TensorBoard sink, runs as
DataFrames, the progress bar (on wherever there is a terminal, with tokens/s and the val loss),
the sweep's progress line and a train.log with the run's key lines."""

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from proxy.config import Config, ConfigError, as_dict, to_config
from proxy.records import ROLLBACK, STEP, TENSORBOARD_DIR, RunRecord, load_run
from proxy.train import runtime, sweep_status, train
from proxy.train.tracking import LogSink, TensorBoardSink, end_line

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**train_keys) -> dict:
    cfg = as_dict(Config())
    cfg["train"].update(steps=6, batch_size=2, seq_len=16, log_every=2, eval_every=3, eval_batches=1, progress="false")
    cfg["train"].update(train_keys)
    cfg["schedule"]["warmup_steps"] = 2
    return cfg


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": ""}
    return subprocess.run(
        [sys.executable, "-m", "proxy.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


# --------------------------------------------------------------------------------------------
# The progress bar
# --------------------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_defaults_to_auto_which_follows_the_terminal(monkeypatch):
    assert Config().train.progress == "auto"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not runtime.progress_wanted("auto")
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert runtime.progress_wanted("auto")
    monkeypatch.setattr(runtime.multiprocessing, "parent_process", lambda: object())  # a joblib worker
    assert not runtime.progress_wanted("auto")
    # true and false as before (a YAML or command-line false arrives as the string "False")
    assert runtime.progress_wanted("true") and runtime.progress_wanted(True)
    assert not runtime.progress_wanted(to_config({"train": {"progress": False}}).train.progress)


def test_progress_setting_is_checked():
    with pytest.raises(ConfigError, match="train.progress='sometimes' must be auto, true or false"):
        to_config({"train": {"progress": "sometimes"}})


def test_no_preset_turns_the_progress_bar_off():
    presets = sorted((ROOT / "conf").rglob("*.yaml"))
    assert presets
    for preset in presets:
        train_section = OmegaConf.to_container(OmegaConf.load(preset)).get("train") or {}
        assert "progress" not in train_section, f"{preset.relative_to(ROOT)} sets train.progress"


def test_bar_keeps_the_latest_val_loss_and_shows_tokens_per_second(capsys):
    bar = runtime.progress_bar(10, "true", "run", 0)
    runtime.show_row(bar, {"val/loss": 4.25})
    runtime.show_row(bar, {"train/loss": 4.5, "optim/lr": 1e-3, "optim/grad_norm": 0.5, "perf/tokens_per_s": 12345.0})
    postfix = bar.bar.postfix
    bar.close()
    assert postfix.startswith("loss=4.500, val=4.250, tok/s=12.3k"), postfix


def test_trainer_bar_shows_val_loss_and_tokens_per_second(tmp_path, capsys):
    train(tiny_cfg(progress="true"), tmp_path / "run")
    err = capsys.readouterr().err
    assert "val=" in err and "tok/s=" in err


def test_bar_writes_console_log_lines_above_itself():
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stdout)
    root.addHandler(console)
    try:
        bar = runtime.progress_bar(10, "true", "run", 0)
        assert console not in root.handlers  # replaced by tqdm's writer while the bar is open
        bar.close()
        assert console in root.handlers
    finally:
        root.removeHandler(console)


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------
def test_tensorboard_sink_has_the_metrics_keys_and_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg()
    cfg["tensorboard"] = {"enabled": True}
    train(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR))
    events.Reload()
    run = load_run(tmp_path / "run")
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "optim/lr", "perf/tokens_per_s"} <= tags
    assert "trainer/step" not in tags and STEP not in tags
    for key in ("train/loss", "val/loss"):
        steps, values = run.series(key)
        logged = events.Scalars(key)
        assert [e.step for e in logged] == steps
        assert [e.value for e in logged] == pytest.approx(values, rel=1e-6)


def test_tensorboard_is_off_by_default(tmp_path):
    assert Config().tensorboard.enabled is False
    train(tiny_cfg(), tmp_path / "run")
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()


def test_missing_tensorboard_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError) as err:
        TensorBoardSink(tmp_path)
    assert "\n" not in str(err.value) and "pip install 'proxy[tensorboard]'" in str(err.value)


def test_tensorboard_resume_purges_what_came_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    for step in range(6):
        sink.log(step, {"train/loss": 1.0, "note": "not a number"})
    sink.finish()
    resumed = TensorBoardSink(tmp_path, resume_step=3)
    for step in range(3, 5):
        resumed.log(step, {"train/loss": 2.0})
    resumed.finish()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (0, 1.0),
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
        (4, 2.0),
    ]


# --------------------------------------------------------------------------------------------
# DataFrames
# --------------------------------------------------------------------------------------------
def rolled_back_run(path: Path, name: str) -> None:
    record = RunRecord(path)
    record.update(
        status="completed", run_name=name, final_val_loss=3.5, overrides=["optim.lr=0.1"], data={"vocab_size": 512}
    )
    (path / "config.yaml").write_text("optim:\n  lr: 0.1\ntrain:\n  steps: 6\n")
    for step in range(4):
        record.log(step, {"train/loss": 5.0 - step})
    record.event(3, "skip_step", loss=9.0)
    record.event(3, ROLLBACK, restore_step=2, data_position=6)
    for step in range(2, 6):
        record.log(step, {"train/loss": 4.0 - step / 10})
    record.close()


def test_frames_set_events_and_rolled_back_rows_apart(tmp_path):
    pytest.importorskip("pandas")
    from proxy.frames import load_frames

    rolled_back_run(tmp_path / "a", "lr=0.1")
    frames = load_frames(tmp_path)
    assert list(frames.runs["run"]) == ["lr=0.1"]
    row = frames.runs.iloc[0]
    assert row["status"] == "completed" and row["final_val_loss"] == 3.5 and row["config.optim.lr"] == 0.1
    assert row["overrides"] == "optim.lr=0.1" and "data" not in frames.runs.columns  # nested fields left out
    assert list(frames.metrics.columns[:2]) == ["run", "step"]
    assert list(frames.metrics["step"]) == [0, 1, 2, 3, 4, 5]  # the kept trajectory, no duplicates
    assert list(frames.metrics["train/loss"]) == [5.0, 4.0, 3.8, 3.7, 3.6, 3.5]
    assert list(frames.abandoned["step"]) == [2, 3] and list(frames.abandoned["train/loss"]) == [3.0, 2.0]
    assert set(frames.abandoned["branch"]) == {0} and set(frames.abandoned["rollback_step"]) == {3}
    assert list(frames.events["event"]) == ["skip_step", ROLLBACK]
    assert list(frames.events["rolled_back"]) == [True, False]
    assert "event" not in frames.metrics.columns


def test_frames_name_runs_by_path_where_names_repeat(tmp_path):
    pytest.importorskip("pandas")
    from proxy.frames import load_frames

    rolled_back_run(tmp_path / "sweep1" / "x", "same")
    rolled_back_run(tmp_path / "sweep2" / "x", "same")
    frames = load_frames(tmp_path / "sweep1", tmp_path / "sweep2")
    assert sorted(frames.runs["run"]) == ["sweep1/x", "sweep2/x"]
    assert set(frames.metrics["run"]) == {"sweep1/x", "sweep2/x"}


def test_frames_of_a_real_run_and_empty_frames_keep_their_columns(tmp_path):
    pytest.importorskip("pandas")
    from proxy.frames import load_frames

    train(tiny_cfg(), tmp_path / "run")
    frames = load_frames(tmp_path / "run")
    assert frames.runs.iloc[0]["steps_completed"] == 6
    assert frames.metrics["val/loss"].dropna().size == 3
    assert frames.events.empty and list(frames.events.columns[:3]) == ["run", "step", "event"]
    assert frames.abandoned.empty and "rollback_step" in frames.abandoned.columns


def test_frames_without_pandas_is_one_line(tmp_path, monkeypatch):
    from proxy import frames

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError) as err:
        frames.load_frames(tmp_path)
    assert str(err.value) == frames.PANDAS_MISSING


# --------------------------------------------------------------------------------------------
# train.log and the sweep's line
# --------------------------------------------------------------------------------------------
def test_log_sink_lines(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="proxy.train")
    sink = LogSink("lr=0.1", tmp_path, 6)
    sink.started({"n_params": 123_456, "device": "cpu", "steps_planned": 6, "lr": 0.1})
    sink.log(0, {"val/loss": 6.25})
    sink.log(2, {"train/loss": 5.5})
    sink.log(3, {"val/loss": 5.125})
    sink.summary({"status": "completed", "steps_completed": 6, "final_val_loss": 4.5, "wall_time_s": 75.0})
    sink.finish()
    assert caplog.messages == [
        f"start lr=0.1: 0.12M params on cpu, 6 steps at lr 0.1 -> {tmp_path}",
        "step 0/6: val loss 6.2500",
        "step 3/6: val loss 5.1250 (last logged train loss 5.5000)",
        "end lr=0.1: completed after 6 steps, val loss 4.5000, 1m15s",
    ]
    assert (
        end_line("x", {"status": "diverged", "diverged_at_step": 37, "steps_completed": 37})
        == "end x: diverged at step 37 after 37 steps"
    )


def write_sweep(sweep: Path, statuses: list[list[str]], started_s_ago: float) -> None:
    sweep.mkdir(parents=True)
    config = {
        "hydra": {
            "sweeper": {"_target_": sweep_status.BASIC_SWEEPER, "params": {"model.qk_norm": "off,layernorm"}},
            "overrides": {"task": ["optim.lr=1e-2,3e-2", "train.steps=4"]},
        }
    }
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    t = time.time() - started_s_ago
    os.utime(sweep / "multirun.yaml", (t, t))
    for i, job in enumerate(statuses):
        folder = sweep / f"{i}_job"
        folder.mkdir()
        places = [folder] if len(job) == 1 else [folder / f"m{k}" for k in range(len(job))]
        for place, status in zip(places, job):
            place.mkdir(exist_ok=True)
            (place / "summary.json").write_text(json.dumps({"status": status}))


def test_sweep_line_counts_done_runs_of_the_grid_and_estimates_the_rest(tmp_path):
    # 2 x 2 grid; job 0 completed, job 1 diverged, job 2 an ensemble with a member still running
    write_sweep(tmp_path / "s", [["completed"], ["diverged"], ["completed", "running"]], started_s_ago=100)
    assert sweep_status.planned_jobs(tmp_path / "s") == 4
    progress = sweep_status.sweep_progress(tmp_path / "s")
    assert progress.done == 2 and progress.planned == 4
    line = progress.line()
    # 50 s a job so far, 2 jobs left, 2 at a time (the one running and the slot just freed)
    assert line.startswith("sweep: 2/4 runs done (1 completed, 1 diverged), 1m4") and line.endswith("ETA 50s")
    assert sweep_status.sweep_progress(tmp_path / "nothing_here") is None


def test_the_eta_counts_the_jobs_that_run_at_once_and_the_done_jobs_own_times(tmp_path):
    # joblib with 2 workers, 8 jobs of ~60 s: at the first job's end (61 s in) another runs
    sweep = tmp_path / "s"
    write_sweep(sweep, [["completed"], ["running"]], started_s_ago=61)
    (sweep / "0_job" / "summary.json").write_text(json.dumps({"status": "completed", "wall_time_s": 60.0}))
    config = OmegaConf.load(sweep / "multirun.yaml")
    config.hydra.sweeper.params = {"model.qk_norm": "off,layernorm,rmsnorm,qknorm"}
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(config))
    progress = sweep_status.sweep_progress(sweep)
    assert (progress.done, progress.planned, progress.running, progress.job_s) == (1, 8, 1, 60.0)
    assert progress.line().endswith("ETA 3m30s")  # 7 jobs x 60 s / 2 at a time (the old rule said 7m07s)
    # sequential (nothing else running): the jobs one after another
    (sweep / "1_job" / "summary.json").write_text(json.dumps({"status": "completed", "wall_time_s": 60.0}))
    assert sweep_status.sweep_progress(sweep).line().endswith("ETA 6m00s")


def test_a_finished_multirun_says_where_it_is_and_what_to_run_next(tmp_path):
    write_sweep(tmp_path / "s", [["completed"], ["diverged"], ["completed"], ["completed"]], started_s_ago=30)
    (tmp_path / "experiments" / "found").mkdir(parents=True)
    (tmp_path / "experiments" / "found" / "verdict.py").write_text("")
    lines = sweep_status.end_lines(tmp_path / "s", "found", root=tmp_path)
    assert lines[0] == f"sweep folder: {tmp_path / 's'}"
    assert lines[1].startswith("sweep: 4/4 runs done (3 completed, 1 diverged)") and "ETA" not in lines[1]
    assert lines[2] == f"next: proxy-verdict experiments/found {tmp_path / 's'}"
    assert sweep_status.end_lines(tmp_path / "s", None, root=tmp_path)[2] == f"next: proxy-report {tmp_path / 's'}"
    # a class's one-seed run: the report first, and why not the verdict (it judges 3 seeds or more)
    for job in (tmp_path / "s").iterdir():
        if job.is_dir():
            (job / "config.yaml").write_text("train:\n  seed: 0\n")
    one_seed = sweep_status.end_lines(tmp_path / "s", "found", root=tmp_path)[2]
    assert one_seed.startswith(f"next: proxy-report {tmp_path / 's'}") and "this sweep has 1" in one_seed
    (tmp_path / "s" / "1_job" / "config.yaml").write_text("train:\n  seed: 1\n")
    (tmp_path / "s" / "2_job" / "config.yaml").write_text("train:\n  seed: 2\n")
    assert sweep_status.end_lines(tmp_path / "s", "found", root=tmp_path)[2].startswith("next: proxy-verdict")


def test_sweep_line_is_said_once_per_finished_job(tmp_path):
    write_sweep(tmp_path / "s", [["completed"], ["completed", "running"]], started_s_ago=10)
    assert sweep_status.new_line(tmp_path / "s").startswith("sweep: 1/4 runs done")
    assert sweep_status.new_line(tmp_path / "s") is None  # an ensemble member that left its job running
    (tmp_path / "s" / "1_job" / "m1" / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert sweep_status.new_line(tmp_path / "s").startswith("sweep: 2/4 runs done")


def test_multirun_train_log_has_the_key_lines_and_the_sweep_line(tmp_path):
    result = cli(
        "-m",
        "optim.lr=1e-3,3e-2",
        "train.steps=4",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eval_every=2",
        "train.eval_batches=1",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    logs = sorted((tmp_path / "sweep").glob("*/train.log"))
    assert len(logs) == 2
    first, second = (p.read_text() for p in logs)
    for text in (first, second):
        assert "start optim.lr=" in text and "step 2/4: val loss" in text and "step 4/4: val loss" in text
        assert ": completed after 4 steps, val loss" in text
    assert "sweep: 1/2 runs done (1 completed)" in first and ", ETA " in first
    assert "sweep: 2/2 runs done (2 completed)" in second
    assert "sweep: 2/2 runs done" in result.stdout
    assert f"sweep folder: {tmp_path / 'sweep'}" in result.stdout  # the multirun's end (hydra.callbacks)
    assert f"next: proxy-report {tmp_path / 'sweep'}" in result.stdout
