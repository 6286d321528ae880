"""Adam's edge of stability before a spike: the trajectory from a kit's pre-spike state to its spike.

The question (issue 18, item 4): before an LR-provoked loss spike, does Adam's *preconditioned*
sharpness cross its stability threshold, and does it do so earlier than the plain sharpness crosses
the gradient-descent one?

- Cohen et al. (2022, "Adaptive gradient methods at the edge of stability", arXiv 2207.14484):
  Adam with step size eta and momentum beta1 is stable on a quadratic only while the largest
  eigenvalue of the preconditioned Hessian P^-1 H stays below (2 + 2 beta1) / ((1 - beta1) eta),
  38/eta at beta1 = 0.9; full-batch Adam drives it up to that bound ("adaptive edge of stability").
  Plain gradient descent's bound is 2/eta on lambda_max(H) (Cohen et al. 2021).
- Molybog et al. (2023, "A theory on Adam instability in large-scale machine learning",
  arXiv 2304.09871): before a divergence the per-coordinate Adam update m_hat / (sqrt(v_hat) + eps)
  turns bimodal (coordinates pile up at +-1, as when v is dominated by a few large gradients), and
  the update decorrelates from the descent direction.

:func:`edge_trajectory` restores a spike kit's "before" state (proxy/forensics/replay.py) and
replays its recorded batches one trainer step at a time, without the run's remedy, through the
spike step. At each measured step t it records, before the update is applied:

- the loss and grad norm of the step (the trainer's own numbers);
- lambda_max(H) of the step's batch loss at theta_t, and its ratio to 2/eta_t;
- lambda_max(P_t^-1 H), P_t = diag(sqrt(v_hat_t) + eps) / lr_scale, and its ratio to
  (2 + 2 beta1) / ((1 - beta1) eta_t). P_t is the preconditioner Adam uses *for step t's update*:
  v_t already holds step t's (clipped) gradient, as in Adam's own arithmetic -- the state of the
  optimizer right after ``optimizer.step()`` at t, with the Hessian taken at the weights before it;
- Sarle's bimodality coefficient of the Adam direction u_t = m_hat_t / (sqrt(v_hat_t) + eps),
  *pooled* over the coordinates of all parameters (u is dimensionless, ~O(1) per coordinate, so one
  pool is meaningful; coordinates that never had a gradient, v = 0, are left out: Adam does not
  move them and they would add a point mass at 0);
- the cosine between the applied update theta_{t+1} - theta_t (weight decay included) and -g_t,
  flattened over all parameters (global-norm clipping scales g_t as a whole, so the cosine is the
  same before or after it).

Both eigenvalues are of the loss of step t's own batch (the one the update descends), not the
full-data loss of Cohen et al.; they come from Lanczos on Hessian-vector products by double
backward (proxy/forensics/curvature.py), on a copy of the model built with the reference attention
and loss (the Triton kernels have no double backward; the weights and the math are the same).

:func:`first_crossing` gives, per ratio, the first measured step where it is >= 1. The dissection
(``proxy-inspect --edge``) adds the trajectory to a kit's report (:func:`edge_section`,
:func:`edge_figure`); experiments/adam_edge_of_stability/study.py pools it over the kits of a sweep.

This module also holds what the dissection (dissect.py) measures the same way at a single state --
the reference-path sharpness of a batch's loss, the Adam direction, the bimodality coefficient --
so both take one code path (dissect.py imports this module, never the other way round).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from proxy.config import Attention, Config, LossImpl
from proxy.forensics import curvature
from proxy.forensics.replay import Kit, KitError, held_out_batch, load_kit, restore, trainer_step
from proxy.report.document import Block, Heading, Paragraph, Table

FIGURE = "edge.png"


# ============================================================================================
# Shared with the dissection: curvature on the reference path, the Adam direction, bimodality
# ============================================================================================
def reference_config(cfg: Config) -> Config:
    """``cfg`` with the reference attention and loss, whose ops have a double backward (the
    Triton kernels do not); the model's parameters and its math are the same."""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention=Attention.naive, loss_impl=LossImpl.torch)
    )


def batch_sharpness(
    model: nn.Module, cfg: Config, x: Tensor, y: Tensor, precond: Tensor, lr: float, iterations: int
) -> curvature.Sharpness:
    """Sharpness and preconditioned sharpness of the training loss (z-loss included) of the batch
    ``(x, y)`` at ``model``'s weights, in fp32; ``model`` is built with :func:`reference_config`,
    ``precond`` flat in the order of ``model.parameters()`` (curvature.adam_preconditioner)."""
    device = next(model.parameters()).device
    out = model(x.to(device), y.to(device), z_loss=cfg.loss.z_loss, ignore_index=cfg.loss.ignore_index)
    return curvature.sharpness(out.loss, list(model.parameters()), precond, lr, cfg.optim.beta1, iterations)


def adam_direction(optimizer: torch.optim.Optimizer, p: Tensor) -> tuple[Tensor, Tensor]:
    """(u, sqrt(v_hat)) of parameter ``p`` in float64: u = m_hat / (sqrt(v_hat) + eps), the
    per-coordinate direction of Adam's next (or just taken) step, from the optimizer's moments."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    state = optimizer.state.get(p, {})
    m = state.get("exp_avg", torch.zeros_like(p))
    v = state.get("exp_avg_sq", torch.zeros_like(p))
    s = max(1, int(state.get("step", 1)))
    (beta1, beta2), eps = group["betas"], group["eps"]
    sqrt_v_hat = (v.double() / (1 - beta2**s)).sqrt()
    return (m.double() / (1 - beta1**s)) / (sqrt_v_hat + eps), sqrt_v_hat


def bimodality_coefficient(values: Tensor) -> float:
    """Sarle's b = (skewness^2 + 1) / kurtosis: 1/3 for a normal, 5/9 for a uniform, toward 1 for
    two separated modes (e.g. Adam updates piling up at +-1)."""
    x = values.reshape(-1).double()
    x = x[torch.isfinite(x)]
    if x.numel() < 4:
        return math.nan
    centred = x - x.mean()
    var = centred.pow(2).mean()
    if var <= 0:
        return math.nan
    skew = centred.pow(3).mean() / var.pow(1.5)
    kurt = centred.pow(4).mean() / var.pow(2)
    return float((skew**2 + 1) / kurt)


# ============================================================================================
# The trajectory
# ============================================================================================
@dataclass
class EdgeStep:
    """One measured step, before its update (see the module doc for each quantity)."""

    step: int
    lr: float  # the base LR eta of the step (schedule x peak)
    loss: float  # cross-entropy of the step's batch, as the trainer computes it
    grad_norm: float  # global norm before clipping
    sharpness: float  # lambda_max(H)
    gd_threshold: float  # 2 / eta
    gd_ratio: float
    preconditioned: float  # lambda_max(P^-1 H)
    adam_threshold: float  # (2 + 2 beta1) / ((1 - beta1) eta)
    adam_ratio: float
    update_bimodality: float  # Sarle's coefficient of m_hat / (sqrt(v_hat) + eps), pooled
    update_cosine: float  # cos(theta_{t+1} - theta_t, -g_t)
    recorded_loss: Optional[float] = None  # the loss the run recorded for this step, if in the kit


@dataclass
class EdgeTrajectory:
    kit: str
    spike_step: int
    trigger: str
    start_step: int  # the kit's "before" state: the first replayed step
    beta1: float
    iterations: int  # Hessian-vector products per eigenvalue
    every: int
    steps: list[EdgeStep] = field(default_factory=list)
    # whose loss the eigenvalues are of: 0 = each step's own batch; N = the run's first N held-out
    # batches, one fixed sample for every step (a stand-in for Cohen et al.'s full-batch loss)
    sharpness_batches: int = 0
    mask_unseen: bool = False  # coordinates with v = 0 left out of P^-1 H

    @property
    def replays_run(self) -> bool:
        """Whether the replayed losses equal the recorded ones (bit for bit) wherever the kit
        recorded them: false when the run's remedy acted in the window (it is off here), or
        for a replay on another device than the run's."""
        pairs = [(s.loss, s.recorded_loss) for s in self.steps if s.recorded_loss is not None]
        return all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in pairs)

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "replays_run": self.replays_run,
            "first_crossing": first_crossing(self).to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EdgeTrajectory":
        names = {f.name for f in dataclasses.fields(cls)} - {"steps"}
        return cls(**{k: data[k] for k in names if k in data}, steps=[EdgeStep(**s) for s in data["steps"]])


def edge_trajectory(
    kit: Kit | str | Path,
    device: str = "cpu",
    iterations: int = 20,
    every: int = 1,
    sharpness_batches: int = 0,
    mask_unseen: bool = False,
) -> EdgeTrajectory:
    """Replay ``kit`` from its "before" state through its spike step, measuring every ``every``-th
    step (counted from the first; the spike step always) before its update: the quantities of the
    module doc. The replay is the trainer's own step without the run's remedy (``use_remedy=False``:
    the unprotected trajectory; gradients are still clipped at ``optim.grad_clip``), so on CPU it
    repeats a remedy-free run bit for bit (``replays_run``). Costs two Lanczos runs of
    ``iterations`` Hessian-vector products per measured step. A step whose loss or gradient is not
    finite gets NaN curvature (nothing to differentiate).

    ``sharpness_batches`` = N > 0 takes both eigenvalues of the loss over the run's first N held-out
    batches (:func:`proxy.forensics.replay.held_out_batch`), the same sample at every step, instead of
    the step's own batch: N times the cost of each Hessian-vector product. ``mask_unseen`` leaves
    the coordinates Adam has never had a gradient for (v = 0) out of the preconditioned operator
    (:func:`proxy.forensics.curvature.adam_preconditioner`)."""
    kit = kit if isinstance(kit, Kit) else load_kit(kit)
    if iterations < 1 or every < 1 or sharpness_batches < 0:
        raise ValueError(
            f"edge_trajectory: need iterations >= 1, every >= 1 and sharpness_batches >= 0, got "
            f"{iterations}, {every}, {sharpness_batches}"
        )
    fixed = held_out_batch(kit, sharpness_batches) if sharpness_batches else None
    t = restore(kit, "before", device)
    start, spike = t.step, kit.step
    steps = [s for s in kit.steps if start <= s <= spike]
    if steps != list(range(start, spike + 1)):
        raise KitError(f"{kit.path}: the batches of steps {start}..{spike} are not all in the kit")
    cfg = kit.config
    reference = restore(kit, "before", device, cfg=reference_config(cfg)).model
    params = list(t.model.parameters())
    traj = EdgeTrajectory(
        kit=str(kit.path),
        spike_step=spike,
        trigger=kit.trigger,
        start_step=start,
        beta1=cfg.optim.beta1,
        iterations=iterations,
        every=every,
        sharpness_batches=sharpness_batches,
        mask_unseen=mask_unseen,
    )
    for step in steps:
        x, y = kit.batch(step)
        if (step - start) % every and step != spike:
            trainer_step(t, x, y, use_remedy=False)
            continue
        r = trainer_step(t, x, y, use_remedy=False, apply=False)
        grad = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        before = _flat(params)
        reference.load_state_dict(t.model.state_dict())  # theta_t, before the update
        # the rest of TrainStep.apply for a step without a remedy event: the update, zeroed grads
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.step += 1
        update = _flat(params) - before
        directions = [adam_direction(t.optimizer, p) for p in params]
        pooled = torch.cat([u[sv > 0] for u, sv in directions])  # coordinates Adam has seen
        bounds = curvature.stability_thresholds(r.lr, traj.beta1)
        finite = math.isfinite(r.loss) and math.isfinite(r.grad_norm)
        if finite:
            precond = curvature.adam_preconditioner(t.optimizer, params, mask_unseen)  # P_t: v_t holds g_t
            sh = batch_sharpness(reference, cfg, *(fixed if fixed is not None else (x, y)), precond, r.lr, iterations)
            plain, adam = sh.sharpness, sh.preconditioned
        else:
            plain = adam = math.nan
        recorded = kit.recorded(step)
        traj.steps.append(
            EdgeStep(
                step=step,
                lr=r.lr,
                loss=r.loss,
                grad_norm=r.grad_norm,
                sharpness=plain,
                gd_threshold=bounds["gd"],
                gd_ratio=plain / bounds["gd"],
                preconditioned=adam,
                adam_threshold=bounds["adam"],
                adam_ratio=adam / bounds["adam"],
                update_bimodality=bimodality_coefficient(pooled),
                update_cosine=_cosine(update, -grad),
                recorded_loss=float(recorded["loss"]) if recorded is not None else None,
            )
        )
    return traj


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) in [-1, 1]; NaN when either is zero or not finite."""
    na, nb = a.norm(), b.norm()
    if not (torch.isfinite(na) and torch.isfinite(nb)) or na == 0 or nb == 0:
        return math.nan
    return float((torch.dot(a, b) / (na * nb)).clamp(-1.0, 1.0))


# ============================================================================================
# First crossings
# ============================================================================================
@dataclass
class Crossing:
    step: Optional[int]  # the first measured step with ratio >= 1; None if never
    steps_before: Optional[int]  # spike step - that step (0: at the spike itself)
    # already >= 1 at the first measured step: the crossing, if there was one, came before the
    # window (left-censored), so "how long before the spike" is a lower bound, not a measurement
    at_start: bool = False


@dataclass
class FirstCrossing:
    spike_step: int
    gd: Crossing  # lambda_max(H) / (2/eta)
    adam: Crossing  # lambda_max(P^-1 H) / (38/eta at beta1 = 0.9)
    max_gd_ratio: float
    max_adam_ratio: float

    @property
    def adam_before_spike(self) -> bool:
        """The preconditioned ratio reached 1 at a step before the spike step (strictly)."""
        return self.adam.step is not None and self.adam.step < self.spike_step

    @property
    def adam_first(self) -> bool:
        """The preconditioned ratio reached 1, and strictly before the plain one did (or the
        plain one never did)."""
        return self.adam.step is not None and (self.gd.step is None or self.adam.step < self.gd.step)

    @property
    def adam_crossed_in_window(self) -> bool:
        """The preconditioned ratio started the window below 1 and reached it strictly before the
        spike step: a crossing seen happening, not one inherited from before the window."""
        return self.adam_before_spike and not self.adam.at_start

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "adam_before_spike": self.adam_before_spike,
            "adam_first": self.adam_first,
            "adam_crossed_in_window": self.adam_crossed_in_window,
        }


def first_crossing(traj: EdgeTrajectory) -> FirstCrossing:
    """For each ratio, the first measured step where it is >= 1 and how many steps before the
    spike that is. The spike step's row is measured at the weights the spike's loss was computed
    at, so a crossing there counts as "at the spike" (steps_before 0), not before it."""

    def first(key: str) -> Crossing:
        step = next((s.step for s in traj.steps if getattr(s, key) >= 1.0), None)  # NaN never is
        at_start = step is not None and step == traj.steps[0].step
        return Crossing(step, None if step is None else traj.spike_step - step, at_start)

    def peak(key: str) -> float:
        return max((getattr(s, key) for s in traj.steps if math.isfinite(getattr(s, key))), default=math.nan)

    return FirstCrossing(traj.spike_step, first("gd_ratio"), first("adam_ratio"), peak("gd_ratio"), peak("adam_ratio"))


# ============================================================================================
# In a kit's report (proxy-inspect --edge)
# ============================================================================================
def _g(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def sharpness_loss(sharpness_batches: int) -> str:
    """Whose loss a trajectory's eigenvalues are of, in words (see EdgeTrajectory.sharpness_batches)."""
    if not sharpness_batches:
        return "the step's batch loss"
    return (
        f"the loss over the run's first {sharpness_batches} held-out batches, one fixed sample at every "
        "step, standing in for the full-data loss"
    )


def crossing_line(traj: EdgeTrajectory) -> str:
    """One line: where each ratio first reached 1, relative to the spike."""
    fc = first_crossing(traj)

    def said(c: Crossing) -> str:
        if c.step is None:
            return "never"
        censored = ", already at the first measured step" if c.at_start else ""
        return f"step {c.step} ({c.steps_before} before the spike{censored})"

    bound = (2 + 2 * traj.beta1) / (1 - traj.beta1)
    return (
        f"edge of stability: λmax(P⁻¹H)/({bound:.3g}/η) first ≥ 1 {said(fc.adam)}, max "
        f"{_g(fc.max_adam_ratio)}; λmax(H)/(2/η) first ≥ 1 {said(fc.gd)}, max {_g(fc.max_gd_ratio)}"
    )


def edge_section(traj: EdgeTrajectory) -> list[Block]:
    """The report section: how the trajectory was measured, then one row per measured step."""
    bound = (2 + 2 * traj.beta1) / (1 - traj.beta1)
    md: list[Block] = [
        Heading(f"Adam's edge of stability before the spike (steps {traj.start_step}–{traj.spike_step})"),
        Paragraph(
            f"Replayed from the pre-spike state without the run's remedy; at each step, before its "
            f"update: λmax(H) / (2/η) and λmax(P⁻¹H) / ({bound:.3g}/η) (Cohen et al. 2022; P = "
            f"diag(√v̂+ε)/lr_scale with v already holding the step's gradient, the preconditioner of "
            f"this update), Lanczos with {traj.iterations} products on "
            f"{sharpness_loss(traj.sharpness_batches)}; BC = "
            "bimodality coefficient of m̂/(√v̂+ε) pooled over all coordinates (1/3 normal, 5/9 "
            "uniform, → 1 bimodal: Molybog et al. 2023); cos = cos(applied update, −gradient). "
            + (
                "The replay repeats the run's losses bit for bit."
                if traj.replays_run
                else "The replay departs from the run's recorded losses (its remedy acted, or another "
                "device): it is the unprotected trajectory from the same state."
            )
        ),
        Paragraph(crossing_line(traj)),
    ]
    rows = [
        [
            s.step,
            _g(s.lr),
            _g(s.loss),
            _g(s.grad_norm),
            _g(s.sharpness),
            _g(s.gd_ratio),
            _g(s.preconditioned),
            _g(s.adam_ratio),
            _g(s.update_bimodality),
            _g(s.update_cosine),
        ]
        for s in traj.steps
    ]
    header = ["step", "η", "loss", "‖g‖", "λmax(H)", "÷ 2/η", "λmax(P⁻¹H)", f"÷ {bound:.3g}/η", "BC", "cos"]
    return md + [Table(header, rows)]


def edge_figure(traj: EdgeTrajectory):
    """Top: the two ratios on a log axis, the line at 1, the spike step marked; bottom: the
    update's bimodality coefficient and cos(update, -gradient). Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [s.step for s in traj.steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    bound = (2 + 2 * traj.beta1) / (1 - traj.beta1)
    hidden = 0
    for key, label, style in (
        ("gd_ratio", "λmax(H) / (2/η)", "o-"),
        ("adam_ratio", f"λmax(P⁻¹H) / ({bound:.3g}/η)", "s-"),
    ):
        values = [v if v > 0 else math.nan for v in (getattr(s, key) for s in traj.steps)]  # log axis
        hidden += sum(getattr(s, key) <= 0 for s in traj.steps)
        top.plot(steps, values, style, ms=4, label=label)
    top.set_yscale("log")
    if hidden:  # a top Ritz value <= 0: Lanczos far from converged, or a step with no convex direction
        top.text(0.01, 0.02, f"{hidden} ratios <= 0 not shown (log axis)", transform=top.transAxes, fontsize=7)
    top.axhline(1.0, color="red", ls=":", lw=1, label="threshold")
    bottom.plot(steps, [s.update_bimodality for s in traj.steps], "o-", ms=4, label="BC of m̂/(√v̂+ε)")
    bottom.plot(steps, [s.update_cosine for s in traj.steps], "s-", ms=4, label="cos(update, −g)")
    bottom.axhline(5 / 9, color="grey", ls=":", lw=1, label="BC 5/9")
    bottom.axhline(0.0, color="black", lw=0.5)
    for ax in (top, bottom):
        ax.axvline(traj.spike_step, color="grey", ls="--", lw=1)
        ax.legend(fontsize=7)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel(f"step (spike at {traj.spike_step}, dashed)")
    top.set_title("Edge of stability before the spike", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = [
    "FIGURE",
    "Crossing",
    "EdgeStep",
    "EdgeTrajectory",
    "FirstCrossing",
    "adam_direction",
    "batch_sharpness",
    "bimodality_coefficient",
    "crossing_line",
    "edge_figure",
    "edge_section",
    "edge_trajectory",
    "first_crossing",
    "reference_config",
]
