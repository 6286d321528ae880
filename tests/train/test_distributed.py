"""Data parallel with torchrun (2 processes, gloo, CPU): same global batch, same trajectory."""

import json
import os
import subprocess
import sys

import pytest

from proxy.records import load_run
from proxy.train import train
from tests.train.test_trainer import tiny_cfg

ARGS = [
    "train.steps=12",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.progress=false",
    "schedule.warmup_steps=3",
    "train.save_final=false",
]


def torchrun(tmp_path, *extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "proxy.train",
        *ARGS,
        *extra,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    cfg = tiny_cfg(
        train=dict(steps=12, batch_size=4, seq_len=32, log_every=1, eval_every=6, eval_batches=2, save_final=False),
        schedule=dict(warmup_steps=3),
    )
    single = train(cfg, tmp_path / "single")
    result = torchrun(tmp_path, f"hydra.run.dir={tmp_path / 'ddp'}")
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["status"] == "completed" and ddp["tokens"] == single["tokens"]
    a, b = load_run(tmp_path / "single"), load_run(tmp_path / "ddp")
    for key in ("train/loss", "optim/grad_norm", "val/loss", "attn/max_logit"):
        steps_a, values_a = a.series(key)
        steps_b, values_b = b.series(key)
        assert steps_a == steps_b, key
        assert values_b == pytest.approx(values_a, rel=1e-5, abs=1e-6), key
    # only rank 0 wrote a record: one metrics file, no stray run dirs in the working directory
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ddp_divergence_stops_all_ranks(tmp_path):
    result = torchrun(tmp_path, "optim.lr=1e4", "optim.grad_clip=0", f"hydra.run.dir={tmp_path / 'div'}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "div" / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_slurm_tasks_become_torch_ranks(monkeypatch):
    """Inside a submitit SLURM job with 2 tasks, task 1 is rank 1 of 2 (no torchrun involved)."""
    from proxy.train import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so the variables export() sets are undone after the test
        monkeypatch.delenv(key)
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node7",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    info = distributed.from_env()
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert os.environ["MASTER_ADDR"] == "node7"


def test_slurm_ddp_launcher_preset_composes(repo_root):
    from hydra import compose, initialize_config_dir

    from proxy.config import register_configs

    register_configs()
    with initialize_config_dir(str(repo_root / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm_ddp", "hydra.launcher.partition=a100"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher.partition == "a100"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4
    assert "SlurmLauncher" in launcher._target_
