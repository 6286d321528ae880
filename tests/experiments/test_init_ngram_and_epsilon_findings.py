"""Findings 4, 5 and 6 (experiments/init_growth, repeated_ngrams, adam_epsilon): presets compose,
verdicts decide on constructed sweeps (one that reproduces, one that does not), the at-init growth
script and the eps figure script run, and a shrunken repeated-n-gram study runs end to end through
proxy-train and the judge.

Constructed run directories go through proxy.records (RunRecord / write_json), the contract the
trainer writes, so a verdict sees what it would see after a real sweep.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from proxy.config import register_configs
from proxy.records import GRAD_NORM, RunRecord, write_json
from proxy.verdict import NOT_TESTABLE, judge_runs
from tests.experiments import judge_tables

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
FINDINGS = ("init_growth", "repeated_ngrams", "adam_epsilon")
STEPS = 200


@pytest.mark.parametrize("scale", ["lab", "gpu"])
@pytest.mark.parametrize("finding", FINDINGS)
def test_presets_compose(finding: str, scale: str) -> None:
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={finding}/{scale}"], return_hydra_config=True)
    assert cfg.experiment == finding
    assert str(cfg.hydra.sweep.dir).startswith(f"runs/{finding}")
    assert cfg.hydra.sweeper.params  # a grid, not a single run
    assert cfg.train.save_final is False


def make_run(root: Path, name: str, config: dict, series: dict[str, list[float]], final_loss: float = 3.5) -> Path:
    """A completed run whose metrics rows hold ``series`` (one value per step)."""
    run_dir = root / name
    write_json(run_dir / "config.yaml", config)
    record = RunRecord(run_dir)
    lr = config["optim"]["lr"]
    record.update(status="running", overrides=[name], lr=lr, loss_at_init=6.2, steps_planned=STEPS)
    n = len(next(iter(series.values())))
    for step in range(n):
        row = {"train/loss": 6.2 - (6.2 - final_loss) * step / n, **{k: v[step] for k, v in series.items()}}
        record.log(step, row)
    record.update(status="completed", final_val_loss=final_loss, final_train_loss=final_loss, steps_completed=n)
    record.close()
    return run_dir


def noisy(seed: int, level: float = 1.0, n: int = STEPS) -> np.ndarray:
    return level * (1.0 + 0.02 * np.random.default_rng(seed).standard_normal(n))


# --------------------------------------------------------------------------------------------
# repeated_ngrams
# --------------------------------------------------------------------------------------------
def ngram_sweep_p1(root: Path, reproduces: bool) -> Path:
    planted = np.zeros(STEPS)
    planted[40::25] = 1.0  # batches that carry a planted run
    for inject in (False, True):
        for filt in (False, True):
            grad = noisy(int(inject) * 2 + int(filt))
            if inject and not filt and reproduces:
                grad = grad * (1.0 + 2.0 * planted)  # the planted batches spike
            series = {"optim/grad_norm": list(grad)}
            if inject:
                series["data/injected_rows"] = list(planted)
            if filt:
                series["data/masked_tokens"] = list(100.0 * planted if inject else np.zeros(STEPS))
            config = {
                "optim": {"lr": 1e-2},
                "train": {"seed": 0},
                "data": {"inject": {"enabled": inject}, "ngram_filter": {"enabled": filt}},
            }
            make_run(root, f"inject={inject},filter={filt}", config, series)
    return root


def ngram_sweep(root: Path, reproduces: bool, masks_clean: bool = False, seeds: int = 3) -> Path:
    """Protocol 2: the 2 x 2 grid x seeds; in each seed the planted batches fall elsewhere and,
    when it reproduces, spike the unfiltered grad norm 3x. ``masks_clean``: the filter also masks
    tokens of clean data."""
    for seed in range(seeds):
        planted = np.zeros(STEPS)
        planted[30 + 7 * seed :: 23] = 1.0
        for inject in (False, True):
            for filt in (False, True):
                grad = noisy(100 * seed + 2 * int(inject) + int(filt))
                if inject and not filt and reproduces:
                    grad = grad * (1.0 + 2.0 * planted)
                series = {"optim/grad_norm": list(grad)}
                if inject:
                    series["data/injected_rows"] = list(planted)
                if filt:
                    masked = 100.0 * planted if inject else (np.full(STEPS, 50.0) if masks_clean else np.zeros(STEPS))
                    series["data/masked_tokens"] = list(masked)
                config = {
                    "optim": {"lr": 1e-2},
                    "train": {"seed": seed, "batch_size": 16, "seq_len": 128},
                    "data": {"inject": {"enabled": inject}, "ngram_filter": {"enabled": filt}},
                }
                make_run(root, f"inject={inject},filter={filt},seed={seed}", config, series)
    return root


@pytest.mark.parametrize("reproduces", [True, False])
def test_repeated_ngrams_p1_verdict(tmp_path: Path, reproduces: bool) -> None:
    root = ngram_sweep_p1(tmp_path / "sweep", reproduces)
    verdict = judge_tables(EXPERIMENTS / "repeated_ngrams" / "protocol1", [root], tmp_path / "report")
    assert verdict.reproduced is reproduces
    assert len(verdict.checks) == 3
    dirty = verdict.numbers["spike_score_grad_norm/inject+nofilter"]
    assert (dirty > 0) is reproduces
    assert verdict.numbers["spike_score_grad_norm/inject+filter"] == 0.0
    assert (tmp_path / "report" / "verdict.md").read_text().startswith("# repeated_ngrams")


@pytest.mark.parametrize("reproduces", [True, False])
def test_repeated_ngrams_verdict(tmp_path: Path, reproduces: bool) -> None:
    verdict = judge_tables(
        EXPERIMENTS / "repeated_ngrams", [ngram_sweep(tmp_path / "sweep", reproduces)], tmp_path / "report"
    )
    assert verdict.reproduced is reproduces, verdict.to_markdown()
    assert len(verdict.checks) == 5 and verdict.numbers["seeds"] == [0, 1, 2]
    if not reproduces:  # the clean-data check and nothing else of the design passes
        assert [c.passed for c in verdict.checks][:1] == [True]


def test_repeated_ngrams_verdict_wants_three_seeds_and_a_filter_that_spares_clean_data(tmp_path: Path) -> None:
    two = judge_tables(
        EXPERIMENTS / "repeated_ngrams", [ngram_sweep(tmp_path / "two", True, seeds=2)], tmp_path / "report_two"
    )
    assert not two.reproduced  # each effect holds in both seeds, but two seeds cannot clear a spread
    greedy = judge_tables(
        EXPERIMENTS / "repeated_ngrams",
        [ngram_sweep(tmp_path / "greedy", True, masks_clean=True)],
        tmp_path / "report_greedy",
    )
    assert not greedy.checks[0].passed and all(c.passed for c in greedy.checks[1:])


def test_repeated_ngrams_verdict_names_a_missing_group(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_run(
        root,
        "clean",
        {"optim": {"lr": 1e-2}, "data": {"inject": {"enabled": False}}},
        {"optim/grad_norm": list(noisy(0))},
    )
    verdict = judge_tables(EXPERIMENTS / "repeated_ngrams", [root], tmp_path / "report")
    assert not verdict.reproduced
    assert "inject+nofilter" in verdict.checks[0].measured


# --------------------------------------------------------------------------------------------
# adam_epsilon
# --------------------------------------------------------------------------------------------
LAYER = "blocks.0.mlp.fc_in.weight"


def eps_sweep_p1(root: Path, reproduces: bool) -> Path:
    """Protocol 1: eps x LR on one model."""
    for eps in (1e-15, 1e-8, 1e-6):
        for lr in (1e-2, 1e-1, 3e-1):
            grad_rms = 1e-6 / lr if reproduces else 1e-3  # falls with the LR, or not
            update = 1.0 / (1.0 + eps / grad_rms)  # m / (sqrt(v) + eps) with |m| ~ sqrt(v) ~ grad RMS
            series = {f"grad_rms/{LAYER}": [grad_rms] * 20, f"update_rms/{LAYER}": [update] * 20}
            config = {"optim": {"lr": lr, "eps": eps}, "model": {"name": "tiny"}, "train": {"seed": 0}}
            make_run(root, f"eps={eps},lr={lr}", config, series)
    return root


def eps_sweep(root: Path, reproduces: bool, seeds: int = 3, widths=(64, 128, 256), first_seed: int = 0) -> Path:
    """Protocol 2: a width ladder x eps {1e-15, 1e-6} x seeds at one LR. With ``reproduces`` the
    gradient RMS falls as d^-2 (from 2e-5 at d 64), so a large eps bites harder up the ladder;
    otherwise it stays at 1e-3, far above eps, at every width."""
    rng = np.random.default_rng(1)
    for width in widths:
        for eps in (1e-15, 1e-6):
            for seed in range(first_seed, first_seed + seeds):
                jitter = 1.0 + 0.01 * rng.standard_normal()
                grad_rms = (2e-5 * (64 / width) ** 2 if reproduces else 1e-3) * jitter
                update = 0.2 / (1.0 + eps / grad_rms)  # m / (sqrt(v) + eps) with |m| ~ sqrt(v) ~ grad RMS
                loss = 3.5 + 5.0 * (1.0 - update / 0.2) + 0.002 * rng.standard_normal()
                series = {f"grad_rms/{LAYER}": [grad_rms] * 20, f"update_rms/{LAYER}": [update] * 20}
                config = {
                    "optim": {"lr": 0.3, "eps": eps},
                    "model": {"name": "tiny", "d_model": width},
                    "train": {"seed": seed},
                }
                make_run(root, f"d={width},eps={eps},seed={seed}", config, series, final_loss=loss)
    return root


@pytest.mark.parametrize("reproduces", [True, False])
def test_adam_epsilon_verdict(tmp_path: Path, reproduces: bool) -> None:
    root = eps_sweep(tmp_path / "sweep", reproduces)
    verdict = judge_tables(EXPERIMENTS / "adam_epsilon", [root], tmp_path / "report")
    assert [c.passed for c in verdict.checks] == [reproduces] * 3
    assert verdict.reproduced is reproduces
    if reproduces:
        assert verdict.numbers["grad_rms_power_law_exponent"] == pytest.approx(-2.0, abs=0.05)
        # 2e-5 * (64 / d)^2 = 1e-8 at d = 64 * sqrt(2000)
        assert verdict.numbers["width_where_grad_rms_reaches_1e-08"] == pytest.approx(64 * 2000**0.5, rel=0.05)
    else:
        assert "never" in str(verdict.numbers["width_where_grad_rms_reaches_1e-08"])


def test_adam_epsilon_verdict_needs_seeds_and_widths(tmp_path: Path) -> None:
    two_seeds = judge_tables(EXPERIMENTS / "adam_epsilon", [eps_sweep(tmp_path / "a", True, seeds=2)], tmp_path / "ra")
    two_widths = judge_tables(
        EXPERIMENTS / "adam_epsilon", [eps_sweep(tmp_path / "b", True, widths=(64, 128))], tmp_path / "rb"
    )
    assert not any(c.passed for c in two_seeds.checks + two_widths.checks)


@pytest.mark.parametrize(("first_seed", "seeds_present"), [(3, True), (0, False)])
def test_adam_epsilon_protocol3_wants_five_fresh_seeds(tmp_path: Path, first_seed: int, seeds_present: bool) -> None:
    """Protocol 3 judges protocol 2's three criteria unchanged on seeds 3-7; seeds 0-4 (two already
    seen) fail its seed check while protocol 2's criteria still pass."""
    root = eps_sweep(tmp_path / "sweep", True, seeds=5, first_seed=first_seed)
    verdict = judge_tables(EXPERIMENTS / "adam_epsilon" / "protocol3", [root], tmp_path / "report")
    assert [c.passed for c in verdict.checks] == [True, True, True, seeds_present]
    assert verdict.reproduced is seeds_present
    assert verdict.numbers["penalty growth d256 minus d64, seeds positive"] == "5 of 5"
    assert len(verdict.numbers["loss_penalty/d256 per seed (nats)"]) == 5


@pytest.mark.parametrize(
    ("reproduces", "first_seed", "label"),
    [(True, 3, "REPRODUCED"), (False, 3, NOT_TESTABLE), (True, 0, NOT_TESTABLE)],
)
def test_adam_epsilon_protocol4_judges_only_past_the_crossing(
    tmp_path: Path, reproduces: bool, first_seed: int, label: str
) -> None:
    """Protocol 4 (the lease's d 256/512/1024): protocol 2's criteria once the gradient RMS has
    reached 1e-6 at the widest model with seeds 3-5; a ladder whose gradient RMS stays at 1e-3, or
    seeds already seen, is NOT TESTABLE and judges nothing."""
    root = eps_sweep(tmp_path / "sweep", reproduces, widths=(256, 512, 1024), first_seed=first_seed)
    verdict = judge_tables(EXPERIMENTS / "adam_epsilon" / "protocol4", [root], tmp_path / "report")
    assert verdict.label == label, verdict.to_markdown()
    assert len(verdict.checks) == (3 if label == "REPRODUCED" else 0)


def init_training_sweep(root: Path, scaled_spikes: int, steps: int = 2100, seeds=(3, 4, 5)) -> Path:
    """Protocol 3's training half: init normal vs scaled x LR {3e-3, 1e-2} x seeds, the grad norm
    logged every step; the scaled init's series carries ``scaled_spikes`` 30-sigma jumps after the
    1000-step window, the normal init's none."""
    for init in ("normal", "scaled"):
        for lr in (3e-3, 1e-2):
            for seed in seeds:
                norms = noisy(seed * 7 + (init == "scaled"), n=steps)
                if init == "scaled":
                    for i in range(scaled_spikes):
                        norms[1100 + 90 * i + seed] *= 1.6
                config = {"optim": {"lr": lr}, "model": {"name": "20m", "init": init}, "train": {"seed": seed}}
                make_run(root, f"init={init},lr={lr},seed={seed}", config, {GRAD_NORM: list(norms)})
    return root


@pytest.mark.parametrize(
    ("scaled_spikes", "steps", "label"),
    [(4, 2100, "REPRODUCED"), (0, 2100, NOT_TESTABLE), (4, 1500, NOT_TESTABLE)],
)
def test_init_growth_protocol3_judges_the_spike_score_only_where_it_can_show(
    tmp_path: Path, scaled_spikes: int, steps: int, label: str
) -> None:
    """Spikes only with the scaled init: REPRODUCED; no spikes at all, or runs too short for
    OLMo 2's 1000-point window: NOT TESTABLE, nothing judged."""
    root = init_training_sweep(tmp_path / "sweep", scaled_spikes, steps)
    verdict = judge_tables(EXPERIMENTS / "init_growth" / "protocol3", [root], tmp_path / "report")
    assert verdict.label == label, verdict.to_markdown()
    assert len(verdict.checks) == (1 if label == "REPRODUCED" else 0)


@pytest.mark.parametrize("reproduces", [True, False])
def test_adam_epsilon_protocol1_verdict(tmp_path: Path, reproduces: bool) -> None:
    root = eps_sweep_p1(tmp_path / "sweep", reproduces)
    verdict = judge_tables(EXPERIMENTS / "adam_epsilon" / "protocol1", [root], tmp_path / "report")
    assert [c.passed for c in verdict.checks] == [reproduces, reproduces]
    ratio = verdict.numbers["update_ratio_eps1e-6_vs_1e-15/tiny/lr=0.3"]
    assert ratio == pytest.approx(1.0 / (1.0 + 1e-6 / (1e-6 / 0.3)) if reproduces else 1.0 / (1.0 + 1e-3), rel=1e-3)


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"test_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_adam_epsilon_figures(tmp_path: Path) -> None:
    figure = load_script(EXPERIMENTS / "adam_epsilon" / "figure.py")
    root = eps_sweep(tmp_path / "sweep", reproduces=True)
    assert figure.main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "figures" / "grad_rms_vs_width.png").stat().st_size > 0
    figure_p1 = load_script(EXPERIMENTS / "adam_epsilon" / "protocol1" / "figure.py")
    assert figure_p1.main([str(eps_sweep_p1(tmp_path / "p1", True)), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "figures" / "grad_rms_vs_lr.png").stat().st_size > 0
    empty = tmp_path / "empty"
    make_run(empty, "no-metrics", {"optim": {"lr": 1e-2}}, {"train/other": [1.0] * 3})
    assert figure.main([str(empty), "--out", str(tmp_path / "out")]) == 2  # one error line, no figure
    assert figure_p1.main([str(empty), "--out", str(tmp_path / "out")]) == 2


# --------------------------------------------------------------------------------------------
# init_growth
# --------------------------------------------------------------------------------------------
def load_measure():
    """measure.py as the init_growth judge loads it (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "init_growth_verdict_test", EXPERIMENTS / "init_growth" / "verdict.py"
    )
    verdict_module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(verdict_module)
    return verdict_module._measure_module()


def growth_samples(reproduces: bool, seeds: int = 3, widths=(64, 128, 256)) -> list:
    """lambda per (init, width, seed): the flat init gets a slope of 0 (plus seed noise), the
    drifting one 0.1 per e-fold of width; with ``reproduces`` the flat one is init=normal."""
    measure = load_measure()
    rng = np.random.default_rng(0)
    samples = []
    for init in ("normal", "scaled"):
        drifts = (init == "scaled") == reproduces
        for seed in range(seeds):
            for width in widths:
                for definition in ("embedding", "block1"):
                    lam = 0.8 + (0.1 * np.log(width / 64) if drifts else 0.0) + rng.normal(0, 0.002)
                    samples.append(
                        measure.GrowthSample(
                            arch="olmo2",
                            init=init,
                            width=width,
                            n_layers=6,
                            n_heads=width // 32,
                            seed=seed,
                            definition=definition,
                            activation=float(lam),
                            gradient=float(-lam),
                        )
                    )
    return samples


def growth_sweep(root: Path, out: Path, reproduces: bool, steps: int = STEPS) -> Path:
    measure = load_measure()
    measure.write_results(growth_samples(reproduces), out)
    spikes = np.zeros(steps)
    spikes[1100::150] = 50.0
    for init in ("normal", "scaled"):
        grad = noisy(1, n=steps)
        if (init == "scaled") == reproduces:
            grad = grad * (1.0 + spikes)
        config = {"optim": {"lr": 1e-2}, "model": {"init": init}, "train": {"seed": 0}}
        make_run(root, f"init={init}", config, {"optim/grad_norm": list(grad)})
    return root


@pytest.mark.parametrize("reproduces", [True, False])
def test_init_growth_verdict_at_init(reproduces: bool) -> None:
    verdict_module = load_measure()._verdict_module()
    verdict = verdict_module.judge_at_init(growth_samples(reproduces))
    assert [c.passed for c in verdict.checks] == [reproduces] * 2
    # two seeds cannot clear a spread, and a slope needs three widths to be judged
    assert [c.passed for c in verdict_module.judge_at_init(growth_samples(True, seeds=2)).checks] == [False] * 2
    assert not any(c.passed for c in verdict_module.judge_at_init(growth_samples(True, widths=(64, 128))).checks)
    assert verdict_module.width_slope([64, 128, 256], [1.0, 1.0 + np.log(2), 1.0 + np.log(4)]) == pytest.approx(1.0)


@pytest.mark.parametrize("reproduces", [True, False])
def test_init_growth_verdict(tmp_path: Path, reproduces: bool) -> None:
    out = tmp_path / "report"
    root = growth_sweep(tmp_path / "sweep", out, reproduces)
    verdict = judge_runs(EXPERIMENTS / "init_growth", [root], out)
    assert verdict.numbers["growth/csv"] == str(out / "growth_exponents_p2.csv")  # the report's CSV wins
    assert "training" in verdict.numbers  # 200 steps: a 1000-step window cannot fill, not judged
    assert [c.passed for c in verdict.checks] == [reproduces] * 2
    assert (out / "figures" / "growth_exponents_p2.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("reproduces", [True, False])
def test_init_growth_verdict_judges_long_training(tmp_path: Path, reproduces: bool) -> None:
    out = tmp_path / "report"
    root = growth_sweep(tmp_path / "sweep", out, reproduces, steps=2200)
    verdict = judge_runs(EXPERIMENTS / "init_growth", [root], out)
    assert verdict.numbers["training/shortest_run_points"] == 2200
    assert len(verdict.checks) == 3 and verdict.checks[2].passed == reproduces


@pytest.mark.parametrize("reproduces", [True, False])
def test_init_growth_protocol1_verdict(tmp_path: Path, reproduces: bool) -> None:
    """Protocol 1 (max |lambda| over widths, block-1 definition) stays runnable on its CSV."""
    out = tmp_path / "report"
    out.mkdir()
    lines = ["arch,init,width,n_layers,n_heads,activation,gradient,activation_std,gradient_std,seeds"]
    for init in ("normal", "scaled"):
        for width in (64, 128):
            lam = 0.01 if (init == "normal") == reproduces else 0.2 * width / 64
            lines.append(f"olmo2,{init},{width},6,2,{lam},{-lam},0,0,1")
    (out / "growth_exponents.csv").write_text("\n".join(lines) + "\n")
    root = tmp_path / "sweep"
    spikes = np.zeros(STEPS)
    spikes[50::50] = 2.0
    for init in ("normal", "scaled"):
        grad = noisy(1)
        if (init == "scaled") == reproduces:
            grad = grad * (1.0 + spikes)
        make_run(
            root,
            f"init={init}",
            {"optim": {"lr": 1e-2}, "model": {"init": init}, "train": {"seed": 0}},
            {"optim/grad_norm": list(grad)},
        )
    verdict = judge_runs(EXPERIMENTS / "init_growth" / "protocol1", [root], out)
    assert [c.passed for c in verdict.checks] == [reproduces] * 3


def test_measure_script_writes_its_table(tmp_path: Path) -> None:
    measure = load_measure()
    code = measure.main(
        [
            "--widths",
            "16",
            "32",
            "64",
            "--n-layers",
            "2",
            "--head-dim",
            "8",
            "--seeds",
            "3",
            "--batches",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    samples = measure.read_samples(tmp_path / "growth_exponents_p2.csv")
    assert {(s.arch, s.init, s.width, s.seed, s.definition) for s in samples} == {
        (a, i, w, seed, d)
        for a in ("pre_ln", "olmo2")
        for i in ("normal", "scaled")
        for w in (16, 32, 64)
        for seed in range(3)
        for d in ("embedding", "block1")
    }
    assert all(np.isfinite([s.activation, s.gradient]).all() for s in samples)
    # the two definitions are different numbers, and seeds are different models
    by_def = {d: [s.activation for s in samples if s.definition == d] for d in ("embedding", "block1")}
    assert by_def["embedding"] != by_def["block1"]
    assert len({s.activation for s in samples if s.definition == "embedding"}) > len(samples) // 4
    verdict = json.loads((tmp_path / "verdict_at_init.json").read_text())
    assert len(verdict["checks"]) == 2 and verdict["numbers"]["wall_time_s"] > 0
    assert (tmp_path / "figures" / "growth_exponents_p2.png").stat().st_size > 0
    (tmp_path / "verdict_at_init.md").unlink()
    assert measure.main(["--judge-only", "--out", str(tmp_path)]) == 0  # re-judges the CSV, measures nothing
    assert (tmp_path / "verdict_at_init.md").is_file()
    assert measure.main(["--judge-only", "--out", str(tmp_path / "nothing")]) == 2
    assert measure.main(["--widths", "20", "--head-dim", "8", "--out", str(tmp_path)]) == 2  # 20 % 8 != 0
    (tmp_path / "bad.csv").write_text("arch,init\nolmo2,normal\n")
    with pytest.raises(ValueError, match="bad.csv: missing columns"):
        measure.read_samples(tmp_path / "bad.csv")


# --------------------------------------------------------------------------------------------
# End to end: proxy-train multirun (shrunken) -> judge
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_repeated_ngrams_study_end_to_end(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "proxy.train",
        "-m",
        "+experiment=repeated_ngrams/lab",
        "train.steps=12",
        "train.eval_every=6",
        "train.eval_batches=1",
        "train.batch_size=4",
        "train.seq_len=40",
        "model.d_model=16",
        "model.n_layers=1",
        "data.inject.fraction=0.5",
        "train.seed=0",
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
    assert len(list(sweep_dir.glob("*/summary.json"))) == 4  # inject off/on x filter off/on
    assert not list(sweep_dir.rglob("*.pt"))  # save_final=false: no checkpoints
    verdict = judge_runs(EXPERIMENTS / "repeated_ngrams", [sweep_dir], tmp_path / "report")
    assert len(verdict.checks) == 5  # 12 steps, one seed: judged, not crashed
    assert verdict.numbers["seeds"] == [0]
    assert verdict.numbers["masked_tokens/inject+filter"][0] > 0  # 32 x 1-token repeats fit 41 tokens
    from proxy.records import load_run

    assert {load_run(p.parent).config_value("data.seed") for p in sweep_dir.rglob("summary.json")} == {0}
