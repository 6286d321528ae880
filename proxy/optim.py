"""AdamW with coupled or independent weight decay, per-layer LR scales, LR schedules, clipping.

Why our own AdamW and not ``torch.optim.AdamW``: Wortsman et al. (2023) find that *independent*
weight decay (the decay follows the LR schedule but not the LR size) lowers LR sensitivity, and
torch only offers the coupled form. In coupled mode this optimizer is the same arithmetic as
torch's, op for op, so the two agree to the last bit on CPU in fp32.

The LR of every parameter group is ``peak_lr * lr_scale * multiplier``:

- ``peak_lr``    the base peak LR (``optim.lr``), the same for every group;
- ``lr_scale``   muParam (simple): ``base_fan_in / fan_in`` for each linear weight matrix,
                 1.0 for everything else (and for everything when muP is off);
- ``multiplier`` the schedule at this step, in [0, 1] (:func:`schedule_multiplier`).

The trainer calls ``apply_lr(optimizer, schedule_multiplier(step, total, cfg))`` before each step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Protocol, overload

import torch
from torch import Tensor, nn

from proxy.config import Cooldown, OptimConfig, Schedule, ScheduleConfig, WeightDecayMode

DECAY_MODES = tuple(m.value for m in WeightDecayMode)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------
class AdamW(torch.optim.Optimizer):
    """Adam with bias-corrected moments and one of two weight-decay forms.

    With ``a`` the Adam direction ``m_hat / (sqrt(v_hat) + eps)`` and ``lr`` the group's LR::

        coupled      theta <- theta - lr * (a + wd * theta)                 (torch.optim.AdamW)
        independent  theta <- theta - lr * a - (lr / (peak_lr * lr_scale)) * wd * theta

    ``lr / (peak_lr * lr_scale)`` is the schedule multiplier, so independent decay shrinks the
    weights by ``wd`` per step at the schedule's peak whatever the LR or the muP scale: this is
    θ ← θ − s_t(ηΔ + λθ) of Wortsman et al. (2023), with λ ~1e-4 where coupled uses ~0.1.

    State per parameter: ``step`` (a Python int), ``exp_avg``, ``exp_avg_sq``. Each group holds
    ``lr``, ``betas``, ``eps``, ``weight_decay``, ``weight_decay_mode`` ('coupled' or
    'independent', a string so checkpoints load with ``weights_only=True``), ``peak_lr`` and
    ``lr_scale``. Parameters without a gradient are left alone, as in torch.

    ``step(skip=flag)``, ``flag`` a 0-dim bool on the device (skip-step decided there): the step
    is taken, or left out as if ``step()`` had not been called (parameters, moments and step
    count as they were), without the host reading the flag. The skipped steps are counted on
    the device and the bias corrections looked up by the device's count from tables of the very
    floats ``step()`` computes, so a step that goes ahead is the bits ``step()`` gives on a CPU
    (fp32; tested), and a skipped one changes nothing but the sign of a zero weight. On a GPU the
    plain step's fused kernels may round in another order (``s * (m / d)`` against ``(s * m) / d``):
    the last bits, so a run keeps to one path (skip-step: the masked one, read or not). The count
    is folded into ``state["step"]`` when the state is read (``state_dict``) or a plain
    ``step()`` follows.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        weight_decay_mode: str | WeightDecayMode = "coupled",
        update_clip: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_mode=_mode_name(weight_decay_mode),
            lr_scale=1.0,
            update_clip=bool(update_clip),
        )
        super().__init__(params, defaults)
        # RMS_t of each parameter's last step (a 0-dim tensor, id(param) -> value), measured when
        # ``measure_rms`` is set (the trainer's logging steps) or update clipping needs it
        self.measure_rms = False
        self.last_rms: dict[int, Tensor] = {}
        self._skipped: Optional[Tensor] = None  # steps skipped on the device, not yet in state["step"]
        self._bias_table = BiasTable()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group's peak LR defaults to its own starting LR, so AdamW(params, lr=x) alone works.
        param_group.setdefault("peak_lr", param_group.get("lr", self.defaults["lr"]))
        if "weight_decay_mode" in param_group:
            param_group["weight_decay_mode"] = _mode_name(param_group["weight_decay_mode"])
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # the overloads torch.optim.Optimizer.step declares: a closure's loss is returned as given
    @overload
    def step(self, closure: None = None, *, skip: Optional[Tensor] = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], *, skip: Optional[Tensor] = None) -> float: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *, skip: Optional[Tensor] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if skip is None:
            self._fold_skipped()
        for group in self.param_groups:
            self._update_group(group, skip)
        if skip is not None:
            skipped = skip.to(torch.int64)
            self._skipped = skipped if self._skipped is None else self._skipped + skipped
        return loss

    def _fold_skipped(self) -> None:
        """Subtract the steps skipped on the device from every ``state["step"]`` (reads the device)."""
        if self._skipped is None:
            return
        skipped, self._skipped = int(self._skipped), None
        if skipped:
            for state in self.state.values():
                if "step" in state:
                    state["step"] -= skipped

    def state_dict(self) -> dict[str, Any]:
        self._fold_skipped()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skipped = None
        super().load_state_dict(state_dict)

    def _update_group(self, group: dict[str, Any], skip: Optional[Tensor] = None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                if skip is not None and self.state.get(p):
                    # the device's skip count is one for all: every stepping parameter must step
                    raise RuntimeError("proxy.optim.AdamW.step(skip=...): a parameter with state has no gradient")
                continue
            if p.grad.is_sparse:
                raise RuntimeError("proxy.optim.AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                # the skips counted so far are not this parameter's: fold them first (a read-back,
                # when a parameter gets its first gradient after a skip decided on the device)
                self._fold_skipped()
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        if skip is not None:
            self._masked_update(group, skip, params, grads, exp_avgs, exp_avg_sqs, steps)
            return

        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        wd = group["weight_decay"]
        if wd != 0:  # decay first: it uses theta before the update, as the formulas above
            if group["weight_decay_mode"] == "coupled":
                decay = lr * wd
            else:
                decay = lr / (group["peak_lr"] * group["lr_scale"]) * wd
            torch._foreach_mul_(params, 1 - decay)

        # m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

        clip = bool(group.get("update_clip", False))
        rms = self._rms(params, grads, exp_avg_sqs, steps, beta2, eps) if clip or self.measure_rms else []

        # theta <- theta - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps): the same order of
        # operations as torch.optim.AdamW, which is what makes the two agree bitwise
        neg_step_sizes = [-(lr / (1 - beta1**s)) for s in steps]
        bc2_sqrts = [(1 - beta2**s) ** 0.5 for s in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, bc2_sqrts)
        torch._foreach_add_(denoms, eps)
        if clip:  # StableAdamW: the step's LR over max(1, RMS_t), per tensor (no host sync)
            for denom, r in zip(denoms, rms):
                denom.mul_(r.clamp(min=1.0))
        torch._foreach_addcdiv_(params, exp_avgs, denoms, neg_step_sizes)

    def _masked_update(
        self,
        group: dict[str, Any],
        skip: Tensor,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[int],
    ) -> None:
        """:meth:`_update_group`'s arithmetic with every scalar a device tensor that ``skip``
        turns into a no-op: a skipped step's gradient is zeroed (it may be non-finite), its
        decay factor and beta2 are 1, its lerp weight and step size 0. Each scalar is the float
        the plain path passes (a double rounded to the tensor's dtype), so a step that goes
        ahead is the same arithmetic, op for op."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        device, dtype = params[0].device, params[0].dtype
        if any(s != steps[0] for s in steps):
            raise RuntimeError("proxy.optim.AdamW.step(skip=...): the parameters of a group differ in step count")
        bias1, bias2, bias2_sqrt = self._bias_corrections(beta1, beta2, device, steps[0])

        def scalar(value: Tensor | float) -> Tensor:  # a double, rounded to the parameters' dtype
            t = value if isinstance(value, Tensor) else torch.full((), value, dtype=torch.float64, device=device)
            return t.to(dtype)

        one, zero = torch.ones((), dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device)
        for g in grads:
            g.masked_fill_(skip, 0.0)
        wd = group["weight_decay"]
        if wd != 0:
            if group["weight_decay_mode"] == "coupled":
                decay = lr * wd
            else:
                decay = lr / (group["peak_lr"] * group["lr_scale"]) * wd
            torch._foreach_mul_(params, torch.where(skip, one, scalar(1 - decay)))
        weight = torch.where(skip, zero, scalar(1 - beta1))
        for m, g in zip(exp_avgs, grads):
            m.lerp_(g, weight)
        torch._foreach_mul_(exp_avg_sqs, torch.where(skip, one, scalar(beta2)))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)  # + 0 where skipped

        clip = bool(group.get("update_clip", False))
        rms = (
            self._rms(params, grads, exp_avg_sqs, [], beta2, eps, bias2=bias2, skip=skip)
            if clip or self.measure_rms
            else []
        )

        # lr / bc1 in float64 on the device is the host's division (IEEE), then rounded as the host's is
        lr_t = torch.full((), lr, dtype=torch.float64, device=device)
        neg_step = torch.where(skip, zero, scalar(-(lr_t / bias1)))
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, scalar(bias2_sqrt))
        torch._foreach_add_(denoms, eps)
        if clip:
            for denom, r in zip(denoms, rms):
                denom.mul_(r.clamp(min=1.0))
        # (step * m) / denom: the order of addcdiv's value * t1 / t2 in the plain path
        torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, neg_step), denoms)

    def _bias_corrections(self, beta1: float, beta2: float, device: torch.device, step: int) -> tuple[Tensor, ...]:
        """``1 - beta1**c``, ``1 - beta2**c`` and its square root for this step's count ``c`` (the
        host's count less the skips on the device, at least 1), float64 0-dim on the device. No sync."""
        count = torch.full((1,), step, dtype=torch.int64, device=device)
        if self._skipped is not None:
            count = (count - self._skipped).clamp(min=1)
        row = self._bias_table.rows(beta1, beta2, count, step)[0]
        return row[0], row[1], row[2]

    def _rms(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[int],
        beta2: float,
        eps: float,
        bias2: Optional[Tensor] = None,
        skip: Optional[Tensor] = None,
    ) -> list[Tensor]:
        """RMS_t = sqrt(mean(g^2 / v_hat)) per tensor, v_hat the bias-corrected second moment after
        this step's update, floored at eps^2 (Wortsman et al. 2023b, StableAdamW): far above 1
        when the gradient outgrew what Adam's second moment has seen. The masked step passes its
        ``bias2`` (a device tensor) and ``skip``: a skipped step keeps the last measured RMS_t."""
        if bias2 is None:
            v_hat = torch._foreach_div(exp_avg_sqs, [1 - beta2**s for s in steps])
        else:
            v_hat = torch._foreach_div(exp_avg_sqs, bias2.to(exp_avg_sqs[0].dtype))
        torch._foreach_clamp_min_(v_hat, eps * eps)
        ratio = torch._foreach_mul(grads, grads)
        torch._foreach_div_(ratio, v_hat)
        rms = [r.float().mean().sqrt() for r in ratio]
        for p, r in zip(params, rms):
            last = self.last_rms.get(id(p))
            self.last_rms[id(p)] = r if skip is None or last is None else torch.where(skip, last, r)
        return rms


class BiasTable:
    """Adam's bias corrections by step count, for counts only the device knows (a skip decided
    there): rows ``[1 - beta1**c, 1 - beta2**c, (1 - beta2**c) ** 0.5]`` filled on the host with
    the very doubles the plain step computes, looked up on the device. Grown by doubling (a copy
    to the device now and then, from pinned memory on a GPU)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[float, float, torch.device], Tensor] = {}

    def rows(self, beta1: float, beta2: float, counts: Tensor, max_count: int) -> Tensor:
        """``(len(counts), 3)`` float64 on ``counts``' device; ``max_count`` bounds the counts."""
        key = (beta1, beta2, counts.device)
        table = self._tables.get(key)
        if table is None or max_count >= table.shape[0]:
            size = max(1024, 2 * max_count)
            host = torch.tensor(
                [[1 - beta1**c, 1 - beta2**c, (1 - beta2**c) ** 0.5] for c in range(size)], dtype=torch.float64
            )
            cuda = counts.device.type == "cuda"
            table = host.pin_memory().to(counts.device, non_blocking=True) if cuda else host.to(counts.device)
            self._tables[key] = table
        return table.index_select(0, counts)


def _mode_name(mode: str | WeightDecayMode) -> str:
    name = mode.value if isinstance(mode, WeightDecayMode) else str(mode)
    if name not in DECAY_MODES:
        raise ValueError(f"weight_decay_mode={name!r} must be one of {', '.join(DECAY_MODES)}")
    return name


def _check_group(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    checks = (
        (group["lr"] >= 0, "lr", group["lr"], ">= 0"),
        (group["peak_lr"] > 0, "peak_lr", group["peak_lr"], "> 0"),
        (group["lr_scale"] > 0, "lr_scale", group["lr_scale"], "> 0"),
        (group["eps"] > 0, "eps", group["eps"], "> 0"),
        (group["weight_decay"] >= 0, "weight_decay", group["weight_decay"], ">= 0"),
        (0.0 <= beta1 < 1.0, "beta1", beta1, "in [0, 1)"),
        (0.0 <= beta2 < 1.0, "beta2", beta2, "in [0, 1)"),
    )
    for ok, key, value, bound in checks:
        if not ok:
            raise ValueError(f"AdamW {key}={value} must be {bound}")


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------
def _param_roles(model: nn.Module) -> dict[int, tuple[str, str, nn.Parameter]]:
    """Each trainable parameter once: id -> (name, role, parameter).

    Roles: ``embedding`` (owned by an nn.Embedding), ``linear`` (an nn.Linear weight), ``gain``
    (any 1-D parameter: norm weights, QK-norm weights, biases if a model had them), ``other``
    (a matrix that is neither; decayed, never LR-scaled). A weight tied between the embedding and
    the LM head is an embedding: it keeps lr_scale 1 and follows ``decay_embeddings``.
    """
    priority = {"embedding": 0, "linear": 1, "gain": 2, "other": 3}
    roles: dict[int, tuple[str, str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, nn.Embedding):
                role = "embedding"
            elif isinstance(module, nn.Linear) and param_name == "weight":
                role = "linear"
            elif p.ndim <= 1:
                role = "gain"
            else:
                role = "other"
            name = f"{module_name}.{param_name}" if module_name else param_name
            seen = roles.get(id(p))
            if seen is None or priority[role] < priority[seen[1]]:
                roles[id(p)] = (name, role, p)
    return roles


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    """AdamW over ``model`` with one group per (decayed?, lr_scale) pair.

    Groups carry ``name`` (e.g. ``decay`` or ``decay/lr_x0.25``), ``param_names``, ``lr_scale``
    and ``peak_lr = cfg.lr``. Embeddings skip decay unless ``cfg.decay_embeddings``; 1-D gains
    (norm and QK-norm weights) skip it unless ``cfg.decay_norms``. With ``cfg.mup`` each linear
    weight's LR is scaled by ``cfg.mup_base_fan_in / fan_in`` (fan_in = weight.shape[1]), the
    LM head included; embeddings and gains keep 1.0.
    """
    if cfg.mup and cfg.mup_base_fan_in <= 0:
        raise ValueError(f"optim.mup_base_fan_in={cfg.mup_base_fan_in} must be > 0")
    groups: dict[tuple[bool, float], list[tuple[str, nn.Parameter]]] = defaultdict(list)
    for name, role, p in _param_roles(model).values():
        decay = {
            "embedding": cfg.decay_embeddings,
            "gain": cfg.decay_norms,
        }.get(role, True)
        lr_scale = cfg.mup_base_fan_in / p.shape[1] if cfg.mup and role == "linear" else 1.0
        groups[(decay, lr_scale)].append((name, p))
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")

    param_groups = []
    for (decay, lr_scale), named in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        label = "decay" if decay else "no_decay"
        param_groups.append(
            {
                "name": label if lr_scale == 1.0 else f"{label}/lr_x{lr_scale:g}",
                "params": named,  # (name, param) pairs: torch records them as 'param_names'
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": lr_scale,
                "peak_lr": cfg.lr,
                "lr": cfg.lr * lr_scale,
            }
        )
    return AdamW(
        param_groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        weight_decay_mode=cfg.weight_decay_mode,
        update_clip=cfg.update_clip,
    )


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def schedule_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The LR multiplier in [0, 1] for the update at 0-based ``step`` of ``total_steps``.

    Warmup is linear and never wastes a step on LR 0: ``(step + 1) / warmup_steps`` reaches 1.0
    at ``step = warmup_steps - 1`` and stays there at ``step = warmup_steps``. After warmup, with
    ``p`` the progress from ``warmup_steps`` (0) to ``total_steps`` (1) and ``m = min_lr_ratio``:

    - cosine:   m + (1 - m) * (1 + cos(pi p)) / 2
    - linear:   m + (1 - m) * (1 - p)
    - constant: 1
    - wsd:      1 until the cooldown, which covers the last ``decay_fraction`` of ``total_steps``
                (never the warmup); with q its progress, linear ``m + (1 - m)(1 - q)`` or sqrt
                ``m + (1 - m)(1 - sqrt(q))`` (Hägele et al. 2024: 1 - sqrt beats linear).

    Each shape reaches ``m`` at ``step = total_steps`` (the last update, ``total_steps - 1``, is
    one step short of it); steps past the end stay at the final value.
    """
    if total_steps <= 0:
        raise ValueError(f"schedule: total_steps={total_steps} must be > 0")
    if step < 0:
        raise ValueError(f"schedule: step={step} must be >= 0")
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    name = Schedule(cfg.name)
    if name == Schedule.constant:
        return 1.0
    if name == Schedule.wsd:
        cooldown_start = max(warmup, total_steps - round(cfg.decay_fraction * total_steps))
        if step < cooldown_start:
            return 1.0
        q = _progress(step, cooldown_start, total_steps)
        shape = 1.0 - math.sqrt(q) if Cooldown(cfg.cooldown) == Cooldown.sqrt else 1.0 - q
        return floor + (1.0 - floor) * shape
    p = _progress(step, warmup, total_steps)
    if name == Schedule.cosine:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    return floor + (1.0 - floor) * (1.0 - p)  # linear


def _progress(step: int, start: int, end: int) -> float:
    """Where ``step`` lies between ``start`` (0) and ``end`` (1), clamped; an empty span is done."""
    if end <= start:
        return 1.0
    return min(1.0, (step - start) / (end - start))


def apply_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Set each group's ``lr = peak_lr * lr_scale * multiplier``; return the base LR (``peak_lr *
    multiplier``, the number to log as ``optim/lr``)."""
    base = None
    for group in optimizer.param_groups:
        if "peak_lr" not in group:
            raise ValueError("apply_lr: a param group has no 'peak_lr'; use build_optimizer")
        group["lr"] = group["peak_lr"] * group.get("lr_scale", 1.0) * multiplier
        if base is None:
            base = group["peak_lr"] * multiplier
    return float(base) if base is not None else 0.0


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------
def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (0: measure only).

    Returns the norm *before* clipping as a 0-dim fp32 tensor; nothing here syncs with the device,
    so the caller decides when to pay for ``.item()``. Same arithmetic as
    ``torch.nn.utils.clip_grad_norm_`` (scale = min(1, max_norm / (norm + 1e-6))).
    """
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm: max_norm={max_norm} must be >= 0")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    per_tensor = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in per_tensor])).float()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
    return total


class HasGrad(Protocol):
    """What scale_grads (and a remedy) uses of a parameter: its gradient, if any. A tensor, or a
    stand-in holding a view of one (a sweep member's slice of a stacked parameter)."""

    @property
    def grad(self) -> Optional[Tensor]: ...


def scale_grads(params: Iterable[HasGrad], factor: float | Tensor) -> None:
    """Multiply every gradient by ``factor`` in place (used by the ZClip remedy). A tensor factor
    (0-dim, on the gradients' device: no sync) is rounded to each gradient's dtype first: for the
    fp32 / fp64 gradients proxy trains with, the bits a Python number gives (tests/test_optim.py)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not isinstance(factor, Tensor):
        if grads:
            torch._foreach_mul_(grads, factor)
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, factor.to(dtype))


__all__ = [
    "AdamW",
    "apply_lr",
    "build_optimizer",
    "clip_grad_norm",
    "scale_grads",
    "schedule_multiplier",
]
