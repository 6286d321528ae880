"""A resume continues the stored run: it may change where and how the run executes, and nothing
else unless told so (proxy/train/resume.py). Also what a run records about itself: its thread
count, its sweep after a resume, its whole override list behind a shortened directory name; and
what proxy-train says before any job runs (--help, -m with --cfg)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from proxy.analysis import MAX_DIRNAME_BYTES, run_dirname
from proxy.config import ConfigError, to_config
from proxy.records import checkpoints, load_run
from proxy.train import train, train_ensemble
from proxy.train.resume import RESUME_MAY_CHANGE, ResumeRefused, may_change, merge_overrides, touched_keys
from tests.records.test_run_dir_faults import snapshot_of
from tests.train.test_trainer import tiny_cfg

# a short run for the CLI: 20 steps, checkpoints at 10 and 20
CLI_RUN = (
    "optim.lr=2e-3",
    "train.steps=20",
    "train.batch_size=2",
    "train.seq_len=16",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_batches=1",
    "train.ckpt_every=10",
    "train.keep_checkpoints=5",
    "train.progress=false",
    "schedule.warmup_steps=5",
)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": ""}
    return subprocess.run(
        [sys.executable, "-m", "proxy.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def resume_of(cfg: dict, **train_keys) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["train"].update(resume=True, **train_keys)
    return cfg


@pytest.fixture
def stored(tmp_path) -> tuple[dict, Path]:
    """A finished tiny run (checkpoints at 10 and 20) and the config it was made with."""
    cfg = tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=5))
    train(cfg, tmp_path / "run")
    return cfg, tmp_path / "run"


# ============================================================================================
# The check (Python API and CLI alike: RunLedger.claim)
# ============================================================================================
def test_a_resume_that_changes_the_recipe_is_refused_in_one_line_naming_the_keys(stored):
    cfg, run_dir = stored
    before = snapshot_of(run_dir)
    changed = resume_of(cfg)
    changed["optim"]["lr"] = 0.1
    changed["model"]["n_layers"] = 3
    with pytest.raises(ResumeRefused) as info:
        train(changed, run_dir)
    message = str(info.value)
    assert "\n" not in message
    assert "optim.lr (0.003 -> 0.1)" in message and "model.n_layers (2 -> 3)" in message
    assert "train.resume_override=true" in message
    assert snapshot_of(run_dir) == before  # config.yaml, summary.json, metrics, checkpoints as they were


def test_train_steps_may_grow_but_not_shrink(stored):
    cfg, run_dir = stored
    before = snapshot_of(run_dir)
    with pytest.raises(ResumeRefused, match=r"train.steps \(20 -> 10 may only grow\)"):
        train(resume_of(cfg, steps=10), run_dir)
    assert snapshot_of(run_dir) == before
    summary = train(resume_of(cfg, steps=30), run_dir)
    assert summary["status"] == "completed" and summary["steps_completed"] == 30
    assert summary["resumed_with"] == {"train.steps": [20, 30]}


def test_keys_that_say_how_the_run_executes_may_change_and_are_recorded(stored):
    cfg, run_dir = stored
    how = resume_of(cfg, log_every=2, eval_every=5, progress=True, keep_checkpoints=3)
    how["wandb"]["tags"] = ["resumed"]
    summary = train(how, run_dir)
    assert summary["status"] == "completed"
    changed = summary["resumed_with"]
    assert changed.pop("train.progress")  # its type is the schema's business: that it is listed
    assert changed == {
        "train.log_every": [5, 2],
        "train.eval_every": [10, 5],
        "train.keep_checkpoints": [5, 3],
        "wandb.tags": [[], ["resumed"]],
    }
    assert "train.resume" not in summary["resumed_with"]  # the command's own switch is no change
    assert "resume_override" not in summary


def test_resume_override_forces_a_change_and_the_record_keeps_it(stored):
    cfg, run_dir = stored
    forced = resume_of(cfg, steps=30, resume_override=True)
    forced["optim"]["lr"] = 0.01
    summary = train(forced, run_dir)
    assert summary["status"] == "completed" and summary["lr"] == 0.01
    assert summary["resume_override"] == {"optim.lr": [0.003, 0.01]}
    assert summary["resumed_with"] == {"train.steps": [20, 30]}
    # the stored config is now the forced one: continuing it needs no override, and the record
    # still says the run was changed on the way
    again = resume_of(forced, steps=40, resume_override=False)
    summary = train(again, run_dir)
    assert summary["resume_override"] == {"optim.lr": [0.003, 0.01]}
    assert summary["resumed_with"] == {"train.steps": [30, 40]}


def test_resume_override_without_resume_is_a_config_error():
    cfg = tiny_cfg(train=dict(resume_override=True))
    with pytest.raises(ConfigError, match="train.resume_override=true needs train.resume=true"):
        to_config(OmegaConf.create(cfg))


def test_the_list_of_keys_a_resume_may_change():
    assert may_change("train.device", "cpu", "cuda") and may_change("wandb.project", "a", "b")
    assert may_change("train.steps", 20, 40) and not may_change("train.steps", 40, 20)
    for key in (
        "train.dtype",
        "train.eval_batches",
        "train.diverge_factor",
        "data.path",
        "optim.lr",
        "model.d_model",
        "remedy.kind",
        "experiment",
        "train.seed",
        "train.batch_size",
    ):
        assert not may_change(key, 0, 1), key
    assert "train.dtype" not in RESUME_MAY_CHANGE


# ============================================================================================
# What the record says about where the run executed
# ============================================================================================
def test_the_thread_count_is_recorded_and_a_change_of_it_on_resume_too(stored):
    cfg, run_dir = stored
    first = summary_of(run_dir)
    assert first["threads"] == {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    torch.set_num_threads(other)
    try:
        summary = train(resume_of(cfg), run_dir)
    finally:
        torch.set_num_threads(threads)
    assert summary["threads"]["torch"] == other
    assert summary["resumed_with"] == {"threads.torch": [threads, other]}


def test_a_resumed_member_stays_in_its_sweep(tmp_path):
    cfg = tiny_cfg(sweep=dict(lrs=[1e-3, 3e-3]), train=dict(steps=10, ckpt_every=5))
    train_ensemble(cfg, tmp_path / "sweep", sweep_id="s1")
    member = tmp_path / "sweep" / "lr=0.001"
    stored = load_run(member)
    assert stored.summary["sweep_id"] == "s1"
    summary = train(resume_of(stored.config, steps=15), member, run_name=stored.summary["run_name"])
    assert summary["status"] == "completed" and summary["steps_completed"] == 15
    assert summary["sweep_id"] == "s1"  # not null: the sweep it was trained in


# ============================================================================================
# proxy-train: a resume continues the stored config
# ============================================================================================
def test_cli_resume_without_overrides_continues_the_stored_run_bitwise(tmp_path):
    run_dir = tmp_path / "run"
    made = cli(*CLI_RUN, f"out_dir={run_dir}", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    whole = load_run(run_dir)
    for path in checkpoints(run_dir)[1:]:
        path.unlink()  # the state of a run killed between steps 10 and 20
    resumed = cli("train.resume=true", f"out_dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["steps_completed"] == 20  # not the default 300
    assert summary["resumed_from"].endswith("step_0000010.pt") and summary["resumed_with"] == {}
    assert summary["run_name"] == whole.summary["run_name"]
    assert set(whole.summary["overrides"]) <= set(summary["overrides"])  # the run's command line, still whole
    again = load_run(run_dir)
    for key in ("train/loss", "val/loss", "optim/lr"):
        assert again.series(key) == whole.series(key), key  # bitwise: the stored config, every key of it


def test_cli_resume_refuses_a_changed_recipe_in_one_line_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert cli(*CLI_RUN, f"out_dir={run_dir}", cwd=tmp_path).returncode == 0
    before = snapshot_of(run_dir)
    refused = cli("train.resume=true", f"out_dir={run_dir}", "optim.lr=1e-1", "train.steps=40", cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = error_lines(refused)
    assert line.startswith("error: resume refused") and "optim.lr (0.002 -> 0.1)" in line
    assert "train.steps" not in line  # it may grow
    assert snapshot_of(run_dir) == before


def test_cli_resume_of_an_ensemble_member_continues_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    made = cli("sweep.lrs=[1e-3,3e-3]", *CLI_RUN[1:], f"out_dir={sweep_dir}", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    member = sweep_dir / "lr=0.001"
    stored = summary_of(member)
    resumed = cli("train.resume=true", f'out_dir="{member}"', "train.steps=25", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = summary_of(member)
    assert summary["status"] == "completed" and summary["steps_completed"] == 25
    assert summary["lr"] == 1e-3 and summary["resumed_with"] == {"train.steps": [20, 25]}
    assert summary["sweep_id"] == stored["sweep_id"] == "sweep" and summary["run_name"] == stored["run_name"]


def test_the_interrupt_line_gives_a_resume_command_hydra_accepts():
    from proxy.train.cli import resume_command

    assert resume_command(Path("/runs/a-1")) == "proxy-train train.resume=true out_dir=/runs/a-1"
    assert resume_command(Path("/runs/s/lr=0.001")) == "proxy-train train.resume=true 'out_dir=\"/runs/s/lr=0.001\"'"


def test_which_keys_a_resume_command_sets():
    fresh, defaults = tiny_cfg(), tiny_cfg()
    fresh["model"]["qk_norm"] = "layernorm"
    touched = touched_keys(fresh, defaults, ["model.qk_norm=layernorm", "train.steps=20", "model=tiny"])
    assert "model.qk_norm" in touched and "train.steps" in touched  # named, even at its default value
    assert "model.d_model" in touched  # a group override names its whole section
    assert "optim.lr" not in touched
    assert merge_overrides(["a=1", "+b=2", "c=3"], ["b=5", "d=4"]) == ("a=1", "b=5", "c=3", "d=4")


# ============================================================================================
# Run directory names, --help, -m with --cfg
# ============================================================================================
def test_a_long_override_list_names_its_directory_by_whole_overrides_and_records_all(tmp_path):
    long = [
        f"remedy.zclip_alpha=0.9{'7' * 30}",
        "remedy.zclip_z=2.5000000000000000001",
        *(
            f"remedy.{k}={v}"
            for k, v in [
                ("detector.sigma", "6.00000000000001"),
                ("detector.window", 128),
                ("rollback_every", 10),
                ("rollback_keep", 3),
                ("rollback_max", 5),
                ("zclip_warmup", 25),
                ("max_consecutive_skips", 50),
            ]
        ),
    ]
    name = run_dirname(long)
    assert len(name.encode()) <= MAX_DIRNAME_BYTES
    head, _, digest = name.rpartition("~")
    assert len(digest) == 10 and all(part in long for part in head.split(","))  # no cut override
    result = cli(
        "-m",
        "train.steps=2",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.progress=false",
        *long,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "summary.json").exists()]
    assert len(job.name.encode()) <= MAX_DIRNAME_BYTES + len("0_")
    # the full list, in the record (as Hydra's sweeper renders each value: 2.5000000000000000001 -> 2.5)
    recorded = dict(o.split("=", 1) for o in summary_of(job)["overrides"])
    for key, value in (o.split("=", 1) for o in long):
        assert float(recorded[key]) == float(value), key


def test_help_describes_proxy_and_how_to_call_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "proxy.train", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "powered by Hydra" not in result.stdout
    assert result.stdout.startswith("proxy-train: train a small GPT-style Transformer")
    assert "train.resume=true out_dir=" in result.stdout and "+experiment=" in result.stdout


def test_multirun_with_cfg_is_one_line(tmp_path):
    result = cli("-m", "optim.lr=1e-3,3e-3", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert line.startswith("error: ") and "drop -m" in line and "Traceback" not in result.stderr
