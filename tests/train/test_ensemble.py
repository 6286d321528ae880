"""Vectorized sweeps (proxy/train/ensemble.py): each member is the standalone run with its LR and seed,
a diverged member is frozen without touching the others, and every member leaves a standard
run record."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from proxy.config import Config, ConfigError, OptimConfig, as_dict, register_configs, to_config
from proxy.model import build_model
from proxy.optim import apply_lr, build_optimizer, clip_grad_norm
from proxy.records import find_runs, load_run
from proxy.records.summary import field_names as summary_fields
from proxy.train import train
from proxy.train.ensemble import member_specs
from proxy.train.ensemble_optim import ParamRule, StackedAdamW, clip_members_, member_grad_norms, param_rules
from proxy.train.trainer import train_ensemble

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread buys nothing and, on a busy shared machine,
    every parallel region waits for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**sections) -> dict:
    cfg = as_dict(Config())
    cfg["model"].update(d_model=32, n_heads=2)
    cfg["train"].update(steps=20, batch_size=4, seq_len=32, log_every=1, eval_every=10, eval_batches=2, progress=False)
    cfg["schedule"]["warmup_steps"] = 5
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def series(run_dir, key: str) -> list[float]:
    return load_run(run_dir).series(key)[1]


def without_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


# --------------------------------------------------------------------------------------------
# Equivalence with standalone runs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(model=dict(qk_norm="rmsnorm", init="fan_in", mlp="swiglu", tie_embeddings=True), loss=dict(z_loss=1e-4)),
        dict(
            model=dict(qk_norm="layernorm", init="scaled", norm_position="reordered", norm="rmsnorm", attention="sdpa"),
            optim=dict(mup=True, mup_base_fan_in=16, weight_decay=1e-4, weight_decay_mode="independent"),
        ),
        dict(optim=dict(update_clip=True, beta2=0.999, grad_clip=0.0)),  # StableAdamW
    ],
)
def test_each_member_follows_its_standalone_run(tmp_path, variant):
    lrs = [1e-3, 4e-3]
    summaries = train_ensemble(tiny_cfg(sweep=dict(lrs=lrs), **variant), tmp_path / "sweep")
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    for lr in lrs:
        member = tmp_path / "sweep" / f"lr={lr!r}"
        solo = tmp_path / f"solo-{lr}"
        standalone = tiny_cfg(**variant)
        standalone["optim"]["lr"] = lr
        assert train(standalone, solo)["status"] == "completed"
        for key in ("train/loss", "val/loss", "optim/lr", "output/lse_mean", "optim/adam_rms_max"):
            ours, theirs = series(member, key), series(solo, key)
            assert len(ours) == len(theirs) > 0, key
            assert ours == pytest.approx(theirs, rel=1e-5, abs=0), key
        assert series(member, "train/loss")[0] == series(solo, "train/loss")[0]  # same init, bit for bit


def test_seed_and_weight_decay_axes_make_a_grid(tmp_path):
    cfg = tiny_cfg(sweep=dict(lrs=[2e-3], seeds=[0, 7], weight_decays=[0.0, 0.1]), train=dict(steps=8))
    summaries = train_ensemble(cfg, tmp_path / "sweep")
    labels = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert labels == [
        "lr=0.002,seed=0,wd=0.0",
        "lr=0.002,seed=0,wd=0.1",
        "lr=0.002,seed=7,wd=0.0",
        "lr=0.002,seed=7,wd=0.1",
    ]
    assert all(s["status"] == "completed" for s in summaries)
    solo = tiny_cfg(optim=dict(lr=2e-3, weight_decay=0.1), train=dict(steps=8, seed=7))
    train(solo, tmp_path / "solo")
    member = tmp_path / "sweep" / "lr=0.002,seed=7,wd=0.1"
    assert series(member, "train/loss") == pytest.approx(series(tmp_path / "solo", "train/loss"), rel=1e-5, abs=0)
    config = load_run(member).config
    assert (config["optim"]["lr"], config["optim"]["weight_decay"], config["train"]["seed"]) == (2e-3, 0.1, 7)
    assert config["sweep"] == {"lrs": [], "seeds": [], "weight_decays": []}
    # different seeds start from different weights
    assert series(member, "train/loss")[0] != series(tmp_path / "sweep" / "lr=0.002,seed=0,wd=0.1", "train/loss")[0]


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------
def test_diverged_member_is_frozen_and_the_others_do_not_notice(tmp_path):
    cfg = dict(schedule=dict(warmup_steps=0), train=dict(steps=12, eval_every=6))
    # lr=1e30 turns the weights to inf in one step: every later forward of that member is NaN
    mixed = train_ensemble(tiny_cfg(sweep=dict(lrs=[1e-3, 1e30, 3e-3]), **cfg), tmp_path / "mixed")
    clean = train_ensemble(tiny_cfg(sweep=dict(lrs=[1e-3, 3e-3]), **cfg), tmp_path / "clean")
    assert [s["status"] for s in mixed] == ["completed", "diverged", "completed"]
    bad = load_run(tmp_path / "mixed" / "lr=1e+30")
    assert bad.summary["diverged_at_step"] == 1 and bad.summary["steps_completed"] == 1
    assert bad.events == [{"step": 1, "event": "diverged", "reason": "non-finite loss"}]
    assert max(row["step"] for row in bad.metrics) == 0  # nothing logged after it froze
    for label in ("lr=0.001", "lr=0.003"):
        ours, theirs = load_run(tmp_path / "mixed" / label), load_run(tmp_path / "clean" / label)
        assert without_perf(ours.metrics) == without_perf(theirs.metrics)  # bit for bit
        assert ours.summary["final_val_loss"] == theirs.summary["final_val_loss"]
        assert math.isfinite(ours.summary["final_val_loss"])
    assert clean[0]["status"] == "completed"


def test_loss_threshold_divergence_matches_standalone(tmp_path):
    cfg = dict(optim=dict(grad_clip=0.0), schedule=dict(warmup_steps=0), train=dict(steps=30, eval_every=15))
    summaries = train_ensemble(tiny_cfg(sweep=dict(lrs=[1e-3, 3.0]), **cfg), tmp_path / "sweep")
    solo = train(
        tiny_cfg(optim=dict(lr=3.0, grad_clip=0.0), schedule=dict(warmup_steps=0), train=dict(steps=30, eval_every=15)),
        tmp_path / "solo",
    )
    assert solo["status"] == "diverged"
    assert summaries[1]["status"] == "diverged"
    assert summaries[1]["diverged_at_step"] == solo["diverged_at_step"]
    assert summaries[0]["status"] == "completed"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def test_members_write_standard_run_records(tmp_path):
    overrides = ("model.qk_norm=rmsnorm", "sweep.lrs=[0.001,0.01]")
    cfg = tiny_cfg(sweep=dict(lrs=[1e-3, 1e-2]), model=dict(qk_norm="rmsnorm"), train=dict(log_every=5))
    train_ensemble(cfg, tmp_path / "sweep", sweep_id="s1", overrides=overrides)
    train(tiny_cfg(optim=dict(lr=1e-3), model=dict(qk_norm="rmsnorm"), train=dict(log_every=5)), tmp_path / "solo")

    runs = find_runs([tmp_path / "sweep"])
    assert [p.name for p in runs] == ["lr=0.001", "lr=0.01"]
    solo = load_run(tmp_path / "solo")
    for path, lr in zip(runs, (1e-3, 1e-2)):
        run = load_run(path)
        assert run.config["optim"]["lr"] == lr
        assert run.summary["lr"] == lr and run.summary["sweep_id"] == "s1"
        assert run.summary["overrides"] == ["model.qk_norm=rmsnorm", f"optim.lr={lr!r}"]
        assert run.summary["run_name"] == f"model.qk_norm=rmsnorm,optim.lr={lr!r}"
        assert set(run.summary) - set(solo.summary) == {"ensemble"}
        assert set(solo.summary) - set(run.summary) == set()
        assert set(run.summary) <= set(summary_fields())  # every field written is declared, with its type
        assert run.summary.lr == lr and run.summary.overrides == ("model.qk_norm=rmsnorm", f"optim.lr={lr!r}")
        assert [r["step"] for r in run.metrics] == [r["step"] for r in solo.metrics]
        for ours, theirs in zip(run.metrics, solo.metrics):
            assert set(ours) - set(theirs) <= {"perf/ensemble_tokens_per_s"}
            assert set(theirs) - set(ours) == set()

        # the final checkpoint is a standalone checkpoint of this member
        state = torch.load(path / "checkpoints" / "step_0000020.pt", weights_only=True)
        model = build_model(to_config(run.config).model, 512)
        model.load_state_dict(state["model"])
        optimizer = build_optimizer(model, to_config(run.config).optim)
        optimizer.load_state_dict(state["optimizer"])
        assert state["step"] == 20 and state["tokens"] == run.summary["tokens"]
        assert optimizer.param_groups[0]["peak_lr"] == lr
    member_state = torch.load(runs[0] / "checkpoints" / "step_0000020.pt", weights_only=True)["model"]
    solo_state = torch.load(tmp_path / "solo" / "checkpoints" / "step_0000020.pt", weights_only=True)["model"]
    # Adam turns a gradient near zero into an update of about +-lr whatever its size, so a
    # reduction-order difference (vmap vs plain matmul, per CPU ISA) can move a rare element by a
    # fraction of lr=1e-3: seen on an AVX-512 machine, 1 of 16384 embedding entries off by 6e-6
    for name, value in solo_state.items():
        torch.testing.assert_close(member_state[name], value, rtol=1e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def test_sweep_composes_from_the_command_line():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["sweep.lrs=[1e-3,3e-3,1e-2]", "sweep.seeds=[1,2]"]))
    assert cfg.sweep.lrs == [1e-3, 3e-3, 1e-2] and cfg.sweep.seeds == [1, 2]
    specs = member_specs(cfg, ["sweep.lrs=[1e-3,3e-3,1e-2]", "sweep.seeds=[1,2]", "model.init=fan_in"])
    assert len(specs) == 6
    assert specs[0].overrides == ("model.init=fan_in", "optim.lr=0.001", "train.seed=1")


@pytest.mark.parametrize(
    "sweep, remedy, message",
    [
        (dict(lrs=[1e-3, 1e-3]), {}, "sweep.lrs=[0.001, 0.001] has repeated values"),
        (dict(lrs=[1e-3, -1.0]), {}, "sweep.lrs entry=-1.0 must be > 0"),
        (dict(weight_decays=[-0.1]), {}, "sweep.weight_decays entry=-0.1 must be >= 0"),
        (dict(lrs=[1e-3]), dict(kind="rollback"), "remedy.kind=rollback is not supported with sweep.*"),
    ],
)
def test_bad_sweeps_fail_with_one_line(tmp_path, sweep, remedy, message):
    with pytest.raises(ConfigError) as info:
        train_ensemble(tiny_cfg(sweep=sweep, remedy=remedy), tmp_path / "sweep")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("kernels", [dict(attention="triton", loss_impl="triton"), dict(loss_impl="fused_linear")])
def test_the_triton_kernels_map_over_members(tmp_path, kernels):
    """conftest sets TRITON_INTERPRET=1: the real kernels run, through their vmap rules, and each
    member still follows its standalone run on the same kernels."""
    lrs = [1e-3, 4e-3]
    # the interpreter runs each kernel program in Python: a handful of small steps
    variant = dict(
        model=kernels,
        loss=dict(z_loss=1e-4),
        data=dict(synthetic=dict(vocab_size=64)),
        train=dict(steps=3, batch_size=2, seq_len=8, eval_every=100, eval_batches=1),
    )
    summaries = train_ensemble(tiny_cfg(sweep=dict(lrs=lrs), **variant), tmp_path / "sweep")
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    for lr in lrs:
        standalone = tiny_cfg(**variant)
        standalone["optim"]["lr"] = lr
        train(standalone, tmp_path / f"solo-{lr}")
        for key in ("train/loss", "output/lse_mean", "attn/max_logit"):
            ours, theirs = series(tmp_path / "sweep" / f"lr={lr!r}", key), series(tmp_path / f"solo-{lr}", key)
            assert len(ours) == len(theirs) > 0, key
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), key


# --------------------------------------------------------------------------------------------
# The stacked optimizer against proxy.optim, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True], ids=["stacked", "foreach"])
@pytest.mark.parametrize("mode, update_clip", [("coupled", False), ("independent", False), ("coupled", True)])
def test_stacked_adamw_is_the_standalone_adamw_per_member(mode, update_clip, foreach):
    """Both forms of the update (the loop over stacked tensors a CPU takes, the multi-tensor
    kernels over member slices a GPU takes) are each member's standalone AdamW."""
    torch.manual_seed(0)
    cfg = dict(d_model=16, n_layers=1, n_heads=2)
    model_cfg = to_config({"model": cfg}).model
    lrs, wds = [1e-3, 3e-2, 1.0], [0.0, 0.1, 0.3]
    models = [build_model(model_cfg, 64) for _ in lrs]
    base_optim = OptimConfig(
        weight_decay=0.1, weight_decay_mode=mode, mup=True, mup_base_fan_in=8, grad_clip=0.5, update_clip=update_clip
    )
    optimizers = []
    for model, lr, wd in zip(models, lrs, wds):
        optimizers.append(build_optimizer(model, dataclasses.replace(base_optim, lr=lr, weight_decay=wd)))
    names = [n for n, _ in models[0].named_parameters()]
    stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_() for n in names}
    optimizer = StackedAdamW(stacked, param_rules(models[0], base_optim), lrs, wds, base_optim)
    optimizer.foreach = foreach
    for step in range(4):
        multiplier = 0.5 + 0.1 * step
        grads = {n: torch.randn_like(p) * 10 ** (step - 2) for n, p in stacked.items()}
        for k, (model, opt) in enumerate(zip(models, optimizers)):
            for n, p in model.named_parameters():
                p.grad = grads[n][k].clone()
            clip_grad_norm(list(model.parameters()), 0.5)
            apply_lr(opt, multiplier)
            opt.step()
        for n, p in stacked.items():
            p.grad = grads[n].clone()
        grad_list = [p.grad for p in stacked.values()]
        clip_members_(grad_list, member_grad_norms(grad_list), 0.5)
        optimizer.step(multiplier, [True, True, True])
        # bit for bit; with update clipping the RMS_t means reduce in another order: to the last bits
        tolerance = dict(rtol=1e-6, atol=1e-7) if update_clip else dict(rtol=0, atol=0)
        for k, model in enumerate(models):
            for n, p in model.named_parameters():
                torch.testing.assert_close(stacked[n][k], p, **tolerance, msg=f"{n} member {k} step {step}")


@pytest.mark.parametrize("foreach", [False, True], ids=["stacked", "foreach"])
@pytest.mark.parametrize("mode, update_clip", [("coupled", False), ("independent", True)])
def test_stacked_adamw_obeys_device_skips_as_it_obeys_host_skips(mode, update_clip, foreach):
    """The same gradients and skips, told once as host flags and once as a device (K,) bool that is
    never read: parameters, moments, RMS_t and step counts agree bit for bit at every step,
    non-finite gradients of a skipped member and a frozen member included (RMS_t where a member
    moved: the rows a log reports)."""
    torch.manual_seed(0)
    model_cfg = to_config({"model": dict(d_model=16, n_layers=1, n_heads=2)}).model
    lrs, wds = [1e-3, 3e-2, 1e-2], [0.0, 0.1, 0.3]
    model = build_model(model_cfg, 64)
    base_optim = OptimConfig(
        weight_decay=0.1, weight_decay_mode=mode, mup=True, mup_base_fan_in=8, update_clip=update_clip
    )
    names = [n for n, _ in model.named_parameters()]
    stacks = []
    for _ in range(2):
        params = {n: torch.stack([p.detach()] * 3).requires_grad_() for n, p in model.named_parameters()}
        optimizer = StackedAdamW(params, param_rules(model, base_optim), lrs, wds, base_optim)
        optimizer.measure_rms, optimizer.foreach = True, foreach  # the host-skip side takes either form
        stacks.append((params, optimizer))
    skips = {1: [False, True, False], 2: [True, True, False], 3: [False, True, True], 5: [False, False, True]}
    for step in range(8):
        active = [True, True, step < 6]  # member 2 freezes at step 6
        skipped = [s and a for s, a in zip(skips.get(step, [False] * 3), active)]
        grads = {n: torch.randn(3, *dict(model.named_parameters())[n].shape) for n in names}
        for k, s in enumerate(skipped):
            if s and step == 2:  # a skipped member's gradient is not finite
                for g in grads.values():
                    g[k] = math.nan
        for (params, optimizer), on_device in zip(stacks, (False, True)):
            for n, p in params.items():
                p.grad = grads[n].clone()
            if on_device:
                optimizer.step(0.5 + 0.1 * step, active, skip_t=torch.tensor(skipped))
            else:
                optimizer.step(0.5 + 0.1 * step, active, skipped=skipped)
        (host_params, host), (device_params, device) = stacks
        for n in names:
            assert torch.equal(host_params[n], device_params[n]), (n, step)
            live = torch.tensor(active)  # a frozen member's moments are never used again
            assert torch.equal(host.exp_avg[n][live], device.exp_avg[n][live]), (n, step)
            assert torch.equal(host.exp_avg_sq[n][live], device.exp_avg_sq[n][live]), (n, step)
            moved = torch.tensor([a and not s for a, s in zip(active, skipped)])  # the rows a log reports
            assert torch.equal(host.last_rms[n][moved], device.last_rms[n][moved]), (n, step)
    for k in range(3):
        assert host.member_state(k, names[0])["step"] == device.member_state(k, names[0])["step"]
    assert host.step_counts == device.step_counts == [7, 5, 4]


def test_stacked_adamw_takes_the_multi_tensor_form_only_where_member_slices_are_dense():
    rules = {"a": ParamRule(decay=True, lr_scale=1.0), "b": ParamRule(decay=True, lr_scale=1.0)}
    params = {
        "a": torch.zeros(2, 3, 4, requires_grad=True),  # members outermost: each slice dense
        "b": torch.zeros(3, 2, 4).permute(1, 0, 2).requires_grad_(),  # members in the middle: gappy slices
    }
    optimizer = StackedAdamW(params, rules, [0.1, 0.1], [0.0, 0.0], OptimConfig())
    assert optimizer._slices_dense == {"a": True, "b": False}


@pytest.mark.parametrize("foreach", [False, True], ids=["stacked", "foreach"])
def test_frozen_member_ignores_nan_gradients(foreach):
    params = {"w": torch.ones(2, 3, requires_grad=True)}
    rules = {"w": ParamRule(decay=True, lr_scale=1.0)}
    optimizer = StackedAdamW(params, rules, [0.1, 0.1], [0.1, 0.1], OptimConfig(weight_decay=0.1))
    optimizer.foreach = foreach
    params["w"].grad = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), float("inf"), 1.0]])
    optimizer.step(1.0, [True, False])
    assert torch.equal(params["w"][1], torch.ones(3))
    assert torch.isfinite(params["w"]).all() and not torch.equal(params["w"][0], torch.ones(3))
    assert torch.isfinite(optimizer.exp_avg["w"]).all()


def test_stacking_members_built_on_the_cpu_for_another_device():
    """Members are built on the CPU; the stack must be made before the base module moves to the
    run's device (the first H200 run failed with 'tensors on cpu and cuda:0' when the base moved
    first). The meta device stands in for CUDA here: it refuses mixed devices the same way."""
    from proxy.train.ensemble import StackedGPT

    cfg = to_config(tiny_cfg())
    models = [build_model(cfg.model, 64) for _ in range(3)]
    stacked = StackedGPT(models, torch.device("meta"))
    assert stacked.n_members == 3
    assert all(p.device.type == "meta" and p.shape[0] == 3 for p in stacked.params.values())
    assert all(b.device.type == "meta" for b in stacked.base.buffers())


# --------------------------------------------------------------------------------------------
# Remedies, spike capture and resume, per member (one loop for one run or K members)
# --------------------------------------------------------------------------------------------
SPIKY = dict(
    data=dict(
        inject=dict(enabled=True, start_step=14, end_step=16, fraction=0.5, repeats=32, min_period=1, max_period=1)
    ),
    train=dict(steps=24, eval_every=100, batch_size=8),
)


@pytest.mark.parametrize(
    "remedy, kind",
    [
        (dict(kind="skip_step", detector=dict(sigma=3.0, window=10, min_history=5)), "skip_step"),
        (dict(kind="zclip", zclip_z=2.0, zclip_warmup=5), "zclip"),
    ],
)
def test_each_member_runs_its_own_remedy_as_its_standalone_run(tmp_path, remedy, kind):
    lrs = [3e-3, 1e-2]
    train_ensemble(tiny_cfg(sweep=dict(lrs=lrs), remedy=remedy, **SPIKY), tmp_path / "sweep")
    acted = []
    for lr in lrs:
        solo = tiny_cfg(remedy=remedy, **SPIKY)
        solo["optim"]["lr"] = lr
        train(solo, tmp_path / f"solo-{lr}")
        ours, theirs = load_run(tmp_path / "sweep" / f"lr={lr!r}"), load_run(tmp_path / f"solo-{lr}")
        steps = [e["step"] for e in ours.events if e["event"] == kind]
        assert steps == [e["step"] for e in theirs.events if e["event"] == kind] and steps
        acted.append(steps)
        assert ours.series("train/loss")[1] == pytest.approx(theirs.series("train/loss")[1], rel=1e-5, abs=0)
        skipped = {e["step"] for e in ours.events if e["event"] == "skip_step"}
        updated = {row["step"] for row in ours.metrics if any(k.startswith("update_rms/") for k in row)}
        assert not skipped & updated  # a skipped step has no update
    assert acted[0] != acted[1]  # each member's remedy watched its own run


def test_each_member_captures_its_own_spike_kits(tmp_path):
    capture = dict(
        enabled=True,
        trigger="loss",
        detector=dict(sigma=5.0, window=10, min_history=5),
        steps_before=2,
        steps_after=2,
        max_kits=1,
    )
    train_ensemble(tiny_cfg(sweep=dict(lrs=[3e-3, 1e-2]), capture=capture, **SPIKY), tmp_path / "sweep")
    solo = tiny_cfg(capture=capture, **SPIKY)
    solo["optim"]["lr"] = 1e-2
    train(solo, tmp_path / "solo")
    from proxy.forensics import find_kits, load_kit

    (ours,), (theirs,) = find_kits(tmp_path / "sweep" / "lr=0.01"), find_kits(tmp_path / "solo")
    assert ours.name == theirs.name  # the same spike, at the same step
    kit, reference = load_kit(ours), load_kit(theirs)
    assert kit.meta["trigger"] == reference.meta["trigger"] == "loss"
    assert kit.config.optim.lr == 1e-2 and kit.meta["complete"]
    for which in ("before", "at"):
        a = torch.load(ours / f"state_{which}.pt", weights_only=True)
        b = torch.load(theirs / f"state_{which}.pt", weights_only=True)
        assert a["model"].keys() == b["model"].keys()
        for name in a["model"]:
            torch.testing.assert_close(
                a["model"][name], b["model"][name], rtol=1e-3, atol=1e-5
            )  # the rounding of batched matmuls
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert torch.equal(kit.batches["inputs"], reference.batches["inputs"])


@pytest.mark.parametrize(
    "remedy",
    [
        dict(kind="zclip", zclip_z=2.0, zclip_warmup=5),
        dict(kind="skip_step", detector=dict(sigma=0.5, window=5, min_history=3)),
    ],
    ids=["zclip", "skip_step"],
)
def test_a_sweep_resumes_as_if_it_had_not_stopped(tmp_path, remedy):
    """Its remedies judged on the device between logs (log_every 3), the checkpoint on a step that
    does not log: the resumed sweep's records are the uninterrupted one's, bit for bit."""
    cfg = tiny_cfg(
        sweep=dict(lrs=[3e-3, 1e-2]),
        remedy=remedy,
        train=dict(steps=20, ckpt_every=10, keep_checkpoints=5, log_every=3),
    )
    whole = tmp_path / "whole"
    train_ensemble(cfg, whole)
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    for member in ("lr=0.003", "lr=0.01"):  # as a kill after the checkpoint at step 10 leaves it
        (stopped / member / "checkpoints" / "step_0000020.pt").unlink()
    cfg["train"]["resume"] = True
    summaries = train_ensemble(cfg, stopped)
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    for member, summary in zip(("lr=0.003", "lr=0.01"), summaries):
        assert summary["resumed_from"].endswith(f"{member}/checkpoints/step_0000010.pt")
        ours, theirs = load_run(stopped / member), load_run(whole / member)
        assert without_perf(ours.metrics) == without_perf(theirs.metrics)  # bit for bit
        assert ours.events == theirs.events
        assert ours.summary.final_train_loss == theirs.summary.final_train_loss
    if remedy["kind"] == "skip_step":
        assert any(e["event"] == "skip_step" and e["step"] > 10 for e in load_run(stopped / "lr=0.01").events)


def test_a_sweep_resume_refuses_members_at_different_steps(tmp_path):
    cfg = tiny_cfg(sweep=dict(lrs=[3e-3, 1e-2]), train=dict(steps=20, ckpt_every=10, keep_checkpoints=5))
    train_ensemble(cfg, tmp_path / "sweep")
    (tmp_path / "sweep" / "lr=0.01" / "checkpoints" / "step_0000020.pt").unlink()
    cfg["train"]["resume"] = True
    with pytest.raises(ConfigError, match="different steps"):
        train_ensemble(cfg, tmp_path / "sweep")
