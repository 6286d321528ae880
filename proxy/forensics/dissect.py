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

Output: ``<kit>/inspect/report.md`` with figures and ``inspect.json`` beside it (the Markdown
through proxy/report/document.py, the project's one document writer).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from proxy.config import Config, ConfigError
from proxy.data import DataError, find_repeated_ngrams
from proxy.forensics import curvature
from proxy.forensics.edge import (
    FIGURE as EDGE_FIGURE,
)
from proxy.forensics.edge import (
    EdgeTrajectory,
    adam_direction,
    batch_sharpness,
    bimodality_coefficient,
    crossing_line,
    edge_figure,
    edge_section,
    edge_trajectory,
    reference_config,
)
from proxy.forensics.replay import (
    Kit,
    KitError,
    Replay,
    find_kits,
    fresh_batches,
    load_kit,
    replay,
    restore,
    states_equal,
    trainer_step,
)
from proxy.records import UnsafePathError, atomic_write_text, output_dir, save_figure, terminal_text, write_json
from proxy.report.document import Block, Figure, Heading, Items, Paragraph, Quote, Table, to_markdown
from proxy.report.figures import LITERAL_TEXT

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


# ============================================================================================
# The report
# ============================================================================================
def _g(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def _pair(a: float, b: float) -> str:
    return f"{_g(a)} → {_g(b)}"


def _yes(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def summary_lines(insp: Inspection) -> list[str]:
    """The headline: trigger, where the gradient jumped, the data, the replays, the curvature."""
    kit, pre, spike = insp.kit, insp.pre, insp.spike
    lines = [f"spike at step {kit.step}: {kit.trigger} {_g(kit.meta['value'])} (threshold {_g(kit.meta['threshold'])})"]
    ratio, name = max(
        (s.grad_norm / p.grad_norm if p.grad_norm > 0 else math.inf, s.name) for p, s in zip(pre.params, spike.params)
    )
    lines.append(
        f"largest gradient growth: {name} x{_g(ratio)} (total grad norm {_pair(pre.grad_norm, spike.grad_norm)})"
    )
    flagged = [s.row for s in insp.sequences if s.repeated_tokens > 0]
    lines.append(f"offending rows {insp.offending_rows}; with repeated n-grams: {flagged or 'none'}")
    for v in insp.verdicts:
        extra = "" if v.bitwise is None else f", bitwise {_yes(v.bitwise)}"
        lines.append(f"replay {v.variant}: {'spike recurs' if v.recurs else 'no spike'} (peak {_g(v.peak)}{extra})")
    if spike.sharpness is not None:
        sh = spike.sharpness
        lines.append(
            f"sharpness {_g(sh.sharpness)} = {_g(sh.gd_ratio)} x 2/lr; preconditioned "
            f"{_g(sh.preconditioned)} = {_g(sh.adam_ratio)} x {_g(sh.adam_threshold * sh.lr)}/lr"
        )
    if insp.edge is not None:
        lines.append(crossing_line(insp.edge))
    return lines


def write_report(insp: Inspection, out_dir: Optional[str | Path] = None) -> Path:
    """report.md, inspect.json and figures in ``out_dir`` (default ``<kit>/inspect``), each file
    written whole, report.md last. Neither folder may be a link (UnsafePathError, one line)."""
    kit = insp.kit
    out = (
        output_dir(out_dir, what="the inspection")
        if out_dir is not None
        else output_dir(kit.path, OUT_DIR, what="the inspection")
    )
    figures = _figures(insp, out)
    blocks: list[Block] = [Paragraph(f"Kit: `{kit.path}`"), Items(summary_lines(insp))]
    blocks += [Quote(note) for note in insp.notes]
    blocks += _param_section(insp) + _logit_section(insp) + _batch_section(insp)
    blocks += _replay_section(insp) + _curvature_section(insp)
    blocks += edge_section(insp.edge) if insp.edge is not None else []
    blocks += [Heading("Figures")] + [Figure(f.name) for f in figures]
    write_json(out / "inspect.json", _as_json(insp))
    atomic_write_text(out / "report.md", to_markdown(f"Spike kit: step {kit.step}", blocks))
    return out / "report.md"


def _param_section(insp: Inspection) -> list[Block]:
    pre, spike = insp.pre, insp.spike
    md: list[Block] = [
        Heading(f"Per parameter: pre-spike (step {pre.step}) → spike (step {spike.step})"),
        Paragraph(
            "One trainer step at each state with its own batch, no remedy. ‖g‖ before clipping; "
            "Δ/lr is the update RMS over the LR (≈1 for a healthy Adam step); √v̂<ε is the fraction "
            "of coordinates where Adam's eps dominates (embedding rows of unseen tokens count too); "
            "BC is the bimodality coefficient of m̂/(√v̂+ε) (1/3 normal, 5/9 uniform, → 1 bimodal)."
        ),
    ]
    rows = [
        [
            f"`{p.name}`",
            _pair(p.weight_norm, s.weight_norm),
            _pair(p.grad_norm, s.grad_norm),
            _g(s.grad_norm / p.grad_norm) if p.grad_norm > 0 else "-",
            _pair(p.update_norm, s.update_norm),
            _pair(p.update_rms_over_lr, s.update_rms_over_lr),
            _pair(p.exp_avg_norm, s.exp_avg_norm),
            _pair(p.exp_avg_sq_norm, s.exp_avg_sq_norm),
            _pair(p.eps_fraction, s.eps_fraction),
            _pair(p.bimodality, s.bimodality),
        ]
        for p, s in zip(pre.params, spike.params)
    ]
    header = ["parameter", "‖W‖", "‖g‖", "‖g‖ ×", "‖Δ‖", "Δ/lr", "‖m‖", "‖v‖", "√v̂<ε", "BC"]
    return md + [Table(header, rows)]


def _logit_section(insp: Inspection) -> list[Block]:
    pre, spike = insp.pre, insp.spike
    md: list[Block] = []
    if spike.attn_max_logits:
        heads = len(spike.attn_max_logits[0])
        md += [
            Heading("Max attention logit per head"),
            Table(
                ["layer"] + [f"head {h}" for h in range(heads)],
                [
                    [i] + [_pair(a, b) for a, b in zip(pa, pb)]
                    for i, (pa, pb) in enumerate(zip(pre.attn_max_logits, spike.attn_max_logits))
                ],
            ),
        ]
    rows = [[k, _pair(pre.output.get(k, math.nan), v)] for k, v in spike.output.items()]
    rows += [["train loss", _pair(pre.loss, spike.loss)], ["grad norm", _pair(pre.grad_norm, spike.grad_norm)]]
    return md + [Heading("Output logits"), Table(["statistic", "pre → spike"], rows)]


def _batch_section(insp: Inspection) -> list[Block]:
    md: list[Block] = [
        Heading(f"The spiking batch (step {insp.kit.step})"),
        Paragraph(
            f"Rows ranked by gradient contribution. Repeated n-grams: find_repeated_ngrams with "
            f"{insp.ngram}. Offending rows (n-gram or robust outlier): {insp.offending_rows}."
        ),
    ]
    ranked = sorted(insp.sequences, key=lambda s: -s.grad_contribution)
    rows = [
        [
            i + 1,
            s.row,
            _g(s.loss),
            s.tokens,
            _g(s.grad_contribution),
            _g(s.cosine),
            f"yes ({s.repeated_tokens} tokens)" if s.repeated_tokens else "no",
            " ".join(map(str, s.preview)),
        ]
        for i, s in enumerate(ranked)
    ]
    header = [
        "rank",
        "row",
        "loss",
        "tokens",
        "grad contribution",
        "cos(batch grad)",
        "repeated n-gram",
        "tokens shown",
    ]
    return md + [Table(header, rows)]


def _replay_section(insp: Inspection) -> list[Block]:
    if not insp.verdicts:
        return []
    kit = insp.kit
    md: list[Block] = [
        Heading(f"Replays from the pre-spike state (step {kit.state_step('before')})"),
        Paragraph(
            f"Does the {kit.trigger} spike come back? Threshold {_g(kit.meta['threshold'])}; "
            "peak = the largest value from the spike step on."
        ),
    ]
    rows = [
        [v.variant, v.description, _g(v.peak), _yes(v.recurs), _yes(v.bitwise), _yes(v.after_state_equal)]
        for v in insp.verdicts
    ]
    return md + [Table(["variant", "batches", "peak", "spike recurs", "bitwise", "after state equal"], rows)]


def _curvature_section(insp: Inspection) -> list[Block]:
    probes = [(p, p.sharpness) for p in (insp.pre, insp.spike) if p.sharpness is not None]
    if not probes:
        return []
    md: list[Block] = [
        Heading("Curvature (edge of stability)"),
        Paragraph(
            "λmax(H) by Lanczos on Hessian-vector products, against 2/η; Adam's preconditioned "
            "sharpness λmax(P⁻¹H), P = diag(√v̂+ε)/lr_scale, against (2+2β₁)/((1−β₁)η) (38/η at "
            "β₁=0.9). Ratios near or above 1 mean the step is at or past the stability edge."
        ),
    ]
    rows = [
        [
            p.state,
            _g(p.lr),
            _g(sharp.sharpness),
            _g(sharp.gd_threshold),
            _g(sharp.gd_ratio),
            _g(sharp.preconditioned),
            _g(sharp.adam_threshold),
            _g(sharp.adam_ratio),
        ]
        for p, sharp in probes
    ]
    header = ["state", "η", "λmax(H)", "2/η", "ratio", "λmax(P⁻¹H)", "(2+2β₁)/((1−β₁)η)", "ratio"]
    return md + [Table(header, rows)]


def _as_json(insp: Inspection) -> dict[str, Any]:
    def probe_json(p: Probe) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("directions", "sharpness")}
        if p.sharpness is not None:
            d["sharpness"] = {
                **dataclasses.asdict(p.sharpness),
                "gd_ratio": p.sharpness.gd_ratio,
                "adam_ratio": p.sharpness.adam_ratio,
            }
        return d

    return {
        "kit": str(insp.kit.path),
        "step": insp.kit.step,
        "trigger": insp.kit.trigger,
        "value": insp.kit.meta["value"],
        "threshold": insp.kit.meta["threshold"],
        "pre": probe_json(insp.pre),
        "spike": probe_json(insp.spike),
        "sequences": [dataclasses.asdict(s) for s in insp.sequences],
        "offending_rows": insp.offending_rows,
        "ngram": insp.ngram,
        "replays": [
            {
                "variant": v.variant,
                "description": v.description,
                "steps": v.replay.steps,
                "losses": v.replay.losses,
                "grad_norms": v.replay.grad_norms,
                "events": v.replay.events,
                "peak": v.peak,
                "recurs": v.recurs,
                "bitwise": v.bitwise,
                "after_state_equal": v.after_state_equal,
            }
            for v in insp.verdicts
        ],
        "notes": insp.notes,
        "edge": insp.edge.to_json() if insp.edge is not None else None,
    }


# -- figures (matplotlib, Agg) -----------------------------------------------------------------
def _figures(insp: Inspection, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(LITERAL_TEXT):  # parameter names from a kit are text, never math
        figures = [_update_figure(insp), _sequence_figure(insp)]
        names = ["update_distribution.png", "sequences.png"]
        if insp.verdicts:
            figures.insert(0, _replay_figure(insp))
            names.insert(0, "replay.png")
        if insp.edge is not None:
            figures.append(edge_figure(insp.edge))
            names.append(EDGE_FIGURE)
        return [_save_fig(fig, out / name) for fig, name in zip(figures, names)]


def _replay_figure(insp: Inspection):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kit, trace = insp.kit, insp.kit.meta["trace"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("loss", "grad_norm")):
        ax.plot([r["step"] for r in trace], [r[key] for r in trace], "ko", ms=7, mfc="none", label="recorded")
        for v in insp.verdicts:
            ax.plot(
                v.replay.steps, v.replay.losses if key == "loss" else v.replay.grad_norms, marker=".", label=v.variant
            )
        threshold = float(kit.meta["threshold"])
        if math.isfinite(threshold) and (kit.trigger == key or (key == "loss" and kit.trigger == "diverged")):
            ax.axhline(threshold, color="red", ls=":", lw=1, label="threshold")
        ax.axvline(kit.step, color="grey", ls="--", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_title(key.replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _update_figure(insp: Inspection):
    """Small multiples, one per parameter: the Adam update per coordinate, pre vs spike."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = [p.name for p in insp.spike.params]
    cols, rows = 4, math.ceil(len(names) / 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pre, spike = insp.pre.directions[name], insp.spike.directions[name]
        both = torch.cat([pre, spike])
        both = both[torch.isfinite(both)]
        bound = float(both.abs().max()) if both.numel() else 0.0
        edges = torch.linspace(-bound, bound, HIST_BINS + 1).tolist() if bound > 0 else HIST_BINS
        ax.hist(pre.numpy(), bins=edges, histtype="step", color="tab:blue", label="pre")
        ax.hist(spike.numpy(), bins=edges, histtype="step", color="tab:red", label="spike")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Adam update m̂/(√v̂+ε) per coordinate", fontsize=9)
    fig.tight_layout()
    return fig


def _sequence_figure(insp: Inspection):
    import matplotlib.pyplot as plt

    stats = insp.sequences
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(stats) + 2), 3))
    ax.bar(
        [s.row for s in stats],
        [s.grad_contribution for s in stats],
        color=["tab:red" if s.repeated_tokens else "tab:blue" for s in stats],
    )
    ax.set_xlabel("row of the spiking batch (red: repeated n-gram)")
    ax.set_ylabel("gradient contribution")
    fig.tight_layout()
    return fig


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================================
# Command line
# ============================================================================================
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``proxy-inspect KIT [KIT ...]``: a kit directory, or a run directory (all its kits)."""
    parser = argparse.ArgumentParser(prog="proxy-inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="spike kit or run directory")
    parser.add_argument("--out", help="report directory (default: <kit>/inspect; one kit only)")
    parser.add_argument("--device", default="cpu", help="cpu (bitwise replays of CPU runs) or cuda")
    parser.add_argument("--no-replay", action="store_true", help="skip the replays")
    parser.add_argument(
        "--lanczos-iters", type=int, default=20, help="Hessian-vector products per eigenvalue; 0 skips the curvature"
    )
    parser.add_argument(
        "--edge",
        action="store_true",
        help="Adam's edge of stability over every step "
        "from the pre-spike state to the spike (two Lanczos runs per step; edge.png)",
    )
    parser.add_argument(
        "--edge-batches",
        type=int,
        default=0,
        help="with --edge: the eigenvalues of the loss over "
        "the run's first N held-out batches, the same at every step (default 0: each step's batch)",
    )
    parser.add_argument(
        "--ngram-repeats",
        type=int,
        default=None,
        help="min repeats for a repeated n-gram (default: from the kit's config)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="the text file or memmap folder a text/memmap run was trained on (a kit's own "
        "data.path is never read): needed for the replays on fresh batches",
    )
    args = parser.parse_args(argv)
    try:
        found = [(Path(p), k) for p in args.paths for k in _kits_at(Path(p))]
        kits = [k for _, k in found]
        if args.out and len(kits) > 1:
            raise KitError(f"--out takes one kit, {len(kits)} found")
        if args.lanczos_iters < 0:
            raise KitError(f"--lanczos-iters={args.lanczos_iters} must be >= 0")
        if args.edge and args.lanczos_iters == 0:
            raise KitError("--edge needs the curvature: --lanczos-iters must be >= 1")
        if args.edge_batches < 0 or (args.edge_batches and not args.edge):
            raise KitError(f"--edge-batches={args.edge_batches} must be >= 0, and needs --edge")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise KitError(f"--device {args.device}: no CUDA device is available")
    except (KitError, ConfigError, DataError, OSError, UnsafePathError) as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    failed = 0
    for named, path in found:  # one kit that cannot be inspected does not stop the others
        try:
            _inspect_one(args, named, path)
        except (KitError, ConfigError, DataError, OSError, UnsafePathError) as exc:
            print(f"error: {terminal_text(exc)}", file=sys.stderr)
            failed += 1
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:  # a kit proxy did not write
            print(terminal_text(f"error: {path}: cannot be inspected ({type(exc).__name__}: {exc})"), file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _inspect_one(args: argparse.Namespace, named: Path, path: Path) -> None:
    # every folder from the one named down to the report must be real: no output through a link
    out = (
        Path(args.out)
        if args.out
        else output_dir(named, *path.relative_to(named).parts, OUT_DIR, what="the inspection")
    )
    kit = load_kit(path)
    kit.data_path = args.data
    ngram = ngram_settings(kit)
    if args.ngram_repeats is not None:
        ngram["min_repeats"] = args.ngram_repeats
    insp = inspect_kit(
        kit, args.device, not args.no_replay, args.lanczos_iters, ngram, edge=args.edge, edge_batches=args.edge_batches
    )
    report = write_report(insp, out)
    print(terminal_text(f"{path}: report -> {report}"))
    for line in summary_lines(insp):
        print(f"  {terminal_text(line)}")


def _kits_at(path: Path) -> list[Path]:
    if not path.exists():
        raise KitError(f"no such path: {path}")
    kits = find_kits(path)
    if not kits:
        raise KitError(f"{path} holds no spike kit (no kit.json, no spike_kits/step_*/)")
    return kits


if __name__ == "__main__":
    sys.exit(main())
