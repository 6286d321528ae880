"""Finding 8's tests of what each remedy claims (experiments/spike_remedies/clipping, isolated,
replay): presets compose, verdicts decide on constructed sweeps (one reproducing, one not), and
shrunken studies run end to end through proxy-train and the judge or the replay study."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from proxy.config import register_configs, to_config
from proxy.records import Run, RunRecord, Summary, write_json
from proxy.verdict import NOT_TESTABLE, judge_runs, load_script

REPO = Path(__file__).resolve().parents[2]
FINDING = REPO / "experiments" / "spike_remedies"
L0 = math.log(512)


def composed(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def point(preset: str, *overrides: str):
    cfg = composed([f"+experiment={preset}", *overrides])
    return to_config({k: v for k, v in cfg.items() if k != "hydra"})


def test_clipping_preset_arms() -> None:
    cfg = composed(["+experiment=spike_remedies/clipping_lab"])
    assert str(cfg.hydra.sweeper.params["+clip"]).split(",") == ["none", "fixed", "zclip"]
    expect = {"none": (0.0, "none"), "fixed": (1.0, "none"), "zclip": (0.0, "zclip")}
    for arm, (clip, kind) in expect.items():
        c = point("spike_remedies/clipping_lab", f"+clip={arm}", "train.seed=1")
        assert (c.optim.grad_clip, c.remedy.kind.value) == (clip, kind)
        assert c.model.qk_norm.value == "off" and c.loss.z_loss == 0.0 and c.capture.enabled
        assert c.data.seed == 1 and c.train.log_every == 1


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("spike_remedies/isolated_lab_p1", [150, 200, 250, 300, 350]),
        ("spike_remedies/isolated_lab", [200, 350, 500, 650]),  # protocol 2: events > 128 steps apart
    ],
)
def test_isolated_preset_plants_single_batches(preset: str, expected: list[int]) -> None:
    c = point(preset, "+arm=none")
    assert c.data.inject.fraction == 1.0
    verdict = load_script(FINDING / "isolated" / "verdict.py")

    class Fake:
        def config_value(self, key):
            return {
                "data.inject.start_step": c.data.inject.start_step,
                "data.inject.end_step": c.data.inject.end_step,
                "data.inject.every": c.data.inject.every,
                "train.steps": c.train.steps,
            }[key]

    events = verdict.poison_steps(Fake())
    assert events == expected
    assert all(p + verdict.AFTER < c.train.steps for p in events)  # each event's harm window fits
    if preset == "spike_remedies/isolated_lab":  # no detector window before an event holds an earlier one
        assert all(b - a > verdict.WINDOW for a, b in zip(events, events[1:]))


# --------------------------------------------------------------------------------------------
# Clipping: ZClip vs fixed vs none
# --------------------------------------------------------------------------------------------
def clip_run(
    root: Path, arm: str, lr: float, seed: int, spikes: int, final: float, steps: int = 300, diverged: bool = False
) -> Path:
    """A run whose train loss falls smoothly with ``spikes`` isolated jumps (each far above 6 sigma)."""
    items = [f"+clip={arm}", f"optim.lr={lr}", f"train.seed={seed}"]
    run_dir = root / ",".join(items)
    write_json(run_dir / "config.yaml", {"optim": {"lr": lr}, "train": {"seed": seed, "steps": steps}})
    record = RunRecord(run_dir)
    record.update(status="running", overrides=items, lr=lr, loss_at_init=L0, steps_planned=steps)
    rng = np.random.default_rng(seed)
    at = set(range(150, 150 + 20 * spikes, 20))
    end = steps // 2 if diverged else steps
    for step in range(end):
        loss = 3.5 + 2.7 * math.exp(-step / 40) + 0.01 * rng.standard_normal() + (2.0 if step in at else 0.0)
        record.log(step, {"train/loss": loss, "optim/grad_norm": 0.3 + 0.01 * rng.standard_normal()})
    if diverged:
        record.update(status="diverged", diverged_at_step=end, steps_completed=end)
    else:
        record.update(status="completed", final_val_loss=final, final_train_loss=final, steps_completed=steps)
    record.close()
    return run_dir


def clipping_sweep(root: Path, reproduces: bool) -> Path:
    for seed in range(3):
        for lr in (0.1, 0.3):
            clip_run(root, "none", lr, seed, spikes=4, final=4.6 + 0.01 * seed, diverged=lr == 0.3 and seed == 0)
            clip_run(root, "fixed", lr, seed, spikes=3, final=4.3 + 0.01 * seed)
            if reproduces:
                clip_run(root, "zclip", lr, seed, spikes=1, final=4.1 + 0.02 * seed)
            else:
                clip_run(root, "zclip", lr, seed, spikes=3, final=4.4 + 0.01 * seed)
    return root


@pytest.mark.parametrize("reproduces", [True, False])
def test_clipping_verdict(tmp_path: Path, reproduces: bool) -> None:
    verdict = judge_runs(FINDING / "clipping", [clipping_sweep(tmp_path / "sweep", reproduces)], tmp_path / "r")
    assert verdict.reproduced is reproduces, verdict.to_markdown()
    assert [c.passed for c in verdict.design_checks] == [True]
    passed = [c.passed for c in verdict.checks]
    assert passed == ([True] * 3 if reproduces else [False, False, True])
    assert verdict.numbers["diverged/none/lr=0.3"] == "1 of 3"
    assert verdict.code == ["unrecorded"]  # records written here carry no commit; the verdict says so


def test_clipping_verdict_needs_an_unstable_regime(tmp_path: Path) -> None:
    root = tmp_path / "calm"
    for seed in range(3):
        for arm in ("none", "fixed", "zclip"):
            clip_run(root, arm, 0.01, seed, spikes=0, final=3.6)
    verdict = judge_runs(FINDING / "clipping", [root], tmp_path / "r")
    assert verdict.label == NOT_TESTABLE and verdict.checks == [] and "loss_spikes" in verdict.would_test
    (design,) = verdict.design_checks
    assert not design.passed and "unstable LRs: none" in design.measured


# --------------------------------------------------------------------------------------------
# Isolated poison batches: skip-step
# --------------------------------------------------------------------------------------------
POISON = (150, 200, 250, 300, 350)


def isolated_run(root: Path, arm: str, seed: int, harm: float, skipped: bool) -> Path:
    """400 logged steps: grad norm ~0.2 with a jump at each poison step (none when skipped and not
    planted), val loss the clean curve plus ``harm`` for 15 steps after each poison step."""
    kind = "skip_step" if arm == "skip_step" else "none"
    config = {
        "optim": {"lr": 3e-2},
        "train": {"seed": seed, "steps": 400},
        "remedy": {"kind": kind},
        "data": {"inject": {"enabled": arm != "clean", "start_step": 150, "end_step": 351, "every": 50}},
    }
    run_dir = root / f"arm={arm},seed={seed}"
    write_json(run_dir / "config.yaml", config)
    record = RunRecord(run_dir)
    record.update(status="running", overrides=[f"+arm={arm}", f"train.seed={seed}"], lr=3e-2, loss_at_init=L0)
    rng = np.random.default_rng(seed)
    for step in range(400):
        after = any(p < step <= p + 15 for p in POISON)
        val = 3.4 + 2.8 * math.exp(-step / 60) + 0.001 * seed + (harm if arm != "clean" and after else 0.0)
        if step % 5 == 0:
            record.log(step, {"val/loss": val})
        poisoned = arm != "clean" and step in POISON
        record.log(
            step,
            {
                "train/loss": val + (3.0 if poisoned else 0.0),
                "optim/grad_norm": (5.0 if poisoned else 0.2) * (1 + 0.02 * rng.standard_normal()),
            },
        )
        if poisoned and skipped:
            record.event(step, "skip_step", trigger="grad_norm", value=5.0, threshold=0.3)
    record.update(status="completed", final_val_loss=3.4, final_train_loss=3.4, steps_completed=400)
    record.close()
    return run_dir


def isolated_sweep(root: Path, works: bool) -> Path:
    for seed in range(3):
        isolated_run(root, "clean", seed, 0.0, False)
        isolated_run(root, "none", seed, 0.05 + 0.005 * seed, False)
        isolated_run(root, "skip_step", seed, 0.005 if works else 0.05 + 0.004 * seed, works)
    return root


@pytest.mark.parametrize("works", [True, False])
def test_isolated_verdict(tmp_path: Path, works: bool) -> None:
    verdict = judge_runs(FINDING / "isolated", [isolated_sweep(tmp_path / "sweep", works)], tmp_path / "r")
    assert verdict.reproduced is works, verdict.to_markdown()
    assert [c.passed for c in verdict.checks] == [True, True, works]
    assert verdict.numbers["skips_at_poison_steps"] == {str(s): 5 if works else 0 for s in range(3)}


# --------------------------------------------------------------------------------------------
# PaLM's replay ablation
# --------------------------------------------------------------------------------------------
def replay_results(study, earlier: list[bool], skip: list[bool]):
    return [
        study.KitReplays(
            kit=f"k{i}",
            arm="fixed",
            lr=0.3,
            seed=i % 3,
            step=100 + i,
            trigger="loss",
            threshold=5.0,
            older_by=18,
            same_bitwise=True,
            same=True,
            earlier=e,
            skip=s,
            peak_same=9.0,
            peak_earlier=4.0,
            peak_skip=4.0,
        )
        for i, (e, s) in enumerate(zip(earlier, skip))
    ]


def test_replay_study_judge() -> None:
    study = load_script(FINDING / "replay" / "study.py")
    good = study.judge(replay_results(study, [False, False, True, False, False, False], [False] * 6))
    assert good.reproduced, good.to_markdown()
    bad = study.judge(replay_results(study, [True, True, True, False, True, False], [False] * 6))
    assert not bad.reproduced and not bad.checks[2].passed and bad.checks[3].passed
    few = study.judge(replay_results(study, [False] * 3, [False] * 3))
    assert not few.reproduced and not few.checks[1].passed


def loss_spike_replays(protocol2, first: dict[str, list], restart_loss: float = 1e-3, bitwise: bool = True):
    """Five studied spikes (seeds 20-24) whose replays first reach 0.1 nats at ``first[variant][i]``."""
    return [
        protocol2.KitReplays(
            run=f"r{i}",
            seed=20 + i,
            kit=f"step_{300 + i:07d}",
            crossing=300 + i,
            peak_step=305 + i,
            peak=3.0,
            kit_step=300 + i,
            restart_step=250 + i,
            restart_loss=restart_loss,
            same_bitwise=bitwise,
            first={k: first[k][i] for k in ("same", "earlier", "skip", "nudged")},
            peaks={},
            later_large=1,
            later_steps=1500,
        )
        for i in range(5)
    ]


def test_replay_protocol2_judges_palm_and_k2_apart() -> None:
    """PaLM's two claims and K2's one are judged in two verdicts behind the same design checks."""
    protocol2 = load_script(FINDING / "replay" / "protocol2.py")
    none = [None] * 5
    palm_like = {"same": [0] * 5, "earlier": none, "skip": [None, None, None, 40, None], "nudged": [0, 0, 2, None, 0]}
    palm, k2 = protocol2.judge(loss_spike_replays(protocol2, palm_like), {})
    assert palm.reproduced and k2.reproduced, palm.to_markdown() + k2.to_markdown()
    adam_like = {"same": [0] * 5, "earlier": none, "skip": [12, 30, None, 8, 51], "nudged": none}
    palm, k2 = protocol2.judge(loss_spike_replays(protocol2, adam_like), {})
    assert palm.testable and not palm.reproduced and palm.checks[0].passed and not palm.checks[1].passed
    assert k2.testable and not k2.reproduced
    assert "0.15 (5 large excursions in 7500 steps" in str(palm.numbers)  # 1 - (1 - 1/1500)^250
    late = protocol2.judge(loss_spike_replays(protocol2, palm_like, restart_loss=0.05), {})
    assert all(v.label == NOT_TESTABLE for v in late)  # no restart state in the low-noise phase
    broken = protocol2.judge(loss_spike_replays(protocol2, palm_like, bitwise=False), {})
    assert all(v.label == NOT_TESTABLE and not v.checks for v in broken)


def test_replay_protocol2_nudges_every_weight_one_ulp() -> None:
    protocol2 = load_script(FINDING / "replay" / "protocol2.py")
    model = torch.nn.Linear(64, 32)
    before = [p.detach().clone() for p in model.parameters()]
    protocol2.nudge(model)
    for old, new in zip(before, model.parameters()):
        moved = torch.where(
            new > old,
            torch.nextafter(old, torch.full_like(old, math.inf)),
            torch.nextafter(old, torch.full_like(old, -math.inf)),
        )
        assert torch.equal(new, moved) and (new != old).all()
        assert 0.3 < (new > old).float().mean() < 0.7  # both directions


def test_replay_protocol2_preset() -> None:
    cfg = composed(["+experiment=spike_remedies/replay_lab"])
    assert str(cfg.hydra.sweeper.params["train.seed"]).split(",") == ["20", "21", "22", "23", "24"]
    run = point("spike_remedies/replay_lab", "train.seed=20")
    assert run.capture.enabled and run.capture.trigger.value == "probe" and run.capture.steps_before == 50
    assert run.train.probe_every == 1 and run.train.log_every == 1 and run.sweep.seeds == []
    assert run.optim.lr == 1e-2 and run.optim.beta2 == 0.99 and run.optim.grad_clip == 0.0  # the organism's recipe


@pytest.mark.slow
def test_remedy_claims_end_to_end(tmp_path: Path) -> None:
    """The clipping sweep (with capture) and the isolated sweep at toy size, then their judges and
    the replay study over the kits: every path runs, and every 'same' replay is bitwise."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled"}
    small = [
        "train.steps=60",
        "train.batch_size=4",
        "train.seq_len=32",
        "model.d_model=16",
        "model.n_layers=1",
        "schedule.warmup_steps=4",
        "train.eval_every=20",
        "train.eval_batches=1",
    ]
    clip_dir = tmp_path / "clip"
    cmd = [
        sys.executable,
        "-m",
        "proxy.train",
        "-m",
        "+experiment=spike_remedies/clipping_lab",
        "train.seed=0",
        "optim.lr=0.3",
        *small,
        "capture.detector.sigma=2",
        "capture.detector.min_history=5",
        "capture.steps_before=6",
        "capture.max_kits=1",
        f"hydra.sweep.dir={clip_dir}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    verdict = judge_runs(FINDING / "clipping", [clip_dir], tmp_path / "rc")
    assert verdict.design_checks and "unstable LRs" in verdict.design_checks[0].measured
    study = load_script(FINDING / "replay" / "study.py")
    assert study.main([str(clip_dir), "--arms", "none,fixed,zclip", "--out", str(tmp_path / "rr")]) == 0
    replays = (tmp_path / "rr" / "replays.csv").read_text().splitlines()
    assert len(replays) >= 2, "a 2-sigma detector at LR 0.3 finds a spike in some arm"
    assert all(",True,True," in row for row in replays[1:])  # same_bitwise, same re-spiked

    iso_dir = tmp_path / "iso"
    cmd = [
        sys.executable,
        "-m",
        "proxy.train",
        "-m",
        "+experiment=spike_remedies/isolated_lab",
        "train.seed=0",
        *small,
        "data.inject.start_step=30",
        "data.inject.end_step=51",
        "data.inject.every=10",
        "data.inject.max_period=1",
        "remedy.detector.min_history=5",
        f"hydra.sweep.dir={iso_dir}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    verdict = judge_runs(FINDING / "isolated", [iso_dir], tmp_path / "ri")
    assert len(verdict.checks) == 3 and verdict.numbers["poison_steps"] == [30, 40, 50]


# --------------------------------------------------------------------------------------------
# ZClip, protocol 2: on the loss-spike organism
# --------------------------------------------------------------------------------------------
CLIP_P2 = load_script(FINDING / "clipping" / "protocol2" / "verdict.py")


def organism_run(arm: str, seed: int, spikes: list[tuple[int, float]], n: int = 1200) -> Run:
    probe = [max(1e-3, 6.0 * 0.97**s) for s in range(n)]
    for at, peak in spikes:
        for i, factor in enumerate((0.3, 1.0, 0.5, 0.1, 0.02)):
            probe[at + i] = max(probe[at + i], peak * factor)
    optim = {"beta2": 0.99, "grad_clip": 1.0 if arm == "grad_clip" else 0.0, "update_clip": False}
    config = {
        "optim": optim,
        "train": {"seed": seed, "dtype": "auto"},
        "remedy": {"kind": arm if arm in ("zclip", "skip_step") else "none"},
    }
    rows = [{"step": s, "probe/loss": p} for s, p in enumerate(probe)]
    return Run(Path(f"/runs/{arm}/{seed}"), Summary(status="completed"), config, rows)


@pytest.mark.parametrize("zclip_peak, holds", [(0.3, True), (3.0, False)])
def test_clipping_protocol2_judges_zclip_on_loss_spikes(zclip_peak, holds):
    runs = []
    for s in CLIP_P2.SEEDS:
        runs.append(organism_run("none", s, [(600, 4.0)]))
        runs.append(organism_run("grad_clip", s, [(600, 2.0), (900, 1.0)]))
        runs.append(organism_run("zclip", s, [(600, zclip_peak)]))
    verdict = CLIP_P2.judge(None, runs)
    assert verdict.testable
    assert [c.passed for c in verdict.checks][:2] == [True, holds]
    assert verdict.reproduced is holds


def test_clipping_protocol2_without_unclipped_spikes_is_not_testable():
    runs = [organism_run(arm, s, []) for arm in CLIP_P2.ARMS for s in CLIP_P2.SEEDS]
    verdict = CLIP_P2.judge(None, runs)
    assert verdict.label == NOT_TESTABLE and verdict.checks == []


SKIP = load_script(FINDING / "skip_on_spikes" / "verdict.py")


@pytest.mark.parametrize("skip_peak, holds", [(0.05, True), (5.0, False)])
def test_skip_on_spikes_judges_skip_step_against_no_remedy(skip_peak, holds):
    runs = [organism_run("none", s, [(600, 4.0)]) for s in SKIP.SEEDS]
    runs += [organism_run("skip_step", s, [(600, skip_peak)]) for s in SKIP.SEEDS]
    verdict = SKIP.judge(None, runs)
    assert verdict.testable and [c.passed for c in verdict.checks][:2] == [holds, holds]
