"""Adam's edge of stability before a spike (proxy/forensics/edge.py, proxy-inspect --edge, and
experiments/adam_edge_of_stability/study.py) on the provoked-spike kit of the forensics tests.

Lanczos against a dense eigen-decomposition is tested in test_inspect.py (a quadratic with a known
spectrum, plain and preconditioned); here the iterations are kept low, since only the plumbing and
the conventions are checked."""

import json
import math
from pathlib import Path

import pytest
import torch

from proxy.forensics import curvature, dissect_report, find_kits, load_kit, restore, trainer_step
from proxy.forensics.edge import (
    Crossing,
    EdgeStep,
    EdgeTrajectory,
    batch_sharpness,
    edge_trajectory,
    first_crossing,
    reference_config,
)
from proxy.forensics.inspect_cli import main as inspect_main
from proxy.records import read_json, write_json
from proxy.verdict import NOT_TESTABLE, load_script
from tests.forensics.test_capture_and_replay import BEFORE, SPIKE_STEP, run_with_capture, single_thread, spike_cfg  # noqa: F401

STUDY = Path(__file__).resolve().parents[2] / "experiments" / "adam_edge_of_stability" / "study.py"
ITERS = 3  # Hessian-vector products per eigenvalue: enough for the plumbing, cheap on a busy CPU


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("edge") / "spike"
    run_with_capture(run_dir, spike_cfg())
    return run_dir


@pytest.fixture(scope="module")
def kit(run_dir):
    return load_kit(find_kits(run_dir)[0])


@pytest.fixture(scope="module")
def traj(kit):
    return edge_trajectory(kit, iterations=ITERS)


def test_trajectory_has_a_row_per_step_from_the_pre_spike_state_through_the_spike(kit, traj):
    assert kit.step == SPIKE_STEP and traj.spike_step == SPIKE_STEP
    assert [s.step for s in traj.steps] == list(range(SPIKE_STEP - BEFORE, SPIKE_STEP + 1))
    assert traj.start_step == kit.state_step("before") and traj.beta1 == 0.9 and traj.iterations == ITERS
    # the unprotected replay of a remedy-free CPU run is the run itself, bit for bit
    assert traj.replays_run
    assert [s.loss for s in traj.steps] == [kit.recorded(s.step)["loss"] for s in traj.steps]
    assert [s.grad_norm for s in traj.steps] == [kit.recorded(s.step)["grad_norm"] for s in traj.steps]
    for s in traj.steps:
        assert s.gd_threshold == pytest.approx(2 / s.lr) and s.adam_threshold == pytest.approx(38 / s.lr)
        assert s.gd_ratio == pytest.approx(s.sharpness / s.gd_threshold)
        assert s.adam_ratio == pytest.approx(s.preconditioned / s.adam_threshold)
        assert s.sharpness > 0 and s.preconditioned > 0
        assert -1.0 <= s.update_cosine <= 1.0
        assert 0.0 < s.update_bimodality <= 1.0
    # the loss spikes at the spike step
    assert traj.steps[-1].loss > max(s.loss for s in traj.steps[:-1])


def test_the_preconditioner_is_the_one_of_the_steps_own_update(kit, traj):
    """Row t pairs the Hessian at theta_t with P from v_t, which already holds g_t (Adam's own
    order): recomputed here by hand for the first step it matches exactly, and the preconditioner
    before the update (v_{t-1}) gives another number."""
    t = restore(kit, "before")
    x, y = kit.batch(t.step)
    reference = restore(kit, "before", cfg=reference_config(kit.config)).model
    params = list(t.model.parameters())
    stale = curvature.adam_preconditioner(t.optimizer, params)  # v_{t-1}
    r = trainer_step(t, x, y, use_remedy=False)  # the update: v_t now holds g_t
    fresh = curvature.adam_preconditioner(t.optimizer, params)
    ours = batch_sharpness(reference, kit.config, x, y, fresh, r.lr, ITERS)
    row = traj.steps[0]
    assert ours.preconditioned == row.preconditioned and ours.sharpness == row.sharpness
    other = batch_sharpness(reference, kit.config, x, y, stale, r.lr, ITERS)
    assert other.preconditioned != row.preconditioned


def test_every_measures_fewer_steps_on_the_same_trajectory(kit, traj):
    sparse = edge_trajectory(kit, iterations=1, every=2)
    start = SPIKE_STEP - BEFORE
    assert [s.step for s in sparse.steps] == sorted({*range(start, SPIKE_STEP + 1, 2), SPIKE_STEP})
    full = {s.step: s.loss for s in traj.steps}
    assert all(s.loss == full[s.step] for s in sparse.steps)  # unmeasured steps are still taken
    with pytest.raises(ValueError, match="every >= 1"):
        edge_trajectory(kit, every=0)


def test_held_out_sharpness_is_of_one_fixed_sample_on_the_same_replay(kit, traj):
    from proxy.forensics.replay import held_out_batch

    x, y = held_out_batch(kit, 2)
    rows, seq_len = kit.batches["inputs"].shape[1:]
    assert x.shape == y.shape == (2 * rows, seq_len)
    assert torch.equal(x, held_out_batch(kit, 2)[0])  # the same sample every time
    fixed = edge_trajectory(kit, iterations=ITERS, every=BEFORE, sharpness_batches=2)
    assert fixed.sharpness_batches == 2 and traj.sharpness_batches == 0
    by_step = {s.step: s for s in traj.steps}
    for s in fixed.steps:  # the replay, the update and its statistics do not depend on the measure
        mine = by_step[s.step]
        assert (s.loss, s.grad_norm, s.update_bimodality) == (mine.loss, mine.grad_norm, mine.update_bimodality)
    # the first measured step's plain sharpness is that of the held-out loss at the "before" weights
    cfg = kit.config
    model = restore(kit, "before", cfg=reference_config(cfg)).model
    dim = sum(p.numel() for p in model.parameters())
    direct = batch_sharpness(model, cfg, x, y, torch.ones(dim), fixed.steps[0].lr, ITERS)
    assert fixed.steps[0].sharpness == pytest.approx(direct.sharpness, rel=1e-5)
    assert fixed.steps[0].sharpness != by_step[fixed.steps[0].step].sharpness
    assert EdgeTrajectory.from_json(json.loads(json.dumps(fixed.to_json()))).sharpness_batches == 2
    with pytest.raises(ValueError, match="sharpness_batches >= 0"):
        edge_trajectory(kit, sharpness_batches=-1)


def _constructed(spike: int, gd: list[float], adam: list[float]) -> EdgeTrajectory:
    start = spike - len(gd) + 1
    steps = [
        EdgeStep(
            step=start + i,
            lr=0.1,
            loss=3.0,
            grad_norm=1.0,
            sharpness=20 * g,
            gd_threshold=20.0,
            gd_ratio=g,
            preconditioned=380 * a,
            adam_threshold=380.0,
            adam_ratio=a,
            update_bimodality=0.4,
            update_cosine=0.2,
        )
        for i, (g, a) in enumerate(zip(gd, adam))
    ]
    return EdgeTrajectory(
        kit="k", spike_step=spike, trigger="loss", start_step=start, beta1=0.9, iterations=20, every=1, steps=steps
    )


def test_first_crossing_on_constructed_trajectories(tmp_path):
    # preconditioned reaches 1 three steps before the spike at 10, plain one step before
    early = first_crossing(_constructed(10, gd=[0.1, 0.2, 0.5, 0.9, 1.3, 2.0], adam=[0.3, 0.8, 1.0, 1.5, 0.9, 4.0]))
    assert early.adam == Crossing(step=7, steps_before=3) and early.gd == Crossing(step=9, steps_before=1)
    assert early.adam_before_spike and early.adam_first and early.adam_crossed_in_window
    assert early.max_adam_ratio == 4.0 and early.max_gd_ratio == 2.0
    # never: below 1 throughout, a NaN (a non-finite step) is not a crossing
    never = first_crossing(_constructed(10, gd=[0.1, 0.2, math.nan], adam=[0.5, 0.99, math.nan]))
    assert never.adam == Crossing(None, None) and never.gd == Crossing(None, None)
    assert not never.adam_before_spike and not never.adam_first and never.max_adam_ratio == 0.99
    # at the spike step itself: not before the spike, but before the plain ratio (which never does)
    at = first_crossing(_constructed(10, gd=[0.1, 0.2], adam=[0.5, 2.0]))
    assert at.adam == Crossing(10, 0) and not at.adam_before_spike and at.adam_first
    # plain first: the preconditioned ratio crossing later is not "first"
    late = first_crossing(_constructed(10, gd=[1.2, 1.5], adam=[0.5, 2.0]))
    assert not late.adam_first and not late.adam_before_spike
    assert late.gd == Crossing(9, 1, at_start=True) and not late.adam.at_start
    # above from the first measured step: before the spike, but a crossing the window did not see
    censored = first_crossing(_constructed(10, gd=[0.5, 0.5, 0.5], adam=[1.5, 0.8, 2.0]))
    assert censored.adam == Crossing(8, 2, at_start=True) and censored.adam_before_spike
    assert censored.adam_first and not censored.adam_crossed_in_window

    traj = _constructed(10, gd=[0.1, math.nan], adam=[0.3, 1.2])
    write_json(tmp_path / "t.json", traj.to_json())
    data = read_json(tmp_path / "t.json")
    assert data["first_crossing"]["adam"] == {"step": 10, "steps_before": 0, "at_start": False}
    back = EdgeTrajectory.from_json(data)
    assert back.steps[0] == traj.steps[0] and math.isnan(back.steps[1].gd_ratio)


def test_wilson_interval():
    study = load_script(STUDY)
    assert study.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert study.wilson(0, 1) == pytest.approx((0.0, 0.7935), abs=1e-4)
    assert all(math.isnan(v) for v in study.wilson(0, 0))


def test_study_end_to_end(run_dir, tmp_path, capsys):
    study = load_script(STUDY)
    out = tmp_path / "study"
    assert study.main([str(run_dir.parent), "--out", str(out), "--iterations", "1"]) == 0  # a "sweep" dir
    data = json.loads((out / "trajectories.json").read_text())
    (entry,) = data["kits"]
    assert entry["seed"] == 0 and entry["lr"] == spike_cfg().optim.lr and entry["remedy"] == "none"
    assert [s["step"] for s in entry["trajectory"]["steps"]] == list(range(SPIKE_STEP - BEFORE, SPIKE_STEP + 1))
    summary = data["summary"]
    assert summary["kits"] == 1 and summary["seeds"] == [0]
    for key in (
        "adam_before_spike",
        "adam_before_plain",
        "adam_at_start",
        "plain_at_start",
        "bimodal_at_spike",
        "bimodality_rises",
        "cosine_falls",
    ):
        lo, hi = summary[key]["wilson95"]
        assert summary[key]["n"] == 1 and 0.0 <= lo <= summary[key]["fraction"] <= hi <= 1.0
    # the in-window question is asked only of kits whose preconditioned ratio started below 1
    censored = summary["adam_at_start"]["k"]
    assert summary["adam_crossed_in_window"]["n"] == 1 - censored
    steps = entry["trajectory"]["steps"]
    assert summary["update_bimodality"]["at_start"] == [steps[0]["update_bimodality"]]
    assert summary["update_cosine"]["at_spike"] == [steps[-1]["update_cosine"]]
    text = (out / "summary.md").read_text()
    for needle in (
        "Measured answer",
        "95% Wilson",
        "distinct seeds",
        "Per kit",
        "ratios_aligned.png",
        "left-censored",
        "bimodality coefficient",
    ):
        assert needle in text
    assert (out / "ratios_aligned.png").stat().st_size > 0
    assert study.main([str(tmp_path / "empty_dir_that_is_missing"), "--out", str(out)]) == 2
    assert "no such path" in capsys.readouterr().err
    held = tmp_path / "held_out"
    assert (
        study.main(
            [str(run_dir), "--out", str(held), "--iterations", "1", "--every", str(BEFORE), "--sharpness-batches", "1"]
        )
        == 0
    )
    data = json.loads((held / "trajectories.json").read_text())
    assert data["sharpness_batches"] == 1 and data["kits"][0]["trajectory"]["sharpness_batches"] == 1
    assert "first 1 held-out batches" in (held / "summary.md").read_text()
    assert study.main([str(run_dir), "--out", str(held), "--sharpness-batches", "-1"]) == 2


def test_inspect_edge_writes_the_section_and_figure(kit, tmp_path, capsys, monkeypatch):
    # the per-parameter update histograms (test_inspect's) take ~10 s of matplotlib on a busy CPU:
    # drawn here with the cheap sequence figure instead, since only the edge section matters
    monkeypatch.setattr(dissect_report, "_update_figure", dissect_report._sequence_figure)
    out = tmp_path / "inspect"
    assert inspect_main([str(kit.path), "--out", str(out), "--no-replay", "--lanczos-iters", str(ITERS), "--edge"]) == 0
    assert "edge of stability:" in capsys.readouterr().out
    assert inspect_main([str(kit.path), "--out", str(out), "--no-replay", "--edge-batches", "2"]) == 2
    assert "needs --edge" in capsys.readouterr().err
    assert (out / "edge.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Adam's edge of stability before the spike" in report and "(edge.png)" in report
    edge = json.loads((out / "inspect.json").read_text())["edge"]
    assert [s["step"] for s in edge["steps"]] == list(range(SPIKE_STEP - BEFORE, SPIKE_STEP + 1))
    assert inspect_main([str(kit.path), "--out", str(out), "--edge", "--lanczos-iters", "0"]) == 2
    assert "--edge needs the curvature" in capsys.readouterr().err


def test_lab_preset_is_the_unprotected_clipping_arm_with_a_long_history():
    from tests.experiments.test_spike_remedy_claims import composed, point

    cfg = composed(["+experiment=adam_edge_of_stability/lab"])
    params = {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"+clip": "none", "optim.lr": "0.1,0.3", "train.seed": "0,1,2"}
    c = point("adam_edge_of_stability/lab", "+clip=none", "optim.lr=0.3", "train.seed=2")
    base = point("spike_remedies/clipping_lab", "+clip=none", "optim.lr=0.3", "train.seed=2")
    assert c.capture.enabled and c.capture.steps_before == 100 and c.capture.max_kits == 1
    assert c.optim.grad_clip == 0.0 and c.remedy.kind == base.remedy.kind
    # everything that shapes the trajectory is the clipping study's: only the capture window differs
    assert (c.model, c.optim, c.train, c.schedule, c.data, c.loss) == (
        base.model,
        base.optim,
        base.train,
        base.schedule,
        base.data,
        base.loss,
    )


def _kit_result(seed: int, at_start: bool, before: bool, first: bool):
    from types import SimpleNamespace

    adam = SimpleNamespace(at_start=at_start, steps_before=8 if before else None)
    crossing = SimpleNamespace(
        adam=adam,
        gd=SimpleNamespace(steps_before=0),
        adam_before_spike=before,
        adam_first=first,
        max_adam_ratio=12.0,
        max_gd_ratio=1.1,
    )
    return SimpleNamespace(seed=seed, crossing=crossing)


def test_protocol3_judges_the_crossing_on_uncensored_kits_only():
    protocol3 = load_script(STUDY.parent / "protocol3.py")
    crossed = [_kit_result(s, False, True, True) for s in (20, 21, 23)] + [_kit_result(24, False, False, False)]
    v = protocol3.judge(crossed)
    assert v.reproduced and "3 of 4" in v.checks[0].measured, v.to_markdown()
    late = [_kit_result(s, False, True, False) for s in (20, 21, 23, 24)]  # the plain ratio got there first
    v = protocol3.judge(late)
    assert v.testable and v.checks[0].passed and not v.checks[1].passed
    censored = [_kit_result(s, True, True, True) for s in (20, 21)] + [
        _kit_result(s, False, True, True) for s in (23, 24)
    ]
    assert protocol3.judge(censored).label == NOT_TESTABLE
