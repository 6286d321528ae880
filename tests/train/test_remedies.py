"""proxy/train/remedies.py: skip-step, rollback-and-skip, ZClip on constructed series."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from proxy.config import ConfigError, DetectorConfig, RemedyConfig, RemedyKind, SpikeBaseline, to_config
from proxy.optim import AdamW, clip_grad_norm
from proxy.train.remedies import Rollback, SkipStep, SpikeDetector, SweepStep, ZClip, build_remedy

# A series with mean 1.05 and population std 0.05: the 6-sigma bar is exactly 1.35.
STEADY = [1.0, 1.1] * 10


def detector_cfg(**kw) -> RemedyConfig:
    # OLMo-core's published mean + sigma * std: the numbers below are worked out for it
    detector = DetectorConfig(baseline=SpikeBaseline.mean, sigma=6.0, window=20, min_history=kw.pop("min_history", 10))
    return RemedyConfig(detector=detector, **kw)


# --------------------------------------------------------------------------------------------
# Skip-step
# --------------------------------------------------------------------------------------------
def test_skip_step_fires_exactly_above_the_bar_and_keeps_spikes_out_of_history():
    skip = SkipStep(detector_cfg())
    for step, loss in enumerate(STEADY):
        assert skip.check(step, loss, 1.0) is None
    assert skip.detector.threshold("loss") == pytest.approx(1.35)

    event = skip.check(20, 1.36, 1.0)
    assert event == {
        "step": 20,
        "kind": "skip_step",
        "trigger": "loss",
        "value": 1.36,
        "threshold": pytest.approx(1.35),
        "skipped": 1,
    }
    assert list(skip.detector.history["loss"]) == STEADY  # the spike did not enter

    assert skip.check(21, 1.34, 1.0) is None  # just under the bar: applied, remembered
    assert skip.detector.history["loss"][-1] == 1.34


def test_skip_step_watches_the_grad_norm_too():
    skip = SkipStep(detector_cfg())
    for step, norm in enumerate(STEADY):
        assert skip.check(step, 2.0, norm) is None
    event = skip.check(20, 2.0, 1.5)
    assert event["trigger"] == "grad_norm" and event["value"] == 1.5
    assert event["threshold"] == pytest.approx(1.35)


def test_skip_step_waits_for_history_but_always_skips_non_finite_values():
    skip = SkipStep(detector_cfg())
    for step in range(9):  # one short of min_history: a huge loss passes
        assert skip.check(step, 100.0 if step == 5 else 1.0, 1.0) is None
    event = skip.check(9, float("nan"), 1.0)
    assert event["trigger"] == "loss" and math.isnan(event["value"])
    assert math.isnan(event["threshold"])  # no bar yet
    assert skip.check(10, 1.0, float("inf"))["trigger"] == "grad_norm"


def test_detector_window_forgets_old_values_and_state_round_trips():
    det = SpikeDetector(sigma=3.0, window=4, min_history=2, baseline="mean")
    for v in (100.0, 100.0, 1.0, 1.0, 1.0, 1.0):
        det.accept(v, None)
    assert list(det.history["loss"]) == [1.0] * 4
    assert det.test(1.01, None) is not None  # std 0: anything above the mean is a spike
    clone = SpikeDetector(sigma=3.0, window=4, min_history=2, baseline="mean")
    clone.load_state_dict(det.state_dict())
    assert clone.threshold("loss") == det.threshold("loss") == 1.0
    assert clone.threshold("loss") == det.threshold("loss") == 1.0


def early_descent(steps: int = 40, seed: int = 0) -> list[float]:
    """A grad norm falling steeply from 3 to ~0.5 with 3% noise, as in the first steps of a run."""
    rng = np.random.default_rng(seed)
    return [(0.5 + 2.5 * math.exp(-s / 12)) * (1 + 0.03 * rng.standard_normal()) for s in range(steps)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_trend_baseline_sees_a_spike_early_in_a_run_where_the_window_mean_cannot(seed):
    trend, mean = SpikeDetector(), SpikeDetector(baseline="mean")  # the defaults: 6 sigma, 128, 20
    for value in early_descent(seed=seed):
        for det in (trend, mean):
            assert det.test(None, value) is None  # the descent itself is no spike
            det.accept(None, value)
    jump = 3 * early_descent(41, seed)[-1]
    assert trend.test(None, jump) is not None
    assert mean.test(None, jump) is None  # mean + 6 sd of a window still holding the descent
    # and a noisy plateau gives no false alarm over many steps
    rng = np.random.default_rng(seed)
    plateau = SpikeDetector()
    alarms = 0
    for _ in range(2000):
        value = 0.5 * (1 + 0.05 * rng.standard_normal())
        alarms += plateau.test(None, value) is not None
        plateau.accept(None, value)
    assert alarms == 0


# --------------------------------------------------------------------------------------------
# Rollback
# --------------------------------------------------------------------------------------------
def rollback_cfg(**kw) -> RemedyConfig:
    return detector_cfg(
        **{
            "rollback_every": 5,
            "rollback_keep": 3,
            "rollback_min_age": 5,
            "rollback_skip_batches": 7,
            "rollback_max": 2,
            **kw,
        }
    )


def train_step(model: nn.Module, opt: torch.optim.Optimizer, position: int) -> None:
    """One update on a batch that depends only on the data position, plus RNG use."""
    gen = torch.Generator().manual_seed(position)
    x = torch.randn(8, 4, generator=gen)
    noise = torch.rand(()).item() + random.random()  # both global RNGs move on
    loss = (model(x) - x.sum(-1, keepdim=True)).pow(2).mean() + 1e-3 * noise
    loss.backward()
    clip_grad_norm(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def state_copy(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "moments": [
            (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"])
            for p in model.parameters()
        ],
        "rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
    }


def assert_same_state(model: nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
    for p, q in zip(model.parameters(), saved["params"]):
        assert torch.equal(p, q)
    for p, (m, v, s) in zip(model.parameters(), saved["moments"]):
        assert torch.equal(opt.state[p]["exp_avg"], m)
        assert torch.equal(opt.state[p]["exp_avg_sq"], v)
        assert opt.state[p]["step"] == s
    assert torch.equal(torch.get_rng_state(), saved["rng"])
    assert random.getstate() == saved["py_rng"]


def test_rollback_restores_the_exact_earlier_state_and_skips_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    opt = AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    rb = Rollback(rollback_cfg())
    position, at_step_5 = 0, None
    for step in range(12):
        took = rb.maybe_snapshot(step, model, opt, position, extra_state={"tokens": 32 * step})
        assert took == (step % 5 == 0)
        if step == 5:
            at_step_5 = state_copy(model, opt)
        train_step(model, opt, position)
        position += 1
        assert rb.check(step, STEADY[step], 1.0) is None
    assert [s.step for s in rb.snapshots] == [0, 5, 10]

    # step 12 spikes: the newest snapshot from step <= 12 - 5 is the one taken at step 5
    event = rb.check(12, 50.0, 1.0)
    assert event["kind"] == "rollback" and event["trigger"] == "loss"
    assert event["restore_step"] == 5 and event["data_position"] == 5 + 7
    restored = rb.restore(model, opt)
    assert (restored.step, restored.data_position) == (5, 12)
    assert restored.extra_state == {"tokens": 160}
    assert_same_state(model, opt, at_step_5)  # bitwise: weights, moments, step counts, RNG
    assert list(rb.detector.history["loss"]) == STEADY[:5]  # the detector as it was at step 5
    assert [s.step for s in rb.snapshots] == [0, 5]  # the abandoned trajectory's snapshot is gone

    # the snapshot itself was not changed by the restore or by training on from it
    train_step(model, opt, restored.data_position)
    assert torch.equal(rb.snapshots[-1].state["model"]["0.weight"], at_step_5["params"][0])
    assert not rb.maybe_snapshot(5, model, opt, 99)  # already held

    # a second rollback to the same snapshot skips a further S batches: nothing is replayed
    # (the restored detector holds 5 values, under min_history: only a non-finite value spikes)
    event = rb.check(11, math.inf, 1.0)
    assert event["restore_step"] == 5 and event["data_position"] == 19
    assert rb.restore(model, opt).data_position == 19
    assert_same_state(model, opt, at_step_5)

    # the budget (rollback_max=2) is spent: a spike now only skips the step
    event = rb.check(12, math.inf, 1.0)
    assert event["kind"] == "skip_step" and event["reason"] == "rollback budget spent"
    with pytest.raises(RuntimeError, match="nothing to restore"):
        rb.restore(model, opt)


def test_rollback_never_rereads_a_batch_seen_on_an_abandoned_branch():
    """A second spike soon after a rollback goes back to an older snapshot, whose position + S
    lies before batches the run already read: it resumes past them instead."""
    model = nn.Linear(4, 1)
    opt = AdamW(model.parameters(), lr=1e-2)
    rb = Rollback(
        rollback_cfg(rollback_every=5, rollback_keep=3, rollback_min_age=5, rollback_skip_batches=7, rollback_max=5)
    )
    position = 0
    for step in range(13):
        rb.maybe_snapshot(step, model, opt, position)
        train_step(model, opt, position)
        position += 1
        assert rb.check(step, STEADY[step % 20], 1.0, data_position=position) is None
    # step 13 spikes on batch 13: back to step 5, skip to 5 + 7 = 12... but 13 was read: go on at 14
    event = rb.check(13, 50.0, 1.0, data_position=14)
    assert (event["restore_step"], event["data_position"]) == (5, 14)
    restored = rb.restore(model, opt)
    assert (restored.step, restored.data_position) == (5, 14)
    # replay steps 5..10 on batches 14..19; step 11 spikes: the newest old-enough snapshot is
    # step 5 again, and the branch already read up to batch 19
    position = restored.data_position
    for step in range(5, 11):
        rb.maybe_snapshot(step, model, opt, position)
        train_step(model, opt, position)
        position += 1
    assert [s.step for s in rb.snapshots] == [0, 5, 10]
    event = rb.check(11, math.inf, 1.0, data_position=position + 1)  # detector back at step 5
    assert event["restore_step"] == 5 and event["data_position"] == position + 1 == 21
    assert rb.restore(model, opt).data_position == 21


def test_rollback_disk_snapshots_restore_bitwise_evict_files_and_survive_a_resume(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    opt = AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    folder = tmp_path / "rollback"
    rb = Rollback(rollback_cfg(rollback_storage="disk"), folder)
    at_step_5 = None
    for step in range(12):
        rb.maybe_snapshot(step, model, opt, step, extra_state=(32 * step, 6.2))
        if step == 5:
            at_step_5 = state_copy(model, opt)
        train_step(model, opt, step)
        assert rb.check(step, STEADY[step], 1.0, data_position=step + 1) is None
    # three kept (rollback_keep=3), nothing in memory, older files deleted
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000000.pt", "step_0000005.pt", "step_0000010.pt"]
    assert all(s.state is None for s in rb.snapshots)

    # a checkpoint now, then a "new process" rolls back to a snapshot taken before it
    saved = rb.state_dict()
    resumed = Rollback(rollback_cfg(rollback_storage="disk"), folder)
    resumed.load_state_dict(saved)
    assert [s.step for s in resumed.snapshots] == [0, 5, 10]
    event = resumed.check(12, 50.0, 1.0, data_position=13)
    assert event["kind"] == "rollback" and event["restore_step"] == 5
    restored = resumed.restore(model, opt)
    assert restored.extra_state == (160, 6.2) and restored.data_position == 13
    assert_same_state(model, opt, at_step_5)
    assert not (folder / "step_0000010.pt").exists()  # on the abandoned branch: deleted
    resumed.close()
    assert not folder.exists()


def test_rollback_on_disk_needs_a_folder():
    with pytest.raises(ValueError, match="needs a directory"):
        Rollback(rollback_cfg(rollback_storage="disk"))


def test_rollback_without_an_old_enough_snapshot_skips_the_step():
    model = nn.Linear(2, 1)
    opt = AdamW(model.parameters(), lr=1e-3)
    rb = Rollback(rollback_cfg(min_history=2))
    for step in range(3):
        rb.maybe_snapshot(step, model, opt, step)
        assert rb.check(step, 1.0 + 0.1 * (step % 2), 1.0) is None
    event = rb.check(3, float("inf"), 1.0)  # only the step-0 snapshot, 3 < min_age steps back
    assert event["kind"] == "skip_step" and event["reason"] == "no snapshot old enough"


# --------------------------------------------------------------------------------------------
# ZClip
# --------------------------------------------------------------------------------------------
def param_with_grad_norm(norm: float) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64) * norm
    return p


def test_zclip_clips_only_outliers_to_the_reciprocal_bound():
    zclip = ZClip(alpha=0.9, z_threshold=2.5, warmup_steps=10)
    for step, norm in enumerate(STEADY[:10]):  # warm-up: statistics only, grads untouched
        p = param_with_grad_norm(norm)
        assert zclip.clip([p], norm, step) is None
        assert p.grad.norm().item() == pytest.approx(norm)
    assert (zclip.mean, zclip.var) == (pytest.approx(1.05), pytest.approx(0.0025))

    p = param_with_grad_norm(1.1)  # z = 1: an ordinary step
    assert zclip.clip([p], 1.1, 10) is None
    assert p.grad.norm().item() == pytest.approx(1.1)

    mean, std = zclip.mean, math.sqrt(zclip.var)
    p = param_with_grad_norm(3.0)
    event = zclip.clip([p], 3.0, 11)
    z = (3.0 - mean) / (std + 1e-6)
    bound = mean + 2.5**2 / z * std
    assert event["kind"] == "zclip" and event["trigger"] == "grad_norm" and event["step"] == 11
    assert event["z"] == pytest.approx(z) and event["threshold"] == pytest.approx(mean + 2.5 * std)
    assert event["clipped_to"] == pytest.approx(bound)
    assert mean < bound < mean + 2.5 * std  # past the threshold the reciprocal bound tightens
    assert p.grad.norm().item() == pytest.approx(bound)
    assert p.grad.tolist() == pytest.approx([0.6 * bound, 0.8 * bound])  # direction kept
    # the statistics took in the clipped norm, not the spike
    assert zclip.mean == pytest.approx(0.9 * mean + 0.1 * bound)


def test_zclip_hard_cap_applies_during_warmup_and_non_finite_norms_are_left_alone():
    zclip = ZClip(warmup_steps=5, max_norm=1.0)
    p = param_with_grad_norm(4.0)
    assert zclip.clip([p], 4.0, 0) is None  # capped, but not a z-score event
    assert p.grad.norm().item() == pytest.approx(1.0)
    p = param_with_grad_norm(1.0)
    p.grad[0] = float("nan")
    assert zclip.clip([p], float("nan"), 1) is None
    assert zclip.warmup_norms == [4.0]

    clone = ZClip(warmup_steps=5, max_norm=1.0)
    clone.load_state_dict(zclip.state_dict())
    assert clone.state_dict() == zclip.state_dict()


def zclip_reference(norms: list[float], alpha: float, z_thr: float, warmup: int, max_norm: float, eps: float = 1e-6):
    """Kumar et al.'s ZClip in plain Python floats, step by step: (event or None, clip factor)."""
    warm: list[float] = []
    mean = var = None
    out = []
    for norm in norms:
        fired, target = None, norm
        if math.isfinite(norm):
            if mean is None:
                warm.append(norm)
                if len(warm) >= max(1, warmup):
                    mean = math.fsum(warm) / len(warm)
                    var = math.fsum((v - mean) ** 2 for v in warm) / len(warm)
            else:
                std = math.sqrt(var)
                z = (norm - mean) / (std + eps)
                if z > z_thr:
                    target = mean + (z_thr**2 / z) * std
                    fired = (z, mean + z_thr * std, target)
                diff = target - mean
                mean, var = mean + (1 - alpha) * diff, alpha * (var + (1 - alpha) * diff * diff)
        bound = min(target, max_norm) if max_norm > 0 else target
        out.append((fired, bound / norm if math.isfinite(norm) and bound < norm else 1.0))
    return out


@pytest.mark.parametrize("max_norm", [0.0, 1.3])
def test_zclip_decided_on_the_device_is_the_papers_rule_step_by_step(max_norm: float):
    """Deferred steps (nothing read back) and read steps, settled in between, give the events and
    clips of the rule in plain floats, on a noisy series with spikes and a non-finite norm."""
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.05 * rng.standard_normal(80))
    for at, value in ((20, 3.0), (21, 2.5), (40, 8.0), (55, float("inf")), (70, 1.6)):
        norms[at] = value
    norms = [float(np.float32(v)) for v in norms]  # what a float32 norm tensor holds
    expected = zclip_reference(norms, alpha=0.9, z_thr=2.0, warmup=8, max_norm=max_norm)
    zclip = ZClip(alpha=0.9, z_threshold=2.0, warmup_steps=8, max_norm=max_norm)
    events, factors = {}, []
    for step, norm in enumerate(norms):
        p = param_with_grad_norm(1.0)
        if step % 7:  # judged on the device
            zclip.defer(step, None, torch.tensor(norm, dtype=torch.float32).double(), [p])
        else:
            events.update({e.step: e for e in zclip.settle()})
            event = zclip.clip([p], norm, step)
            if event is not None:
                events[step] = event
        factors.append(p.grad.norm().item())
    events.update({e.step: e for e in zclip.settle()})
    fired = {step: f for step, (f, _) in enumerate(expected) if f is not None}
    assert sorted(events) == sorted(fired) and {20, 40} <= set(fired)
    for step, (z, threshold, target) in fired.items():
        e = events[step]
        assert (e["z"], e["threshold"], e["clipped_to"]) == (
            pytest.approx(z, rel=1e-12),
            pytest.approx(threshold, rel=1e-12),
            pytest.approx(target, rel=1e-12),
        )
    assert factors == pytest.approx([f for _, f in expected], rel=1e-12)  # each step's clip (none at the inf)
    assert factors[55] == 1.0 and min(factors) < 0.5


# --------------------------------------------------------------------------------------------
# Config and factory
# --------------------------------------------------------------------------------------------
def test_build_remedy_and_config_checks():
    assert build_remedy(RemedyConfig()) is None
    assert isinstance(build_remedy(RemedyConfig(kind=RemedyKind.skip_step)), SkipStep)
    assert isinstance(build_remedy(RemedyConfig(kind=RemedyKind.rollback)), Rollback)
    zclip = build_remedy(RemedyConfig(kind=RemedyKind.zclip, zclip_z=3.0), grad_clip=1.0)
    assert isinstance(zclip, ZClip) and zclip.max_norm == 1.0 and zclip.z_threshold == 3.0

    assert to_config({"remedy": {"kind": "rollback"}}).remedy.kind == RemedyKind.rollback
    with pytest.raises(ConfigError, match="remedy.rollback_min_age=60"):
        to_config({"remedy": {"rollback_every": 20, "rollback_keep": 3, "rollback_min_age": 60}})
    with pytest.raises(ConfigError, match="remedy.zclip_alpha"):
        to_config({"remedy": {"zclip_alpha": 1.0}})
    with pytest.raises(ConfigError, match="remedy.kind"):
        to_config({"remedy": {"kind": "restart"}})


def test_a_sweeps_skip_steps_judged_together_are_each_members_own_skip_step():
    """Members judged as lanes of one detector (SkipStep.defer_members) decide, record and keep
    their history as a skip-step of their own fed the same values; a member sitting steps out
    (diverged) neither skips nor remembers."""
    import random

    cfg = RemedyConfig(detector=DetectorConfig(sigma=2.0, window=12, min_history=4))
    rng = random.Random(0)
    members = [SkipStep(cfg), None, SkipStep(cfg), SkipStep(cfg)]
    alone = [SkipStep(cfg) if m is not None else None for m in members]
    alone_events: list[list] = [[] for _ in members]
    for step in range(60):
        losses = [3.0 - step / 40 + rng.gauss(0, 0.02) * (10 if rng.random() < 0.1 else 1) for _ in members]
        norms = [abs(rng.gauss(1.0, 0.1)) * (8 if rng.random() < 0.05 else 1) for _ in members]
        active = [True, True, step < 40, True]
        at = SweepStep(step, torch.tensor(losses), torch.tensor(norms), [], lambda k: [], active)
        flags = SkipStep.defer_members(members, at)
        for k, solo in enumerate(alone):
            if solo is None or not active[k]:
                assert flags[k] is None
                continue
            event = solo.check(step, float(torch.tensor(losses[k])), float(torch.tensor(norms[k])))
            alone_events[k] += [event] if event else []
            assert bool(flags[k]) == (event is not None), (step, k)
        if step % 7 == 6:  # the loop's read-backs, member by member
            for k, member in enumerate(members):
                if member is not None:
                    assert member.settle() == alone_events[k]
                    alone_events[k] = []
    for k, member in enumerate(members):
        if member is not None:
            assert member.settle() == alone_events[k]
            assert member.state_dict() == alone[k].state_dict()
    assert members[0]._lane[0] is members[3]._lane[0]  # one detector for the sweep
    assert sum(m.skipped for m in members if m is not None) > 3


def test_a_sweeps_zclips_judged_together_are_each_members_own_zclip():
    """Members' ZClip statistics as lanes of one state (ZClip.defer_members): the same events,
    states and clipped gradients, bit for bit, as a ZClip of each member's own."""
    from types import SimpleNamespace

    rng = random.Random(0)
    k_members, shapes = 3, [(5, 4), (7,)]
    members = [ZClip(alpha=0.8, z_threshold=0.5, warmup_steps=3) for _ in range(k_members)]
    alone = [ZClip(alpha=0.8, z_threshold=0.5, warmup_steps=3) for _ in range(k_members)]
    fired = 0
    for step in range(40):
        norms = torch.tensor([abs(rng.gauss(1, 0.3)) * (5 if rng.random() < 0.1 else 1) for _ in range(k_members)])
        stacked = [torch.randn(k_members, *shape) for shape in shapes]
        own = [g.clone() for g in stacked]
        ZClip.defer_members(members, SweepStep(step, norms, norms, stacked, lambda k: [], [True] * k_members))
        for k, solo in enumerate(alone):
            solo.defer(step, None, norms[k], [SimpleNamespace(grad=g[k]) for g in own])
        assert all(torch.equal(a, b) for a, b in zip(stacked, own)), step
        if step % 9 == 8:
            for member, solo in zip(members, alone):
                events = member.settle()
                assert events == solo.settle()
                fired += len(events)
    for member, solo in zip(members, alone):
        assert member.settle() == solo.settle() and member.state_dict() == solo.state_dict()
    assert fired > 3 and members[0]._lane is not None and members[0]._lane[0] is members[2]._lane[0]


def test_a_lane_reloaded_mid_sweep_gets_none_of_its_earlier_verdicts():
    """A member's remedy state loaded after its sweep's lanes were built (a resume) drops the
    verdicts still on the device for that member, and only for it."""
    remedy = RemedyConfig(detector=DetectorConfig(sigma=0.5, window=5, min_history=3))
    members = [SkipStep(remedy), SkipStep(remedy)]
    fresh = SkipStep(remedy).state_dict()
    for step in range(12):
        losses = torch.tensor([1.0 + (step % 3) * 0.5, 1.0 + (step % 2) * 0.7])
        SkipStep.defer_members(members, SweepStep(step, losses, torch.ones(2), [], lambda k: [], [True, True]))
    members[0].load_state_dict(fresh)  # its lane back to an empty history, skipped count 0
    assert members[0].settle() == [] and members[0].state_dict() == fresh
    assert [e["step"] for e in members[1].settle()]  # the other member's verdicts are still there
