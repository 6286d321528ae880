"""proxy/optim.py: AdamW against torch, weight-decay forms, parameter groups, schedules."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from proxy.config import Cooldown, OptimConfig, Schedule, ScheduleConfig, WeightDecayMode
from proxy.optim import AdamW, apply_lr, build_optimizer, clip_grad_norm, scale_grads, schedule_multiplier


class RMSGain(nn.Module):
    """A norm that is not a torch module type: only its 1-D weight identifies it."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyLM(nn.Module):
    """Embedding -> up (d -> 4d) -> down (4d -> d) -> norms -> lm_head, no biases."""

    def __init__(self, vocab: int = 11, d: int = 8, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)
        self.q_norm = RMSGain(d)
        self.norm = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.lm_head(self.norm(self.q_norm(h)))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def group_of(optimizer: torch.optim.Optimizer, name: str) -> dict:
    return next(g for g in optimizer.param_groups if name in g["param_names"])


# --------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------
def test_coupled_matches_torch_adamw_bitwise_with_clipping():
    torch.manual_seed(0)
    ours_model = TinyLM()
    torch_model = copy.deepcopy(ours_model)
    cfg = OptimConfig(
        lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_mode=WeightDecayMode.coupled
    )
    ours = build_optimizer(ours_model, cfg)
    # the same groups (decay / no-decay) for torch, parameter for parameter
    by_name = dict(torch_model.named_parameters())
    theirs = torch.optim.AdamW(
        [
            {"params": [by_name[n] for n in g["param_names"]], "weight_decay": g["weight_decay"]}
            for g in ours.param_groups
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    assert {g["weight_decay"] for g in ours.param_groups} == {0.0, 0.1}
    for step in range(6):
        tokens = torch.randint(0, 11, (4, 9))
        multiplier = schedule_multiplier(step, 6, ScheduleConfig(warmup_steps=2))
        apply_lr(ours, multiplier)
        for g in theirs.param_groups:
            g["lr"] = cfg.lr * multiplier
        lm_loss(ours_model, tokens).backward()
        lm_loss(torch_model, tokens).backward()
        ours_norm = clip_grad_norm(ours_model.parameters(), 0.05)
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.05)
        assert torch.equal(ours_norm, torch_norm) and ours_norm > 0.05  # the clip is active
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
        for (name, a), b in zip(ours_model.named_parameters(), torch_model.parameters()):
            assert torch.equal(a, b), f"step {step}: {name} differs from torch.optim.AdamW"
    p = ours_model.up.weight
    q = torch_model.up.weight
    assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])
    assert ours.state[p]["step"] == int(theirs.state[q]["step"]) == 6


def test_independent_decay_matches_a_hand_computed_step():
    theta0 = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    grad = torch.tensor([0.1, -0.3, 0.0], dtype=torch.float64)
    peak, scale, multiplier, wd, eps = 0.2, 0.25, 0.5, 0.1, 1e-8
    p = nn.Parameter(theta0.clone())
    opt = AdamW(
        [{"params": [p], "lr_scale": scale, "peak_lr": peak}],
        lr=peak,
        betas=(0.9, 0.95),
        eps=eps,
        weight_decay=wd,
        weight_decay_mode="independent",
    )
    apply_lr(opt, multiplier)
    lr = peak * scale * multiplier
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    p.grad = grad.clone()
    opt.step()
    # first Adam step: m_hat = g, v_hat = g^2, so the direction is g / (|g| + eps)
    direction = grad / (grad.abs() + eps)
    expected = theta0 - lr * direction - multiplier * wd * theta0  # decay: schedule only
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", ["coupled", "independent"])
def test_decay_alone_follows_the_mode(mode):
    """With a zero gradient the Adam direction is 0, leaving only the decay factor."""
    peak, multiplier, wd = 0.3, 0.5, 0.1
    p = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt = AdamW([p], lr=peak, weight_decay=wd, weight_decay_mode=mode)
    apply_lr(opt, multiplier)
    p.grad = torch.zeros_like(p)
    opt.step()
    factor = 1 - (peak * multiplier * wd if mode == "coupled" else multiplier * wd)
    torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 * factor, dtype=torch.float64))


def test_state_dict_round_trip_is_bitwise():
    torch.manual_seed(1)
    model = TinyLM()
    cfg = OptimConfig(
        lr=1e-2, weight_decay=1e-4, weight_decay_mode=WeightDecayMode.independent, mup=True, mup_base_fan_in=8
    )
    opt = build_optimizer(model, cfg)
    batches = [torch.randint(0, 11, (2, 7)) for _ in range(6)]

    def train(m: nn.Module, o: torch.optim.Optimizer, steps: list[torch.Tensor]) -> None:
        for tokens in steps:
            lm_loss(m, tokens).backward()
            clip_grad_norm(m.parameters(), 1.0)
            o.step()
            o.zero_grad()

    train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what a checkpoint resume does
    clone = TinyLM()
    clone.load_state_dict(saved["model"])
    clone_opt = build_optimizer(clone, cfg)
    clone_opt.load_state_dict(saved["optim"])

    for p, q in zip(model.parameters(), clone.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], clone_opt.state[q][key])
        assert opt.state[p]["step"] == clone_opt.state[q]["step"] == 3
    assert [g["name"] for g in clone_opt.param_groups] == ["decay/lr_x0.25", "decay", "no_decay"]
    assert {g["weight_decay_mode"] for g in clone_opt.param_groups} == {"independent"}
    train(model, opt, batches[3:])
    train(clone, clone_opt, batches[3:])
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(p, q), f"{name} diverged after resuming from the state dict"


def test_bad_hyperparameters_raise_one_clear_error():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="weight_decay_mode='decoupled'"):
        AdamW([p], weight_decay_mode="decoupled")
    with pytest.raises(ValueError, match="beta2=1.0"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps=0"):
        AdamW([p], eps=0)


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------
def test_no_decay_on_embeddings_and_norms_when_configured():
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    kept = {n for g in opt.param_groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert decayed == {"up.weight", "down.weight", "lm_head.weight"}
    assert kept == {"embed.weight", "q_norm.weight", "norm.weight"}

    opt = build_optimizer(model, OptimConfig(weight_decay=0.1, decay_embeddings=True, decay_norms=True))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]
    assert len(opt.param_groups[0]["params"]) == 6


def test_tied_lm_head_is_optimised_once_as_an_embedding():
    model = TinyLM(tie=True)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1, mup=True, mup_base_fan_in=4))
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(["embed.weight", "up.weight", "down.weight", "q_norm.weight", "norm.weight"])
    tied = group_of(opt, "embed.weight")
    assert tied["weight_decay"] == 0.0 and tied["lr_scale"] == 1.0


def test_mup_lr_scale_is_base_fan_in_over_fan_in():
    model = TinyLM(d=8)  # fan_in: up 8, down 32, lm_head 8
    cfg = OptimConfig(lr=1e-2, mup=True, mup_base_fan_in=16)
    opt = build_optimizer(model, cfg)
    expected = {
        "up.weight": 2.0,
        "down.weight": 0.5,
        "lm_head.weight": 2.0,
        "embed.weight": 1.0,
        "norm.weight": 1.0,
        "q_norm.weight": 1.0,
    }
    for name, scale in expected.items():
        assert group_of(opt, name)["lr_scale"] == scale, name
    base = apply_lr(opt, 0.5)
    assert base == pytest.approx(5e-3)
    assert group_of(opt, "down.weight")["lr"] == pytest.approx(1e-2 * 0.5 * 0.5)
    assert group_of(opt, "up.weight")["lr"] == pytest.approx(1e-2 * 2.0 * 0.5)
    assert all(g["peak_lr"] == 1e-2 for g in opt.param_groups)

    plain = build_optimizer(model, OptimConfig(lr=1e-2, mup=False))
    assert {g["lr_scale"] for g in plain.param_groups} == {1.0}


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def sched(name: Schedule, **kw) -> ScheduleConfig:
    return ScheduleConfig(name=name, **{"warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


@pytest.mark.parametrize("name", list(Schedule))
def test_warmup_is_linear_and_ends_at_one(name):
    cfg = sched(name)
    assert schedule_multiplier(0, 110, cfg) == pytest.approx(0.1)
    assert schedule_multiplier(4, 110, cfg) == pytest.approx(0.5)
    assert schedule_multiplier(9, 110, cfg) == 1.0
    assert schedule_multiplier(10, 110, cfg) == 1.0


def test_cosine_linear_constant_values():
    cos, lin, const = sched(Schedule.cosine), sched(Schedule.linear), sched(Schedule.constant)
    # progress p = (step - 10) / 100
    assert schedule_multiplier(60, 110, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert schedule_multiplier(35, 110, cos) == pytest.approx(quarter)
    assert schedule_multiplier(110, 110, cos) == pytest.approx(0.1)
    assert schedule_multiplier(500, 110, cos) == pytest.approx(0.1)  # clamped past the end
    assert schedule_multiplier(60, 110, lin) == pytest.approx(0.55)
    assert schedule_multiplier(85, 110, lin) == pytest.approx(0.1 + 0.9 * 0.25)
    assert schedule_multiplier(110, 110, lin) == pytest.approx(0.1)
    assert schedule_multiplier(100, 110, const) == 1.0
    values = [schedule_multiplier(s, 110, cos) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_stable_then_cools_down_with_the_chosen_shape():
    # 100 steps, last 20% cooldown: stable through step 79, cooldown progress q = (step - 80) / 20
    linear = sched(Schedule.wsd, decay_fraction=0.2, cooldown=Cooldown.linear)
    sqrt = sched(Schedule.wsd, decay_fraction=0.2, cooldown=Cooldown.sqrt)
    for cfg in (linear, sqrt):
        assert schedule_multiplier(50, 100, cfg) == 1.0
        assert schedule_multiplier(80, 100, cfg) == 1.0
        assert schedule_multiplier(100, 100, cfg) == pytest.approx(0.1)
    assert schedule_multiplier(90, 100, linear) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule_multiplier(85, 100, linear) == pytest.approx(0.1 + 0.9 * 0.75)
    assert schedule_multiplier(85, 100, sqrt) == pytest.approx(0.1 + 0.9 * 0.5)  # 1 - sqrt(1/4)
    assert schedule_multiplier(99, 100, sqrt) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.95)))
    # 1 - sqrt drops faster early in the cooldown than linear
    assert schedule_multiplier(82, 100, sqrt) < schedule_multiplier(82, 100, linear)


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="total_steps=0"):
        schedule_multiplier(0, 0, sched(Schedule.cosine))
    with pytest.raises(ValueError, match="step=-1"):
        schedule_multiplier(-1, 10, sched(Schedule.cosine))


def test_no_warmup_and_warmup_longer_than_training():
    cfg = ScheduleConfig(name=Schedule.cosine, warmup_steps=0, min_lr_ratio=0.0)
    assert schedule_multiplier(0, 10, cfg) == 1.0
    long = ScheduleConfig(name=Schedule.cosine, warmup_steps=20, min_lr_ratio=0.2)
    assert schedule_multiplier(9, 10, long) == pytest.approx(0.5)
    assert schedule_multiplier(25, 10, long) == pytest.approx(0.2)  # no decay span left


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------
def test_clip_zero_only_measures_and_small_norms_are_untouched():
    p = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 0.0, 0.0])
    q.grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm([p, q], 0.0)
    assert norm.item() == pytest.approx(5.0)
    assert p.grad.tolist() == [3.0, 0.0, 0.0]
    clip_grad_norm([p, q], 10.0)
    assert q.grad.tolist() == [0.0, 4.0, 0.0, 0.0]
    assert clip_grad_norm([p, q], 1.0).item() == pytest.approx(5.0)
    assert clip_grad_norm([p, q], 0.0).item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm([nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0  # no grads at all


def test_update_clipping_caps_each_tensors_step_where_the_second_moment_lags():
    """StableAdamW (Wortsman et al. 2023b): after steps of small gradients, a gradient 100x larger
    makes Adam's step several times the LR (beta1 = 0 here, so the step is g / sqrt(v_hat) alone);
    update clipping divides the LR by RMS_t = sqrt(mean(g^2 / v_hat)), so the step stays about the
    LR, and RMS_t is what is logged."""
    from proxy.optim import AdamW

    def run(update_clip: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(256))
        opt = AdamW([p], lr=1e-3, betas=(0.0, 0.999), eps=1e-8, update_clip=update_clip)
        for _ in range(50):
            p.grad = torch.randn(256) * 1e-3
            opt.step()
        opt.measure_rms = True
        p.grad = torch.randn(256) * 1e-1  # the gradient outgrows what v has seen
        before = p.detach().clone()
        opt.step()
        step_rms = float((p.detach() - before).pow(2).mean().sqrt()) / 1e-3
        return step_rms, float(opt.last_rms[id(p)])

    plain, rms = run(False)
    clipped, rms_clipped = run(True)
    assert rms > 5 and rms == pytest.approx(rms_clipped)  # the same RMS_t, measured either way
    assert plain > 3 and clipped < 1.5 and clipped == pytest.approx(plain / rms, rel=0.05)


def test_update_clipping_off_is_the_plain_adamw_bit_for_bit():
    from proxy.optim import AdamW

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))
    b.data.copy_(a.data)
    opt_a, opt_b = AdamW([a], lr=1e-2), AdamW([b], lr=1e-2, update_clip=False)
    opt_b.measure_rms = True  # measuring must not change the step
    for _ in range(5):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_grads_by_a_device_factor_gives_the_bits_of_a_python_number(dtype: torch.dtype) -> None:
    """ZClip scales by a 0-dim float64 tensor (no sync): the same bits as the host's float."""
    torch.manual_seed(0)
    factor = 0.3319113552570343
    by_tensor = [nn.Parameter(torch.zeros(3, 5, dtype=dtype)) for _ in range(2)]
    by_number = [nn.Parameter(torch.zeros(3, 5, dtype=dtype)) for _ in range(2)]
    for a, b in zip(by_tensor, by_number):
        a.grad = torch.randn(3, 5).to(dtype)
        b.grad = a.grad.clone()
    before = by_tensor[0].grad.clone()
    scale_grads(by_tensor, torch.tensor(factor, dtype=torch.float64))
    scale_grads(by_number, factor)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(by_tensor, by_number))
    assert not torch.equal(by_tensor[0].grad, before)  # it did scale


# --------------------------------------------------------------------------------------------
# A skip decided on the device: step(skip=flag)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, update_clip, dtype",
    [("coupled", False, torch.float32), ("independent", True, torch.float32), ("coupled", True, torch.float64)],
)
def test_a_device_skip_is_a_left_out_step_and_a_kept_step_is_the_plain_steps_bits(mode, update_clip, dtype):
    """Two optimizers see the same gradients; one is told on the host which steps to leave out
    (it does not call step()), the other gets the flag as a device tensor. Parameters, moments,
    step counts and RMS_t agree bit for bit at every step, non-finite gradients on skipped steps
    included, across muP groups and a schedule's LR changes, and after a state round trip."""
    torch.manual_seed(0)
    cfg = OptimConfig(
        lr=3e-3,
        weight_decay=0.1 if mode == "coupled" else 1e-3,
        weight_decay_mode=mode,
        update_clip=update_clip,
        mup=True,
    )
    host_model = TinyLM(d=16).to(dtype)
    device_model = copy.deepcopy(host_model)
    host, device = build_optimizer(host_model, cfg), build_optimizer(device_model, cfg)
    host.measure_rms = device.measure_rms = True
    skips = {3, 4, 9, 10, 11, 17}
    tokens = torch.randint(0, 11, (4, 9))
    for step in range(24):
        apply_lr(host, 0.5 + 0.5 * math.cos(step / 5))
        apply_lr(device, 0.5 + 0.5 * math.cos(step / 5))
        for model in (host_model, device_model):
            model.zero_grad(set_to_none=True)
            lm_loss(model, tokens.roll(step, 0)).backward()
        if step in {4, 10}:  # the skipped step's gradient is not finite: the reason to skip it
            for p in device_model.parameters():
                p.grad.fill_(math.nan if step == 4 else math.inf)
        if step not in skips:
            host.step()
        device.step(skip=torch.tensor(step in skips))
        for a, b in zip(host_model.parameters(), device_model.parameters()):
            assert torch.equal(a, b), step
            assert torch.equal(host.last_rms[id(a)], device.last_rms[id(b)]), step
        if step == 13:  # the skips fold into the checkpoint's step counts; a fresh optimizer goes on
            state = device.state_dict()
            device = build_optimizer(device_model, cfg)
            device.load_state_dict(state)
            device.measure_rms = True
            device.last_rms = dict(
                zip(map(id, device_model.parameters()), (host.last_rms[id(p)] for p in host_model.parameters()))
            )
    host_state, device_state = host.state_dict(), device.state_dict()
    assert (
        [s["step"] for s in host_state["state"].values()]
        == [s["step"] for s in device_state["state"].values()]
        == [24 - len(skips)] * len(host_state["state"])
    )
    for a, b in zip(host_state["state"].values(), device_state["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_a_device_skip_reads_nothing_back_and_grows_its_tables(monkeypatch):
    p = nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=1e-2)
    from tests.train.test_watch import SYNCING

    flags = [torch.tensor(step % 2 == 1) for step in range(1500)]  # past the first table's 1024 rows
    reads: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: reads.append(_n) or _o(self, *a, **k)
        )
    for flag in flags:
        p.grad = torch.full((4,), 0.1)
        opt.step(skip=flag)
    assert reads == []
    monkeypatch.undo()
    assert opt.state_dict()["state"][0]["step"] == 750


def test_a_device_skip_needs_every_stepping_parameter_to_have_a_gradient():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = AdamW([a, b], lr=1e-2)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step(skip=torch.tensor(False))
    b.grad = None
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step(skip=torch.tensor(False))


def test_a_device_skip_leaves_a_parameter_without_gradients_alone_and_counts_a_late_one_from_its_start():
    """A parameter that never has a gradient gets no state; one whose first gradient comes after
    skips counts its own steps only: as a host-decided skip counts them."""

    def run(on_device: bool) -> tuple[list[int], list[torch.Tensor]]:
        a, b, idle = (nn.Parameter(torch.ones(3)) for _ in range(3))
        opt = AdamW([{"params": [a, idle]}, {"params": [b]}], lr=1e-2)
        for step in range(6):
            a.grad = torch.full((3,), 0.1 * (step + 1))
            b.grad = torch.full((3,), 0.2 * step) if step >= 3 else None
            skip = step == 1
            if on_device:
                opt.step(skip=torch.tensor(skip))
            elif not skip:
                opt.step()
        state = opt.state_dict()["state"]
        return [s["step"] for s in state.values()], [a.detach().clone(), b.detach().clone()]

    host_steps, host_params = run(False)
    device_steps, device_params = run(True)
    assert host_steps == device_steps == [5, 3]  # a skipped once; b from its first gradient; idle: no state
    assert all(torch.equal(h, d) for h, d in zip(host_params, device_params))
