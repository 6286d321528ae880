"""Spike capture: a provoked spike leaves exactly one kit, and the kit replays bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch

from proxy.config import ConfigError, as_dict, to_config
from proxy.forensics import (
    BATCHES_FILE,
    KIT_JSON,
    STATE_FILES,
    KitError,
    SpikeCapture,
    find_kits,
    fresh_batches,
    held_out_batch,
    load_kit,
    replay,
    states_equal,
)
from proxy.records import load_run
from proxy.train import RunInfo, Trainer
from tests.train.test_trainer import tiny_cfg

SPIKE_STEP = 30  # the injection window opens here
BEFORE, AFTER = 3, 2


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for the module: these tiny models gain nothing from two, and on a
    shared CPU two spinning threads can run 10-50x slower. The same count for the recorded run
    and its replays keeps the bitwise comparisons meaningful."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spike_cfg(**capture):
    """A tiny run that sees a clean stream, then two steps in which half the rows are one random
    token repeated 32 times: the loss jumps ~7 sigma above its recent history at SPIKE_STEP."""
    inject = dict(
        enabled=True,
        start_step=SPIKE_STEP,
        end_step=SPIKE_STEP + 2,
        fraction=0.5,
        repeats=32,
        min_period=1,
        max_period=1,
    )
    cap = dict(
        enabled=True,
        trigger="loss",
        detector=dict(sigma=5.0, window=20, min_history=10),
        steps_before=BEFORE,
        steps_after=AFTER,
        max_kits=1,
    )
    cap.update(capture)
    return to_config(
        tiny_cfg(train=dict(steps=SPIKE_STEP + 4, batch_size=8, eval_every=1000), data=dict(inject=inject), capture=cap)
    )


def run_with_capture(run_dir: Path, cfg) -> tuple[dict, SpikeCapture]:
    trainer = Trainer(cfg, RunInfo(run_dir, run_dir.name))  # capture.enabled adds the observer
    (capture,) = [o for o in trainer.observers if isinstance(o, SpikeCapture)]
    (summary,) = trainer.run()  # one run: one member
    return summary, capture


@pytest.fixture(scope="module")
def spike_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("forensics") / "spike"
    summary, capture = run_with_capture(run_dir, spike_cfg())
    return run_dir, summary, capture


def test_provoked_spike_writes_exactly_one_kit(spike_run):
    run_dir, summary, capture = spike_run
    assert summary["status"] == "completed"
    kits = find_kits(run_dir)
    assert [k.name for k in kits] == [f"step_{SPIKE_STEP:07d}"]
    kit_dir = kits[0]
    for name in [KIT_JSON, BATCHES_FILE, *STATE_FILES.values()]:
        assert (kit_dir / name).is_file(), name
    for name in [BATCHES_FILE, *STATE_FILES.values()]:
        torch.load(kit_dir / name, weights_only=True)  # plain tensors and containers only

    meta = json.loads((kit_dir / KIT_JSON).read_text())
    assert meta["complete"] and meta["trigger"] == "loss" and meta["value"] > meta["threshold"]
    assert {k: v["step"] for k, v in meta["states"].items()} == {
        "before": SPIKE_STEP - BEFORE,
        "at": SPIKE_STEP,
        "after": SPIKE_STEP + AFTER,
    }
    # the second injected step spikes too: listed, not a second kit (max_kits=1)
    assert [s["step"] for s in meta["later_spikes"]] == [SPIKE_STEP + 1]
    batches = torch.load(kit_dir / BATCHES_FILE, weights_only=True)
    assert batches["steps"].tolist() == list(range(SPIKE_STEP - BEFORE, SPIKE_STEP + AFTER))
    assert batches["inputs"].shape == (BEFORE + AFTER, 8, 32)

    events = [e for e in load_run(run_dir).events if e["event"] == "spike_kit"]
    assert len(events) == 1
    assert events[0]["step"] == SPIKE_STEP and events[0]["path"] == f"spike_kits/step_{SPIKE_STEP:07d}"
    assert events[0]["trigger"] == "loss" and events[0]["value"] == meta["value"]
    assert len(capture.states) <= BEFORE + 1  # the ring never held more than K + 1 states


def test_replay_with_same_batches_is_bitwise(spike_run):
    run_dir, _, _ = spike_run
    kit = load_kit(find_kits(run_dir)[0])
    result = replay(kit)
    assert result.steps == kit.steps
    recorded = [kit.recorded(s) for s in result.steps]
    assert result.losses == [r["loss"] for r in recorded]  # exact float equality
    assert result.grad_norms == [r["grad_norm"] for r in recorded]
    assert states_equal(result.training.model.state_dict(), kit.state("after")["model"])
    # and the spike is really in there: the recorded loss at the spike is above the threshold
    assert kit.recorded(SPIKE_STEP)["loss"] > kit.meta["threshold"]


def test_capture_only_watches(spike_run, tmp_path):
    run_dir, summary, _ = spike_run
    plain_cfg = spike_cfg(enabled=False)
    (plain,) = Trainer(plain_cfg, RunInfo(tmp_path / "plain", "plain")).run()
    assert plain["final_val_loss"] == summary["final_val_loss"]
    assert load_run(tmp_path / "plain").series("train/loss") == load_run(run_dir).series("train/loss")


def test_a_divergence_is_captured_when_the_run_stops(tmp_path):
    cfg = to_config(
        tiny_cfg(
            optim=dict(lr=3.0),
            train=dict(steps=30, eval_every=1000),
            capture=dict(
                enabled=True, trigger="loss", detector=dict(window=20, min_history=15), steps_before=2, max_kits=1
            ),
        )
    )
    summary, _ = run_with_capture(tmp_path / "div", cfg)
    assert summary["status"] == "diverged"
    step = summary["diverged_at_step"]
    [kit_dir] = find_kits(tmp_path / "div")
    kit = load_kit(kit_dir)
    assert kit.step == step and kit.trigger == "diverged"
    assert not kit.meta["complete"] and "diverged" in kit.meta["incomplete_reason"]
    assert not kit.has_state("after") and kit.meta["value"] > kit.meta["threshold"]
    # the event is in the record even though the trainer had closed it
    assert [e["step"] for e in load_run(tmp_path / "div").events if e["event"] == "spike_kit"] == [step]
    result = replay(kit)
    assert result.losses[-1] == kit.meta["value"] and math.isfinite(result.losses[-1])


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"detector": {"min_history": 1}}, "capture.detector.min_history=1"),
        ({"steps_before": 0}, "capture.steps_before=0"),
        ({"max_kits": 0}, "capture.max_kits=0"),
        ({"trigger": "lossy"}, "trigger"),
    ],
)
def test_bad_capture_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        to_config({"capture": override})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_load_kit_rejects_what_is_not_a_kit(tmp_path):
    with pytest.raises(KitError, match="is not a spike kit"):
        load_kit(tmp_path)
    (tmp_path / KIT_JSON).write_text(json.dumps({"format": 1, "config": {}}))
    with pytest.raises(KitError, match="lacks step, trigger"):
        load_kit(tmp_path)
    meta = {
        "format": 1,
        "config": {},
        "step": 5,
        "trigger": "loss",
        "value": 9.0,
        "threshold": 3.0,
        "states": {"before": None, "at": None, "after": None},
        "trace": [],
        "vocab_size": 512,
    }
    (tmp_path / KIT_JSON).write_text(json.dumps(meta))
    with pytest.raises(KitError, match="states.before must hold an integer step and data_position"):
        load_kit(tmp_path)
    state = {"step": 4, "data_position": 4}
    meta["states"] = {"before": state, "at": {"step": 5, "data_position": 5}, "after": None}
    (tmp_path / KIT_JSON).write_text(json.dumps(meta))
    (tmp_path / BATCHES_FILE).write_text("not a tensor file")
    with pytest.raises(KitError, match="batches.pt: (unreadable|refused)"):
        load_kit(tmp_path)


def probe_spike_cfg(monkeypatch, **train):
    """A clean tiny run with capture watching probe/loss, whose logged probe loss (what the capture
    detector sees) jumps by 10 nats at SPIKE_STEP only."""
    cfg = as_dict(spike_cfg())
    cfg["capture"]["trigger"] = "probe"
    cfg["train"].update(probe_every=1, probe_batches=1, **train)
    cfg["data"]["inject"]["enabled"] = False
    original = Trainer._log_probe

    def probe(self, step):
        evaluate = self.engine.evaluate
        if step == SPIKE_STEP:
            self.engine.evaluate = lambda batches, ignore: [v + 10.0 for v in evaluate(batches, ignore)]
        try:
            original(self, step)
        finally:
            self.engine.evaluate = evaluate

    monkeypatch.setattr(Trainer, "_log_probe", probe)
    return to_config(cfg)


def test_a_probe_loss_spike_opens_a_kit_at_the_step_whose_start_shows_it(tmp_path, monkeypatch):
    """capture.trigger=probe watches probe/loss (a loss spike stands clear of batch noise there);
    the probe at step N is measured before N's batch, so the kit's 'at' state is N's start."""
    run_with_capture(tmp_path / "run", probe_spike_cfg(monkeypatch))
    (kit,) = find_kits(tmp_path / "run")
    meta = json.loads((kit / "kit.json").read_text())
    assert kit.name == f"step_{SPIKE_STEP:07d}" and meta["trigger"] == "probe_loss"
    assert meta["detector"]["watching"] == "probe" and meta["value"] > meta["threshold"]
    assert meta["states"]["at"]["step"] == SPIKE_STEP and meta["states"]["before"]["step"] == SPIKE_STEP - BEFORE


def test_a_probe_trigger_needs_a_probe_every_step():
    with pytest.raises(ConfigError, match="train.probe_every=1"):
        to_config(tiny_cfg(capture=dict(enabled=True, trigger="probe"), train=dict(probe_every=5)))


def test_a_replay_runs_past_the_kit_and_measures_the_probe_as_the_run_did(tmp_path, monkeypatch):
    """Batches past the kit's window continue the run's data stream (fresh_batches, offset 0), and
    the held-out loss at each step's start is the run's probe/loss: from the kit's earliest state,
    a replay over the rest of the run reproduces every logged train loss, grad norm and probe loss
    bit for bit; with an offset it reads other batches."""
    run_with_capture(tmp_path / "run", probe_spike_cfg(monkeypatch, steps=SPIKE_STEP + 15, log_every=1))
    run = load_run(tmp_path / "run")
    kit = load_kit(find_kits(tmp_path / "run")[0])
    start = kit.state_step("before")
    steps = list(range(start, SPIKE_STEP + 15))
    assert steps[-1] > kit.steps[-1]  # the replay goes past the recorded window
    r = replay(kit, fresh_batches(kit, steps, 0), probe=held_out_batch(kit, 1))
    assert r.steps == steps
    logged = {key: dict(zip(*run.series(key))) for key in ("train/loss", "optim/grad_norm", "probe/loss")}
    assert r.losses == [logged["train/loss"][s] for s in steps]
    assert r.grad_norms == [logged["optim/grad_norm"][s] for s in steps]
    assert r.probe_losses == [logged["probe/loss"][s] - (10.0 if s == SPIKE_STEP else 0.0) for s in steps]
    other = fresh_batches(kit, steps[:3], 500)
    assert not torch.equal(other[0][0], fresh_batches(kit, steps[:1], 0)[0][0])
