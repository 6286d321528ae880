"""K members of a sweep as one step engine: member-stacked parameters, one vmapped forward.

A 1-20M parameter proxy model leaves a GPU mostly idle, so the sweep axis goes inside the batch:
``proxy-train sweep.lrs=[1e-3,3e-3,1e-2,3e-2]`` trains four runs at once, through the one
training loop (proxy/train/trainer.py) that trains a single run. Each member

- is initialised exactly as a standalone run with its seed (``torch.manual_seed(seed)``, then
  ``build_model``), and its parameters are stacked along a new dim 0;
- sees the same batches as every other member (a controlled comparison);
- has its own LR, weight decay, Adam moments and step count, gradient clipping (its own global
  norm), remedy (skip-step, ZClip: each watches its own loss and grad norm), schedule,
  divergence check and spike capture (proxy/train/ensemble_optim.py, the loop);
- writes its own run directory ``<run_dir>/lr=0.001/`` through its own run ledger
  (proxy/train/ledger.py), the one a standalone run writes through: the same keys, summary
  fields, checkpoint format and wandb step axis (optim.lr set to its LR in config.yaml and in
  its overrides), so ``proxy-report <run_dir>`` sees K ordinary runs, each of which a standalone
  ``train.resume=true`` can continue, and the sweep's own ``train.resume=true`` continues all.

The forward pass is the existing GPT, not a copy: ``torch.func.functional_call`` runs the module
with member k's parameters and ``torch.func.vmap`` maps that over the member dim, which turns
every matmul into one batched matmul. One ``backward()`` of the summed member losses gives each
member exactly its own gradients (member k's loss depends only on member k's parameters).

A member that diverges is recorded as diverged and frozen; the others go on unaffected (its
gradients are masked out by selection, never by multiplication, so its NaNs stay its own). A
member whose remedy skips a step keeps its parameters, moments and step count. The loop ends
when every member has finished or diverged.

Each member logs the standalone keys (train/loss, train/z_loss, train/total_loss, val/loss,
optim/lr, optim/grad_norm, grad_rms/<param> before clipping, update_rms/<param>, param_norm/<param>,
attn/max_logit[/layer_i], output/logit_mean|logit_max|lse_mean, tokens, data metrics,
perf/tokens_per_s: the rate at which this member advanced) plus perf/ensemble_tokens_per_s (all
members together); perf/mfu, on GPUs, is the utilisation of the whole ensemble.

Not supported with a sweep, each with a one-line error: the rollback remedy (it rewinds the
batch stream the members share) and data parallelism.

Every attention and loss backend maps: the Triton kernels are torch.library ops with vmap rules
(proxy/kernels: attention and cross-entropy fold the K members into K times the batch rows, one
launch; fused linear + cross-entropy, whose LM head differs per member, launches once per member).
``attention=sdpa`` works everywhere, but on CPU torch has no batching rule for its flash kernel
and loops over the members (slower; prefer ``naive`` there).

Cost: K x (parameters + gradients + two Adam moments) and K x the activations of one run; on a
GPU one more moment's worth for the multi-tensor update's denominators (ensemble_optim.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from proxy.analysis import run_name_from
from proxy.config import Config, ConfigError, RemedyKind, SweepConfig
from proxy.model import GPT, build_model
from proxy.optim import apply_lr, build_optimizer, schedule_multiplier
from proxy.records import (
    ADAM_RMS,
    ADAM_RMS_MAX,
    ATTN_MAX_LOGIT,
    GRAD_RMS,
    OUTPUT,
    PARAM_NORM,
    UPDATE_RMS,
    attn_layer_key,
)
from proxy.train import distributed
from proxy.train.engine import Computed
from proxy.train.ensemble_optim import StackedAdamW, clip_members_, is_dense, member_grad_norms, param_rules
from proxy.train.remedies import Event, Remedy, SweepStep
from proxy.train.runtime import param_dtype, values_on

log = logging.getLogger("proxy.ensemble")


# --------------------------------------------------------------------------------------------
# Members: who they are, what they are called, what config they record
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberSpec:
    label: str  # its directory under the sweep's run dir, e.g. "lr=0.001" or "lr=0.001,seed=1"
    lr: float
    seed: int
    weight_decay: float
    overrides: tuple[str, ...]  # what a standalone run of this member would have on its command line


def sweep_requested(cfg: Config) -> bool:
    """Whether ``cfg`` asks for an ensemble (any of sweep.lrs / seeds / weight_decays set)."""
    return bool(cfg.sweep.lrs or cfg.sweep.seeds or cfg.sweep.weight_decays)


def _override_key(item: str) -> str:
    return item.lstrip("+~").split("=", 1)[0]


def member_specs(cfg: Config, overrides: Sequence[str] = ()) -> list[MemberSpec]:
    """The grid lrs x seeds x weight_decays; an empty axis takes the config's single value.

    Each member's overrides are the sweep's without ``sweep.*`` and without the keys it sweeps,
    plus its own values of those keys: exactly the command line of the equivalent standalone run,
    which is what the report groups variants and reads LRs from.
    """
    sw = cfg.sweep
    axes: list[tuple[bool, Sequence[float], str, str]] = [  # (swept?, values, directory key, override key)
        (bool(sw.lrs), list(sw.lrs) or [cfg.optim.lr], "lr", "optim.lr"),
        (bool(sw.seeds), list(sw.seeds) or [cfg.train.seed], "seed", "train.seed"),
        (bool(sw.weight_decays), list(sw.weight_decays) or [cfg.optim.weight_decay], "wd", "optim.weight_decay"),
    ]
    swept_keys = {key for swept, _, _, key in axes if swept}
    kept = [o for o in overrides if not _override_key(o).startswith("sweep.") and _override_key(o) not in swept_keys]
    specs = []
    for lr, seed, wd in itertools.product(*(values for _, values, _, _ in axes)):
        values = {"optim.lr": float(lr), "train.seed": int(seed), "optim.weight_decay": float(wd)}
        own = [(short, key, values[key]) for swept, _, short, key in axes if swept]
        label = ",".join(f"{short}={value!r}" for short, _, value in own)
        specs.append(
            MemberSpec(
                label, float(lr), int(seed), float(wd), tuple(kept + [f"{key}={value!r}" for _, key, value in own])
            )
        )
    return specs


def member_config(cfg: Config, spec: MemberSpec, run_dir: Path) -> Config:
    """The config a standalone run of this member would have: its LR, seed, decay; no sweep."""
    member = copy.deepcopy(cfg)
    member.optim.lr, member.train.seed, member.optim.weight_decay = spec.lr, spec.seed, spec.weight_decay
    member.sweep = SweepConfig()
    if cfg.run_name:
        member.run_name = f"{cfg.run_name},{spec.label}"
    if cfg.out_dir:
        member.out_dir = str(run_dir / spec.label)
    return member


def member_run_name(spec: MemberSpec, run_name: Optional[str], overrides: Sequence[str]) -> str:
    """A name chosen by the user gets the member's label appended; a name derived from the
    command line is derived again from the member's own command line."""
    if run_name is None or run_name == run_name_from(list(overrides)):
        return run_name_from(list(spec.overrides))
    return f"{run_name},{spec.label}"


def check_supported(cfg: Config) -> None:
    """Refuse, in one line, what an ensemble cannot do (see the module docstring)."""
    if RemedyKind(cfg.remedy.kind) == RemedyKind.rollback:
        raise ConfigError(
            "remedy.kind=rollback is not supported with sweep.*: a rollback rewinds the batch stream "
            "the members share; run the sweep as a Hydra multirun instead"
        )
    if distributed.from_env().enabled:
        raise ConfigError("sweep.* trains its members in one process; do not start it with torchrun or several tasks")


# --------------------------------------------------------------------------------------------
# K models as one: stacked parameters, vmapped forward
# --------------------------------------------------------------------------------------------
@dataclass
class StackedOutput:
    """proxy.model.ModelOutput with a leading member dim on every tensor."""

    loss: Tensor  # (K,) ce + z: what backward() sums
    ce_loss: Tensor  # (K,)
    z_loss: Tensor  # (K,)
    attn_max_logits: list[Tensor] = field(default_factory=list)  # per layer (K, batch, heads)
    output_stats: dict[str, Tensor] = field(default_factory=dict)  # each (K,)


class StackedGPT:
    """K GPTs of one architecture as one set of modules with member-stacked parameters.

    ``params`` maps parameter names to leaf tensors ``(K, ...)``; ``base`` is one of the GPTs,
    used as the module ``functional_call`` runs (its own parameters are never read by the
    forward; its buffers, the rotary tables, are shared by all members).
    """

    def __init__(self, models: Sequence[GPT], device: torch.device, compile_mode: Optional[str] = None):
        if not models:
            raise ValueError("StackedGPT needs at least one model")
        # stack while every member is still where it was built: moving the base first would leave
        # one member on the device and the rest on the CPU (torch.stack refuses mixed devices)
        params, _ = stack_module_state(list(models))  # tied weights appear once, as in named_parameters
        self.base = models[0].to(device)
        self.params: dict[str, Tensor] = {n: p.detach().to(device).requires_grad_() for n, p in params.items()}
        self.n_members = len(models)
        self.device = device
        self.compile_mode = compile_mode  # torch.compile's mode, None: eager
        self._mapped: dict[tuple, Any] = {}

    # -- forward -----------------------------------------------------------------------------
    def _member_forward(
        self,
        params: dict[str, Tensor],
        idx: Tensor,
        labels: Tensor,
        *,
        z_loss: float,
        ignore_index: int,
        collect_stats: bool,
    ):
        out = functional_call(
            self.base,
            params,
            (idx, labels),
            dict(z_loss=z_loss, ignore_index=ignore_index, collect_stats=collect_stats),
        )
        maxima = [m for m in out.attn_max_logits if m is not None]  # vmap returns tensors only
        return out.loss, out.ce_loss, out.z_loss, maxima, dict(out.output_stats)

    def _mapped_forward(self, z_loss: float, ignore_index: int, collect_stats: bool):
        key = (z_loss, ignore_index, collect_stats, self.compile_mode)
        if key not in self._mapped:
            fn = functools.partial(
                self._member_forward, z_loss=z_loss, ignore_index=ignore_index, collect_stats=collect_stats
            )
            # parameters are mapped over, the batch is shared; "different" keeps any future dropout
            # independent per member instead of failing
            mapped = vmap(fn, in_dims=(0, None, None), randomness="different")
            self._mapped[key] = torch.compile(mapped, mode=self.compile_mode) if self.compile_mode else mapped
        return self._mapped[key]

    def __call__(
        self, idx: Tensor, labels: Tensor, *, z_loss: float = 0.0, ignore_index: int = -100, collect_stats: bool = False
    ) -> StackedOutput:
        with warnings.catch_warnings():
            # CPU sdpa has no vmap batching rule: torch loops over members (correct, slower) and says so
            # on every call; once is enough (it is in the docs and in the run log)
            warnings.filterwarnings("ignore", message=".*_scaled_dot_product_flash_attention_for_cpu.*")
            loss, ce, z, maxima, stats = self._mapped_forward(z_loss, ignore_index, collect_stats)(
                self.params, idx, labels
            )
        return StackedOutput(loss, ce, z, list(maxima), dict(stats))

    # -- memory layout -----------------------------------------------------------------------
    def adopt_gradient_layouts(self, idx: Tensor, labels: Tensor, autocast=contextlib.nullcontext) -> None:
        """Store each parameter in the memory layout its gradient arrives in.

        Under vmap the weight gradient of a linear layer comes out of a batched matmul as
        ``(K, in, out)`` memory viewed as ``(K, out, in)``. Autograd copies an incoming gradient
        whose strides differ from its parameter's into the parameter's layout, every step (a
        weight-sized copy per weight); a parameter stored in the gradient's layout takes it as
        is. One small forward/backward, with hooks that see the gradients before that copy,
        finds the layouts.
        """
        arrived: dict[str, tuple[int, ...]] = {}

        def remember(name: str):
            def hook(grad: Tensor) -> None:
                if is_dense(grad):
                    arrived[name] = grad.stride()

            return hook

        handles = [p.register_hook(remember(name)) for name, p in self.params.items()]
        mode, self.compile_mode = self.compile_mode, None  # not worth a compilation for one tiny batch
        try:
            with autocast():
                out = self(idx, labels)
            out.loss.sum().backward()
        finally:
            self.compile_mode = mode
            for handle in handles:
                handle.remove()
        for name, p in list(self.params.items()):
            p.grad = None
            stride = arrived.get(name)
            if stride is not None and stride != p.stride():
                order = sorted(range(p.ndim), key=lambda d: stride[d], reverse=True)
                inverse = sorted(range(p.ndim), key=lambda d: order[d])
                self.params[name] = p.detach().permute(order).contiguous().permute(inverse).requires_grad_()

    # -- one member as a standalone model ----------------------------------------------------
    @torch.no_grad()
    def load_member(self, k: int, model: GPT) -> GPT:
        """Copy member k's parameters into ``model`` (an nn.Module of the same architecture)."""
        own = dict(model.named_parameters())
        for name, p in self.params.items():
            own[name].copy_(p[k])
        return model

    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params.values() if p.grad is not None]

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def _per_member(t: Tensor, reduce: str) -> Tensor:
    """Reduce every dim but the member dim: 'rms', 'norm' or 'max'. Returns fp32 (K,)."""
    dims = tuple(range(1, t.ndim))
    if not dims:
        return t.float()
    if reduce == "rms":
        return t.float().pow(2).mean(dim=dims).sqrt()
    if reduce == "norm":
        return torch.linalg.vector_norm(t.float(), dim=dims)
    return t.float().amax(dim=dims)


# --------------------------------------------------------------------------------------------
# The step engine of K members (proxy/train/engine.py has the protocol the loop drives)
# --------------------------------------------------------------------------------------------
class _MemberGrad:
    """Member k's slice of a stacked parameter, as a remedy sees a parameter: its ``.grad`` is a
    view, so a remedy that scales gradients (ZClip) scales that member's only."""

    __slots__ = ("grad",)

    def __init__(self, grad: Optional[Tensor]):
        self.grad = grad


class StackedEngine:
    """K GPTs of one architecture trained at once on the same batches: member-stacked
    parameters, one vmapped forward, one backward, per-member clipping, remedies and AdamW
    (proxy/train/ensemble_optim.py). Each member is initialised exactly as a standalone run with
    its seed, so member k follows the standalone run up to the rounding of batched matmuls."""

    def __init__(
        self,
        configs: Sequence[Config],
        vocab_size: int,
        device: torch.device,
        autocast: Callable[[], ContextManager],
        compile_mode: Optional[str],
        probe: tuple[Tensor, Tensor],
        mark: Callable[[GPT], Any],
    ):
        cfg = configs[0]
        self.cfg, self.configs, self.device, self.autocast = cfg, list(configs), device, autocast
        self.n_members = len(configs)
        models = []
        for member_cfg in configs:  # each exactly as a standalone run would build it
            torch.manual_seed(member_cfg.train.seed)
            random.seed(member_cfg.train.seed)
            models.append(build_model(member_cfg.model, vocab_size).to(param_dtype(member_cfg)))
        for model in models:  # every member (stack_module_state stacks the buffers too)
            self.token_classes = mark(model)
        self.model = StackedGPT(models, device, compile_mode=compile_mode)
        del models
        # a tiny forward/backward before any record exists: it fixes the parameter layouts (and a
        # backend that cannot run here fails now, not after the records are open)
        self.model.adopt_gradient_layouts(probe[0][:2, :16], probe[1][:2, :16], autocast)
        self.optimizer = StackedAdamW(
            self.model.params,
            param_rules(self.model.base, cfg.optim),
            [c.optim.lr for c in configs],
            [c.optim.weight_decay for c in configs],
            cfg.optim,
        )
        self._multiplier = 0.0
        self._before: Optional[dict[str, Tensor]] = None

    # -- one step ------------------------------------------------------------------------------
    def schedule(self, step: int) -> list[float]:
        cfg = self.cfg
        self._multiplier = schedule_multiplier(step, cfg.train.steps, cfg.schedule)
        return [c.optim.lr * self._multiplier for c in self.configs]  # as proxy.optim.apply_lr returns

    def compute(
        self,
        step: int,
        lrs: list[float],
        x: Tensor,
        y: Tensor,
        remedies: Sequence[Optional[Remedy]],
        active: Sequence[bool],
        *,
        collect: bool,
        measure: bool,
        data_position: int,
        read: bool = True,
    ) -> Computed:
        cfg = self.cfg
        with self.autocast():
            out = self.model(x, y, z_loss=cfg.loss.z_loss, ignore_index=cfg.loss.ignore_index, collect_stats=collect)
        out.loss.sum().backward()
        names = [n for n, p in self.model.params.items() if p.grad is not None]
        grads = self.model.grads()
        rms = [_per_member(g, "rms") for g in grads] if measure else []  # before clipping
        norms = member_grad_norms(grads)
        thresholds = [r.clip_threshold(cfg.optim.grad_clip) if r is not None else cfg.optim.grad_clip for r in remedies]
        clip_members_(grads, norms, thresholds)
        loss_t = out.ce_loss.detach().float()
        if not read:  # nothing waits for the device (proxy/train/watch.py); a device remedy judges there
            if any(r is not None and not r.decides_on_device for r in remedies):
                raise ValueError("StackedEngine.compute(read=False): a remedy judges read-back values")
            skip_t = self._defer(step, remedies, active, loss_t, norms)
            nothing: list[dict[str, float]] = [{} for _ in range(self.n_members)]
            return Computed(lrs, [], [], [None] * self.n_members, nothing, collect, out, [], loss_t, norms, skip_t)
        skip_t = self._defer(step, remedies, active, loss_t, norms)  # judged as between read-backs
        values = torch.stack([loss_t, norms, *rms]).tolist()  # one sync
        losses, grad_norms = values[0], values[1]
        grad_stats = [
            {GRAD_RMS + n: values[2 + i][k] for i, n in enumerate(names)} if measure else {}
            for k in range(self.n_members)
        ]
        events: list[Optional[Event]] = []
        for k, remedy in enumerate(remedies):
            if remedy is None or not active[k]:
                events.append(None)
            elif remedy.decides_on_device:
                events.append(remedy.settle_step(step))
            else:
                events.append(
                    remedy.after_backward(step, losses[k], grad_norms[k], self._member_views(k), data_position)
                )
        return Computed(lrs, losses, grad_norms, events, grad_stats, collect, out, [], loss_t, norms, skip_t)

    def _defer(
        self, step: int, remedies: Sequence[Optional[Remedy]], active: Sequence[bool], loss_t: Tensor, norms: Tensor
    ) -> Optional[Tensor]:
        """Each active member's device remedy judges the step; the members' skip flags ``(K,)`` (None
        when no remedy skips on the device). Nothing is read back."""
        device_remedies = [r if r is not None and r.decides_on_device else None for r in remedies]
        kinds = {type(r) for r in device_remedies if r is not None}
        if not kinds:
            return None
        kind = kinds.pop() if len(kinds) == 1 else Remedy  # one kind may judge its members together
        at = SweepStep(step, loss_t, norms, self.model.grads(), self._member_views, active)
        flags = kind.defer_members(device_remedies, at)
        if all(f is None for f in flags):
            return None
        no = torch.zeros((), dtype=torch.bool, device=self.device)
        return torch.stack([f if f is not None else no for f in flags])

    def _member_views(self, k: int) -> list["_MemberGrad"]:
        """Member k's gradients as a remedy sees a model's parameters."""
        return [_MemberGrad(p.grad[k] if p.grad is not None else None) for p in self.model.params.values()]

    def apply(
        self, computed: Computed, update: Sequence[bool], active: Sequence[bool], measure: bool
    ) -> list[dict[str, float]]:
        """The update of the members in ``update``; an active member left out (its step was
        skipped) keeps its parameters, moments and step count; an inactive one never moves again."""
        moving = [u and a for u, a in zip(update, active)]
        self.optimizer.measure_rms = measure
        before = {n: p.detach().clone() for n, p in self.model.params.items()} if measure and any(moving) else None
        if any(moving):
            skipped = [a and not m for a, m in zip(active, moving)]
            self.optimizer.step(self._multiplier, active, skipped=skipped, skip_t=computed.skip_t)
        self.model.zero_grad()
        if before is None:
            return [{} for _ in range(self.n_members)]
        columns: dict[str, Tensor] = {}
        for n, p in self.model.params.items():
            lrs = values_on(self.optimizer.lrs(n, self._multiplier), self.device)
            rms = _per_member(p.detach() - before[n], "rms")
            columns[UPDATE_RMS + n] = torch.where(lrs > 0, rms / lrs, torch.zeros_like(rms))
        for n, p in self.model.params.items():
            columns[PARAM_NORM + n] = _per_member(p.detach(), "norm")
        measured = {n: r for n, r in self.optimizer.last_rms.items() if n in self.model.params}
        columns.update({ADAM_RMS + n: r for n, r in measured.items()})
        if measured:
            columns[ADAM_RMS_MAX] = torch.stack(list(measured.values())).amax(dim=0)
        self.optimizer.last_rms.clear()
        keys = list(columns)
        values = torch.stack([columns[k] for k in keys]).tolist()  # one sync
        return [{key: values[i][k] for i, key in enumerate(keys)} if moving[k] else {} for k in range(self.n_members)]

    def statistics(self, computed: Computed) -> list[dict[str, float]]:
        if not computed.collect:
            return [{} for _ in range(self.n_members)]
        columns = _forward_stats(computed.out)
        keys = list(columns)
        values = torch.stack([columns[k].to(self.device) for k in keys]).tolist() if keys else []
        # a NaN output statistic: no label counted in the batch (diagnostics.forward_stats)
        return [
            {
                key: values[i][k]
                for i, key in enumerate(keys)
                if not (key.startswith(OUTPUT) and math.isnan(values[i][k]))
            }
            for k in range(self.n_members)
        ]

    def loss_parts(self, computed: Computed) -> list[tuple[float, float]]:
        out = computed.out
        z, total = torch.stack([out.z_loss.detach().float(), out.loss.detach().float()]).tolist()
        return list(zip(z, total))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[Tensor, Tensor]], ignore_index: int) -> list[float]:
        """Each member's mean cross-entropy over the held-out batches (SingleEngine.evaluate)."""
        self.model.base.eval()
        per_batch = []
        for x, y in batches:
            with self.autocast():
                # a copy: a CUDA graph's next replay writes over its outputs
                per_batch.append(self.model(x, y, ignore_index=ignore_index).ce_loss.float().clone())
        self.model.base.train()
        totals = [0.0] * self.n_members
        for values in torch.stack(per_batch).tolist():  # one sync; summed in the standalone order
            totals = [total + v for total, v in zip(totals, values)]
        return [total / len(per_batch) for total in totals]

    # -- a member as a standalone run ------------------------------------------------------------
    def member_module(self, k: int) -> GPT:
        """The GPT module holding member k's parameters (the shared base module, overwritten)."""
        return self.model.load_member(k, self.model.base)

    def member_optimizer(self, k: int) -> torch.optim.Optimizer:
        """Member k's optimizer as a standalone run holds it (proxy.optim.AdamW, its state)."""
        model = self.model.base
        optimizer = build_optimizer(model, self.configs[k].optim)
        apply_lr(optimizer, self._multiplier)
        own = dict(model.named_parameters())
        for name in self.model.params:
            optimizer.state[own[name]] = self.optimizer.member_state(k, name)
        return optimizer

    def member_state(self, k: int) -> dict[str, Any]:
        model = self.member_module(k)
        return {"model": model.state_dict(), "optimizer": self.member_optimizer(k).state_dict()}

    def load_member_state(self, k: int, state: dict[str, Any]) -> None:
        """Member k from a standalone checkpoint's model and optimizer states (its resume)."""
        model, optimizer = state["model"], state["optimizer"]
        missing = sorted(set(self.model.params) - set(model))
        if missing:
            raise ValueError(f"the checkpoint has no {', '.join(missing[:3])}")
        with torch.no_grad():
            for name, p in self.model.params.items():
                p[k].copy_(model[name])
        by_name = {}
        for group in optimizer["param_groups"]:
            for index, name in zip(group["params"], group.get("param_names", [])):
                by_name[name] = optimizer["state"].get(index)
        for name in self.model.params:
            if by_name.get(name):
                self.optimizer.load_member_state(k, name, by_name[name])

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.base.flops_per_token(seq_len) * self.n_members  # MFU of the whole ensemble


def _forward_stats(out: StackedOutput) -> dict[str, Tensor]:
    """diagnostics.forward_stats per member: (K,) columns under the standalone keys."""
    stats: dict[str, Tensor] = {}
    per_layer = [_per_member(m, "max") for m in out.attn_max_logits]
    for i, maxima in enumerate(per_layer):
        stats[attn_layer_key(i)] = maxima
    if per_layer:
        stats[ATTN_MAX_LOGIT] = torch.stack(per_layer).amax(dim=0)
    for name, value in out.output_stats.items():
        stats[OUTPUT + name] = value.detach().float()
    return stats


__all__ = [
    "MemberSpec",
    "StackedEngine",
    "StackedGPT",
    "StackedOutput",
    "member_config",
    "member_run_name",
    "member_specs",
    "sweep_requested",
]
