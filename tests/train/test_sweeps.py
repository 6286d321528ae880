"""Sweep presets and launchers compose, and a real tiny multirun goes through to the report."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from proxy.config import register_configs, to_config
from proxy.demo import demo_command, headline
from proxy.report import build_report

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PRESETS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
TINY = [
    "train.steps=24",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.log_every=2",
    "train.eval_every=12",
    "train.eval_batches=1",
    "schedule.warmup_steps=2",
]


def composed(overrides: list[str], hydra_config: bool = True):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def test_required_presets_exist() -> None:
    assert {"demo", "lr_sweep/qk_norm", "lr_sweep/z_loss"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_sweep_point_of_a_preset_is_a_valid_config(preset: str) -> None:
    cfg = composed([f"+experiment={preset}"])
    # presets are grouped per study, conf/experiment/<study>/<scale>.yaml: lab, gpu, lease (sized for
    # one GPU lease, benchmarks/science/queue.yaml), a sub-study's <part>_<scale>, and an earlier
    # protocol's with _p<N> (it reproduces a committed result). The report groups and titles by the
    # experiment name, which a study's scales share.
    study, _, scale = preset.rpartition("/")
    scale = re.sub(r"_p\d+$", "", scale)
    lr_sweep = preset == "demo" or study == "lr_sweep"
    if study == "lr_sweep":  # the LR-sweep recipes of the README: one preset each
        assert cfg.experiment == f"{scale}_lr_sweep"
    elif study:
        part, _, kind = scale.rpartition("_")
        assert (kind or scale) in ("lab", "gpu", "lease"), f"{preset}: a scale is lab, gpu or lease"
        assert cfg.experiment == (f"{study}_{part}" if part else study)
    else:
        assert preset == cfg.experiment == "demo"
    params = dict(cfg.hydra.sweeper.params)
    grid = [float(v) for v in str(params["optim.lr"]).split(",")] if "optim.lr" in params else list(cfg.sweep.lrs)
    assert grid or not lr_sweep, "an LR-sweep preset sweeps optim.lr (jobs) or sweep.lrs (ensembles)"
    assert str(cfg.hydra.sweep.dir).startswith((f"runs/{cfg.experiment}", f"runs/{study}/"))
    # each value of each swept key composes and validates (typos and bad enum values fail here)
    for key, values in params.items():
        for value in str(values).split(","):
            point = to_config(composed([f"+experiment={preset}", f"{key}={value}"], hydra_config=False))
            assert point.experiment == cfg.experiment
    if lr_sweep:
        lrs = sorted(grid)
        assert len(lrs) >= 3 and lrs[-1] / lrs[0] >= 10  # spans at least a decade


def test_demo_preset_is_qk_norm_off_vs_on_on_the_tiny_model() -> None:
    cfg = composed(["+experiment=demo"])
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"model.qk_norm", "optim.lr"}
    assert set(str(params["model.qk_norm"]).split(",")) == {"off", "layernorm"}
    assert cfg.model.name == "tiny"
    n_runs = len(list(itertools.product(*(str(v).split(",") for v in params.values()))))
    assert n_runs * cfg.train.steps <= 4000  # the CPU budget the demo was measured against


def test_sizes_are_swept_where_promised() -> None:
    params = dict(composed(["+experiment=lr_sweep/qk_norm"]).hydra.sweeper.params)
    assert set(str(params["model"]).split(",")) == {"tiny", "1m"}
    # a size picked on the command line replaces the preset's model
    assert composed(["+experiment=lr_sweep/qk_norm", "model=5m"]).model.name == "5m"


def test_slurm_launcher_settings() -> None:
    cfg = composed(["hydra/launcher=slurm", "+experiment=lr_sweep/qk_norm", "hydra.launcher.partition=a100"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "a100"
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 120 and launcher.array_parallelism == 16
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # logs beside the runs
    assert launcher.max_num_timeout == 0


def test_local_launcher_is_joblib_processes() -> None:
    launcher = composed(["hydra/launcher=local"]).hydra.launcher
    assert launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert launcher.n_jobs == 2 and launcher.prefer == "processes"


def test_real_tiny_multirun_then_report(tmp_path: Path) -> None:
    """2 LRs x 2 variants through Hydra on CPU, then the report on the sweep directory."""
    sweep = tmp_path / "sweep"
    # one thread per process: on a shared 2-core machine two OpenMP threads contending with
    # other work slow tiny steps down 10-20x
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.train",
            "-m",
            "+experiment=demo",
            f"hydra.sweep.dir={sweep}",
            "model.qk_norm=off,layernorm",
            "optim.lr=1e-3,1e-1",
            *TINY,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    assert len({s["sweep_id"] for s in summaries}) == 1 and summaries[0]["sweep_id"] == sweep.name
    for s in summaries:  # the run name shows the overrides that make the run
        swept = [o for o in s["overrides"] if o.startswith(("optim.lr=", "model.qk_norm="))]
        assert len(swept) == 2 and all(o in s["run_name"] for o in swept)
        assert s["experiment"] == "demo"

    result = build_report([sweep], tmp_path / "report")
    assert len(result.runs) == 4
    assert [row.status for row in result.runs] == ["completed"] * 4
    assert {row.variant for row in result.runs} == {"model.qk_norm=off", "model.qk_norm=layernorm"}
    assert sorted({row.lr for row in result.runs}) == [1e-3, 1e-1]
    for row in result.sensitivity:
        assert row.lrs == [1e-3, 1e-1] and row.sensitivity is not None and row.sensitivity >= 0
    with open(result.csv) as f:
        assert sum(1 for _ in f) == 5  # header + 4 runs
    assert result.html.is_file() and {"loss", "attn_max_logit", "grad_norm", "lr_vs_loss"} <= set(result.figures)
    # the trainer's keys reach the table
    row = result.runs[0]
    assert row.loss_at_init is not None and row.max_attn_logit_peak is not None
    assert row.spike_score_grad_norm is not None and row.output_logit_mean_final is not None
    lines = headline(result)  # the comparison, then one line per variant
    assert len(lines) == 3 and "off vs layernorm" in lines[0], lines


def test_demo_command_is_the_documented_multirun(tmp_path: Path) -> None:
    cmd = demo_command(tmp_path / "s", ["train.steps=5"])
    assert cmd[1:] == [
        "-m",
        "proxy.train",
        "-m",
        "+experiment=demo",
        f"hydra.sweep.dir={tmp_path / 's'}",
        "train.steps=5",
    ]
    two = demo_command(tmp_path / "s", ["train.steps=5"], workers=2)
    assert two[5:] == [
        f"hydra.sweep.dir={tmp_path / 's'}",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        "train.steps=5",
    ]  # the user's overrides come last, so they win


def test_demo_workers_run_one_thread_each_unless_the_user_says() -> None:
    from proxy.demo import default_workers, demo_env

    assert 1 <= default_workers() <= 8
    assert demo_env(2, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert demo_env(2, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in demo_env(1, {})


def test_demo_rejects_a_malformed_override(capsys: pytest.CaptureFixture) -> None:
    from proxy.demo import main

    assert main(["not_an_override"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_an_override" in err[0]
    assert main(["--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers" in err[0]


def test_demo_end_to_end_on_two_workers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The demo as a user runs it: 8 runs on two single-threaded workers, then the report."""
    from proxy.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--workers", "2", *TINY, "train.steps=8", "train.eval_every=8"]) == 0
    printed = capsys.readouterr().out
    assert "(2 workers)" in printed and "8 runs in" in printed and "off vs layernorm" in printed
    assert (out / "report" / "report.html").is_file()
    assert len(list(out.glob("*/summary.json"))) == 8
