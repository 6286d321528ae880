"""The science queue a GPU lease runs (benchmarks/science_run.py), on the CPU at tiny shapes: it
admits what fits, stops what would overrun, judges on the device and packs what comes back."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.science_run import Study, load_queue, plan, predict

ROOT = Path(__file__).resolve().parents[2]


def science(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.science_run", "--dry-run", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "science-summary.json").read_text())


def test_the_committed_queue_plans_and_predicts():
    rates = json.loads((ROOT / "benchmarks" / "science" / "rates.json").read_text())
    studies = load_queue(ROOT / "benchmarks" / "science" / "queue.yaml")
    assert studies and all((ROOT / s.finding / "verdict.py").is_file() for s in studies)
    for study in studies:  # every queued study fits one lease on the card most likely to come
        jobs = plan(study, dry_run=False, gpu="H100")
        seconds, _ = predict(jobs, rates, "H100")
        assert 0 < seconds < 8 * 60, (study.name, seconds)
        assert all(job.members >= 1 and job.member_tokens > 0 for job in jobs)


def test_a_cuda_graph_rate_is_not_taken_for_a_compiled_preset():
    """The probe measures reduce-overhead too; a preset compiles in the default mode, so a
    reduce-overhead rate merged into the table must not predict its time."""
    study = load_queue(ROOT / "benchmarks" / "science" / "queue.yaml")[0]
    jobs = plan(study, dry_run=False, gpu="H200")
    job = jobs[0]
    fast = {
        "model": job.model,
        "members": job.members,
        "tokens_per_step": job.tokens_per_step,
        "tokens_per_s": 1e12,
        "compiled": job.compiled,
    }
    table = {"devices": {"H200": {"calibration": {"single": 0.5, "ensemble": 0.5}, "rates": []}}}
    modelled, how = predict(jobs, table, "H200")
    table["devices"]["H200"]["rates"] = [{**fast, "mode": "reduce-overhead"}]
    assert predict(jobs, table, "H200") == (modelled, how)
    table["devices"]["H200"]["rates"] = [fast]
    assert predict(jobs, table, "H200")[1] == "measured rate"


def test_a_dry_run_trains_judges_and_packs_what_comes_back(tmp_path):
    record = science(tmp_path, "--budget", "300", "--probe-s", "60")
    for part in record["studies"]:  # every queued part, each trained here
        assert part["status"] == "completed" and part["member_tokens"] == part["planned_member_tokens"]
    studies = {part["name"]: part for part in record["studies"]}
    # a study split in two parts, judged once both have trained
    first, second = studies["attention_logit_growth_85m_off"], studies["attention_logit_growth_85m_layernorm"]
    assert studies["loss_spikes_20m_update_clip"]["verdict"]
    assert first["verdict_note"].startswith("to be judged with attention_logit_growth_85m_layernorm")
    assert second["verdict"]  # judged on the device, over both parts
    rows = record["probe"]["rows"]
    assert [(row["members"], row.get("remedy")) for row in rows] == [
        (1, None),
        (8, None),
        (1, "none"),
        (1, "skip_step"),
        (1, "zclip"),
        (8, "skip_step"),
    ]
    assert all(row["model"] == "tiny" and row["tokens_per_s"] > 0 for row in rows)
    assert all(row["host_waits"] is None for row in rows[2:])  # CUDA's sync debug mode: a GPU's count only
    probed = [r for r in record["rates_measured"] if "study" not in r]
    assert [r["members"] for r in probed] == [1, 8]  # the rate table learns from the plain rows only
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and all(name.replace("-", "").replace("_", "").replace(".", "").isalnum() for name in files)
    # a split study comes back as one archive, its first part's, holding every part
    assert first["archive"] == second["archive"] == f"{first['name']}.tar.gz"
    with tarfile.open(tmp_path / "out" / second["archive"]) as tar:
        names = tar.getnames()
    assert {n.split("/")[0] for n in names} == {first["name"], second["name"]}
    assert not [n for n in names if n.endswith(".pt") or "/checkpoints/" in n]
    assert any(n.endswith("report/verdict.json") for n in names) and any(n.endswith("summary.json") for n in names)
    report = [n for n in names if n.endswith("report/report.md")]
    assert report  # the report covers both parts' runs
    assert "| attention_logit_growth_85m_off |" in (tmp_path / "out" / "science-summary.md").read_text()


def _queue(tmp_path: Path, steps: int) -> Path:
    queue = tmp_path / "queue.yaml"
    study = Study(
        "long",
        "attention_logit_growth/lease",
        "experiments/attention_logit_growth",
        dry_run=[
            "model=tiny",
            f"train.steps={steps}",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.eval_every=1000",
            "train.eval_batches=1",
            "train.log_every=5",
            "sweep.lrs=[1e-2]",
            "sweep.seeds=[0]",
            "train.device=cpu",
            "train.compile=false",
            "model.qk_norm=off",
        ],
    )
    queue.write_text(json.dumps({"studies": [study.__dict__]}))
    return queue


def test_a_study_that_does_not_fit_is_not_admitted(tmp_path):
    record = science(tmp_path, "--budget", "60", "--no-probe", "--queue", str(_queue(tmp_path, 20)))
    (study,) = record["studies"]
    assert study["status"].startswith("not admitted: predicted") and "member_tokens" not in study


def test_a_study_that_would_overrun_is_stopped_keeping_what_it_measured(tmp_path):
    rates = json.loads((ROOT / "benchmarks" / "science" / "rates.json").read_text())
    for row in rates["devices"]["cpu"]["rates"]:
        row["tokens_per_s"] = 1e9  # the table promises it fits; the run's own rate says otherwise
    fast = tmp_path / "rates.json"
    fast.write_text(json.dumps(rates))
    record = science(
        tmp_path,
        "--budget",
        "95",
        "--no-probe",
        "--verdict-s",
        "30",
        "--queue",
        str(_queue(tmp_path, 100_000)),
        "--rates",
        str(fast),
    )
    (study,) = record["studies"]
    assert study["status"].startswith("stopped: would overrun"), study
    assert 0 < study["member_tokens"] < study["planned_member_tokens"] and study["member_tokens_per_s"] > 0
    assert record["rates_measured"] and record["seconds"] < 95


@pytest.mark.parametrize("kind, expected", [("H200", "measured rate"), ("Some GPU", "model / calibration")])
def test_predictions_use_a_measured_rate_where_the_table_has_one(kind, expected):
    rates = json.loads((ROOT / "benchmarks" / "science" / "rates.json").read_text())
    study = Study(
        "s",
        "attention_logit_growth/lease",
        "experiments/attention_logit_growth",
        dry_run=[
            "model=5m",
            "sweep.seeds=[0]",
            "sweep.lrs=[1e-3,2e-3,3e-3,4e-3,5e-3,6e-3,7e-3,8e-3]",
            "train.compile=false",
        ],
    )
    jobs = plan(study, dry_run=True, gpu="H200")
    assert {job.members for job in jobs} == {8}
    _, how = predict(jobs, rates, kind)
    assert how.startswith(expected)
