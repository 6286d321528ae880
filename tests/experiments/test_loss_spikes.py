"""experiments/loss_spikes: the verdict's arms, its design check (NOT TESTABLE AT THIS SCALE) and
its criteria, on run records built here (the study itself runs in experiments/, not in tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.records import ADAM_RMS_MAX, PROBE_LOSS, Run, Summary
from proxy.verdict import NOT_TESTABLE, Verdict, load_module

STUDY = load_module(Path(__file__).resolve().parents[2] / "experiments" / "loss_spikes")
ARM_CONFIG = {
    "none": {},
    "beta2_095": {"beta2": 0.95},
    "beta2_0999": {"beta2": 0.999},
    "update_clip": {"update_clip": True},
    "grad_clip": {"grad_clip": 1.0},
    "fp64": {"dtype": "fp64"},
}


def fake_run(arm: str, seed: int, probe: list[float], rms: list[float]) -> Run:
    optim = {"beta2": 0.99, "grad_clip": 0.0, "update_clip": False, **ARM_CONFIG[arm]}
    train = {"seed": seed, "dtype": optim.pop("dtype", "auto")}
    rows = [{"step": s, PROBE_LOSS: p, ADAM_RMS_MAX: r} for s, (p, r) in enumerate(zip(probe, rms))]
    return Run(Path(f"/runs/{arm}/{seed}"), Summary(status="completed"), {"optim": optim, "train": train}, rows)


def settled(n: int, level: float = 1e-3) -> list[float]:
    """A loss that falls to ``level`` by step 200 and stays there (with a little noise)."""
    return [max(level, 6.0 * 0.97**s) * (1 + 0.02 * ((s * 7919) % 5 - 2) / 2) for s in range(n)]


def with_spike(series: list[float], at: int, peak: float) -> list[float]:
    out = list(series)
    for i, factor in enumerate((0.3, 1.0, 0.5, 0.1, 0.02)):
        out[at + i] = max(out[at + i], peak * factor)
    return out


def test_each_arm_is_told_by_what_the_run_was_trained_with():
    for arm in STUDY.ARMS:
        assert STUDY.arm_of(fake_run(arm, 0, [1.0], [0.1])) == arm


def test_a_run_that_never_reaches_the_low_noise_phase_is_not_testable_and_no_claim_is_judged():
    runs = [fake_run(arm, s, [3.0] * 400, [0.5] * 400) for arm in STUDY.ARMS for s in range(3)]
    verdict: Verdict = STUDY.judge(None, runs)
    assert verdict.label == NOT_TESTABLE and not verdict.reproduced
    assert verdict.checks == [] and "long enough" in verdict.would_test
    assert "design:" in verdict.to_markdown() and NOT_TESTABLE in verdict.to_markdown()


@pytest.mark.parametrize("rms_before_spike, f_passes", [(5.0, True), (0.5, False)])
def test_spikes_preceded_by_rms_are_told_from_chance(rms_before_spike, f_passes):
    n, at = 900, 600
    runs = []
    for arm in STUDY.ARMS:
        for s in range(3):
            rms = [0.3] * n
            probe = settled(n)
            if arm in ("none", "beta2_0999", "fp64", "grad_clip") or (arm == "beta2_095" and s == 0):
                probe = with_spike(probe, at, 0.5)
                rms[at - 3] = rms_before_spike
            runs.append(fake_run(arm, s, probe, rms))
    verdict = STUDY.judge(None, runs)

    def held(prefix: str) -> bool:
        (check,) = [c for c in verdict.checks if c.claim.startswith(prefix)]
        return check.passed

    assert verdict.testable
    assert held("spikes (rise and recovery) in every seed of the spiking arm")
    assert held("RMS_t > 1 in the 8 steps before most spikes") is f_passes
    assert held("the spikes are not a float32 artefact")
    assert held("gradient clipping (global norm 1.0) does not")
    assert held("update clipping")  # no excursion with it, one per seed without
    assert not held("the rate of excursions grows with beta2")  # 0.95 < 0.99 = 0.999: not ordered


# --------------------------------------------------------------------------------------------
# Protocol 3: 20m on a GPU, held against protocol 2's committed tiny runs
# --------------------------------------------------------------------------------------------
P3 = load_module(Path(__file__).resolve().parents[2] / "experiments" / "loss_spikes" / "protocol3")


def run_20m(arm: str, seed: int, probe: list[float], rms: list[float]) -> Run:
    run = fake_run(arm, seed, probe, rms)
    return Run(run.path, run.summary, {**run.config, "model": {"name": "20m"}}, run.metrics)


def test_protocol3_reads_tiny_from_protocol2s_committed_verdict():
    assert P3.tiny_large_excursions() == {3: 1, 4: 1, 5: 1}  # 1.64, 4.47, 3.91 nats, all before step 1000


@pytest.mark.parametrize("spikes_per_run, more", [(3, True), (1, False)])
def test_protocol3_judges_size_rms_and_update_clipping(spikes_per_run, more):
    n = 1000
    runs = []
    for s in P3.SEEDS:
        probe, rms = settled(n), [0.3] * n
        for i in range(spikes_per_run):
            at = 300 + 200 * i
            probe = with_spike(probe, at, 2.0)
            rms[at - 2] = 6.0
        runs.append(run_20m("none", s, probe, rms))
        runs.append(run_20m("update_clip", s, with_spike(settled(n), 500, 0.05), [0.3] * n))
    runs.append(fake_run("none", 3, settled(n), [0.3] * n))  # a tiny run: not protocol 3's
    verdict = P3.judge(None, runs)

    def held(prefix: str) -> bool:
        (check,) = [c for c in verdict.checks if c.claim.startswith(prefix)]
        return check.passed

    assert verdict.testable
    assert held("larger models spike more") is more
    assert held("RMS_t > 1 in the 8 steps before most large excursions")
    assert held("update clipping shrinks the largest rise")
    assert verdict.reproduced is more


def test_protocol3_without_the_low_noise_phase_is_not_testable():
    runs = [run_20m(arm, s, [3.0] * 600, [0.5] * 600) for arm in P3.ARMS for s in P3.SEEDS]
    verdict = P3.judge(None, runs)
    assert verdict.label == NOT_TESTABLE and verdict.checks == []


P4 = load_module(Path(__file__).resolve().parents[2] / "experiments" / "loss_spikes" / "protocol4")


def run_rows(rows: int, seed: int, spikes: int, n: int = 1200) -> Run:
    """Protocol 4's run: ``rows`` a step, the probe on 16 rows, ``spikes`` large spikes 150 steps apart."""
    probe, rms = settled(n), [0.3] * n
    for i in range(spikes):
        at = 300 + 150 * i
        probe = with_spike(probe, at, 1.5)
        rms[at - 3] = 8.0
    run = fake_run("none", seed, probe, rms)
    train = {**run.config["train"], "batch_size": rows, "probe_batches": 16 // rows, "steps": n}
    return Run(run.path.with_name(f"{seed}-{rows}"), run.summary, {**run.config, "train": train}, run.metrics)


@pytest.mark.parametrize(
    "counts, label",
    [
        ({4: 0, 8: 1, 16: 3}, "REPRODUCED"),  # more large spikes with every doubling, every seed
        ({4: 2, 8: 2, 16: 2}, "NOT REPRODUCED"),  # as many at every batch
        ({4: 3, 8: 2, 16: 0}, NOT_TESTABLE),  # the recipe's own batch never spikes: the design check
    ],
)
def test_protocol4_counts_large_spikes_against_the_batch(counts, label):
    planted = {
        (rows, s): counts[rows] + (s % 2 if rows == 16 and counts[16] else 0) for rows in P4.ROWS for s in P4.SEEDS
    }
    verdict = P4.judge(None, [run_rows(rows, s, n) for (rows, s), n in planted.items()])
    assert verdict.label == label, verdict.to_markdown()
    found = {
        (rows, int(s)): len(events)
        for rows in P4.ROWS
        for s, events in verdict.numbers[f"large_excursions/{rows}_rows"].items()
    }
    assert found == planted  # every planted spike is a large excursion, nothing else is
    n = sum(planted.values())  # each preceded by RMS_t = 8
    assert verdict.numbers["rms_t_gt_1_before_large_excursions"].startswith(f"{n}/{n} ")
    if label != NOT_TESTABLE:
        assert "large excursions against log2(batch rows)" in verdict.checks[0].claim


def test_protocol4_without_every_run_is_not_testable():
    runs = [run_rows(rows, s, 1) for rows in P4.ROWS for s in P4.SEEDS if not (rows == 8 and s == 14)]
    verdict = P4.judge(None, runs)
    assert verdict.label == NOT_TESTABLE and "8 rows/seed 14" in verdict.design_checks[0].measured


def test_protocol4_preset_varies_the_batch_and_keeps_the_probe_at_16_rows():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from proxy.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        base = compose("config", ["+experiment=loss_spikes/batch_lab"], return_hydra_config=True)
        # in the order a multirun job gives them (the sweep's overrides first): protocol 4's first run
        # composed its batch before the experiment, whose recipe then reset the probe to one batch
        arms = {
            r: compose(
                "config", ["loss_spike_arm=none", f"loss_spike_batch=rows{r}", "+experiment=loss_spikes/batch_lab"]
            )
            for r in P4.ROWS
        }
    assert dict(base.hydra.sweeper.params) == {"loss_spike_arm": "none", "loss_spike_batch": "rows16,rows8,rows4"}
    assert list(base.sweep.seeds) == list(P4.SEEDS) and base.optim.beta2 == 0.99 and base.train.steps == 2000
    assert {r: (c.train.batch_size, c.train.batch_size * c.train.probe_batches) for r, c in arms.items()} == {
        r: (r, 16) for r in P4.ROWS
    }
