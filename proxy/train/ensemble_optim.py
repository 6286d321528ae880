"""AdamW and gradient clipping over member-stacked parameters (the optimizer of proxy/train/ensemble.py).

Every tensor here carries the ensemble's members along dim 0: a parameter of shape ``(out, in)``
in a standalone run is ``(K, out, in)`` here, and so are its gradient and Adam moments. What
differs between members (peak LR, weight decay, whether the member is still training) lives in
``(K,)`` vectors that broadcast as ``(K, 1, ..., 1)``.

The arithmetic is proxy.optim.AdamW's, op for op, with the per-member scalars computed in Python
doubles exactly as the standalone optimizer computes them. Given the same gradients a member's
update is the standalone update to the last bit, so an ensemble member follows the standalone run
with the same LR and seed up to the rounding of batched matmuls.

A frozen (diverged) member must not move and must not poison the others: its gradients are
replaced by zeros with a masked fill (a NaN times zero is still NaN, so never a multiplication),
its LR is 0 and its decay factor 1, so ``theta + 0 * m / denom`` leaves it exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from proxy.config import OptimConfig, WeightDecayMode
from proxy.optim import BiasTable, build_optimizer
from proxy.train.runtime import values_on


@dataclass(frozen=True)
class ParamRule:
    """How the optimizer treats one parameter: decayed or not, and its muP LR scale."""

    decay: bool
    lr_scale: float


def param_rules(model: nn.Module, cfg: OptimConfig) -> dict[str, ParamRule]:
    """Each parameter's rule, read off ``build_optimizer``'s groups so the two never disagree.

    Groups are named ``decay``, ``no_decay`` or ``<that>/lr_x<scale>`` (proxy.optim); a sweep over
    weight decay needs the decay flag even where ``cfg.weight_decay`` is 0.
    """
    rules = {}
    for group in build_optimizer(model, cfg).param_groups:
        rule = ParamRule(decay=group["name"].split("/")[0] == "decay", lr_scale=group["lr_scale"])
        for name in group["param_names"]:
            rules[name] = rule
    return rules


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of ``t``'s dims is contiguous."""
    order = sorted(range(t.ndim), key=lambda d: t.stride()[d], reverse=True)
    return t.permute(order).is_contiguous()


def as_member_column(values: Tensor, ndim: int) -> Tensor:
    """A ``(K,)`` vector shaped ``(K, 1, ..., 1)`` to broadcast against a ``ndim``-dim stack."""
    return values.view(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------
def member_grad_norms(grads: Sequence[Tensor]) -> Tensor:
    """Each member's global gradient L2 norm, fp32 ``(K,)``: the norm a standalone run clips by.

    One norm per member slice (a single fused call, as proxy.optim.clip_grad_norm does per
    tensor) rather than one reduction over the stack: a reduction's summation order depends on
    the shape it is given, and a member's norm must not depend on how many members there are.
    """
    if not grads:
        raise ValueError("member_grad_norms: no gradients")
    n_members = grads[0].shape[0]
    per_slice = torch._foreach_norm([g[k] for g in grads for k in range(n_members)])
    # (member, tensor), each row contiguous: every member reduces its own norms the same way
    per_tensor = rearrange(torch.stack(per_slice), "(p k) -> k p", k=n_members).contiguous()
    return torch.linalg.vector_norm(per_tensor, dim=1).float()


def clip_members_(grads: Sequence[Tensor], norms: Tensor, max_norm: float | Sequence[float]) -> None:
    """Scale each member's gradients so its global norm is at most its ``max_norm`` (one for all,
    or one per member; 0: that member is not clipped).

    Same arithmetic as proxy.optim.clip_grad_norm: scale = min(1, max_norm / (norm + 1e-6)).
    """
    bounds = [float(max_norm)] * len(norms) if isinstance(max_norm, (int, float)) else [float(m) for m in max_norm]
    if len(bounds) != len(norms) or any(b < 0 for b in bounds):
        raise ValueError(f"clip_members_: max_norm={max_norm} must be >= 0, one for all or one per member")
    if not any(bounds):
        return
    if len(set(bounds)) == 1:
        scale = torch.clamp(bounds[0] / (norms + 1e-6), max=1.0)
    else:
        limit = values_on(bounds, norms.device, norms.dtype)
        scale = torch.where(limit > 0, torch.clamp(limit / (norms + 1e-6), max=1.0), torch.ones_like(norms))
    for g in grads:
        g.mul_(as_member_column(scale, g.ndim))


# --------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------
class StackedAdamW:
    """AdamW for K members at once; member k has its own peak LR, weight decay and step count.

    ``params`` maps names to leaf tensors ``(K, ...)`` whose ``.grad`` the backward pass fills.
    All members share the betas, eps and the decay mode; see proxy.optim.AdamW for the two decay
    forms. A member whose step is skipped (a skip-step remedy) keeps its parameters, moments and
    step count exactly, as a standalone run that skips ``optimizer.step()``. The skips come as
    host flags (``skipped``) or, decided on the device, as a ``(K,)`` bool (``skip_t``) that the
    step obeys without reading it: then every scalar that differs by member is a device vector a
    skip turns into a no-op (proxy.optim.AdamW.step(skip=...)), the skipped steps are counted on
    the device and folded into the step counts when a member's state is read.
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        rules: dict[str, ParamRule],
        peak_lrs: Sequence[float],
        weight_decays: Sequence[float],
        cfg: OptimConfig,
    ):
        if len(peak_lrs) != len(weight_decays):
            raise ValueError(f"StackedAdamW: {len(peak_lrs)} peak LRs but {len(weight_decays)} weight decays")
        missing = sorted(set(params) - set(rules))
        if missing:
            raise ValueError(f"StackedAdamW: no optimizer rule for {', '.join(missing)}")
        gappy = sorted(n for n, p in params.items() if not is_dense(p))
        if gappy:
            raise ValueError(f"StackedAdamW: parameters must be dense (a permuted contiguous layout): {gappy}")
        self.params = params
        self.rules = rules
        self.peak_lrs = [float(v) for v in peak_lrs]
        self.weight_decays = [float(v) for v in weight_decays]
        self.beta1, self.beta2, self.eps = cfg.beta1, cfg.beta2, cfg.eps
        self.coupled = WeightDecayMode(cfg.weight_decay_mode) == WeightDecayMode.coupled
        self.update_clip = bool(cfg.update_clip)  # StableAdamW, per member and tensor (proxy.optim.AdamW)
        self.measure_rms = False
        self.last_rms: dict[str, Tensor] = {}  # (K,) RMS_t of each parameter's last step, where measured
        self.step_counts = [0] * len(self.peak_lrs)  # per member: a skipped step does not count
        self._skipped: Optional[Tensor] = None  # (K,) steps skipped on the device, not yet in step_counts
        self._bias_table = BiasTable()
        # moments keep the parameter's memory layout (proxy/train/ensemble.py may store weights
        # transposed), so every elementwise op below runs on matching strides
        self.exp_avg = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}
        # two scratch tensors for the step's temporaries (the scaled moment and the denominator),
        # reused across parameters and steps: allocating K-times-larger temporaries every step
        # costs more than the arithmetic on a CPU (fresh pages from the OS on every allocation)
        self._scratch_size = max((p.numel() for p in params.values()), default=0)
        self._scratch: Optional[Tensor] = None
        # on a GPU, the update as multi-tensor kernels (launches, not arithmetic, are a small model's
        # cost there); on a CPU, a loop over the stacked tensors (the per-tensor overhead of K x
        # more, smaller tensors would be the cost). The same bits either way (tests).
        first = next(iter(params.values()), None)
        self.foreach = first is not None and first.device.type == "cuda"
        # CUDA's multi-tensor kernels take dense tensors only (else a kernel per tensor): a member's
        # slice is dense where the member dim is outermost in memory; a rule with any other takes the loop
        self._slices_dense = {n: p.shape[0] == 0 or is_dense(p[0]) for n, p in params.items()}
        self._denoms: dict[str, Tensor] = {}  # the foreach update's denominators, kept between steps
        self._view_cache: dict[tuple[str, tuple[str, ...]], list[Tensor]] = {}

    @property
    def n_members(self) -> int:
        return len(self.peak_lrs)

    def lrs(self, name: str, multiplier: float) -> list[float]:
        """Member LRs of parameter ``name`` at a schedule multiplier (proxy.optim.apply_lr's order)."""
        scale = self.rules[name].lr_scale
        return [peak * scale * multiplier for peak in self.peak_lrs]

    @torch.no_grad()
    def step(
        self, multiplier: float, active: Sequence[bool], skipped: Sequence[bool] = (), skip_t: Optional[Tensor] = None
    ) -> None:
        """One AdamW step for the active members that are not ``skipped`` (host flags) nor marked
        in ``skip_t`` (device flags, not read); frozen (inactive) members stay exactly where they
        are, and so do skipped ones, moments and step count too."""
        skipped = list(skipped) or [False] * self.n_members
        if len(active) != self.n_members or len(skipped) != self.n_members:
            raise ValueError(f"StackedAdamW.step: {len(active)} / {len(skipped)} flags for {self.n_members} members")
        if skip_t is not None:
            self._masked_step(multiplier, [a and not s for a, s in zip(active, skipped)], skip_t)
            return
        self._fold_skipped()
        moving = [a and not s for a, s in zip(active, skipped)]
        for k, on in enumerate(moving):
            if on:
                self.step_counts[k] += 1
        # bias corrections: a member that does not move has LR 0, so any finite value serves it; where
        # every moving member has taken as many steps, one scalar serves all (the arithmetic of a
        # sweep whose members never skip, whatever froze)
        moved = {self.step_counts[k] for k, on in enumerate(moving) if on} or {1}
        counts = [c if on and len(moved) > 1 else min(moved) for c, on in zip(self.step_counts, moving)]
        bias1 = [1 - self.beta1**c for c in counts]
        bias2 = [1 - self.beta2**c for c in counts]
        bias2_sqrt = [(1 - self.beta2**c) ** 0.5 for c in counts]
        kept = [k for k, s in enumerate(skipped) if s and active[k]]
        frozen = None
        if not all(moving):
            device = next(iter(self.params.values())).device
            frozen = values_on([not on for on in moving], device)

        for rule, names in self._by_rule().items():
            lrs = [lr if on else 0.0 for lr, on in zip(self.lrs(names[0], multiplier), moving)]
            decay = self._decay_factors(rule, lrs, multiplier, moving)
            neg_steps = [-(lr / b1) for lr, b1 in zip(lrs, bias1)]
            if self.foreach and all(self._slices_dense[n] for n in names):
                self._foreach_rule(names, decay, neg_steps, bias2, bias2_sqrt, frozen, kept)
                continue
            device, dtype = self.params[names[0]].device, self.params[names[0]].dtype
            neg_steps_t = values_on(neg_steps, device, dtype)
            decay_t = values_on(decay, device, dtype) if decay is not None else None
            bias2_t = values_on(bias2_sqrt, device, dtype) if len(set(bias2_sqrt)) > 1 else None
            for name in names:
                p, g = self.params[name], self.params[name].grad
                assert g is not None  # _by_rule holds only the parameters that have a gradient
                m, v = self.exp_avg[name], self.exp_avg_sq[name]
                saved = [(k, m[k].clone(), v[k].clone()) for k in kept]  # a skip leaves the moments as they were
                if frozen is not None:  # a selection, not a product: NaN * 0 is NaN
                    g.masked_fill_(as_member_column(frozen, g.ndim), 0.0)
                if decay_t is not None:  # decay first: it uses theta before the update
                    p.mul_(as_member_column(decay_t, p.ndim))
                m.lerp_(g, 1 - self.beta1)
                v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = torch.sqrt(v, out=self._scratch_like(v, 0))
                if bias2_t is None:
                    denom.div_(bias2_sqrt[0])
                else:
                    denom.div_(as_member_column(bias2_t, denom.ndim))
                denom.add_(self.eps)
                if self.update_clip or self.measure_rms:
                    rms = self._rms(g, v, values_on(bias2, device, dtype))
                    self.last_rms[name] = rms
                    if self.update_clip:  # the step's LR over max(1, RMS_t), per member and tensor
                        denom.mul_(as_member_column(rms.clamp(min=1.0).to(dtype), denom.ndim))
                # (step * m) / denom, the order torch's addcdiv uses in proxy.optim.AdamW
                scaled = torch.mul(m, as_member_column(neg_steps_t, m.ndim), out=self._scratch_like(m, 1))
                p.addcdiv_(scaled, denom)
                for k, m_k, v_k in saved:
                    m[k].copy_(m_k)
                    v[k].copy_(v_k)

    def _foreach_rule(
        self,
        names: list[str],
        decay: Optional[list[float]],
        neg_steps: list[float],
        bias2: list[float],
        bias2_sqrt: list[float],
        frozen: Optional[Tensor],
        kept: list[int],
    ) -> None:
        """:meth:`step`'s arithmetic for the parameters ``names`` of one rule as a handful of
        multi-tensor kernels: the stacked tensors where a scalar is the same for every member, and
        each member's slice (``p[k]``, views made once) where it is the member's own, passed as a
        scalar per tensor, which is proxy.optim.AdamW's own call on a member's tensors. On a GPU
        this is ~10 launches for the rule rather than ~8 per parameter."""
        ps = [self.params[n] for n in names]
        gs = [p.grad for p in ps if p.grad is not None]  # _by_rule holds only the parameters that have one
        ms, vs = [self.exp_avg[n] for n in names], [self.exp_avg_sq[n] for n in names]
        if not self._denoms:
            self._denoms = {
                n: torch.empty_like(v, memory_format=torch.preserve_format) for n, v in self.exp_avg_sq.items()
            }
        saved = [(n, k, self.exp_avg[n][k].clone(), self.exp_avg_sq[n][k].clone()) for n in names for k in kept]
        if frozen is not None:  # a selection, not a product: NaN * 0 is NaN
            for g in gs:
                g.masked_fill_(as_member_column(frozen, g.ndim), 0.0)
        per_member = lambda values: [v for _ in names for v in values]  # noqa: E731  (the order of _views)
        if decay is not None:  # decay first: it uses theta before the update
            torch._foreach_mul_(self._views("p", names), per_member(decay))
        torch._foreach_lerp_(ms, gs, 1 - self.beta1)
        torch._foreach_mul_(vs, self.beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - self.beta2)
        denoms = [self._denoms[n] for n in names]
        torch._foreach_copy_(denoms, vs)
        torch._foreach_sqrt_(denoms)
        if len(set(bias2_sqrt)) == 1:
            # a scalar per tensor, as proxy.optim.AdamW passes it: CUDA's one-scalar form multiplies
            # by the reciprocal instead of dividing (another last bit)
            torch._foreach_div_(denoms, [bias2_sqrt[0]] * len(denoms))
        else:
            torch._foreach_div_(self._views("d", names), per_member(bias2_sqrt))
        torch._foreach_add_(denoms, self.eps)
        if self.update_clip or self.measure_rms:
            device, dtype = ps[0].device, ps[0].dtype
            bias2_t = values_on(bias2, device, dtype)
            for name, g, v, denom in zip(names, gs, vs, denoms):
                rms = self._rms(g, v, bias2_t)
                self.last_rms[name] = rms
                if self.update_clip:  # the step's LR over max(1, RMS_t), per member and tensor
                    denom.mul_(as_member_column(rms.clamp(min=1.0).to(dtype), denom.ndim))
        # theta + step * m / denom per member: proxy.optim.AdamW's addcdiv with a scalar per tensor
        torch._foreach_addcdiv_(
            self._views("p", names), self._views("m", names), self._views("d", names), per_member(neg_steps)
        )
        for n, k, m_k, v_k in saved:
            self.exp_avg[n][k].copy_(m_k)
            self.exp_avg_sq[n][k].copy_(v_k)

    def _views(self, kind: str, names: list[str]) -> list[Tensor]:
        """Each member's slice of the parameters (``p``), first moments (``m``) or denominators
        (``d``) of ``names``, parameter by parameter, member by member; made once and kept."""
        key = (kind, tuple(names))
        views = self._view_cache.get(key)
        if views is None:
            source = {"p": self.params, "m": self.exp_avg, "d": self._denoms}[kind]
            views = [source[n][k] for n in names for k in range(self.n_members)]
            self._view_cache[key] = views
        return views

    def _masked_step(self, multiplier: float, active: Sequence[bool], skip_t: Tensor) -> None:
        """:meth:`step` with the skips on the device: a skipped or frozen member's gradient is
        zeroed, its decay factor and beta2 are 1, its lerp weight and step size 0; the bias
        corrections come from each member's count on the device."""
        params = next(iter(self.params.values()))
        device, dtype = params.device, params.dtype
        for k, on in enumerate(active):
            if on:
                self.step_counts[k] += 1
        active_t = values_on(active, device)
        moving = active_t & ~skip_t
        counts = values_on(self.step_counts, device, torch.int64)
        if self._skipped is not None:
            counts = counts - self._skipped
        bias = self._bias_table.rows(self.beta1, self.beta2, counts.clamp(min=1), max(self.step_counts))
        bias1, bias2, bias2_sqrt = bias[:, 0], bias[:, 1].to(dtype), bias[:, 2].to(dtype)
        zero, one = torch.zeros((), dtype=dtype, device=device), torch.ones((), dtype=dtype, device=device)
        weight = torch.where(moving, torch.full((), 1 - self.beta1, dtype=torch.float64, device=device).to(dtype), zero)
        beta2 = torch.where(moving, torch.full((), self.beta2, dtype=torch.float64, device=device).to(dtype), one)

        for rule, names in self._by_rule().items():
            lrs = self.lrs(names[0], multiplier)
            decay = self._decay_factors(rule, lrs, multiplier, active)
            # lr / bc1 in float64 on the device is the host's division (IEEE), then rounded as the host's
            neg_steps = torch.where(moving, (-(values_on(lrs, device, torch.float64) / bias1)).to(dtype), zero)
            decay_t = torch.where(moving, values_on(decay, device, dtype), one) if decay is not None else None
            for name in names:
                p, g = self.params[name], self.params[name].grad
                assert g is not None  # _by_rule holds only the parameters that have a gradient
                m, v = self.exp_avg[name], self.exp_avg_sq[name]
                g.masked_fill_(as_member_column(~moving, g.ndim), 0.0)  # a selection: NaN * 0 is NaN
                if decay_t is not None:
                    p.mul_(as_member_column(decay_t, p.ndim))
                m.lerp_(g, as_member_column(weight, m.ndim))
                v.mul_(as_member_column(beta2, v.ndim)).addcmul_(g, g, value=1 - self.beta2)
                denom = torch.sqrt(v, out=self._scratch_like(v, 0))
                denom.div_(as_member_column(bias2_sqrt, denom.ndim))
                denom.add_(self.eps)
                if self.update_clip or self.measure_rms:
                    rms = self._rms(g, v, bias2)
                    last = self.last_rms.get(name)
                    self.last_rms[name] = rms if last is None else torch.where(moving, rms, last)
                    if self.update_clip:
                        denom.mul_(as_member_column(rms.clamp(min=1.0).to(dtype), denom.ndim))
                scaled = torch.mul(m, as_member_column(neg_steps, m.ndim), out=self._scratch_like(m, 1))
                p.addcdiv_(scaled, denom)
        skipped = (skip_t & active_t).to(torch.int64)
        self._skipped = skipped if self._skipped is None else self._skipped + skipped

    def _by_rule(self) -> dict[ParamRule, list[str]]:
        """The parameters that have a gradient, grouped by their rule (one LR scale and decay each)."""
        by_rule: dict[ParamRule, list[str]] = {}
        for name, p in self.params.items():
            if p.grad is not None:
                by_rule.setdefault(self.rules[name], []).append(name)
        return by_rule

    def _fold_skipped(self) -> None:
        """Subtract the steps skipped on the device from the step counts (reads the device)."""
        if self._skipped is None:
            return
        skipped, self._skipped = self._skipped.tolist(), None
        self.step_counts = [c - s for c, s in zip(self.step_counts, skipped)]

    def _rms(self, g: Tensor, v: Tensor, bias2: Tensor) -> Tensor:
        """Each member's RMS_t = sqrt(mean(g^2 / v_hat)) of one stacked tensor (proxy.optim.AdamW._rms)."""
        v_hat = (v / as_member_column(bias2, v.ndim)).clamp_(min=self.eps * self.eps)
        ratio = (g * g).div_(v_hat).float()
        return ratio.mean(dim=tuple(range(1, ratio.ndim))).sqrt() if ratio.ndim > 1 else ratio.sqrt()

    def _scratch_like(self, t: Tensor, slot: int) -> Tensor:
        """A scratch tensor with ``t``'s shape and strides (``t`` is dense, maybe permuted)."""
        if self._scratch is None or self._scratch.dtype != t.dtype or self._scratch.device != t.device:
            self._scratch = torch.empty(2 * self._scratch_size, dtype=t.dtype, device=t.device)
        return self._scratch.as_strided(t.shape, t.stride(), slot * self._scratch_size)

    def _decay_factors(
        self, rule: ParamRule, lrs: list[float], multiplier: float, active: Sequence[bool]
    ) -> list[float] | None:
        """``1 - decay`` per member (1 for members with no decay), or None when nobody decays."""
        if not rule.decay or not any(wd != 0 and on for wd, on in zip(self.weight_decays, active)):
            return None
        factors = []
        for lr, peak, wd, on in zip(lrs, self.peak_lrs, self.weight_decays, active):
            if wd == 0 or not on:
                factors.append(1.0)
            elif self.coupled:
                factors.append(1 - lr * wd)
            else:  # independent: the schedule multiplier times wd, whatever the LR
                factors.append(1 - lr / (peak * rule.lr_scale) * wd)
        return factors

    # -- a member as a standalone optimizer state ------------------------------------------------
    def member_state(self, k: int, name: str) -> dict[str, object]:
        """Member k's state of ``name`` in proxy.optim.AdamW's format (for its checkpoint)."""
        self._fold_skipped()
        return {
            "step": self.step_counts[k],
            "exp_avg": self.exp_avg[name][k].detach().clone(memory_format=torch.contiguous_format),
            "exp_avg_sq": self.exp_avg_sq[name][k].detach().clone(memory_format=torch.contiguous_format),
        }

    @torch.no_grad()
    def load_member_state(self, k: int, name: str, state: dict[str, object]) -> None:
        """Member k's state of ``name`` from proxy.optim.AdamW's format (its checkpoint)."""
        self._fold_skipped()
        self.exp_avg[name][k].copy_(state["exp_avg"])  # type: ignore[arg-type]
        self.exp_avg_sq[name][k].copy_(state["exp_avg_sq"])  # type: ignore[arg-type]
        self.step_counts[k] = int(state["step"])  # type: ignore[call-overload]
