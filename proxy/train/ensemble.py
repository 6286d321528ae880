"""Train a whole sweep in one process: K members vectorized along a member dimension.

A 1-20M parameter proxy model leaves a GPU mostly idle, so the sweep axis goes inside the batch:
``proxy-train sweep.lrs=[1e-3,3e-3,1e-2,3e-2]`` trains four runs at once. Each member

- is initialised exactly as a standalone run with its seed (``torch.manual_seed(seed)``, then
  ``build_model``), and its parameters are stacked along a new dim 0;
- sees the same batches as every other member (a controlled comparison);
- has its own LR, weight decay, Adam moments, gradient clipping (its own global norm), schedule
  and divergence check (proxy/train/ensemble_optim.py);
- writes its own run directory ``<run_dir>/lr=0.001/`` through its own run ledger
  (proxy/train/ledger.py), the one a standalone run writes through: the same keys, summary
  fields, checkpoint format and wandb step axis (optim.lr set to its LR in config.yaml and in
  its overrides), so ``proxy-report <run_dir>`` sees K ordinary runs.

The forward pass is the existing GPT, not a copy: ``torch.func.functional_call`` runs the module
with member k's parameters and ``torch.func.vmap`` maps that over the member dim, which turns
every matmul into one batched matmul. One ``backward()`` of the summed member losses gives each
member exactly its own gradients (member k's loss depends only on member k's parameters).

A member that diverges is recorded as diverged and frozen; the others go on unaffected (its
gradients are masked out by selection, never by multiplication, so its NaNs stay its own). The
loop ends when every member has finished or diverged.

Each member logs the standalone keys (train/loss, train/z_loss, train/total_loss, val/loss,
optim/lr, optim/grad_norm, grad_rms/<param> before clipping, update_rms/<param>, param_norm/<param>,
attn/max_logit[/layer_i], output/logit_mean|logit_max|lse_mean, tokens, data metrics,
perf/tokens_per_s: the rate at which this member advanced) plus perf/ensemble_tokens_per_s (all
members together); perf/mfu, on GPUs, is the utilisation of the whole ensemble.

Not supported with a sweep, each with a one-line error: remedies (each would rewind or skip
batches per member, breaking the shared data stream), ``train.resume`` of the whole sweep (each
member's checkpoint resumes on its own), data parallelism and spike capture.

Every attention and loss backend maps: the Triton kernels are torch.library ops with vmap rules
(proxy/kernels: attention and cross-entropy fold the K members into K times the batch rows, one
launch; fused linear + cross-entropy, whose LM head differs per member, launches once per member).
``attention=sdpa`` works everywhere, but on CPU torch has no batching rule for its flash kernel
and loops over the members (slower; prefer ``naive`` there).

Cost: K x (parameters + gradients + two Adam moments) and K x the activations of one run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import math
import random
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from proxy.analysis import run_name_from
from proxy.config import Config, ConfigError, RemedyKind, SweepConfig, to_config
from proxy.data import build_source
from proxy.model import GPT, build_model
from proxy.optim import apply_lr, build_optimizer, schedule_multiplier
from proxy.records import (ATTN_MAX_LOGIT, COMPLETED, DIVERGED, INTERRUPTED, ENSEMBLE_TOKENS_PER_S, ERROR_FILE, GRAD_RMS, OUTPUT,
                           PARAM_NORM, TOKENS, TOKENS_PER_S, TRAIN_LOSS, UPDATE_RMS, VAL_LOSS, RunDirError,
                           atomic_write_text, attn_layer_key)
from proxy.train import diagnostics, distributed
from proxy.train.ensemble_optim import StackedAdamW, clip_members_, is_dense, member_grad_norms, param_rules
from proxy.train.ledger import RunDirTaken, RunLedger, step_row
from proxy.train.runtime import (Interrupted, StopSignals, autocast_for, backends, divergence_reason,
                                 mark_token_classes, progress_bar, resolve_device, wants_compile)

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
    axes = [  # (swept?, values, directory key, override key)
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
        specs.append(MemberSpec(label, float(lr), int(seed), float(wd),
                                tuple(kept + [f"{key}={value!r}" for _, key, value in own])))
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
    if RemedyKind(cfg.remedy.kind) != RemedyKind.none:
        raise ConfigError(f"remedy.kind={RemedyKind(cfg.remedy.kind).value} is not supported with sweep.*: "
                          f"members share one batch stream; run the sweep as a Hydra multirun instead")
    if cfg.train.resume:
        raise ConfigError("train.resume=true is not supported with sweep.*: resume a member on its own "
                          "(proxy-train optim.lr=<lr> out_dir=<run_dir>/<member> train.resume=true)")
    if distributed.from_env().enabled:
        raise ConfigError("sweep.* trains its members in one process; do not start it with torchrun or several tasks")
    if getattr(getattr(cfg, "capture", None), "enabled", False):
        raise ConfigError("capture.enabled=true is not supported with sweep.*")


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

    def __init__(self, models: Sequence[GPT], device: torch.device, compile: bool = False):
        if not models:
            raise ValueError("StackedGPT needs at least one model")
        # stack while every member is still where it was built: moving the base first would leave
        # one member on the device and the rest on the CPU (torch.stack refuses mixed devices)
        params, _ = stack_module_state(list(models))  # tied weights appear once, as in named_parameters
        self.base = models[0].to(device)
        self.params: dict[str, Tensor] = {n: p.detach().to(device).requires_grad_() for n, p in params.items()}
        self.n_members = len(models)
        self.device = device
        self.compile = compile
        self._mapped: dict[tuple, Any] = {}

    # -- forward -----------------------------------------------------------------------------
    def _member_forward(self, params: dict[str, Tensor], idx: Tensor, labels: Tensor, *, z_loss: float,
                        ignore_index: int, collect_stats: bool):
        out = functional_call(self.base, params, (idx, labels), dict(
            z_loss=z_loss, ignore_index=ignore_index, collect_stats=collect_stats))
        maxima = [m for m in out.attn_max_logits if m is not None]  # vmap returns tensors only
        return out.loss, out.ce_loss, out.z_loss, maxima, dict(out.output_stats)

    def _mapped_forward(self, z_loss: float, ignore_index: int, collect_stats: bool):
        key = (z_loss, ignore_index, collect_stats, self.compile)
        if key not in self._mapped:
            fn = functools.partial(self._member_forward, z_loss=z_loss, ignore_index=ignore_index,
                                   collect_stats=collect_stats)
            # parameters are mapped over, the batch is shared; "different" keeps any future dropout
            # independent per member instead of failing
            mapped = vmap(fn, in_dims=(0, None, None), randomness="different")
            self._mapped[key] = torch.compile(mapped) if self.compile else mapped
        return self._mapped[key]

    def __call__(self, idx: Tensor, labels: Tensor, *, z_loss: float = 0.0, ignore_index: int = -100,
                 collect_stats: bool = False) -> StackedOutput:
        with warnings.catch_warnings():
            # CPU sdpa has no vmap batching rule: torch loops over members (correct, slower) and says so
            # on every call; once is enough (it is in the docs and in the run log)
            warnings.filterwarnings("ignore", message=".*_scaled_dot_product_flash_attention_for_cpu.*")
            loss, ce, z, maxima, stats = self._mapped_forward(z_loss, ignore_index, collect_stats)(
                self.params, idx, labels)
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
        compile, self.compile = self.compile, False  # not worth a compilation for one tiny batch
        try:
            with autocast():
                out = self(idx, labels)
            out.loss.sum().backward()
        finally:
            self.compile = compile
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
# Per-member bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One member: its ledger, and the state a standalone trainer would hold for it."""

    index: int
    spec: MemberSpec
    cfg: Config
    run_dir: Path
    run_name: str
    ledger: RunLedger
    active: bool = True
    tokens: int = 0
    loss_at_init: Optional[float] = None

    def divergence(self, loss: float, grad_norm: float, train_cfg) -> Optional[str]:
        """The standalone trainer's divergence rules; the reason, or None."""
        return divergence_reason(loss, grad_norm, self.loss_at_init, train_cfg)

    def finish(self, status: str, step: int, diverged_at: Optional[int] = None,
               final_val: Optional[float] = None, **extra: Any) -> dict[str, Any]:
        self.active = False
        return self.ledger.finish(status, steps=step, tokens=self.tokens, diverged_at=diverged_at,
                                  final_val=final_val, **extra)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class EnsembleTrainer:
    """proxy.train.Trainer's loop for K members at once (same order of steps, same records)."""

    def __init__(self, cfg: Config, run_dir: Path, run_name: Optional[str] = None,
                 sweep_id: Optional[str] = None, overrides: Sequence[str] = ()):
        check_supported(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.specs = member_specs(cfg, overrides)
        self.configs = [member_config(cfg, spec, run_dir) for spec in self.specs]
        self.source = build_source(cfg.data)
        self.source.check_seq_len(cfg.train.seq_len)  # before any member's run dir is claimed

        models = []
        for member_cfg in self.configs:  # each exactly as Trainer.__init__ would build it
            torch.manual_seed(member_cfg.train.seed)
            random.seed(member_cfg.train.seed)
            models.append(build_model(member_cfg.model, self.source.vocab_size))
        for model in models:  # every member (stack_module_state stacks the buffers too)
            self.token_classes = mark_token_classes(model, self.source, cfg)
        self.model = StackedGPT(models, self.device, compile=wants_compile(cfg, self.device))
        del models
        self.autocast = autocast_for(cfg, self.device)
        self._check_backends_and_layout()
        self.optimizer = StackedAdamW(self.model.params, param_rules(self.model.base, cfg.optim),
                                      [s.lr for s in self.specs], [s.weight_decay for s in self.specs], cfg.optim)

        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.step = 0
        n_members = len(self.specs)
        flops = self.model.base.flops_per_token(cfg.train.seq_len) * n_members  # MFU of the whole ensemble
        self.throughput = diagnostics.Throughput(flops, self.device)
        self.n_params = self.model.base.n_params(), self.model.base.n_params(non_embedding=True)
        self.members = []
        for k, (spec, member_cfg) in enumerate(zip(self.specs, self.configs)):
            member_dir = run_dir / spec.label
            name = member_run_name(spec, run_name or cfg.run_name, overrides)
            ledger = RunLedger(member_cfg, member_dir, name, sweep_id or run_dir.name, concurrent_wandb=True)
            self.members.append(Member(k, spec, member_cfg, member_dir, name, ledger))
        self.run_dir, self.sweep_id = run_dir, sweep_id

    def _check_backends_and_layout(self) -> None:
        """A tiny forward/backward before any record exists: it fixes the parameter layouts (and
        a backend that cannot run here fails now, not after the records are open)."""
        x, y = self.batch("train", 0)
        self.model.adopt_gradient_layouts(x[:2, :16], y[:2, :16], self.autocast)

    # -- data and evaluation -----------------------------------------------------------------
    def batch(self, split: str, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.source.batch(split, index, self.cfg.train.batch_size, self.cfg.train.seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Each member's mean cross-entropy over the fixed held-out batches (Trainer.evaluate)."""
        self.model.base.eval()
        per_batch = []
        for i in range(self.cfg.train.eval_batches):
            x, y = self.batch("val", i)
            with self.autocast():
                per_batch.append(self.model(x, y, ignore_index=self.cfg.loss.ignore_index).ce_loss.float())
        self.model.base.train()
        totals = [0.0] * len(self.members)
        for values in torch.stack(per_batch).tolist():  # one sync; summed in the standalone order
            totals = [total + v for total, v in zip(totals, values)]
        return [total / self.cfg.train.eval_batches for total in totals]

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, step: int, logging_step: bool) -> Optional[dict[int, dict[str, float]]]:
        """One optimizer step for every active member. Returns {member: row} on logging steps."""
        cfg = self.cfg
        multiplier = schedule_multiplier(step, cfg.train.steps, cfg.schedule)
        x, y = self.batch("train", step)  # no remedies, so the data position is the step

        collect = logging_step and (cfg.train.stats_every == 0 or step % cfg.train.stats_every == 0)
        with self.autocast():
            out = self.model(x, y, z_loss=cfg.loss.z_loss, ignore_index=cfg.loss.ignore_index,
                             collect_stats=collect)
        out.loss.sum().backward()
        names = [n for n, p in self.model.params.items() if p.grad is not None]
        grads = self.model.grads()
        columns: dict[str, Tensor] = {}
        if logging_step:  # before clipping, as diagnostics.grad_stats
            columns.update({GRAD_RMS + n: _per_member(g, "rms") for n, g in zip(names, grads)})
        norms = member_grad_norms(grads)
        clip_members_(grads, norms, cfg.optim.grad_clip)

        losses, grad_norms = torch.stack([out.ce_loss.detach().float(), norms]).tolist()  # one sync
        for member in self.members:
            if not member.active:
                continue
            reason = member.divergence(losses[member.index], grad_norms[member.index], cfg.train)
            if reason is not None:
                member.ledger.event(step, DIVERGED, reason=reason)
                log.warning("member %s diverged at step %d: %s", member.spec.label, step, reason)
                member.finish(DIVERGED, step, diverged_at=step)
        active = [m.active for m in self.members]
        if not any(active):
            self.model.zero_grad()
            return None

        before = {n: p.detach().clone() for n, p in self.model.params.items()} if logging_step else None
        self.optimizer.step(multiplier, active)
        self.model.zero_grad()
        self.step = step + 1
        self.throughput.add(self.tokens_per_step)
        for member in self.members:
            if member.active:
                member.tokens += self.tokens_per_step
                member.ledger.track_loss(losses[member.index])
        if not logging_step:
            return None

        lrs = {n: torch.tensor(self.optimizer.lrs(n, multiplier), device=self.device) for n in self.model.params}
        for n, p in self.model.params.items():
            rms = _per_member(p.detach() - before[n], "rms")
            columns[UPDATE_RMS + n] = torch.where(lrs[n] > 0, rms / lrs[n], torch.zeros_like(rms))
            columns[PARAM_NORM + n] = _per_member(p.detach(), "norm")
        if collect:
            columns.update(_forward_stats(out))
        columns.update({"z_loss": out.z_loss.detach().float(), "total_loss": out.loss.detach().float()})
        keys = list(columns)
        values = torch.stack([columns[k].to(self.device) for k in keys]).tolist() if keys else []  # one sync
        shared = dict(getattr(self.source, "last_batch_info", {}))
        perf = self.throughput.read()
        if TOKENS_PER_S in perf:
            perf[ENSEMBLE_TOKENS_PER_S] = perf[TOKENS_PER_S] * len(self.members)
        rows = {}
        for member in self.members:
            if not member.active:
                continue
            k = member.index
            # a NaN output statistic: no label counted in the batch (diagnostics.forward_stats)
            row = {key: values[i][k] for i, key in enumerate(keys)
                   if not (key.startswith(OUTPUT) and math.isnan(values[i][k]))}
            z_loss, total_loss = row.pop("z_loss"), row.pop("total_loss")
            row.update(shared)
            row.update(step_row(tokens=member.tokens, loss=losses[k], z_loss=z_loss, total_loss=total_loss,
                                lr=member.spec.lr * multiplier,  # the base LR, as proxy.optim.apply_lr returns
                                grad_norm=grad_norms[k]))
            row.update(perf)
            rows[k] = row
        return rows

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoints(self) -> None:
        """Each active member's checkpoint, in the standalone format (loadable by Trainer)."""
        multiplier = schedule_multiplier(max(self.step - 1, 0), self.cfg.train.steps, self.cfg.schedule)
        for member in self.members:
            if member.active:
                self._save_member_checkpoint(member, multiplier)

    def _save_member_checkpoint(self, member: Member, multiplier: float) -> Optional[Path]:
        model = self.model.load_member(member.index, self.model.base)
        optimizer = build_optimizer(model, member.cfg.optim)
        apply_lr(optimizer, multiplier)
        own = dict(model.named_parameters())
        for name in self.model.params:
            optimizer.state[own[name]] = self.optimizer.member_state(member.index, name)
        return member.ledger.save_checkpoint(
            self.step, model=model.state_dict(), optimizer=optimizer.state_dict(),
            data_position=self.step,  # no remedies: the data position is the step
            tokens=member.tokens, loss_at_init=member.loss_at_init, remedy={})

    # -- the loop ----------------------------------------------------------------------------
    def _start_records(self) -> None:
        for member in self.members:  # every directory taken before any is written
            member.ledger.claim()
        for member in self.members:
            member.ledger.start(
                overrides=member.spec.overrides, n_params=self.n_params[0],
                n_params_non_embedding=self.n_params[1], device=self.device, data=self.source.describe(),
                lr=member.spec.lr, backends=backends(member.cfg, self.device), token_classes=self.token_classes,
                ensemble={"members": len(self.members), "index": member.index, "label": member.spec.label},
            )

    def run(self) -> list[dict[str, Any]]:
        t = self.cfg.train
        self._start_records()
        progress = progress_bar(t.steps, t.progress, f"sweep x{len(self.members)}", 0)
        stop = StopSignals()
        try:
            with stop:
                self._loop(progress, stop)
        except Interrupted as interrupted:  # at a step boundary, as the standalone trainer
            self.save_checkpoints()
            log.warning("sweep interrupted by %s at step %d", interrupted, self.step)
            for member in self.members:
                if member.active:
                    member.finish(INTERRUPTED, self.step, interrupted_by=str(interrupted))
            return [m.ledger.summary for m in self.members]
        finally:
            if progress is not None:
                progress.close()
        if any(m.active for m in self.members):
            final = self.evaluate()
            for member in self.members:
                if member.active:
                    member.ledger.log(t.steps, {VAL_LOSS: final[member.index], TOKENS: member.tokens})
            if t.save_final:
                self.save_checkpoints()
            for member in self.members:
                if member.active:
                    member.finish(COMPLETED, self.step, final_val=final[member.index])
        return [m.ledger.summary for m in self.members]

    def _loop(self, progress, stop: StopSignals) -> None:
        t = self.cfg.train
        while self.step < t.steps and any(m.active for m in self.members):
            stop.check()
            step = self.step
            if step % t.eval_every == 0:
                self._log_eval(step)
            logging_step = step % t.log_every == 0 or step == t.steps - 1
            rows = self.train_step(step, logging_step)
            for k, row in (rows or {}).items():
                self.members[k].ledger.log(step, row)
            if progress is not None:
                progress.n = self.step
                if rows:
                    active = [r[TRAIN_LOSS] for r in rows.values()]
                    progress.set_postfix(active=f"{len(active)}/{len(self.members)}",
                                         best=f"{min(active):.3f}", refresh=False)
                    progress.refresh()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and 0 < self.step < t.steps:
                self.save_checkpoints()

    def _log_eval(self, step: int) -> None:
        values = self.evaluate()
        for member in self.members:
            if not member.active:
                continue
            val = values[member.index]
            if member.loss_at_init is None:
                member.loss_at_init = val
                member.ledger.update(loss_at_init=val)
            member.ledger.log(step, {VAL_LOSS: val})

    def fail(self, exc: BaseException) -> None:
        """Record a crash in every member still running (as the standalone trainer does for one
        run), and the traceback in the sweep's own directory, where the CLI's error line points."""
        text = traceback.format_exc()
        if not isinstance(exc, (RunDirTaken, RunDirError)):  # a refused start writes nowhere it was refused
            try:
                atomic_write_text(self.run_dir / ERROR_FILE, text)
            except OSError as err:
                log.error("could not write %s: %s", self.run_dir / ERROR_FILE, err)
        for member in self.members:
            if member.active:
                member.ledger.fail(exc, self.step, text)
                member.active = False


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


# --------------------------------------------------------------------------------------------
# Python API (the Hydra entry routes here when sweep_requested(cfg))
# --------------------------------------------------------------------------------------------
def train_ensemble(cfg: Config | dict, run_dir: str | Path, run_name: Optional[str] = None,
                   sweep_id: Optional[str] = None, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train every member of ``cfg.sweep`` into ``run_dir/<label>`` and return their summaries.

    Mirrors proxy.train.trainer.train: never raises on divergence (a diverged member is a result); a
    crash marks every running member failed, writes error.txt, and raises.
    """
    cfg = to_config(cfg) if not isinstance(cfg, Config) else cfg
    if not sweep_requested(cfg):
        raise ConfigError("train_ensemble needs sweep.lrs, sweep.seeds or sweep.weight_decays")
    run_dir = Path(run_dir)
    trainer = EnsembleTrainer(cfg, run_dir, run_name, sweep_id, tuple(overrides))
    try:
        return trainer.run()
    except Exception as exc:
        trainer.fail(exc)
        raise
    finally:
        for member in trainer.members:
            member.ledger.release()


__all__ = [
    "EnsembleTrainer",
    "MemberSpec",
    "StackedGPT",
    "StackedOutput",
    "member_config",
    "member_run_name",
    "member_specs",
    "sweep_requested",
    "train_ensemble",
]
