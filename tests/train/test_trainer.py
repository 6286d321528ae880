"""The trainer end to end: learning, divergence as a result, bitwise resume, Hydra runs and sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proxy.config import Config, as_dict
from proxy.records import latest_checkpoint, load_run
from proxy.train import train

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**sections) -> dict:
    cfg = as_dict(Config())
    cfg["train"].update(steps=20, batch_size=4, seq_len=32, log_every=5, eval_every=10, eval_batches=2, progress=False)
    cfg["schedule"]["warmup_steps"] = 5
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": ""}
    return subprocess.run(
        [sys.executable, "-m", "proxy.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_run_record_contract(tmp_path):
    summary = train(tiny_cfg(), tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["steps_completed"] == 20
    assert summary["tokens"] == 20 * 4 * 32
    run = load_run(tmp_path / "run")
    assert run.config["model"]["name"] == "tiny"
    steps, losses = run.series("train/loss")
    assert steps == [0, 5, 10, 15, 19]
    row = run.metrics[1]
    for key in (
        "optim/lr",
        "optim/grad_norm",
        "train/z_loss",
        "attn/max_logit/layer_0",
        "attn/max_logit/layer_1",
        "output/logit_mean",
        "output/lse_mean",
        "perf/tokens_per_s",
        "grad_rms/blocks.0.mlp.fc_in.weight",
        "update_rms/blocks.0.mlp.fc_in.weight",
        "param_norm/embed.weight",
    ):
        assert key in row, key
    val_steps, _ = run.series("val/loss")
    assert val_steps == [0, 10, 20]
    assert summary["loss_at_init"] == run.series("val/loss")[1][0]
    ckpt = latest_checkpoint(tmp_path / "run")
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 20


@pytest.mark.slow
def test_tiny_model_learns_beyond_unigram(tmp_path):
    """A few hundred steps take the val loss well below the unigram entropy of the synthetic source."""
    cfg = tiny_cfg(
        train=dict(steps=300, batch_size=16, seq_len=64, eval_every=300, log_every=50),
        optim=dict(lr=1e-2),
        schedule=dict(warmup_steps=30),
    )
    summary = train(cfg, tmp_path / "run")
    info = summary["data"]
    unigram, optimal = info["unigram_entropy"], info["optimal_loss"]
    assert summary["status"] == "completed"
    # closes at least half of the gap between unigram statistics and the Bayes-optimal loss
    assert summary["final_val_loss"] < unigram - 0.5 * (unigram - optimal), (summary["final_val_loss"], info)


def test_huge_lr_diverges_cleanly_with_exit_zero(tmp_path):
    result = cli(
        "optim.lr=1e4",
        "optim.grad_clip=0",
        "schedule.warmup_steps=0",
        "train.steps=40",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.eval_every=20",
        "train.eval_batches=1",
        "train.progress=false",
        f"out_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_at_step"] is not None and summary["diverged_at_step"] < 40
    assert load_run(tmp_path / "run").events[0]["event"] == "diverged"


def test_resume_is_bitwise_identical(tmp_path):
    full = train(tiny_cfg(train=dict(ckpt_every=0)), tmp_path / "full")
    part = tiny_cfg(train=dict(steps=20, ckpt_every=10, keep_checkpoints=5))
    # an interrupted run: stop after the step-10 checkpoint by truncating the plan, then resume
    train(tiny_cfg(train=dict(steps=20, ckpt_every=10, keep_checkpoints=5)), tmp_path / "resumed")
    for extra in sorted((tmp_path / "resumed" / "checkpoints").glob("step_*.pt"))[1:]:
        extra.unlink()  # keep only step 10: the state of a run killed between 10 and 20
    part["train"]["resume"] = True
    resumed = train(part, tmp_path / "resumed")
    assert resumed["status"] == "completed"
    a, b = load_run(tmp_path / "full"), load_run(tmp_path / "resumed")
    assert a.series("train/loss") == b.series("train/loss")  # bitwise: floats compared exactly
    assert a.series("val/loss") == b.series("val/loss")
    assert full["final_val_loss"] == resumed["final_val_loss"]
    steps = [row["step"] for row in b.metrics]
    assert len(steps) == len([row["step"] for row in a.metrics]), "no duplicated rows after resume"


def test_cli_single_run_with_overrides(tmp_path):
    result = cli(
        "model=tiny",
        "optim.lr=3e-3",
        "model.qk_norm=layernorm",
        "train.steps=5",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eval_every=5",
        "train.eval_batches=1",
        "train.log_every=1",
        "hydra.run.dir=" + str(tmp_path / "single"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (
        summary["run_name"] == "model.qk_norm=layernorm,model=tiny,optim.lr=3e-3,train.batch_size=2,"
        "train.eval_batches=1,train.eval_every=5,train.log_every=1,train.seq_len=16,train.steps=5"
    )
    assert (tmp_path / "single" / ".hydra" / "config.yaml").exists()
    assert "completed" in result.stdout


def test_cli_multirun_two_by_two(tmp_path):
    result = cli(
        "-m",
        "optim.lr=1e-3,3e-2",
        "model.qk_norm=off,layernorm",
        "train.steps=4",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eval_every=4",
        "train.eval_batches=1",
        "train.progress=false",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert len(summaries) == 4
    assert {s["status"] for s in summaries} == {"completed"}
    assert {s["sweep_id"] for s in summaries} == {"sweep"}
    assert {s["lr"] for s in summaries} == {1e-3, 3e-2}
    assert len({s["run_name"] for s in summaries}) == 4


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.qk_norm=sometimes", "qk_norm"),
        ("model.n_layerz=3", "n_layerz"),
        ("model.d_model=66", "model.d_model=66"),
        ("optim.lr=-1", "optim.lr"),
        ("model=huge", "model"),
        ("train.steps=-5", "train.steps"),
    ],
)
def test_cli_bad_config_is_one_clear_line(tmp_path, override, needle):
    result = cli("train.steps=2", override, cwd=tmp_path)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and needle in lines[0]
    # refused before anything is written: no run folder, not even Hydra's .hydra/ and an empty log
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]


def test_cli_missing_data_file_is_one_clear_line(tmp_path):
    result = cli("data.source=memmap", f"data.path={tmp_path / 'nope.bin'}", "train.steps=2", cwd=tmp_path)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nope.bin" in lines[0], result.stderr


def test_fp64_runs_every_computation_in_float64_from_the_same_init(tmp_path):
    """train.dtype=fp64, the precision control: parameters and Adam's state are float64 (the
    init is fp32's, upcast), and on a healthy run it follows the fp32 run to fp32's rounding."""
    from proxy.records import load_state

    fp32 = train(tiny_cfg(train=dict(steps=10, log_every=1)), tmp_path / "fp32")
    fp64 = train(tiny_cfg(train=dict(steps=10, log_every=1, dtype="fp64")), tmp_path / "fp64")
    state = load_state(latest_checkpoint(tmp_path / "fp64"))
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float64}
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert {t.dtype for t in moments if t.is_floating_point() and t.dim() > 0} == {torch.float64}
    assert fp64.backends is not None and fp64.backends["dtype"] == "fp64"
    a, b = load_run(tmp_path / "fp32").series("train/loss")[1], load_run(tmp_path / "fp64").series("train/loss")[1]
    assert a != b and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert fp64.final_val_loss != fp32.final_val_loss


def test_a_run_records_the_commit_it_trained_with_and_the_report_shows_it(tmp_path):
    from proxy.report import build_report
    from proxy.train.runtime import code_version

    root = Path(__file__).resolve().parents[2]
    code_version.cache_clear()  # HEAD now, not when this process first asked
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    summary = train(tiny_cfg(train=dict(steps=4)), tmp_path / "run")
    if head.returncode != 0:  # not a git checkout (a copied tree): nothing to record
        assert summary.code is None
        return
    assert summary.code["commit"] == head.stdout.strip() and isinstance(summary.code["dirty"], bool)
    result = build_report([tmp_path / "run"], tmp_path / "report")
    cell = result.runs[0].code_commit
    assert cell.startswith(head.stdout.strip()[:12]) and (cell.endswith("+dirty") is summary.code["dirty"])
    assert "code_commit" in (tmp_path / "report" / "runs.csv").read_text().splitlines()[0]
