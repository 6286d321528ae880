"""The one spike definition (proxy/spikes.py): a loss spike rises past the trend bar and comes
back; a collapse does not; noise is neither. And the probe loss it is scored on."""

from __future__ import annotations

import json
import math
import random

from proxy.report import build_report
from proxy.spikes import LossSpike, loss_spikes
from proxy.train import train
from tests.report.test_build import make_run
from tests.train.test_trainer import tiny_cfg


def series(n: int = 300, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [3.0 - 0.001 * i + rng.gauss(0, 0.01) for i in range(n)]


def test_noise_is_neither_a_spike_nor_a_collapse():
    for seed in range(5):
        assert loss_spikes(range(300), series(seed=seed)) == []


def test_a_rise_that_comes_back_is_a_spike_and_one_that_stays_a_collapse():
    spiky = series()
    for j in range(150, 160):
        spiky[j] += 1.5 * math.exp(-(j - 150) / 3)
    (spike,) = loss_spikes(range(300), spiky)
    assert spike.kind == "spike" and spike.step == 150 and spike.peak_step == 150 and 150 < spike.back_step < 160
    stays = series()
    for j in range(200, 300):
        stays[j] += 1.0
    (collapse,) = loss_spikes(range(300), stays)
    assert collapse.kind == "collapse" and collapse.step == 200 and collapse.back_step is None
    late = series()  # back, but only after the recovery window: a collapse too
    for j in range(100, 250):
        late[j] += 1.0
    assert [s.kind for s in loss_spikes(range(300), late, recovery=100)] == ["collapse"]


def test_a_non_finite_loss_is_an_excursion_and_never_enters_the_history():
    values = series()
    values[120] = math.nan
    found = loss_spikes(range(300), values)
    assert [(s.kind, s.step) for s in found] == [("spike", 120)]
    assert isinstance(found[0], LossSpike)


def test_the_probe_loss_is_logged_and_its_spikes_counted_in_the_summary(tmp_path):
    summary = train(tiny_cfg(train=dict(steps=30, probe_every=2, probe_batches=1)), tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe/loss" in r]
    assert [r["step"] for r in probes] == list(range(0, 30, 2))
    assert summary["loss_spikes"] == 0 and summary["loss_collapses"] == 0 and summary["loss_spike_steps"] == []
    plain = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "loss_spikes" in plain
    off = train(tiny_cfg(train=dict(steps=4)), tmp_path / "off")
    assert "loss_spikes" not in off  # a run without the probe says nothing of loss spikes


def test_the_report_counts_loss_spikes_and_collapses(tmp_path):
    run = make_run(tmp_path / "sweep", "0", lr=1e-3, qk_norm="off")
    values = series(200)
    for j in range(80, 86):
        values[j] += 1.0 * math.exp(-(j - 80) / 2)
    with (run / "metrics.jsonl").open("a") as f:
        for step, value in enumerate(values):
            f.write(json.dumps({"step": step, "probe/loss": value}) + "\n")
    result = build_report([tmp_path / "sweep"], tmp_path / "rep")
    (row,) = result.runs
    assert (row.loss_spikes, row.loss_collapses) == (1, 0)
    assert "loss spikes" in result.markdown.read_text()
