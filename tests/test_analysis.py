"""Spike score and LR sensitivity against values computed by hand on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from proxy.analysis import (
    OLMO_CORE_SPIKES,
    CurvePoint,
    SpikeOptions,
    best_is_inside,
    clipped_losses,
    detect_spikes,
    lr_sensitivity,
    override_value,
    per_lr_losses,
    seed_curves,
    spike_score,
    spread,
    variant_labels,
    variant_of,
)


# --------------------------------------------------------------------------------------------
# Spike score
# --------------------------------------------------------------------------------------------
def alternating(n: int) -> np.ndarray:
    """1.0, 1.1, 1.0, 1.1, ...: mean 1.05, sample std ~0.05 over any long window."""
    return 1.0 + 0.1 * (np.arange(n) % 2)


def test_spike_score_counts_excursions_over_scored_points() -> None:
    up, down = alternating(40), alternating(40)
    up[25] = 1.05 + 8 * 0.051  # ~8 sigma above the mean of its 25 predecessors
    down[25] = 1.05 - 8 * 0.051  # ~8 sigma below
    opts = SpikeOptions(sigma=7, window=1000, min_history=10)
    for x in (up, down):
        spikes = detect_spikes(x, opts)
        assert list(spikes.indices) == [25]
        assert int(spikes.scored.sum()) == 30  # points 0..9 have < 10 predecessors
        assert spikes.score == pytest.approx(100 / 30)
    # one-sided (OLMo-core): only the upward excursion counts
    one_sided = SpikeOptions(sigma=7, window=1000, one_sided=True, min_history=10)
    assert spike_score(up, one_sided) == pytest.approx(100 / 30)
    assert spike_score(down, one_sided) == 0.0


def test_spike_threshold_is_at_least_sigma_std_of_previous_values() -> None:
    history = alternating(20)
    mean, std = history.mean(), history.std(ddof=1)
    just_over = np.append(history, mean + 7.01 * std)
    just_under = np.append(history, mean + 6.99 * std)
    opts = SpikeOptions(sigma=7, window=1000, min_history=20)
    assert detect_spikes(just_over, opts).indices.tolist() == [20]
    assert detect_spikes(just_under, opts).indices.tolist() == []
    assert spike_score(just_over, opts) == 100.0  # the only scored point


def test_spike_window_only_sees_the_last_values() -> None:
    # a noisy start (std ~5) then a quiet stretch (std ~0.05): a jump of 1.0 is a spike only when
    # the window has forgotten the noisy start
    x = np.concatenate([np.tile([0.0, 10.0], 10), alternating(20), [2.1]])
    wide = SpikeOptions(sigma=7, window=1000, min_history=10)
    narrow = SpikeOptions(sigma=7, window=16, min_history=10)
    assert 40 not in detect_spikes(x, wide).indices
    assert 40 in detect_spikes(x, narrow).indices


def test_non_finite_values_are_spikes_and_leave_the_history() -> None:
    x = alternating(30)
    x[12] = math.nan
    x[20] = math.inf
    spikes = detect_spikes(x, SpikeOptions(min_history=10))
    assert spikes.indices.tolist() == [12, 20]
    # 28 finite values, the first 10 unscored -> 18 scored, plus the 2 non-finite ones
    assert int(spikes.scored.sum()) == 20
    assert spikes.score == pytest.approx(100 * 2 / 20)
    # a NaN very early, before any history, still counts
    assert detect_spikes([math.nan, 1.0, 1.0], SpikeOptions()).score == 100.0


def test_constant_history_and_short_series() -> None:
    flat = [2.0] * 15
    assert spike_score(flat) == 0.0  # equal to the history: no spike
    assert detect_spikes(flat + [2.0001]).indices.tolist() == [15]  # any change from a flat history
    assert spike_score([1.0, 2.0, 3.0]) is None  # nothing has 10 predecessors
    assert spike_score([]) is None


def test_olmo_core_preset_and_bad_options() -> None:
    assert (OLMO_CORE_SPIKES.sigma, OLMO_CORE_SPIKES.window, OLMO_CORE_SPIKES.one_sided) == (6.0, 128, True)
    for bad in (dict(sigma=0), dict(window=1), dict(min_history=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SpikeOptions(**bad)


def test_spike_detection_is_vectorised_enough_for_long_series() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=20_000)
    x[15_000] = 12.0
    spikes = detect_spikes(x)
    assert 15_000 in spikes.indices
    assert spikes.score is not None and spikes.score < 0.05  # Gaussian noise: ~no 7-sigma points


# --------------------------------------------------------------------------------------------
# LR sensitivity
# --------------------------------------------------------------------------------------------
def test_lr_sensitivity_hand_computed() -> None:
    lrs = [3e-4, 1e-3, 3e-3, 1e-2]
    losses = [4.0, 3.5, 3.0, 7.0]  # the last above the loss at init: clipped to it
    l0 = 6.0
    # min(l, l0) = 4, 3.5, 3, 6; l* = 3 -> (1 + 0.5 + 0 + 3) / 4
    assert lr_sensitivity(lrs, losses, l0) == pytest.approx(4.5 / 4)


def test_lr_sensitivity_diverged_and_failed_count_as_init() -> None:
    lrs = [1e-3, 1e-2, 1e-1]
    # the diverged run has a finite, even good-looking loss: it still counts as l0
    assert lr_sensitivity(lrs, [3.0, 2.0, 2.5], 6.0, diverged=[False, False, True]) == pytest.approx((1 + 0 + 4) / 3)
    # a missing or NaN loss (failed run) counts as l0 too
    assert lr_sensitivity(lrs, [3.0, 2.0, None], 6.0) == pytest.approx((1 + 0 + 4) / 3)
    assert lr_sensitivity(lrs, [3.0, 2.0, math.nan], 6.0) == pytest.approx((1 + 0 + 4) / 3)
    # per-run loss at init
    assert clipped_losses([3.0, None], [6.0, 5.0]) == [3.0, 5.0]


def test_lr_sensitivity_averages_seeds_per_lr_and_restricts_range() -> None:
    lrs = [1e-3, 1e-3, 1e-2, 1e-1]
    losses = [3.0, 4.0, 2.0, None]
    assert per_lr_losses(lrs, losses, 6.0) == {1e-3: 3.5, 1e-2: 2.0, 1e-1: 6.0}
    assert lr_sensitivity(lrs, losses, 6.0) == pytest.approx((1.5 + 0 + 4) / 3)
    assert lr_sensitivity(lrs, losses, 6.0, lr_range=(1e-3, 1e-2)) == pytest.approx(1.5 / 2)
    with pytest.raises(ValueError, match="range"):
        lr_sensitivity(lrs, losses, 6.0, lr_range=(1.0, 2.0))


def test_lr_sensitivity_edge_cases() -> None:
    assert math.isnan(lr_sensitivity([1e-2, 1e-1], [None, None], 6.0))  # all diverged: undefined
    assert lr_sensitivity([1e-2], [3.0], 6.0) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        lr_sensitivity([], [], 6.0)
    with pytest.raises(ValueError, match="losses"):
        lr_sensitivity([1e-2, 1e-1], [3.0], 6.0)
    with pytest.raises(ValueError, match="loss at init"):
        lr_sensitivity([1e-2], [3.0], math.nan)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
def test_variant_drops_lr_seed_and_bookkeeping() -> None:
    a = variant_of(["optim.lr=0.1", "+experiment=demo", "model.qk_norm=off", "train.seed=3", "wandb.mode=offline"])
    b = variant_of(["model.qk_norm=off", "++experiment=demo", "optim.lr=0.01", "train.progress=false"])
    assert a == b == ("experiment=demo", "model.qk_norm=off")
    assert override_value(["optim.lr=0.1", "model=1m"], "optim.lr") == "0.1"
    assert override_value(["model=1m"], "optim.lr") is None
    assert variant_of(["~loss.z_loss"]) == ("~loss.z_loss",)


def test_variant_labels_strip_shared_overrides() -> None:
    base = ("experiment=x",)
    zl = ("experiment=x", "loss.z_loss=1e-4")
    labels, shared = variant_labels([base, zl, zl])
    assert shared == ("experiment=x",)
    assert labels == {base: "baseline", zl: "loss.z_loss=1e-4"}
    assert variant_labels([base]) == ({base: "experiment=x"}, ())  # alone: its own overrides
    assert variant_labels([()]) == ({(): "defaults"}, ())


# --------------------------------------------------------------------------------------------
# Effects across seeds, bracketed grids, per-seed LR curves
# --------------------------------------------------------------------------------------------
def test_spread_clears_only_a_consistent_effect_beyond_two_standard_errors() -> None:
    assert spread([0.30, 0.32, 0.28]).clears(+1)
    assert spread([-0.30, -0.32, -0.28]).clears(-1) and not spread([-0.30, -0.32, -0.28]).clears(+1)
    assert not spread([0.30, 0.32]).clears(+1)  # two seeds: no verdict
    assert not spread([0.5, 0.01, -0.01]).clears(+1)  # one seed against it
    assert not spread([1.0, 0.01, 0.02]).clears(+1)  # all positive, but mean 0.34 < 2 x sem 0.66
    assert not spread([0.3, float("nan"), 0.3]).clears(+1)
    s = spread([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.sem) == pytest.approx((2.0, 1.0, 1.0 / math.sqrt(3)))
    assert s.describe() == "2 ± 1 (sd over 3 seeds; 95% t interval [-0.484, 4.48])"
    assert spread([]).describe() == "no seeds"


def test_best_is_inside_needs_three_points_and_an_interior_minimum() -> None:
    assert best_is_inside({1e-3: 4.0, 1e-2: 3.5, 1e-1: 3.9})
    assert not best_is_inside({1e-3: 3.4, 1e-2: 3.5, 1e-1: 3.9})
    assert not best_is_inside({1e-3: 4.0, 1e-2: 3.9, 1e-1: 3.5})
    assert not best_is_inside({1e-3: 4.0, 1e-2: 3.5})


def test_seed_curves_give_one_sensitivity_per_seed_and_group() -> None:
    points = [
        CurvePoint("a", seed, lr, loss + 0.1 * seed, 6.0)
        for seed in (0, 1)
        for lr, loss in ((1e-3, 4.0), (1e-2, 3.0), (1e-1, 5.0))
    ]
    points.append(CurvePoint("b", 0, 1e-3, 3.0, 6.0))
    points.append(CurvePoint("b", 0, 1e-2, None, 6.0, diverged=True))  # counts as the loss at init
    curves = seed_curves(points)
    assert set(curves) == {"a", "b"} and set(curves["a"]) == {0, 1}
    a0 = curves["a"][0]
    assert a0.curve == {1e-3: 4.0, 1e-2: 3.0, 1e-1: 5.0} and a0.best_lr == 1e-2 and a0.bracketed
    assert a0.sensitivity == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    assert curves["a"][1].sensitivity == pytest.approx(a0.sensitivity)  # a shift changes nothing
    b0 = curves["b"][0]
    assert b0.curve == {1e-3: 3.0, 1e-2: 6.0} and not b0.bracketed
    assert b0.sensitivity == pytest.approx(1.5)


def test_seed_interval_and_proportion_interval_match_textbook_values() -> None:
    from proxy.analysis import spread, wilson_interval

    low, high = spread([1.0, 2.0, 3.0]).interval()  # mean 2, sd 1, sem 1/sqrt(3), t(2) = 4.303
    assert math.isclose(low, 2 - 4.303 / math.sqrt(3)) and math.isclose(high, 2 + 4.303 / math.sqrt(3))
    assert all(math.isnan(x) for x in spread([1.0]).interval())
    low, high = wilson_interval(8, 10)  # 0.8 of 10: (0.490, 0.943)
    assert round(low, 3) == 0.49 and round(high, 3) == 0.943
    assert wilson_interval(0, 5)[0] == 0.0


def test_a_job_folder_is_one_folder_even_when_a_value_holds_a_slash() -> None:
    from proxy.analysis import run_dirname

    name = run_dirname(["+experiment=spike_remedies/lab", "optim.lr=0.01", "data.path=/data/x"])
    assert "/" not in name and name == "+experiment=spike_remedies-lab,data.path=-data-x,optim.lr=0.01"


def test_a_run_has_one_name_its_folder_and_its_report_label_share() -> None:
    """Whatever the command-line order, a run's name is its folder's name (after the job number),
    and the report's label keeps a subset of the same parts in the same spelling."""
    from types import SimpleNamespace

    from proxy.analysis import run_dirname, run_name_from
    from proxy.report.tables import run_labels

    typed = ["optim.lr=0.003", "model.qk_norm=off", "train.log_every=1", "hydra/launcher=local"]
    name = run_name_from(typed)
    assert name == run_dirname(typed) == run_name_from(list(reversed(typed)))
    assert name == "model.qk_norm=off,optim.lr=0.003,train.log_every=1"  # hydra/launcher is not part of it
    rows = [
        SimpleNamespace(path=f"/s/{i}_x", lr=lr, seed=seed)
        for i, (lr, seed) in enumerate([(0.003, 0), (0.01, 0), (0.003, 1)])
    ]
    variants = [("model.qk_norm=off",), ("model.qk_norm=off",), ("model.qk_norm=layernorm",)]
    labels = {("model.qk_norm=off",): "model.qk_norm=off", ("model.qk_norm=layernorm",): "model.qk_norm=layernorm"}
    names, constant = run_labels(rows, variants, labels, ())  # type: ignore[arg-type]
    assert names[0] == "model.qk_norm=off,optim.lr=0.003,train.seed=0" and constant == ()
    row0 = run_name_from(["train.seed=0", "optim.lr=0.003", "model.qk_norm=off", "train.log_every=1"])
    assert set(names[0].split(",")) <= set(row0.split(","))  # the label: parts of the name, as spelled


def test_a_joined_name_splits_back_into_its_overrides_list_values_whole() -> None:
    from proxy.analysis import split_overrides

    assert split_overrides("+experiment=x/lab,optim.lr=0.01,sweep.seeds=[3,4,5]") == [
        "+experiment=x/lab",
        "optim.lr=0.01",
        "sweep.seeds=[3,4,5]",
    ]
    assert split_overrides("model.qk_norm=off, optim.lr=0.1") == ["model.qk_norm=off", "optim.lr=0.1"]  # older labels
    assert split_overrides("baseline") == ["baseline"] and split_overrides("") == []
