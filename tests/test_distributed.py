"""Data parallel with torchrun (2 processes, gloo, CPU): same global batch, same trajectory."""

import json
import os
import subprocess
import sys

import pytest

from proxy.records import load_run
from proxy.train import train
from tests.test_train import tiny_cfg

ARGS = ["train.steps=12", "train.batch_size=4", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=6", "train.eval_batches=2", "train.progress=false", "schedule.warmup_steps=3",
        "train.save_final=false"]


def torchrun(tmp_path, *extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "proxy.train", *ARGS, *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    cfg = tiny_cfg(train=dict(steps=12, batch_size=4, seq_len=32, log_every=1, eval_every=6, eval_batches=2,
                              save_final=False), schedule=dict(warmup_steps=3))
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
