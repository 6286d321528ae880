"""The report of a kit's dissection (proxy/forensics/dissect.py's :class:`Inspection`):
``<kit>/inspect/report.md`` with its figures and ``inspect.json``, written through
proxy/report/document.py (the project's one document writer) and proxy/records' one writer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch

from proxy.forensics.dissect import HIST_BINS, OUT_DIR, Inspection, Probe
from proxy.forensics.edge import (
    FIGURE as EDGE_FIGURE,
)
from proxy.forensics.edge import (
    crossing_line,
    edge_figure,
    edge_section,
)
from proxy.records import atomic_write_text, output_dir, save_figure, write_json
from proxy.report.document import Block, Figure, Heading, Items, Paragraph, Quote, Table, to_markdown
from proxy.report.figures import LITERAL_TEXT, plain_log_ticks


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
        return [save_fig(fig, out / name) for fig, name in zip(figures, names)]


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


def save_fig(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG through the one writer (log axes with plain-text ticks), then closed."""
    import matplotlib.pyplot as plt

    plain_log_ticks(fig)
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    if not isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):  # laid out with the longer labels: again
        fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
