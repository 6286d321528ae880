"""experiments/reproduce.py: a committed result's job is found, named with today's presets and keys,
re-run, and compared run by run; a result that still comes out of the code reads "same"."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from proxy.verdict import load_script

REPO = Path(__file__).resolve().parents[2]
reproduce = load_script(REPO / "experiments" / "reproduce.py")


def test_a_job_folder_gives_todays_command() -> None:
    overrides, why = reproduce.job_overrides("3_+experiment=loss_spikes_lab,loss_spike_arm=none,sweep.seeds=[3,4,5]")
    assert not why and overrides == ["+experiment=loss_spikes/lab", "loss_spike_arm=none", "sweep.seeds=[3,4,5]"]
    overrides, _ = reproduce.job_overrides("0_+experiment=spike_remedies-clipping_lab,remedy.spike_sigma=3")
    assert overrides == ["+experiment=spike_remedies/clipping_lab", "remedy.detector.sigma=3"]
    assert reproduce.current_preset("spike_remedies_clipping_lab") == "spike_remedies/clipping_lab"
    assert reproduce.current_preset("spike_frequency-own_lr") == "spike_frequency/own_lr_lab"  # renamed to _lab
    assert reproduce.job_overrides("1_+experiment=gone_lab")[1] == "no preset gone_lab today"
    assert "hash" in reproduce.job_overrides("2_model.d_model=64,optim.lr=0.1~0123456789")[1]


def test_runs_are_compared_on_their_final_losses_and_their_size() -> None:
    then = {"final_val_loss": "3.5", "final_train_loss": "3.4", "steps_planned": "300", "n_params": "1000"}
    same = {"final_val_loss": 3.5, "final_train_loss": 3.4, "steps_planned": 300, "n_params": 1000}
    assert reproduce.compare(then, same) == "same"
    assert reproduce.compare(then, {**same, "final_val_loss": 3.501}).startswith("close")
    assert reproduce.compare(then, {**same, "final_val_loss": 3.6}).startswith("differs")
    assert reproduce.compare(then, {**same, "steps_planned": 600}).startswith("preset changed")


def test_a_committed_job_re_run_today_is_the_same(tmp_path: Path) -> None:
    """A two-member LR sweep job, reported; the plan picks its job and re-running it matches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": ""}
    sweep = tmp_path / "sweep"
    train = [sys.executable, "-m", "proxy.train", "-m", "model=tiny", "train.steps=6", "train.batch_size=2"]
    train += ["train.seq_len=16", "train.eval_every=3", "train.eval_batches=1", "sweep.lrs=[0.001,0.01]"]
    done = subprocess.run([*train, f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = [sys.executable, "-m", "proxy.report", str(sweep), "--out", str(tmp_path / "results")]
    done = subprocess.run(report, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = tmp_path / "results" / "runs.csv"
    assert len(list(csv.DictReader(table.open()))) == 2
    (job,) = reproduce.plan([table])
    assert job.folder.startswith("0_") and "sweep.lrs=[0.001,0.01]" in job.overrides
    outcome = reproduce.rerun(job, tmp_path / "again")
    assert outcome.status == "same", outcome
    assert [status for _, status in outcome.runs] == ["same", "same"]


def test_a_second_pass_keeps_the_first_ones_rows_and_replaces_what_it_re_ran(tmp_path: Path) -> None:
    here = reproduce.HERE

    def outcome(result: str, status: str, detail: str = ""):
        job = reproduce.Job(here / result / "runs.csv", "0_x=1", ["x=1"], [], 10.0)
        return reproduce.Outcome(job, status, detail)

    first = reproduce.report([outcome("a/results", "same"), outcome("b/results", "not run", "past the budget")], 2, 60)
    second = reproduce.report([outcome("b/results", "differs")], 1, 60, previous=first)
    rows = [line for line in second.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| a/results", "| b/results"]
    assert "**same**" in rows[0] and "**differs**" in rows[1]
    assert second.count("`python experiments/reproduce.py` on") == 2
    third = reproduce.report([outcome("a/results", "not run", "past the budget")], 1, 60, previous=second)
    assert "**same**" in third  # a pass that did not run it keeps the earlier outcome


def test_a_result_older_than_its_studys_protocol_2_is_re_run_with_the_kept_protocol_1_preset() -> None:
    here = reproduce.HERE
    assert reproduce.protocol1_era(here / "adam_epsilon" / "results" / "runs.csv")
    assert reproduce.protocol1_era(here / "adam_epsilon" / "results" / "investigation_d128" / "runs.csv")
    assert reproduce.protocol1_era(here / "spike_remedies" / "results" / "isolated" / "runs.csv")
    assert not reproduce.protocol1_era(here / "adam_epsilon" / "results" / "protocol2" / "runs.csv")
    assert not reproduce.protocol1_era(here / "lr_transfer" / "results" / "runs.csv")  # no protocol 2 there
    overrides, _ = reproduce.job_overrides("8_+experiment=adam_epsilon_lab,optim.lr=0.3", protocol1=True)
    assert overrides[0] == "+experiment=adam_epsilon/lab_p1"
    overrides, _ = reproduce.job_overrides("8_+experiment=spike_frequency_lab", protocol1=True)
    assert overrides == ["+experiment=spike_frequency/lab"]  # no _p1 kept: today's
