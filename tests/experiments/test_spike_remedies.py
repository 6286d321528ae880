"""The spike-remedies study (experiments/spike_remedies): presets and arms compose, the verdict
decides on constructed sweeps (one where every remedy works, one where they do not), the figure
script runs, and a shrunken study runs end to end through proxy-train and the judge.

Constructed runs go through proxy.records (RunRecord / write_json), the contract the trainer
writes, rollbacks included (their abandoned rows and events in file order).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from proxy.config import register_configs, to_config
from proxy.records import RunRecord, write_json
from proxy.verdict import judge_runs

REPO = Path(__file__).resolve().parents[2]
FINDING = REPO / "experiments" / "spike_remedies"
ARMS = ("clean", "none", "skip_step", "rollback", "zclip", "mask")
START, END, STEPS = 150, 200, 400


def composed(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("scale", ["lab", "gpu"])
def test_presets_compose_and_each_arm_sets_what_it_names(scale: str) -> None:
    cfg = composed([f"+experiment=spike_remedies/{scale}"])
    assert cfg.experiment == "spike_remedies"
    assert str(cfg.hydra.sweep.dir).startswith("runs/spike_remedies")
    assert str(cfg.hydra.sweeper.params["+arm"]).split(",") == list(ARMS)
    assert cfg.train.save_final is False
    for arm in ARMS:
        point = composed([f"+experiment=spike_remedies/{scale}", f"+arm={arm}", "train.seed=2"])
        c = to_config({k: v for k, v in point.items() if k != "hydra"})
        assert c.data.inject.enabled is (arm != "clean")
        assert c.data.ngram_filter.enabled is (arm == "mask")
        assert c.remedy.kind.value == (arm if arm in ("skip_step", "rollback", "zclip") else "none")
        assert c.data.seed == 2  # a seed is a whole replicate: init and data stream
        # the planted window fits the run and its recovery window too
        assert 0 < c.data.inject.start_step < c.data.inject.end_step
        assert 2 * c.data.inject.end_step - c.data.inject.start_step < c.train.steps


def make_run(root: Path, arm: str, seed: int, excess: float, events: tuple = ()) -> Path:
    """A completed run of ``arm`` whose val loss is the clean curve plus ``excess`` nats inside
    [START, 2 END - START), with optional rollback events (abandoned rows written before them)."""
    run_dir = root / f"arm={arm},seed={seed}"
    config = {
        "optim": {"lr": 3e-2},
        "train": {"seed": seed},
        "remedy": {"kind": arm if arm in ("skip_step", "rollback", "zclip") else "none"},
        "data": {
            "inject": {"enabled": arm != "clean", "start_step": START, "end_step": END},
            "ngram_filter": {"enabled": arm == "mask"},
        },
    }
    write_json(run_dir / "config.yaml", config)
    record = RunRecord(run_dir)
    record.update(status="running", overrides=[f"+arm={arm}", f"train.seed={seed}"], lr=3e-2, loss_at_init=6.2)
    rng = np.random.default_rng(seed)

    def log_step(step: int, spiked: bool = False) -> float:
        """What the trainer logs at ``step``: the val row (every 10 steps), then the train row."""
        bump = excess if START <= step < 2 * END - START else 0.0
        val = 3.4 + 2.8 * np.exp(-step / 60) + 0.002 * seed + bump
        if step % 10 == 0:
            record.log(step, {"val/loss": val})
        if step < STEPS:
            record.log(
                step,
                {
                    "train/loss": 9.0 if spiked else val + 0.01 * rng.standard_normal(),
                    "optim/grad_norm": 5.0 if spiked else 0.2 * (1 + 0.02 * rng.standard_normal()),
                    "data/masked_tokens": 100.0 if arm == "mask" and START <= step < END else 0.0,
                },
            )
        return val

    start = 0
    for event in events:  # steps up to the spike, the event, then the replay from restore_step
        for step in range(start, event["step"] + 1):
            log_step(step, spiked=step == event["step"])
        record.event(
            event["step"],
            "rollback",
            trigger="grad_norm",
            value=5.0,
            threshold=1.0,
            restore_step=event["restore_step"],
            data_position=event["data_position"],
        )
        start = event["restore_step"]
    for step in range(start, STEPS + 1):
        val = log_step(step)
    record.update(status="completed", final_val_loss=val, final_train_loss=val, steps_completed=STEPS)
    record.close()
    return run_dir


def remedies_sweep(root: Path, works: bool) -> Path:
    for seed in (0, 1):
        for arm in ARMS:
            excess = {"clean": 0.0, "none": 0.2}.get(arm, 0.02 if works else 0.19)
            events = ()
            if arm == "rollback":  # one rollback, resuming past the window or inside it
                events = ({"step": 170, "restore_step": 140, "data_position": 260 if works else 190},)
            make_run(root, arm, seed, excess, events)
    return root


@pytest.mark.parametrize("works", [True, False])
def test_spike_remedies_verdict(tmp_path: Path, works: bool) -> None:
    verdict = judge_runs(FINDING, [remedies_sweep(tmp_path / "sweep", works)], tmp_path / "report")
    assert verdict.reproduced is works
    assert [c.passed for c in verdict.checks] == [True] + [works] * 4
    assert verdict.numbers["damage/none"] == pytest.approx(0.2)
    assert verdict.numbers["damage/clean"] == 0.0
    assert verdict.numbers["damage/skip_step"] == pytest.approx(0.02 if works else 0.19)
    assert verdict.numbers["thrown_away/rollback"] == 31  # steps 140..170 of the abandoned branch
    assert verdict.numbers["masked/mask"] > 0
    md = (tmp_path / "report" / "verdict.md").read_text()
    assert md.startswith("# spike_remedies")
    assert ("0 of 2" if works else "2 of 2") in md  # rollbacks that resumed inside the window
    # the report beside the verdict scores spikes like the verdict (OLMo-core 6 sigma / 128)
    assert "6 sigma" in (tmp_path / "report" / "report.md").read_text()


def test_spike_remedies_verdict_names_what_is_missing(tmp_path: Path) -> None:
    make_run(tmp_path / "sweep", "none", 0, 0.2)
    verdict = judge_runs(FINDING, [tmp_path / "sweep"], tmp_path / "report")
    assert not verdict.reproduced and "clean" in verdict.checks[0].measured


def test_figure_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("spike_remedies_figure", FINDING / "figure.py")
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    root = remedies_sweep(tmp_path / "sweep", works=True)
    assert figure.main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "figures" / "val_excess.png").stat().st_size > 10_000
    assert figure.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.slow
def test_spike_remedies_study_end_to_end(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "proxy.train",
        "-m",
        "+experiment=spike_remedies/lab",
        "train.seed=0",
        "train.steps=40",
        "train.eval_every=5",
        "train.eval_batches=1",
        "train.batch_size=4",
        "train.seq_len=40",
        "model.d_model=16",
        "model.n_layers=1",
        "data.inject.start_step=10",
        "data.inject.end_step=20",
        "data.inject.fraction=0.5",
        "remedy.detector.min_history=5",
        "remedy.rollback_every=5",
        "remedy.rollback_min_age=5",
        "remedy.rollback_skip_batches=10",
        "schedule.warmup_steps=4",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    done = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(sweep_dir.glob("*/summary.json"))) == len(ARMS)  # one seed per arm
    verdict = judge_runs(FINDING, [sweep_dir], tmp_path / "report")
    assert len(verdict.checks) == 5  # judged, whatever the outcome at this size
    assert all(verdict.numbers[f"seeds/{arm}"] == 1 for arm in ARMS)
    assert verdict.numbers["masked/mask"] > 0
