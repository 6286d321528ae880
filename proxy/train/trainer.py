"""The training loop: one run, or a sweep of K members trained at once. Written once.

A run is an ensemble of K >= 1 members that share every batch (K = 1: a standalone run; K > 1:
``sweep.lrs`` / ``sweep.seeds`` / ``sweep.weight_decays``, proxy/train/ensemble.py). Each member
has its own run directory and ledger, remedy, observers, divergence check, token count and loss
at init; the step engine (proxy/train/engine.py) does the arithmetic. The loop is deliberately
plain::

    for step in range(start, steps):
        remedy.before_step                               # a rollback's snapshot (K = 1)
        lrs    <- schedule(step)
        batch  <- data.batch("train", position)          # a pure function of the position
        step   <- forward, backward, clip, each remedy's verdict   (the engine)
        observers look; a member whose loss or grad norm diverged stops   # a result, not a crash
        optimizer step for the members whose update goes ahead
        log rows (every log_every), eval (every eval_every), checkpoints (every ckpt_every)

Everything measured comes from proxy/train/diagnostics.py; everything written goes through the
members' ledgers. A diverged member ends with status ``diverged`` (``proxy-train`` exits 0, so a
multirun goes on) and the others go on; a crash ends every running member ``failed`` with the
traceback in error.txt; SIGINT / SIGTERM end every member at a step boundary with a checkpoint
and status ``interrupted``. Before anything is written the start is validated (the data, every
member's lock, the checkpoints a resume loads), so a start that fails leaves an existing run
directory as it was. What a sweep cannot do (rollback rewinds the batch stream the members
share; data parallelism) is refused in one line.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from proxy.config import Config, ConfigError, RemedyKind, to_config
from proxy.data import build_source
from proxy.model import build_model
from proxy.optim import build_optimizer
from proxy.records import (
    COMPLETED,
    DIVERGED,
    ENSEMBLE_TOKENS_PER_S,
    ERROR_FILE,
    INTERRUPTED,
    PROBE_LOSS,
    ROLLBACK_DIR,
    TOKENS,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    RunDirError,
    Summary,
    atomic_write_text,
)
from proxy.train import diagnostics, distributed
from proxy.train.capture import SpikeCapture
from proxy.train.engine import Computed, Engine, SingleEngine
from proxy.train.ensemble import (
    MemberSpec,
    StackedEngine,
    check_supported,
    member_config,
    member_run_name,
    member_specs,
    sweep_requested,
)
from proxy.train.ledger import RunDirTaken, RunLedger, step_row
from proxy.train.observer import StepObserver
from proxy.train.remedies import Event, Remedy, build_remedy
from proxy.train.runtime import (
    Diverged,
    Interrupted,
    StopSignals,
    autocast_for,
    backends,
    compiled,
    cuda_graph_skips,
    divergence_reason,
    mark_token_classes,
    param_dtype,
    progress_bar,
    resolve_device,
    show_row,
    to_device,
    uses_cuda_graphs,
    wants_compile,
)
from proxy.train.watch import DivergenceWatch, Settled, wants_watch

log = logging.getLogger("proxy.train")


def _reads_every_step(remedy: Optional[Remedy]) -> bool:
    """Whether ``remedy`` needs every step's loss and norm on the host (rollback)."""
    return remedy is not None and not remedy.decides_on_device


class CheckpointError(ConfigError):
    """A checkpoint that loads but cannot be resumed from (it does not fit this config)."""


@dataclass
class RunInfo:
    run_dir: Path
    run_name: str
    sweep_id: Optional[str] = None
    overrides: tuple[str, ...] = ()


@dataclass
class Member:
    """One member of the run: its record and the state a standalone run holds for itself."""

    index: int
    cfg: Config
    run_dir: Path
    run_name: str
    overrides: tuple[str, ...]
    ledger: RunLedger
    remedy: Optional[Remedy]
    spec: Optional[MemberSpec] = None  # None: a standalone run
    observers: list[StepObserver] = field(default_factory=list)
    active: bool = True
    tokens: int = 0
    loss_at_init: Optional[float] = None
    consecutive_skips: int = 0
    # how the member's loop ended, for the observers' close: completed | diverged | interrupted | crashed
    outcome: Optional[str] = None
    diverged_at: Optional[int] = None


class MemberRun:
    """What an observer (proxy/train/observer.py) sees of one member: the run as if it trained
    alone. Its model and optimizer are the engine's own for a standalone run, and member k's
    state as a standalone model and optimizer for a sweep."""

    def __init__(self, trainer: "Trainer", member: Member):
        self._trainer, self._member = trainer, member
        self.cfg, self.run_dir, self.ledger = member.cfg, member.run_dir, member.ledger
        self.dist, self.device, self.source = trainer.dist, trainer.device, trainer.source
        self.autocast = trainer.autocast

    @property
    def model(self) -> nn.Module:
        return self._trainer.engine.member_module(self._member.index)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.engine.member_optimizer(self._member.index)

    @property
    def remedy(self) -> Optional[Remedy]:
        return self._member.remedy

    @property
    def data_position(self) -> int:
        return self._trainer.data_position

    @property
    def lr(self) -> float:
        return self._trainer.lrs[self._member.index]

    @property
    def loss_at_init(self) -> Optional[float]:
        return self._member.loss_at_init

    @property
    def outcome(self) -> Optional[str]:
        return self._member.outcome

    @property
    def diverged_at(self) -> Optional[int]:
        return self._member.diverged_at


class Trainer:
    def __init__(self, cfg: Config, info: RunInfo):
        self.cfg, self.info = cfg, info
        self.sweep = sweep = sweep_requested(cfg)  # members in run_dir/<label>, even a sweep of one
        if sweep:
            check_supported(cfg)
        self.dist = distributed.from_env()
        self.device = resolve_device(cfg.train.device, self.dist.local_rank)
        if self.device.type == "mps" and RemedyKind(cfg.remedy.kind) in (RemedyKind.skip_step, RemedyKind.zclip):
            raise ConfigError(
                f"remedy.kind={RemedyKind(cfg.remedy.kind).value} decides on the device in float64, which MPS lacks: "
                "train on train.device=cpu or cuda"
            )
        if cfg.train.batch_size % self.dist.world_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible "
                f"by the {self.dist.world_size} data-parallel processes"
            )
        distributed.setup(self.dist, self.device)
        info.run_dir = Path(distributed.broadcast(str(info.run_dir)))  # rank 0's directory
        self.run_dir = info.run_dir
        self.local_batch = cfg.train.batch_size // self.dist.world_size
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.autocast = autocast_for(cfg, self.device)

        specs: list[Optional[MemberSpec]] = list(member_specs(cfg, info.overrides)) if sweep else [None]
        # each member's config, as a standalone run of it would have it (built once: engine and ledger)
        configs = [member_config(cfg, spec, info.run_dir) if spec is not None else cfg for spec in specs]
        first_dir = info.run_dir / specs[0].label if specs[0] is not None else info.run_dir
        torch.manual_seed(cfg.train.seed)  # a sweep seeds each member again as it builds it
        random.seed(cfg.train.seed)
        # a resume reads the run's own files back (tokenizer.json: the ids the run was trained on)
        self.source = build_source(cfg.data, run_dir=first_dir if cfg.train.resume else None)
        self.source.check_seq_len(cfg.train.seq_len)  # before any run dir is claimed
        self.engine: Engine = self._sweep_engine(configs) if sweep else self._single_engine()
        self.flops = self.engine.flops_per_token(cfg.train.seq_len)

        # the state a checkpoint restores, shared by the members (they read the same batches)
        self.step = 0  # the next optimizer step to take
        self.data_position = 0  # the index of the next train batch
        self.lrs: list[float] = []  # each member's base LR at the step in progress
        self.stop = StopSignals()
        self.members = [self._member(k, spec, member_cfg) for k, (spec, member_cfg) in enumerate(zip(specs, configs))]
        self.throughput = diagnostics.Throughput(self.flops, self.device)
        self.cuda_graphs = uses_cuda_graphs(cfg, self.device)
        self._graph_skips_before = cuda_graph_skips()  # a process-wide count: a multirun's earlier jobs
        # the divergence rule judged on the device between logging steps (proxy/train/watch.py)
        self.watch: Optional[DivergenceWatch] = None
        if wants_watch(
            cfg,
            self.device,
            remedies=any(_reads_every_step(m.remedy) for m in self.members),
            observers=any(m.observers for m in self.members),
            distributed=self.dist.enabled,
        ):
            self.watch = DivergenceWatch(len(self.members), self.device)

    # -- building ------------------------------------------------------------------------------
    def _single_engine(self) -> SingleEngine:
        cfg = self.cfg
        model = build_model(cfg.model, self.source.vocab_size).to(self.device, param_dtype(cfg))
        self.token_classes = mark_token_classes(model, self.source, cfg)
        optimizer = build_optimizer(model, cfg.optim)
        forward: nn.Module = model
        if self.dist.enabled:  # averages gradients over ranks during backward
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(model, device_ids=ids)
        if wants_compile(cfg, self.device):
            forward = compiled(forward, cfg)  # type: ignore[assignment]
        return SingleEngine(cfg, model, optimizer, forward, self.autocast, self.device)

    def _sweep_engine(self, configs: Sequence[Config]) -> StackedEngine:
        def mark(model: nn.Module) -> Any:
            self.token_classes = mark_token_classes(model, self.source, self.cfg)
            return self.token_classes

        return StackedEngine(
            configs,
            self.source.vocab_size,
            self.device,
            self.autocast,
            self.cfg.train.compile_mode if wants_compile(self.cfg, self.device) else None,
            self.batch("train", 0),
            mark,
        )

    def _member(self, k: int, spec: Optional[MemberSpec], member_cfg: Config) -> Member:
        cfg, info = self.cfg, self.info
        if spec is None:
            run_dir, name, overrides = info.run_dir, info.run_name, info.overrides
        else:
            run_dir = info.run_dir / spec.label
            name = member_run_name(spec, info.run_name or cfg.run_name, info.overrides)
            overrides = spec.overrides
        sweep_id = info.sweep_id if spec is None else (info.sweep_id or info.run_dir.name)
        ledger = RunLedger(
            member_cfg,
            run_dir,
            name,
            sweep_id,
            resume=cfg.train.resume,
            main=self.dist.is_main,
            concurrent_wandb=spec is not None,
        )
        snapshot_dir = run_dir / ROLLBACK_DIR  # disk snapshots; one folder per rank under DDP
        if self.dist.world_size > 1:
            snapshot_dir = snapshot_dir / f"rank_{self.dist.rank}"
        remedy = build_remedy(member_cfg.remedy, grad_clip=member_cfg.optim.grad_clip, snapshot_dir=snapshot_dir)
        member = Member(k, member_cfg, run_dir, name, overrides, ledger, remedy, spec)
        if cfg.capture.enabled:  # spike kits
            member.observers.append(SpikeCapture(cfg.capture))
        return member

    # -- the standalone run's one member, by its old names ---------------------------------------
    @property
    def ledger(self) -> RunLedger:
        return self.members[0].ledger

    @property
    def observers(self) -> list[StepObserver]:
        return self.members[0].observers

    @property
    def remedy(self) -> Optional[Remedy]:
        return self.members[0].remedy

    @remedy.setter
    def remedy(self, remedy: Optional[Remedy]) -> None:
        self.members[0].remedy = remedy

    @property
    def loss_at_init(self) -> Optional[float]:
        return self.members[0].loss_at_init

    @loss_at_init.setter
    def loss_at_init(self, value: Optional[float]) -> None:
        self.members[0].loss_at_init = value

    @property
    def model(self) -> nn.Module:
        return self.engine.member_module(0)

    # -- data ----------------------------------------------------------------------------------
    def batch(self, split: str, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.source.batch(
            split, index, self.local_batch, self.cfg.train.seq_len, rank=self.dist.rank, world_size=self.dist.world_size
        )
        return to_device(x, self.device), to_device(y, self.device)

    def _val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.batch("val", i) for i in range(self.cfg.train.eval_batches))

    def evaluate(self) -> list[float]:
        """Each member's mean cross-entropy over a fixed set of held-out batches."""
        return self.engine.evaluate(self._val_batches(), self.cfg.loss.ignore_index)

    def _active(self) -> list[Member]:
        return [m for m in self.members if m.active]

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, step: int, logging_step: bool) -> dict[int, dict[str, float]]:
        """One optimizer step (or a remedy's skip / rollback) for every active member. Returns
        {member: row} on logging steps."""
        cfg = self.cfg
        solo = None if self.sweep else self.members[0]
        if solo is not None and solo.remedy is not None:
            solo.remedy.before_step(
                step,
                self.engine.member_module(0),
                self.engine.member_optimizer(0),
                self.data_position,
                extra_state=(solo.tokens, solo.loss_at_init),
            )
        if self.cuda_graphs:  # a new training step: the graphs' outputs of the last one may be reused
            torch.compiler.cudagraph_mark_step_begin()
        lrs = self.lrs = self.engine.schedule(step)
        x, y = self.batch("train", self.data_position)
        for member in self._active():
            for observer in member.observers:
                observer.on_batch(self._view(member), step, x, y)
        self.data_position += 1

        collect = logging_step and (cfg.train.stats_every == 0 or step % cfg.train.stats_every == 0)
        read = logging_step or not self._defers()
        if read:
            self.settle()  # the steps before this one, before this one is judged
        active = [m.active for m in self.members]
        c = self.engine.compute(
            step,
            lrs,
            x,
            y,
            [m.remedy for m in self.members],
            active,
            collect=collect,
            measure=logging_step,
            data_position=self.data_position,
            read=read,
        )
        if not read:  # judged on the device, read back at the next settle
            assert self.watch is not None and c.loss_t is not None and c.grad_norm_t is not None
            bounds = self.watch.bounds(cfg, [m.loss_at_init for m in self.members])
            self.watch.observe(step, c.loss_t, c.grad_norm_t, bounds, skipped=c.skip_t)
            moving = [m.active for m in self.members]
            for member in self._active():
                member.tokens += self.tokens_per_step
            self.throughput.add(self.tokens_per_step)
            self.engine.apply(c, moving, moving, measure=False)
            self.step = step + 1
            return {}
        for member in self._active():
            k = member.index
            try:
                self._judge_event(member, step, c.events[k])
                for observer in member.observers:  # before the divergence check: a diverging step is seen too
                    observer.on_step_end(self._view(member), step, c.losses[k], c.grad_norms[k], c.events[k])
                if not c.skips(k):
                    self._check_divergence(member, step, c.losses[k], c.grad_norms[k])
            except Diverged as d:
                self._diverged(member, d)
        moving = [m.active for m in self.members]
        if not any(moving):
            if self.sweep:
                self.engine.apply(c, [False] * len(self.members), moving, measure=False)  # gradients dropped
            return {}

        for member in self._active():
            member.tokens += self.tokens_per_step
        self.throughput.add(self.tokens_per_step)
        updates = self.engine.apply(c, [not c.skips(k) for k in range(len(self.members))], moving, measure=logging_step)
        if solo is not None and c.events[0] is not None and c.events[0].rewinds:
            # the spike's own row ends the abandoned branch, then the event marks where the
            # branch ends: the reader (records.split_branches) relies on that order
            if logging_step:
                solo.ledger.log(step, self._rows(c, updates)[0])
            solo.ledger.remedy_event(c.events[0])
            assert solo.remedy is not None
            restored = solo.remedy.restore(self.engine.member_module(0), self.engine.member_optimizer(0))
            self.step, self.data_position = restored.step, restored.data_position
            solo.tokens, solo.loss_at_init = restored.extra_state
            solo.ledger.drop_checkpoints_after(restored.step)
            return {}
        self.step = step + 1
        for member in self._active():
            member.ledger.track_loss(c.losses[member.index])
        return self._rows(c, updates) if logging_step else {}

    def _rows(self, c: Computed, updates: list[dict[str, float]]) -> dict[int, dict[str, float]]:
        """The log rows of a step: grad stats, updates, forward and data statistics, the scalars."""
        stats = self.engine.statistics(c)
        parts = self.engine.loss_parts(c)
        batch_info = dict(getattr(self.source, "last_batch_info", {}))
        perf = self.throughput.read()
        if self.sweep and TOKENS_PER_S in perf:
            perf[ENSEMBLE_TOKENS_PER_S] = perf[TOKENS_PER_S] * len(self.members)
        rows = {}
        for member in self._active():
            k = member.index
            row = dict(c.grad_stats[k])
            row.update(updates[k])
            row.update(stats[k])
            row.update(batch_info)
            z_loss, total_loss = parts[k]
            row.update(
                step_row(
                    tokens=member.tokens,
                    loss=c.losses[k],
                    z_loss=z_loss,
                    total_loss=total_loss,
                    lr=c.lrs[k],
                    grad_norm=c.grad_norms[k],
                )
            )
            row.update(perf)
            rows[k] = row
        return rows

    def _defers(self) -> bool:
        """Whether this step's divergence rule may wait on the device: a watch, and nothing that
        reads every step's values (rollback, or an observer set after the trainer was built)."""
        return self.watch is not None and not any(_reads_every_step(m.remedy) or m.observers for m in self._active())

    def settle(self) -> None:
        """Read back what the device judged since the last settle (proxy/train/watch.py): a member
        that broke the divergence rule at step s ends diverged at s, as a per-step check ends it;
        so does one whose remedy skipped ``remedy.max_consecutive_skips`` steps in a row ending at
        s. Before that, each step's remedy event (skip-step, ZClip) goes to the member's ledger in
        step order, and the train losses to it. Every step before ``self.step`` is done."""
        if self.watch is None or not self.watch.pending:
            return
        settled: Settled = self.watch.settle()
        for member in self._active():
            k = member.index
            first = settled.first_bad[k]
            events = {e.step: e for e in member.remedy.settle()} if member.remedy is not None else {}
            ended: Optional[Diverged] = None
            for step in settled.steps:  # the per-step order: the event, then the divergence check
                if first is not None and step > first:
                    break
                try:
                    self._judge_event(member, step, events.get(step))
                except Diverged as d:
                    ended = d
                    break
            if ended is None and first is not None:
                reason = divergence_reason(
                    settled.loss_at[k], settled.grad_norm_at[k], member.loss_at_init, member.cfg.train
                )
                ended = Diverged(first, reason or "diverged")
            end = ended.step if ended is not None else None
            for step, loss in zip(settled.steps, settled.losses[k]):
                if end is None or step < end:
                    member.ledger.track_loss(loss)
            if ended is None:
                continue
            member.tokens -= (self.step - ended.step) * self.tokens_per_step  # the steps from s on never counted
            self._diverged(member, ended)

    def _judge_event(self, member: Member, step: int, event: Optional[Event]) -> None:
        """Record the remedy's event (a rollback after its step's row) and count skips in a row."""
        if event is None:
            member.consecutive_skips = 0
            return
        if not event.rewinds:
            member.ledger.remedy_event(event)
        if event.skips_update and not event.rewinds:
            member.consecutive_skips += 1
            limit = member.cfg.remedy.max_consecutive_skips
            if limit and member.consecutive_skips >= limit:
                raise Diverged(step, f"{limit} steps skipped in a row (remedy.max_consecutive_skips)")

    def _check_divergence(self, member: Member, step: int, loss: float, grad_norm: float) -> None:
        reason = divergence_reason(loss, grad_norm, member.loss_at_init, member.cfg.train)
        if reason is not None:
            raise Diverged(step, reason)

    def _diverged(self, member: Member, d: Diverged) -> None:
        """A member's run ended as diverged at step ``d.step`` (a result): its event, its
        observers' close, its final summary. The others go on."""
        member.ledger.event(d.step, DIVERGED, reason=d.reason)
        who = f"member {member.spec.label}" if member.spec is not None else "run"
        log.warning("%s diverged at step %d: %s", who, d.step, d.reason)
        member.outcome, member.diverged_at = DIVERGED, d.step
        self._close_observers(member)
        self._finish(member, DIVERGED, steps=d.step, diverged_at=d.step)

    def _view(self, member: Member) -> MemberRun:
        return MemberRun(self, member)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, member: Member) -> Optional[Path]:
        state = self.engine.member_state(member.index)
        return member.ledger.save_checkpoint(
            self.step,
            model=state["model"],
            optimizer=state["optimizer"],
            data_position=self.data_position,
            tokens=member.tokens,
            loss_at_init=member.loss_at_init,
            remedy=member.remedy.state_dict() if member.remedy is not None else {},
        )

    def save_checkpoints(self) -> dict[int, Optional[Path]]:
        return {m.index: self.save_checkpoint(m) for m in self._active()}

    def restore_checkpoint(self, member: Member, path: Path, state: dict[str, Any]) -> Optional[int]:
        """Put a checkpoint's state (``ledger.read_checkpoint``) back into ``member``; returns how
        many metrics.jsonl lines it covers. CheckpointError (one line) when it does not fit."""
        try:
            self.engine.load_member_state(member.index, state)
            if member.remedy is not None and state.get("remedy"):
                member.remedy.load_state_dict(state["remedy"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{path}: cannot resume from it with this config: {first}") from None
        member.tokens, member.loss_at_init = state["tokens"], state["loss_at_init"]
        return state.get("record_lines")

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Train every member to its end; returns their summaries."""
        t = self.cfg.train
        self._start()
        name = f"sweep x{len(self.members)}" if self.sweep else self.info.run_name
        progress = progress_bar(t.steps, t.progress if self.dist.is_main else False, name, self.step)
        for member in self.members:
            member.outcome = "crashed"  # until the loop says otherwise
        interrupted: Optional[Interrupted] = None
        ended = False  # the loop ended as a loop does (not by an exception: a crash)
        try:
            try:
                with self.stop:
                    self._loop(progress)
            except Interrupted as i:
                interrupted = i
                self.settle()  # a member that diverged before the signal ends diverged
            ended = True
        finally:
            if progress is not None:
                progress.close()
            for member in self._active():
                if ended:
                    member.outcome = INTERRUPTED if interrupted is not None else COMPLETED
                self._close_observers(member)
        if interrupted is not None:  # at a step boundary: the state is whole, a resume goes on from here
            checkpoints = self.save_checkpoints()
            log.warning("run interrupted by %s at step %d", interrupted, self.step)
            for member in self._active():
                checkpoint = checkpoints.get(member.index)
                self._finish(
                    member,
                    INTERRUPTED,
                    steps=self.step,
                    interrupted_by=str(interrupted),
                    checkpoint=str(checkpoint) if checkpoint else None,
                )
            return self.summaries()
        if self._active():
            final = self.evaluate()
            for member in self._active():
                member.ledger.log(t.steps, {VAL_LOSS: final[member.index], TOKENS: member.tokens})
            if t.save_final:
                self.save_checkpoints()
            for member in self._active():
                self._finish(member, COMPLETED, steps=self.step, final_val=final[member.index])
        return self.summaries()

    def summaries(self) -> list[dict[str, Any]]:
        return [m.ledger.summary for m in self.members]

    def _loop(self, progress) -> None:
        t = self.cfg.train
        while self.step < t.steps and self._active():
            self._check_stop()  # SIGINT / SIGTERM: stop here, between two steps
            step = self.step
            if step % t.eval_every == 0 or (t.probe_every and step % t.probe_every == 0):
                self.settle()  # no diverged member is evaluated
                if not self._active():
                    break
            if step % t.eval_every == 0:
                self._log_eval(step, progress)
            if t.probe_every and step % t.probe_every == 0:
                self._log_probe(step)
            logging_step = step % t.log_every == 0 or step == t.steps - 1
            rows = self.train_step(step, logging_step)  # advances self.step (a rollback rewinds it)
            for k, row in rows.items():
                self.members[k].ledger.log(step, row)
            self._show(progress, rows)
            if t.ckpt_every and self.step % t.ckpt_every == 0 and 0 < self.step < t.steps and self._active():
                self.settle()
                self.save_checkpoints()
        self.settle()  # the loop's last step logs (and settles); an emptied ensemble may stop earlier

    def _log_eval(self, step: int, progress) -> None:
        values = self.evaluate()
        for member in self._active():
            val = values[member.index]
            if member.loss_at_init is None:
                member.loss_at_init = val
                member.ledger.update(loss_at_init=val)
            member.ledger.log(step, {VAL_LOSS: val})
        if not self.sweep and self.members[0].active:
            show_row(progress, {VAL_LOSS: values[0]})

    def _log_probe(self, step: int) -> None:
        """Each member's loss on the fixed held-out sample, before this step's update."""
        batches = (self.batch("val", i) for i in range(self.cfg.train.probe_batches))
        values = self.engine.evaluate(batches, self.cfg.loss.ignore_index)
        for member in self._active():
            member.ledger.log(step, {PROBE_LOSS: values[member.index]})
            for observer in member.observers:  # spike capture with capture.trigger=probe
                observer.on_probe(self._view(member), step, values[member.index])

    def _show(self, progress, rows: dict[int, dict[str, float]]) -> None:
        if progress is None:
            return
        if not self.sweep:
            if rows:
                show_row(progress, rows[0])
            progress.n = self.step
            if rows:
                progress.refresh()
            return
        progress.n = self.step
        if rows:
            losses = [r[TRAIN_LOSS] for r in rows.values()]
            progress.set_postfix(active=f"{len(losses)}/{len(self.members)}", best=f"{min(losses):.3f}", refresh=False)
            progress.refresh()

    def _check_stop(self) -> None:
        """Stop at this step boundary if a signal asked to, on every rank together: a signal
        that reached one rank (a scheduler's SIGTERM can) stops them all at the same step."""
        signum = self.stop.signum or 0
        if self.dist.enabled:
            signum = distributed.max_int(signum, self.device)
        if signum:
            raise Interrupted(signum)

    def _start(self) -> None:
        """Validate, then write: every member's lock, the checkpoints a resume starts from (read
        and put back), and only then wandb and the records."""
        for member in self.members:  # every directory taken before any is written
            member.ledger.claim()
        resumed: dict[int, dict[str, Any]] = {k: {} for k in range(len(self.members))}
        lines: dict[int, Optional[int]] = {}
        if self.cfg.train.resume:
            positions = set()
            for member in self.members:
                path, state, skipped = member.ledger.read_checkpoint(self.device)
                lines[member.index] = self.restore_checkpoint(member, path, state)
                positions.add((state["step"], state["data_position"]))
                resumed[member.index] = {
                    "resumed_from": str(path),
                    **({"skipped_checkpoints": skipped} if skipped else {}),
                }
                rng = state
            if len(positions) > 1:
                raise CheckpointError(
                    f"{self.info.run_dir}: the members' newest checkpoints are at different steps "
                    f"({', '.join(str(s) for s, _ in sorted(positions))}); resume each on its own"
                )
            ((self.step, self.data_position),) = positions
            torch.set_rng_state(rng["rng_cpu"].cpu())
            if rng.get("rng_cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["rng_cuda"]])
            for member in self.members:
                member.ledger.open(resume_step=self.step, lines=lines[member.index])
                log.info("resumed %s at step %d", resumed[member.index]["resumed_from"], self.step)
        n_params = self.engine.member_module(0).n_params()
        n_params_non_embedding = self.engine.member_module(0).n_params(non_embedding=True)
        for member in self.members:
            ensemble = (
                {}
                if member.spec is None
                else {"ensemble": {"members": len(self.members), "index": member.index, "label": member.spec.label}}
            )
            member.ledger.start(
                overrides=member.overrides,
                n_params=n_params,
                n_params_non_embedding=n_params_non_embedding,
                device=self.device,
                data=self.source.describe(),
                lr=member.cfg.optim.lr,
                backends=backends(member.cfg, self.device),
                token_classes=self.token_classes,
                **ensemble,
                **resumed[member.index],
            )
            if self.dist.is_main:
                self.source.save(member.run_dir)  # what decodes the run's checkpoints (a BPE tokenizer)

    def _close_observers(self, member: Member) -> None:
        for observer in member.observers:
            observer.close(self._view(member))

    def _finish(
        self,
        member: Member,
        status: str,
        *,
        steps: int,
        diverged_at: Optional[int] = None,
        final_val: Optional[float] = None,
        **extra: Any,
    ) -> dict[str, Any]:
        member.active = False
        if self.cuda_graphs:  # the graphs this run compiled that inductor left out of CUDA graphs
            extra["cuda_graph_skips"] = cuda_graph_skips() - self._graph_skips_before
        if member.remedy is not None and status != INTERRUPTED:
            member.remedy.close()  # e.g. disk snapshots: of no use once the run has ended for good
        return member.ledger.finish(
            status, steps=steps, tokens=member.tokens, diverged_at=diverged_at, final_val=final_val, **extra
        )

    def fail(self, exc: BaseException) -> None:
        """Record a crash in every member still running, and for a sweep the traceback in the
        sweep's own directory too, where the CLI's error line points."""
        import traceback

        text = traceback.format_exc()
        try:  # a member that diverged before the crash, still pending on the device, ends diverged
            self.settle()
        except Exception as err:  # the device may be what failed: the crash is recorded all the same
            log.error("could not read back the pending divergence checks: %s", err)
        if self.sweep and self.dist.is_main and not isinstance(exc, (RunDirTaken, RunDirError)):
            try:  # a refused start writes nowhere it was refused
                atomic_write_text(self.info.run_dir / ERROR_FILE, text)
            except OSError as err:
                log.error("could not write %s: %s", self.info.run_dir / ERROR_FILE, err)
        for member in self.members:
            if member.active:
                member.ledger.fail(exc, self.step, text)
                member.active = False

    def release(self) -> None:
        for member in self.members:
            member.ledger.release()  # also after a KeyboardInterrupt: no lock may outlive the run


# --------------------------------------------------------------------------------------------
# Python API (the Hydra entry, proxy/train/cli.py, routes here)
# --------------------------------------------------------------------------------------------
def _train(
    cfg: Config | dict, run_dir: str | Path, run_name: Optional[str], sweep_id: Optional[str], overrides: Sequence[str]
) -> list[Summary]:
    cfg = to_config(cfg) if not isinstance(cfg, Config) else cfg
    run_dir = Path(run_dir)
    info = RunInfo(run_dir, run_name or cfg.run_name or run_dir.name, sweep_id, tuple(overrides))
    if sweep_requested(cfg):
        info.run_name = run_name or cfg.run_name  # type: ignore[assignment]  # members derive theirs
    trainer = Trainer(cfg, info)
    try:
        return [Summary.of(summary) for summary in trainer.run()]
    except Exception as exc:
        trainer.fail(exc)
        raise
    finally:
        trainer.release()
        distributed.teardown()


def train(
    cfg: Config | dict,
    run_dir: str | Path,
    run_name: Optional[str] = None,
    sweep_id: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> Summary:
    """Train one run into ``run_dir`` and return its summary. Never raises on divergence."""
    cfg = to_config(cfg) if not isinstance(cfg, Config) else cfg
    if sweep_requested(cfg):
        raise ConfigError("train() trains one run: sweep.* asks for a sweep (train_ensemble)")
    return _train(cfg, run_dir, run_name, sweep_id, overrides)[0]


def train_ensemble(
    cfg: Config | dict,
    run_dir: str | Path,
    run_name: Optional[str] = None,
    sweep_id: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> list[Summary]:
    """Train every member of ``cfg.sweep`` into ``run_dir/<label>`` and return their summaries.

    As :func:`train`: never raises on divergence (a diverged member is a result); a crash marks
    every running member failed, writes error.txt, and raises.
    """
    cfg = to_config(cfg) if not isinstance(cfg, Config) else cfg
    if not sweep_requested(cfg):
        raise ConfigError("train_ensemble needs sweep.lrs, sweep.seeds or sweep.weight_decays")
    return _train(cfg, run_dir, run_name, sweep_id, overrides)


__all__ = ["CheckpointError", "Member", "MemberRun", "RunInfo", "Trainer", "train", "train_ensemble"]
