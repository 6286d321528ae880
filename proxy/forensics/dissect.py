"""Dissect a spike kit: ``proxy-inspect KIT`` (or a run directory: every kit in it).

What it asks of a kit (proxy/train/capture.py writes them), and where the answer comes from:

- Where in the model? One trainer step taken at the pre-spike state (K steps earlier, its own
  batch) and at the spike, per parameter: weight, gradient (before clipping), update and Adam
  moment norms; the update RMS over the LR (~1 for a healthy Adam step, small when eps
  dominates, Wortsman et al. 2023); the fraction of coordinates with sqrt(v_hat) < eps (eps
  collapse); the max attention logit per head; the output logit mean and log-sum-exp.
- Which data? Per-sequence loss and gradient contribution in the spiking batch (one backward per
  row), each row checked with proxy.data.find_repeated_ngrams (OLMo 2's repeated n-grams).
- Does it come back? Replays from the pre-spike state with the trainer's own step arithmetic:
  (a) the same batches, which must reproduce the recorded losses bitwise on CPU; (b) the same
  rows shuffled across the window's steps, and different batches from the data stream (PaLM
  skipped batches); (c) the spiking batch without its offending rows.
- Is it an optimizer instability? Sharpness and Adam's preconditioned sharpness against the 2/eta
  and 38/eta edge-of-stability bounds (proxy/forensics/curvature.py), and the distribution of the
  per-coordinate Adam update, which turns bimodal before divergence (Molybog et al. 2023). With
  ``--edge``, the same measured at every step from the pre-spike state through the spike
  (proxy/forensics/edge.py: does the preconditioned sharpness cross 38/eta before the spike?).

This module is the analysis (:func:`inspect_kit` -> :class:`Inspection`); its report is
proxy/forensics/dissect_report.py (``<kit>/inspect/report.md``, figures, ``inspect.json``) and the
command line proxy/forensics/inspect_cli.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from proxy.config import Config
from proxy.data import find_repeated_ngrams
from proxy.forensics import curvature
from proxy.forensics.edge import (
    EdgeTrajectory,
    adam_direction,
    batch_sharpness,
    bimodality_coefficient,
    edge_trajectory,
    reference_config,
)
from proxy.forensics.replay import (
    Kit,
    KitError,
    Replay,
    fresh_batches,
    load_kit,
    replay,
    restore,
    states_equal,
    trainer_step,
)

OUT_DIR = "inspect"
DIFFERENT_OFFSET = 10_000  # "different batches" are read this many positions further on
HIST_SAMPLE = 200_000  # coordinates per parameter kept for the update histograms
HIST_BINS = 61


# ============================================================================================
# One step at a kit state: where the spike sits in the model
# ============================================================================================
@dataclass
class ParamStats:
    name: str
    weight_norm: float
    grad_norm: float  # before clipping
    grad_rms: float
    update_norm: float
    update_rms_over_lr: float  # RMS of the applied update / the parameter's LR
    exp_avg_norm: float
    exp_avg_sq_norm: float
    eps_fraction: float  # coordinates with sqrt(v_hat) < eps
    bimodality: float  # Sarle's coefficient of the Adam direction (> 5/9: bimodal-leaning)


@dataclass
class Probe:
    state: str
    step: int
    lr: float
    loss: float
    grad_norm: float
    params: list[ParamStats]
    attn_max_logits: list[list[float]]  # [layer][head], max over the batch
    output: dict[str, float]  # logit_mean, logit_max, lse_mean
    directions: dict[str, Tensor] = field(repr=False, default_factory=dict)  # m_hat/(sqrt(v_hat)+eps)
    sharpness: Optional[curvature.Sharpness] = None


def probe(kit: Kit, state: str, device: str = "cpu", curvature_iters: int = 20) -> Probe:
    """Take the step at kit state ``state`` with its recorded batch (no remedy) and measure it."""
    t = restore(kit, state, device)
    step = t.step
    x, y = kit.batch(step)
    named = list(t.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named}
    r = trainer_step(t, x, y, use_remedy=False, collect_stats=True, apply=False)
    clip = t.cfg.optim.grad_clip
    # undo the clipping to report the raw gradient (clip_grad_norm's own scale)
    scale = min(1.0, clip / (r.grad_norm + 1e-6)) if clip > 0 and math.isfinite(r.grad_norm) else 1.0
    grads = {n: p.grad.detach() / scale if p.grad is not None else torch.zeros_like(p) for n, p in named}
    t.optimizer.step()
    group_of = {id(p): g for g in t.optimizer.param_groups for p in g["params"]}
    stats, directions = [], {}
    for name, p in named:
        group, state_p = group_of[id(p)], t.optimizer.state.get(p, {})
        g, delta = grads[name].float(), (p.detach() - before[name]).float()
        m, v = state_p.get("exp_avg", torch.zeros_like(p)), state_p.get("exp_avg_sq", torch.zeros_like(p))
        u, sqrt_v_hat = adam_direction(t.optimizer, p)
        directions[name] = _sample(u.reshape(-1))
        stats.append(
            ParamStats(
                name=name,
                weight_norm=float(before[name].float().norm()),
                grad_norm=float(g.norm()),
                grad_rms=float(g.pow(2).mean().sqrt()),
                update_norm=float(delta.norm()),
                update_rms_over_lr=float(delta.pow(2).mean().sqrt() / group["lr"]) if group["lr"] > 0 else 0.0,
                exp_avg_norm=float(m.float().norm()),
                exp_avg_sq_norm=float(v.float().norm()),
                eps_fraction=float((sqrt_v_hat < group["eps"]).double().mean()),
                bimodality=bimodality_coefficient(u),
            )
        )
    result = Probe(
        state=state,
        step=step,
        lr=r.lr,
        loss=r.loss,
        grad_norm=r.grad_norm,
        params=stats,
        attn_max_logits=[
            layer.float().amax(0).tolist()  # max over the batch, per head
            for layer in r.out.attn_max_logits
            if layer is not None
        ],
        output={k: float(v) for k, v in r.out.output_stats.items()},
        directions=directions,
    )
    if curvature_iters > 0:
        precond = curvature.adam_preconditioner(t.optimizer, [p for _, p in named])
        result.sharpness = _sharpness(kit, state, device, x, y, precond, r.lr, curvature_iters)
    return result


def _sharpness(
    kit: Kit, state: str, device: str, x: Tensor, y: Tensor, precond: Tensor, lr: float, iterations: int
) -> curvature.Sharpness:
    """At the state's weights, before its update, in fp32 on the reference attention and loss
    (the Triton kernels have no double backward; the weights and the math are the same)."""
    model = restore(kit, state, device, cfg=reference_config(kit.config)).model
    return batch_sharpness(model, kit.config, x, y, precond, lr, iterations)


def _sample(values: Tensor) -> Tensor:
    """At most HIST_SAMPLE values, evenly strided (deterministic), as fp32 on the CPU."""
    stride = max(1, values.numel() // HIST_SAMPLE)
    return values[::stride].float().cpu()


# ============================================================================================
# The batch: which sequences drive the spike
# ============================================================================================
@dataclass
class SequenceStat:
    row: int
    tokens: int  # label tokens that count in the loss
    loss: float
    grad_contribution: float  # || d (n_row / n_batch * loss_row) / d theta ||
    cosine: float  # with the whole batch's gradient
    repeated_tokens: int  # tokens in a repeated n-gram run (find_repeated_ngrams)
    preview: list[int]  # a few tokens: the start of the repeated run if any, else of the row


def sequence_stats(
    kit: Kit, device: str = "cpu", step: Optional[int] = None, ngram: Optional[dict[str, int]] = None
) -> list[SequenceStat]:
    """:func:`batch_sequence_stats` for the batch of ``step`` (default: the spike) at the state
    the kit holds for it."""
    step = kit.step if step is None else step
    name = "at" if step == kit.step else "before"
    if kit.state_step(name) != step:
        raise KitError(f"{kit.path} holds no state at step {step}")
    t = restore(kit, name, device)
    x, y = kit.batch(step)
    return batch_sequence_stats(t.model, t.cfg, x.to(device), y.to(device), ngram or ngram_settings(kit), t.autocast)


def batch_sequence_stats(
    model: torch.nn.Module, cfg: Config, x: Tensor, y: Tensor, ngram: dict[str, int], autocast=contextlib.nullcontext
) -> list[SequenceStat]:
    """Per-row loss and gradient contribution of a batch (one backward per row).

    The training loss is a mean over all label tokens of the batch, so row b weighs n_b / N and
    the rows' contributions sum to the batch gradient. ``cosine`` is each row's alignment with
    that sum: a row that points where the whole batch points is what moves the weights.
    """
    ignore = cfg.loss.ignore_index
    n_rows = (y != ignore).sum(-1)
    n_total = max(1, int(n_rows.sum()))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(rows: slice, weight: float) -> tuple[Tensor, float]:
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x[rows], y[rows], z_loss=cfg.loss.z_loss, ignore_index=ignore)
        (out.loss * weight).backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        return flat, out.ce_loss.item()

    total, _ = gradient(slice(None), 1.0)
    total_norm = float(total.norm())
    stats = []
    for b in range(x.shape[0]):
        g, loss = gradient(slice(b, b + 1), int(n_rows[b]) / n_total)
        norm = float(g.norm())
        row_tokens = _row_tokens(x[b], y[b], ignore)
        mask = find_repeated_ngrams(row_tokens, **ngram)
        start = int(mask.nonzero()[0]) if mask.any() else 0
        stats.append(
            SequenceStat(
                row=b,
                tokens=int(n_rows[b]),
                loss=loss,
                grad_contribution=norm,
                cosine=float(torch.dot(g, total) / (norm * total_norm)) if norm > 0 and total_norm > 0 else 0.0,
                repeated_tokens=int(mask.sum()),
                preview=row_tokens[start : start + 16].tolist(),
            )
        )
    model.zero_grad(set_to_none=True)
    return stats


def _row_tokens(inputs: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The row as the source drew it (seq_len + 1 tokens), so a planted run is seen whole."""
    last = labels[-1:]
    return torch.cat([inputs, last]).cpu() if int(last) != ignore_index else inputs.cpu()


def ngram_settings(kit: Kit) -> dict[str, int]:
    """The repeated n-gram definition to flag rows with: the run's ngram_filter settings, with
    the planted run length when injection was on and shorter (else the plants go unflagged)."""
    flt, inj = kit.config.data.ngram_filter, kit.config.data.inject
    repeats = min(flt.min_repeats, inj.repeats) if inj.enabled else flt.min_repeats
    return {"min_period": flt.min_period, "max_period": flt.max_period, "min_repeats": max(2, repeats)}


def offenders(stats: Sequence[SequenceStat], z: float = 3.0) -> list[int]:
    """Rows to blame: those with a repeated n-gram, and those whose gradient contribution is a
    robust outlier (above median + z * 1.4826 * MAD); at least the largest contributor."""
    values = torch.tensor([s.grad_contribution for s in stats], dtype=torch.float64)
    median = values.median()
    mad = 1.4826 * (values - median).abs().median()
    rows = {s.row for s in stats if s.repeated_tokens > 0}
    rows |= {s.row for s in stats if s.grad_contribution > median + z * mad and mad > 0}
    rows.add(max(stats, key=lambda s: s.grad_contribution).row)
    return sorted(rows)


# ============================================================================================
# Replays: does the spike come back?
# ============================================================================================
@dataclass
class ReplayVerdict:
    variant: str
    description: str
    replay: Replay
    peak: float  # the largest trigger-series value from the spike step on
    recurs: bool
    bitwise: Optional[bool] = None  # same batches: losses equal to the recorded ones, bit for bit
    after_state_equal: Optional[bool] = None


def replays(
    kit: Kit, offending_rows: Sequence[int], device: str = "cpu", seed: int = 0, ngram: Optional[dict[str, int]] = None
) -> tuple[list[ReplayVerdict], list[str]]:
    """The four replays from the pre-spike state; notes say what could not be run."""
    notes: list[str] = []
    steps = [s for s in kit.steps if s >= kit.state_step("before")]
    same = [kit.batch(s) for s in steps]
    variants: list[tuple[str, str, list[tuple[Tensor, Tensor]]]] = [
        ("same", "the recorded batches", same),
        ("shuffled", "the same rows shuffled across the window's steps", _shuffled(same, seed)),
    ]
    different = fresh_batches(kit, steps, DIFFERENT_OFFSET, notes)
    if different is not None:
        variants.append(
            ("different", f"fresh batches from the data stream, {DIFFERENT_OFFSET} positions on", different)
        )
    cleaned, masked = _without_offenders(kit, steps, same, offending_rows, ngram or ngram_settings(kit))
    variants.append(
        (
            "without_offenders",
            f"offending rows masked out of the loss: {list(offending_rows)} "
            f"at the spike, {masked} rows with repeated n-grams at other "
            "steps",
            cleaned,
        )
    )

    verdicts = []
    for name, description, batches in variants:
        r = replay(kit, batches, variant=name, device=device)
        verdict = _judge(kit, name, description, r)
        if name == "same":
            pairs = []  # (recorded, replayed) losses and grad norms (none for a diverged step)
            for step, loss, grad_norm in zip(r.steps, r.losses, r.grad_norms):
                row = kit.recorded(step)
                if row is not None:
                    pairs.append((row["loss"], loss))
                    pairs += [(row["grad_norm"], grad_norm)] if row["event"] != "diverged" else []
            verdict.bitwise = bool(pairs) and all(_same_float(a, b) for a, b in pairs)
            if kit.has_state("after") and r.steps and r.steps[-1] + 1 == kit.state_step("after"):
                assert r.training is not None  # replay() returns with its final state
                verdict.after_state_equal = states_equal(r.training.model.state_dict(), kit.state("after")["model"])
        verdicts.append(verdict)
    if kit.meta.get("world_size", 1) > 1:
        notes.append(
            f"the run had {kit.meta['world_size']} data-parallel ranks; the kit holds rank "
            "0's shard, so replays see part of each batch and cannot match bitwise"
        )
    return verdicts, notes


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _judge(kit: Kit, name: str, description: str, r: Replay) -> ReplayVerdict:
    series = r.grad_norms if kit.trigger == "grad_norm" else r.losses
    after = [v for s, v in zip(r.steps, series) if s >= kit.step]
    threshold = float(kit.meta["threshold"])
    finite_peak = max((v for v in after if math.isfinite(v)), default=math.nan)
    broke = any(not math.isfinite(v) for v in r.losses + r.grad_norms)
    recurs = broke or (math.isfinite(threshold) and finite_peak > threshold)
    return ReplayVerdict(name, description, r, peak=math.inf if broke else finite_peak, recurs=recurs)


def _without_offenders(
    kit: Kit,
    steps: Sequence[int],
    batches: Sequence[tuple[Tensor, Tensor]],
    offending_rows: Sequence[int],
    ngram: dict[str, int],
):
    """The batches with the spike's offending rows, and every other step's rows holding a
    repeated n-gram (what OLMo 2's filter would drop), masked out of the loss."""
    ignore = kit.config.loss.ignore_index
    cleaned, masked = [], 0
    for step, (x, y) in zip(steps, batches):
        y = y.clone()
        if step == kit.step:
            rows = list(offending_rows)
        else:
            rows = [b for b in range(len(x)) if find_repeated_ngrams(_row_tokens(x[b], y[b], ignore), **ngram).any()]
            masked += len(rows)
        y[rows] = ignore
        cleaned.append((x, y))
    return cleaned, masked


def _shuffled(batches: Sequence[tuple[Tensor, Tensor]], seed: int) -> list[tuple[Tensor, Tensor]]:
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    rows = len(batches[0][0])
    return [(inputs[order[i : i + rows]], labels[order[i : i + rows]]) for i in range(0, len(order), rows)]


# ============================================================================================
# The whole dissection
# ============================================================================================
@dataclass
class Inspection:
    kit: Kit
    pre: Probe
    spike: Probe
    sequences: list[SequenceStat]
    offending_rows: list[int]
    ngram: dict[str, int]
    verdicts: list[ReplayVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    edge: Optional[EdgeTrajectory] = None  # with edge=True: every step from the pre-spike state on


def inspect_kit(
    kit: Kit | str | Path,
    device: str = "cpu",
    do_replay: bool = True,
    curvature_iters: int = 20,
    ngram: Optional[dict[str, int]] = None,
    edge: bool = False,
    edge_batches: int = 0,
) -> Inspection:
    """Every analysis of the module doc on one kit; :func:`write_report` writes it out.

    ``edge`` adds Adam's edge-of-stability trajectory (proxy/forensics/edge.py) with
    ``curvature_iters`` products per eigenvalue: two Lanczos runs per step of the window, of each
    step's batch loss, or with ``edge_batches`` = N of the run's first N held-out batches."""
    if edge and curvature_iters < 1:
        raise KitError("the edge-of-stability trajectory needs curvature_iters >= 1")
    kit = kit if isinstance(kit, Kit) else load_kit(kit)
    ngram = ngram or ngram_settings(kit)
    pre = probe(kit, "before", device, curvature_iters)
    spike = probe(kit, "at", device, curvature_iters)
    sequences = sequence_stats(kit, device, ngram=ngram)
    rows = offenders(sequences)
    result = Inspection(kit, pre, spike, sequences, rows, ngram)
    if not kit.meta.get("complete", False):
        result.notes.append(f"incomplete kit: {kit.meta.get('incomplete_reason')}")
    if do_replay:
        result.verdicts, notes = replays(kit, rows, device, ngram=ngram)
        result.notes += notes
    if edge:
        result.edge = edge_trajectory(kit, device, curvature_iters, sharpness_batches=edge_batches)
    return result
