"""One run ledger for every run: a standalone run and an ensemble member write the same record
(metric keys, summary fields, checkpoint format, wandb step axis); and the trainer talks to its
remedy only through the Remedy interface."""

from __future__ import annotations

import math
from typing import Optional
from unittest import mock

import pytest
import torch

from proxy.config import to_config
from proxy.records import ENSEMBLE_ONLY_FIELDS, ENSEMBLE_ONLY_KEYS, SKIP_STEP, WANDB_STEP, latest_checkpoint, load_run
from proxy.train import RunInfo, Trainer, train, train_ensemble
from proxy.train.remedies import Event, Remedy
from tests.train.test_trainer import tiny_cfg


def keys(run) -> tuple[set[str], set[str]]:
    """(metric keys, event kinds) of a loaded run."""
    metric = {k for row in run.metrics for k in row}
    return metric, {e["event"] for e in run.events}


def test_a_standalone_run_and_a_one_member_ensemble_keep_the_same_record(tmp_path, monkeypatch):
    import wandb

    runs: list[mock.MagicMock] = []  # one wandb run per run record, in order
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(mock.MagicMock(summary={})) or runs[-1])
    common = dict(train=dict(steps=12, log_every=2, eval_every=5, ckpt_every=5), wandb=dict(mode="offline"))
    solo = train(tiny_cfg(**common), tmp_path / "solo")
    lr = tiny_cfg()["optim"]["lr"]
    (member,) = train_ensemble(tiny_cfg(sweep=dict(lrs=[lr]), **common), tmp_path / "sweep")
    member_dir = tmp_path / "sweep" / f"lr={lr!r}"

    a, b = load_run(tmp_path / "solo"), load_run(member_dir)
    (a_keys, a_events), (b_keys, b_events) = keys(a), keys(b)
    assert a_keys - {"perf/mfu"} <= b_keys and b_keys - a_keys == set(ENSEMBLE_ONLY_KEYS)
    assert a_events == b_events
    assert set(member) - set(solo) == set(ENSEMBLE_ONLY_FIELDS) and set(solo) <= set(member)
    # the same numbers, too: one member is the standalone run
    assert a.series("train/loss")[1] == pytest.approx(b.series("train/loss")[1], rel=1e-5)
    # the same checkpoint format
    sa = torch.load(latest_checkpoint(tmp_path / "solo"), weights_only=True)
    sb = torch.load(latest_checkpoint(member_dir), weights_only=True)
    assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 12
    # and the same wandb x-axis: trainer/step defined, on every row
    assert len(runs) == 2
    for run in runs:
        assert run.define_metric.call_args_list == [mock.call(WANDB_STEP), mock.call("*", step_metric=WANDB_STEP)]
        logged = run.log.call_args_list
        assert logged and all(len(c.args) == 1 and not c.kwargs and WANDB_STEP in c.args[0] for c in logged)
    solo_steps, member_steps = ([c.args[0][WANDB_STEP] for c in run.log.call_args_list] for run in runs)
    assert solo_steps == member_steps


class EveryThird(Remedy):
    """A remedy the trainer has never heard of: skips the update of every third step."""

    def __init__(self):
        self.seen: list[int] = []

    def after_backward(self, step, loss, grad_norm, params, data_position=None) -> Optional[Event]:
        self.seen.append(step)
        if step % 3 == 2:
            return Event(step, SKIP_STEP, "loss", float(loss), math.inf, why="every third")
        return None

    def state_dict(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = list(state["seen"])


def test_the_trainer_needs_only_the_remedy_interface(tmp_path, monkeypatch):
    cfg = to_config(tiny_cfg(train=dict(steps=9, log_every=1, eval_every=100)))
    trainer = Trainer(cfg, RunInfo(tmp_path / "run", "run"))
    remedy = trainer.remedy = EveryThird()
    weights: dict[int, torch.Tensor] = {}

    real = Trainer.train_step

    def watched(self, step, logging_step):
        before = self.model.embed.weight.detach().clone()
        row = real(self, step, logging_step)
        weights[step] = torch.equal(before, self.model.embed.weight)
        return row

    monkeypatch.setattr(Trainer, "train_step", watched)
    (summary,) = trainer.run()
    assert summary["status"] == "completed" and remedy.seen == list(range(9))
    assert [s for s, unchanged in weights.items() if unchanged] == [2, 5, 8]  # skipped: not applied
    events = load_run(tmp_path / "run").events
    assert [(e["step"], e["event"], e["why"]) for e in events] == [(s, SKIP_STEP, "every third") for s in (2, 5, 8)]
