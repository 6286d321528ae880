"""Spike frequency vs model size (issue 18 item 1, pre-registered): the presets compose with the
intended axes, the verdict decides on constructed sweeps (a rate that rises with size, one that
does not), and a shrunken preset trains and is judged end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import proxy.verdict
from proxy.analysis import SpikeOptions, spread
from proxy.config import register_configs, to_config
from proxy.records import RunRecord, find_runs, load_run, write_json
from proxy.verdict import judge_runs, load_script

REPO = Path(__file__).resolve().parents[2]
FINDING = REPO / "experiments" / "spike_frequency"
SIZES = {"tiny": (2, 64, 99_000), "1m": (6, 128, 1_180_000), "5m": (6, 256, 4_720_000)}  # layers, width, N
LAYOUT = {**SIZES, "20m": (6, 512, 18_880_000)}
CONDITIONS = ("plain", "ngrams", "qknorm")


def composed(overrides: list[str], hydra_config: bool = True):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def verdict_module():
    return load_script(FINDING / "verdict.py")


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,sizes", [("spike_frequency/lab", "tiny,1m,5m"), ("spike_frequency/gpu", "5m,20m,85m,124m")]
)
def test_presets_sweep_sizes_by_condition_with_seed_ensembles(preset: str, sizes: str) -> None:
    cfg = composed([f"+experiment={preset}"])
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"model", "+spike_condition"}
    assert str(params["model"]) == sizes and str(params["+spike_condition"]) == "plain,ngrams,qknorm"
    assert cfg.experiment == "spike_frequency" and str(cfg.hydra.sweep.dir).startswith("runs/spike_frequency/")
    assert len(cfg.sweep.lrs) == 1 and list(cfg.sweep.seeds) == [0, 1, 2]  # one LR for every size, 3 seeds
    assert cfg.train.log_every == 1 and cfg.schedule.name == "constant"
    protocol = verdict_module().PROTOCOL
    assert cfg.train.steps - protocol.score_from >= protocol.min_scored  # OLMo 2's window fills, 1000+ scored
    inject = cfg.data.inject
    assert inject.max_period * inject.repeats <= cfg.train.seq_len + 1  # every planted length fits a row
    for condition, (qk, planted) in {
        "plain": ("off", False),
        "ngrams": ("off", True),
        "qknorm": ("layernorm", False),
    }.items():
        for size in sizes.split(","):
            point = to_config(
                composed(
                    [f"+experiment={preset}", f"+spike_condition={condition}", f"model={size}"], hydra_config=False
                )
            )
            assert point.model.name == size and point.model.qk_norm.value == qk
            assert point.data.inject.enabled is planted and not point.data.ngram_filter.enabled
            assert point.sweep.lrs == list(cfg.sweep.lrs)  # the same LR at every size and condition


def test_gpu_preset_has_an_estimate_per_job() -> None:
    from proxy.train.estimate import estimate, job_config, sweep_jobs

    jobs = sweep_jobs(["+experiment=spike_frequency/gpu"])
    assert len(jobs) == 12
    total = sum(estimate(job_config(job), "H200").seconds for job in jobs) / 60
    header = (REPO / "conf/experiment/spike_frequency/gpu.yaml").read_text()
    assert f"~{total:.0f} min on one H200" in header  # the header states the modelled time


# --------------------------------------------------------------------------------------------
# The verdict on constructed sweeps
# --------------------------------------------------------------------------------------------
def spiky_run(
    root: Path,
    job: int,
    condition: str,
    model: str,
    seed: int,
    spikes: int,
    steps: int = 2000,
    lr: float = 0.03,
    final_loss: float = 3.5,
    status: str = "completed",
) -> Path:
    """One ensemble member: grad norm ~ 1 +- 0.05 and loss ~ 3.5 +- 0.02 every step, with
    ``spikes`` isolated spikes (grad norm +10, loss +1) spread over the scored steps 1000-1999."""
    layers, width, n = LAYOUT[model]
    overrides = ["+experiment=spike_frequency/lab", f"+spike_condition={condition}", f"model={model}"]
    run_dir = root / f"{job}_{','.join(sorted(overrides))}" / f"lr={lr:g},seed={seed}"
    write_json(
        run_dir / "config.yaml",
        {
            "model": {"name": model, "n_layers": layers, "d_model": width},
            "optim": {"lr": lr},
            "train": {"seed": seed, "steps": steps, "log_every": 1},
        },
    )
    record = RunRecord(run_dir)
    record.update(
        status="running",
        overrides=[*overrides, f"optim.lr={lr:g}", f"train.seed={seed}"],
        n_params_non_embedding=n,
        loss_at_init=math.log(512),
        steps_planned=steps,
    )
    rng = np.random.default_rng(hash((job, seed)) % 2**32)
    noise = rng.standard_normal((steps, 2))
    first = 1000 if steps >= 2000 else 20  # the first scored step: OLMo 2's window, or a short protocol's
    at = {first + int((j + 0.5) * (steps - first) / spikes) for j in range(spikes)} if spikes else set()
    for step in range(steps):
        spike = step in at
        record.log(
            step,
            {
                "optim/grad_norm": 1.0 + 0.05 * noise[step, 0] + (10.0 if spike else 0.0),
                "train/loss": 3.5 + 0.02 * noise[step, 1] + (1.0 if spike else 0.0),
            },
        )
    record.update(status=status, final_val_loss=final_loss, final_train_loss=final_loss, steps_completed=steps)
    record.close()
    return run_dir


def constructed_sweep(root: Path, counts: dict[str, list[list[int]]]) -> list:
    """counts[condition][seed][size index] spikes per run; sizes tiny, 1m, 5m."""
    job = 0
    for condition, per_seed in counts.items():
        for k, model in enumerate(SIZES):
            for seed, row in enumerate(per_seed):
                spiky_run(root, job, condition, model, seed, row[k])
            job += 1
    return [load_run(p) for p in find_runs([root])]


RISING = {
    "plain": [[1, 3, 6], [2, 3, 7], [1, 4, 6]],
    "ngrams": [[2, 5, 9], [3, 5, 8], [2, 6, 9]],
    "qknorm": [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
}
FLAT = {
    "plain": [[4, 3, 4], [3, 4, 3], [4, 4, 3]],
    "ngrams": [[5, 6, 5], [6, 5, 5], [5, 5, 6]],
    "qknorm": [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
}


@pytest.mark.parametrize("rising", [True, False])
def test_verdict_on_constructed_sweeps(tmp_path: Path, rising: bool) -> None:
    module = verdict_module()
    counts = RISING if rising else FLAT
    verdict = module.judge(None, constructed_sweep(tmp_path, counts))
    checks = verdict.checks
    assert len(checks) == 5, verdict.to_markdown()
    assert checks[0].passed and checks[1].passed  # the design holds: windows full, the detector fires
    assert checks[2].passed is rising and checks[3].passed is rising, verdict.to_markdown()
    assert checks[4].passed  # QK-norm's 0-1 spikes at 5m against plain's 3-7
    assert verdict.reproduced is rising
    # every run is scored on exactly the 1000 steps after OLMo 2's window; the counts are the planted ones
    n = verdict.numbers
    assert n["spikes_total"]["grad_norm/olmo2"] == sum(map(sum, (row for rows in counts.values() for row in rows)))
    assert n["spikes_total"]["loss/olmo_core"] == n["spikes_total"]["grad_norm/olmo2"]
    expected = spread(1000 * r[2] / 1000 for r in counts["plain"])
    assert n["spikes_per_1000_steps/grad_norm/olmo2"]["plain/5m (4.72M)"] == expected.describe(".3g")
    slopes = n["per_seed_size_slope/grad_norm/olmo2"]["plain"]
    assert len(slopes) == 3 and (all(s > 0 for s in slopes) if rising else any(s <= 0 for s in slopes))
    assert n["answer/plain"].startswith("yes" if rising else "no growth shown")
    settle = n["what_would_settle_it/plain"]
    assert ("settled on this ladder" in settle) if rising else ("seeds" in settle or "GPU preset" in settle)


def test_verdict_says_when_the_detector_never_fires(tmp_path: Path) -> None:
    silent = {c: [[0, 0, 0]] * 3 for c in CONDITIONS}
    verdict = verdict_module().judge(None, constructed_sweep(tmp_path, silent))
    assert verdict.checks[0].passed and not verdict.checks[1].passed and not verdict.reproduced
    assert verdict.numbers["answer/plain"].startswith("cannot tell")
    assert "cannot tell" in verdict.numbers["what_would_settle_it/plain"]


def test_what_would_settle_it_counts_seeds_from_the_spread() -> None:
    settle = verdict_module().what_would_settle_it
    # mean 1, sd 2: 2 SE < 1 needs n > 16
    text = settle(spread([1.0, 3.0, -1.0]), False, 3.9)
    assert "about 17 seeds" in text and "5.7x" in text
    assert "does not change" in settle(spread([0.0, 0.0, 0.0]), False, 3.9)
    assert "settled" in settle(spread([1.0, 1.2, 0.9]), False, 3.9)


# --------------------------------------------------------------------------------------------
# Protocol 2: each size at its own LR, five fresh seeds, design checks first
# --------------------------------------------------------------------------------------------
OWN_LR = {"tiny": 0.01, "1m": 0.003}
RISING_P2 = {
    "plain": [[1, 5], [2, 6], [1, 4], [2, 5], [1, 6]],
    "ngrams": [[2, 6], [3, 7], [2, 5], [2, 6], [3, 8]],
    "qknorm": [[0, 0], [0, 1], [1, 0], [0, 0], [0, 0]],
}


def own_lr_sweep(root: Path, lr_of: dict[str, float], collapsed: str = "") -> list:
    """Protocol 2's sweep: tiny and 1m at their own LRs, seeds 3-7; ``collapsed``: a size whose
    plain runs end at 5.0 nats (near the unigram entropy, as protocol 1's 1m did)."""
    job = 0
    for condition, per_seed in RISING_P2.items():
        for k, model in enumerate(("tiny", "1m")):
            for seed, row in zip(range(3, 8), per_seed):
                final = 5.0 if (model == collapsed and condition == "plain") else 3.5
                spiky_run(root, job, condition, model, seed, row[k], lr=lr_of[model], final_loss=final)
            job += 1
    return [load_run(p) for p in find_runs([root])]


def test_protocol2_presets_bracket_then_train_each_size_at_its_lr() -> None:
    bracket = composed(["+experiment=spike_frequency/bracket_lab"])
    assert dict(bracket.hydra.sweeper.params) == {"model": "tiny,1m", "+spike_condition": "plain"}
    assert list(bracket.sweep.lrs) == [1e-3, 3e-3, 1e-2, 3e-2] and list(bracket.sweep.seeds) == [10]
    own = composed(["+experiment=spike_frequency/own_lr_lab", "model=1m", "sweep.lrs=[0.003]"])
    assert list(own.sweep.seeds) == [3, 4, 5, 6, 7] and list(own.sweep.lrs) == [0.003]
    assert str(own.hydra.sweep.dir).startswith("runs/spike_frequency/own_lr_")
    for preset in (bracket, own):  # the recipe is protocol 1's
        assert preset.train.steps == 2000 and preset.train.batch_size == 4 and preset.train.log_every == 1


def test_choose_lrs_takes_the_lowest_loss_inside_the_grid() -> None:
    choose = load_script(FINDING / "protocol2" / "choose_lrs.py").choose
    chosen, problems = choose({"tiny": {1e-3: 3.9, 3e-3: 3.6, 1e-2: 3.5, 3e-2: 3.6}, "1m": {1e-3: 3.7, 3e-2: 5.0}})
    assert chosen == {"tiny": 1e-2} and len(problems) == 1 and problems[0].startswith("1m: best LR 0.001")


@pytest.mark.parametrize(
    ("ran_at", "collapsed", "testable"),
    [(OWN_LR, "", True), (OWN_LR, "1m", False), ({"tiny": 0.01, "1m": 0.01}, "", False)],
)
def test_protocol2_decides_its_design_before_the_claim(
    tmp_path: Path, ran_at: dict[str, float], collapsed: str, testable: bool
) -> None:
    """Each size must run at the LR the bracket chose (lrs.json), with seeds 3-7, and train there
    (plain runs 1 nat under the unigram entropy); else NOT TESTABLE, whatever the spike counts."""
    module = load_script(FINDING / "protocol2" / "verdict.py")
    verdict = module.judge(None, own_lr_sweep(tmp_path, ran_at, collapsed), lrs=OWN_LR)
    assert len(verdict.design_checks) == 3 and len(verdict.checks) == 5, verdict.to_markdown()
    assert verdict.testable is testable and verdict.reproduced is testable
    assert verdict.label == ("REPRODUCED" if testable else "NOT TESTABLE AT THIS SCALE")
    assert all(c.passed for c in verdict.checks)  # the spike counts rise with size in every case
    if collapsed:
        assert "above the bar" in verdict.design_checks[2].measured


# --------------------------------------------------------------------------------------------
# Protocol 3: 5m -> 20m on a GPU lease, the LR bracket inside the sweep
# --------------------------------------------------------------------------------------------
P3_LRS = (3e-4, 1e-3, 3e-3, 1e-2)


def test_protocol3_lease_preset_brackets_lr_inside_every_job() -> None:
    lease = composed(["+experiment=spike_frequency/lease"])
    assert dict(lease.hydra.sweeper.params) == {"model": "5m,20m", "+spike_condition": "plain,ngrams"}
    assert list(lease.sweep.lrs) == list(P3_LRS) and list(lease.sweep.seeds) == [3, 4, 5]
    assert lease.train.steps == 2000 and lease.train.log_every == 1 and lease.schedule.name == "constant"
    assert lease.train.batch_size * lease.train.seq_len == 4096
    assert str(lease.hydra.sweep.dir).startswith("runs/spike_frequency/lease_")


def lease_sweep(root: Path, loss_of, spikes_of, steps: int = 2000) -> list:
    """Protocol 3's sweep, constructed: loss_of(size, lr) the final val loss (None: diverged),
    spikes_of(condition, size, lr, seed) the planted grad-norm spikes."""
    job = 0
    for condition in ("plain", "ngrams"):
        for model in ("5m", "20m"):
            for lr in P3_LRS:
                for seed in (3, 4, 5):
                    loss = loss_of(model, lr)
                    spiky_run(
                        root,
                        job,
                        condition,
                        model,
                        seed,
                        spikes_of(condition, model, lr, seed),
                        steps,
                        lr=lr,
                        final_loss=math.nan if loss is None else loss + 0.01 * seed,
                        status="completed" if loss is not None else "diverged",
                    )
            job += 1
    return [load_run(p) for p in find_runs([root])]


def bowl(best: dict[str, float]):
    """Final val loss with its minimum at best[size]: 3.4 there, +0.2 per decade away."""
    return lambda size, lr: 3.4 + 0.2 * abs(math.log10(lr / best[size]))


def rising_at(best: dict[str, float]):
    """Spikes that grow 5m -> 20m at each size's best LR, and fall with size at every other LR
    (so a verdict that judged the wrong LRs would say no)."""

    def spikes(condition: str, size: str, lr: float, seed: int) -> int:
        if math.isclose(lr, best[size]):
            return {"5m": 1, "20m": 5}[size] + seed % 2
        return {"5m": 6, "20m": 1}[size]

    return spikes


def test_protocol3_judges_each_size_at_the_lr_its_plain_runs_train_best(tmp_path: Path) -> None:
    best = {"5m": 3e-3, "20m": 1e-3}
    module = load_script(FINDING / "protocol3" / "verdict.py")
    verdict = module.judge(None, lease_sweep(tmp_path, bowl(best), rising_at(best)))
    assert len(verdict.design_checks) == 4 and len(verdict.checks) == 2, verdict.to_markdown()
    assert verdict.testable and verdict.reproduced, verdict.to_markdown()
    assert verdict.numbers["chosen_lr"] == {"20m": "0.001", "5m": "0.003"}
    rates = verdict.numbers["spikes_per_1000_steps/grad_norm/olmo2"]
    assert rates["plain/20m/lr 0.001 (chosen)"].startswith("5.67")  # 6, 5, 6
    shared = verdict.numbers["size_slope_per_ln_N_at_each_shared_lr (reported, not judged)"]
    assert shared["plain/lr 0.0003"].startswith("-3.61")  # (1 - 6) / ln 4: the shared-LR view falls


@pytest.mark.parametrize(
    ("case", "failing"),
    [("edge", 1), ("silent", 3), ("diverged_best", None), ("missing_seed", 0)],
)
def test_protocol3_decides_its_design_before_the_claim(tmp_path: Path, case: str, failing) -> None:
    """An optimum on the grid's edge, a detector that never fires at the chosen LRs, or a sweep
    with a seed missing: NOT TESTABLE AT THIS SCALE whatever the counts; a diverged cell is never
    chosen (the next best LR is)."""
    module = load_script(FINDING / "protocol3" / "verdict.py")
    short = module.P1.Protocol(  # protocol 1's detectors with windows that fill in 100 steps
        olmo2=SpikeOptions(sigma=7.0, window=20, min_history=20),
        olmo_core=SpikeOptions(sigma=6.0, window=10, one_sided=True, min_history=10),
        min_scored=50,
    )
    best = {"5m": 3e-3, "20m": 1e-2 if case == "edge" else 1e-3}
    loss_of = bowl(best)
    spikes = rising_at(best)
    if case == "silent":
        spikes = lambda c, s, lr, seed: 0 if math.isclose(lr, best[s]) else 4  # noqa: E731
    if case == "diverged_best":
        loss_of = lambda s, lr: None if (s == "5m" and math.isclose(lr, 3e-3)) else bowl(best)(s, lr)  # noqa: E731
    runs = lease_sweep(tmp_path, loss_of, spikes, steps=100)
    if case == "missing_seed":
        runs = [r for r in runs if not (r.config_value("train.seed") == 5 and "model=20m" in r.overrides)]
    verdict = module.judge(None, runs, protocol=short)
    if failing is None:
        assert verdict.numbers["chosen_lr"]["5m"] in ("0.001", "0.01")
        assert "diverged or non-finite" in str(verdict.numbers["plain_mean_final_val_loss_by_lr"]["5m"])
        return
    assert not verdict.testable and verdict.label == "NOT TESTABLE AT THIS SCALE", verdict.to_markdown()
    assert not verdict.design_checks[failing].passed
    assert verdict.would_test


# --------------------------------------------------------------------------------------------
# End to end: the preset, shrunken, trains and is judged
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shrunken_preset_trains_and_is_judged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab preset with its ladder shrunk to the tiny layout at widths 16/32 and 24 steps:
    3 conditions x 2 sizes, each an ensemble of 3 seeds."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.train",
            "-m",
            "+experiment=spike_frequency/lab",
            f"hydra.sweep.dir={sweep}",
            "model=tiny",
            "model.d_model=16,32",
            "train.steps=24",
            "train.eval_every=24",
            "train.eval_batches=1",
            "schedule.warmup_steps=2",
            "data.inject.fraction=0.2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [load_run(p) for p in find_runs([sweep])]
    assert len(runs) == 2 * 3 * 3 and all(r.status == "completed" for r in runs)
    assert all(len(r.series("optim/grad_norm")[1]) == 24 == len(r.series("train/loss")[1]) for r in runs)
    planted = [r for r in runs if "+spike_condition=ngrams" in r.overrides]
    assert sum(sum(r.series("data/injected_rows")[1]) for r in planted) > 0

    # the committed protocol through proxy-verdict's judge_runs (the report itself stubbed out:
    # its figures take longer than the runs): 24 steps never fill OLMo 2's window, and it says so
    monkeypatch.setattr(proxy.verdict, "collect_report", lambda paths, out, **options: None)
    monkeypatch.setattr(proxy.verdict, "write_report", lambda result, summary=None: None)
    verdict = judge_runs(FINDING, [sweep], tmp_path / "report")
    assert not verdict.checks[0].passed and not verdict.reproduced and len(verdict.checks) == 5
    assert "scored steps per run 0-0" in verdict.checks[0].measured
    assert verdict.numbers["answer/plain"].startswith("cannot tell")
    assert "NOT REPRODUCED" in (tmp_path / "report" / "verdict.md").read_text()

    # the same verdict with windows short enough for 24 steps: the design's windows fill
    module = verdict_module()
    short = module.Protocol(
        olmo2=SpikeOptions(sigma=7.0, window=8, min_history=8),
        olmo_core=SpikeOptions(sigma=6.0, window=4, one_sided=True, min_history=4),
        min_scored=16,
    )
    verdict = module.judge(None, runs, protocol=short)
    assert verdict.checks[0].passed, verdict.checks[0].measured
    assert "scored steps per run 16-16" in verdict.checks[0].measured
    slopes = verdict.numbers["per_seed_size_slope/grad_norm/olmo2"]
    assert {c: len(v) for c, v in slopes.items()} == {c: 3 for c in CONDITIONS}
    assert all(math.isfinite(x) for v in slopes.values() for x in v)
