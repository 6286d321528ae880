"""The report of a checkpoint series (proxy/forensics/series.py), with the probe forward where it was
run (proxy/forensics/probe_forward.py): ``series.md`` with its figures and ``series.json``, through
the project's one document writer and one file writer."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from proxy.forensics.dissect_report import save_fig
from proxy.forensics.probe_forward import ProbeResult
from proxy.forensics.series import SeriesResult, iter_transitions, role_of
from proxy.records import atomic_write_text, write_json
from proxy.report.document import Block, Figure, Heading, Items, Paragraph, Table, to_markdown

UPDATES_FIGURE = "series_updates.png"
BOUNDS_FIGURE = "series_logit_bound.png"
FORWARD_FIGURE = "series_forward.png"


def _g(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def top_moving(result: SeriesResult, transition: int, n: int = 10) -> list[dict[str, Any]]:
    """The tensors with the largest relative update ||dW|| / ||W|| at one transition, largest first."""
    rows = [t for t in result.tensors if t["relative_update"] and math.isfinite(t["relative_update"][transition])]
    rows.sort(key=lambda t: -t["relative_update"][transition])
    return rows[:n]


def by_group(result: SeriesResult) -> dict[str, list[float]]:
    """Mean relative update per layer type ('attention q/k', 'mlp', ...) at each transition."""
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for t in result.tensors:
        groups[role_of(t["name"]).group].append(t["relative_update"])
    out = {}
    for group, series in sorted(groups.items()):
        columns = list(zip(*series))
        out[group] = [sum(c) / len(c) for c in columns]
    return out


def largest_rises(per_layer: Sequence[tuple[int, Sequence[float]]]) -> list[tuple[int, int, float]]:
    """(layer, transition, ratio) of the largest rise of each layer's series (value at checkpoint
    i+1 over value at i, where the latter is > 0 and the ratio finite), largest first."""
    jumps = []
    for layer, values in per_layer:
        ratios = [(values[i + 1] / values[i], i) for i in range(len(values) - 1) if values[i] > 0]
        finite = [(r, i) for r, i in ratios if math.isfinite(r)]
        if finite:
            r, i = max(finite)
            jumps.append((layer, i, r))
    return sorted(jumps, key=lambda j: -j[2])


def bound_jumps(result: SeriesResult) -> list[tuple[int, int, float]]:
    """The largest rise of each layer's logit bound, largest first."""
    return largest_rises([(b["layer"], b["max"]) for b in result.bounds])


def forward_jumps(forward: Sequence[ProbeResult]) -> list[tuple[int, int, float]]:
    """The largest rise of each layer's max |attention logit| on the probe, largest first."""
    layers = range(len(forward[0].attn_max_abs_logit) if forward else 0)
    return largest_rises([(k, [r.attn_max_abs_logit[k] for r in forward]) for k in layers])


def summary_lines(
    result: SeriesResult, transitions: int = 3, forward: Optional[Sequence[ProbeResult]] = None
) -> list[str]:
    """What the terminal shows: the ``transitions`` updates with the largest relative update of a
    tensor (largest first, each with its tensor), the largest rise of a logit bound and, with the
    probe forward, of a measured attention logit, and log Z at the first and last checkpoint."""
    lines = [f"{len(result.checkpoints)} checkpoints, {len(result.tensors)} tensors"]
    tops = [(top[0], i, name) for i, name in iter_transitions(result) for top in [top_moving(result, i, 1)] if top]
    for t, i, name in sorted(tops, key=lambda x: -x[0]["relative_update"][x[1]])[:transitions]:
        lines.append(f"{name}: largest relative update {t['name']} ({_g(t['relative_update'][i])})")
    jumps = bound_jumps(result)
    if jumps:
        layer, i, r = jumps[0]
        _, name = list(iter_transitions(result))[i]
        lines.append(f"largest rise of an attention-logit bound: layer {layer}, x{r:.3g} at {name}")
    elif result.qk_norm:
        lines.append("attention-logit bound: none (the model has QK-norm, which caps the logits)")
    if forward:
        names = [name for _, name in iter_transitions(result)]
        found = forward_jumps(forward)
        if found:
            layer, i, r = found[0]
            lines.append(
                f"probe forward: largest rise of a max |attention logit|: layer {layer}, x{r:.3g} at {names[i]}"
            )
        lines.append(
            f"probe forward: log Z mean {_g(forward[0].log_z_mean)} -> {_g(forward[-1].log_z_mean)}, "
            f"loss {_g(forward[0].loss)} -> {_g(forward[-1].loss)} ({forward[0].source})"
        )
    return lines


def write_series_report(
    result: SeriesResult,
    out: Path,
    marks: Sequence[str] = (),
    forward: Optional[Sequence[ProbeResult]] = None,
) -> Path:
    """series.md, series.json and the figures in ``out`` (a folder output_dir made); ``forward``:
    each checkpoint's probe forward, in the series' order."""
    figures = [save_fig(_updates_figure(result, marks), out / UPDATES_FIGURE)]
    if result.bounds:
        figures.append(save_fig(_bounds_figure(result, marks), out / BOUNDS_FIGURE))
    if forward:
        figures.append(save_fig(_forward_figure(result, forward, marks), out / FORWARD_FIGURE))
    blocks: list[Block] = [Items(summary_lines(result, forward=forward))]
    blocks += [
        Heading("Checkpoints"),
        Table(
            ["#", "checkpoint", "step", "GB"],
            [[str(i), c["label"], str(c["step"]), f"{c['bytes'] / 1e9:.2f}"] for i, c in enumerate(result.checkpoints)],
        ),
        Heading("Largest relative updates per transition (||dW|| / ||W||)"),
    ]
    for i, name in iter_transitions(result):
        rows = [
            [t["name"], _g(t["relative_update"][i]), _g(t["update"][i]), _g(t["cosine"][i])]
            for t in top_moving(result, i)
        ]
        blocks += [
            Paragraph(f"**{name}**"),
            Table(["tensor", "relative update", "||dW||", "cosine with the update before"], rows),
        ]
    groups = by_group(result)
    transitions = [name for _, name in iter_transitions(result)]
    blocks += [
        Heading("Mean relative update per layer type"),
        Table(["layer type", *transitions], [[g, *map(_g, v)] for g, v in groups.items()]),
    ]
    rows_section = [t for t in result.tensors if "top_rows" in t]
    if rows_section:
        blocks.append(Heading("Embedding and LM-head rows that moved most (token id: ||d row||)"))
        for t in rows_section:
            moved = [
                [name, ", ".join(f"{i}: {v:.3g}" for i, v in t["top_rows"][k])] for k, name in iter_transitions(result)
            ]
            blocks += [Paragraph(f"`{t['name']}`"), Table(["transition", "rows"], moved)]
    blocks += adam_blocks(result)
    if result.bounds:
        blocks += [
            Heading("Attention-logit bound per layer (max over heads)"),
            Paragraph(
                "s(W_q^h diag g) s(W_k^h diag g) d / sqrt(d_head): no input of the pre-norm block can give a larger "
                "logit (proxy/forensics/series.py)."
            ),
            Table(
                ["layer", *[c["label"] for c in result.checkpoints]],
                [[str(b["layer"]), *map(_g, b["max"])] for b in result.bounds],
            ),
        ]
    elif result.qk_norm:
        blocks.append(Paragraph("No attention-logit bound: the model has QK-norm, which caps the logits."))
    if forward:
        blocks += forward_blocks(forward)
    blocks += [Heading("Figures")] + [Figure(f.name) for f in figures]
    data = _as_json(result)
    if forward:
        data["forward"] = {
            "probe": forward[0].source,
            "shape": forward[0].shape,
            "checkpoints": [r.as_json() for r in forward],
        }
    write_json(out / "series.json", data)
    atomic_write_text(out / "series.md", to_markdown("Checkpoint series", blocks))
    return out / "series.md"


def adam_blocks(result: SeriesResult) -> list[Block]:
    """Adam's state, where the checkpoints hold it: per tensor the normalized step's RMS (first,
    last, largest) and the largest RMS_t between checkpoints one step apart, largest first."""
    held = [t for t in result.tensors if "adam_step_rms" in t]
    if not held:
        return []
    labels = [c["label"] for c in result.checkpoints]
    names = [name for _, name in iter_transitions(result)]

    def largest(values: list[float], where: list[str]) -> tuple[float, str]:
        finite = [(v, w) for v, w in zip(values, where) if math.isfinite(v)]
        return max(finite) if finite else (math.nan, "-")

    rows = []
    for t in held:
        step, step_at = largest(t["adam_step_rms"], labels)
        rms_t, rms_t_at = largest(t["adam_rms_t"], names)
        rows.append((rms_t if math.isfinite(rms_t) else -1.0, step, t, step_at, rms_t, rms_t_at))
    rows.sort(key=lambda r: (-r[0], -r[1]))
    table = [
        [t["name"], _g(t["adam_step_rms"][0]), _g(t["adam_step_rms"][-1]), f"{_g(step)} ({at})", f"{_g(r)} ({r_at})"]
        for _, step, t, at, r, r_at in rows
    ]
    return [
        Heading("Adam's state per tensor"),
        Paragraph(
            "RMS of the normalized step m_hat / (sqrt(v_hat) + eps): near 1 while gradients agree from step to "
            "step, small while they are noise. RMS_t = sqrt(mean(g^2 / v_hat)), g recovered from the first "
            "moments of two checkpoints one step apart (Wortsman et al. 2023b: far above 1 when the gradient "
            "outgrew Adam's second moment); '-' where no two checkpoints are one step apart."
        ),
        Table(["tensor", "step RMS, first", "step RMS, last", "largest step RMS (at)", "largest RMS_t (at)"], table),
    ]


def forward_blocks(forward: Sequence[ProbeResult]) -> list[Block]:
    """The probe forward: max |attention logit| per layer (rows) and checkpoint (columns), then per
    checkpoint log Z, the mean largest output logit and the probe's loss."""
    first = forward[0]
    random_ids = first.source.startswith("random ids")
    about = (
        f"{first.source}, {first.shape[0]} x {first.shape[1]} tokens, through each checkpoint layer by layer "
        "(proxy/forensics/probe_forward.py). Max |q.k| / sqrt(d_head) over causal positions, heads and sequences."
    )
    if random_ids:
        about += (
            " Random ids: the numbers compare the checkpoints with each other, not with training; the loss is "
            "not a loss on text."
        )
    labels = [r.label for r in forward]
    layers = range(len(first.attn_max_abs_logit))
    return [
        Heading("Probe forward: max |attention logit| per layer"),
        Paragraph(about),
        # the longer axis down the page: layers x checkpoints for a deep model (K2: 80 layers, 8
        # checkpoints), checkpoints x layers for a lab series (2 layers, 39 checkpoints)
        Table(["layer", *labels], [[str(i), *(_g(r.attn_max_abs_logit[i]) for r in forward)] for i in layers])
        if len(layers) >= len(forward)
        else Table(
            ["checkpoint", *(f"layer {i}" for i in layers)],
            [[r.label, *(_g(r.attn_max_abs_logit[i]) for i in layers)] for r in forward],
        ),
        Heading("Probe forward: output"),
        Paragraph("log Z = logsumexp of the output logits, per position (z-loss holds it near 0)."),
        Table(
            ["checkpoint", "log Z mean", "log Z max", "mean max logit", "probe loss", "largest |attn logit| (layer)"],
            [
                [
                    r.label,
                    _g(r.log_z_mean),
                    _g(r.log_z_max),
                    _g(r.output_max_logit_mean),
                    _g(r.loss),
                    f"{_g(max(r.attn_max_abs_logit))} ({r.attn_max_abs_logit.index(max(r.attn_max_abs_logit))})",
                ]
                for r in forward
            ],
        ),
    ]


def _as_json(result: SeriesResult) -> dict[str, Any]:
    return {
        "checkpoints": result.checkpoints,
        "tensors": result.tensors,
        "logit_bounds": result.bounds,
        "qk_norm": result.qk_norm,
        "by_layer_type": by_group(result),
    }


def _marked(ax, result: SeriesResult, marks: Sequence[str], offset: float) -> None:
    labels = [c["label"] for c in result.checkpoints]
    for mark in marks:
        if mark in labels:
            ax.axvline(labels.index(mark) - offset, color="tab:red", alpha=0.4, linestyle="--")


def _updates_figure(result: SeriesResult, marks: Sequence[str]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for group, values in by_group(result).items():
        ax.plot(range(len(values)), values, marker="o", label=group)
    labels = [c["label"] for c in result.checkpoints]
    _finish(ax, [f"→ {b}" for b in labels[1:]], "mean ||dW|| / ||W|| (update into each checkpoint)")
    _marked(ax, result, marks, 1.0)
    fig.tight_layout()
    return fig


def _bounds_figure(result: SeriesResult, marks: Sequence[str]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    jumps = {layer for layer, _, _ in bound_jumps(result)[:5]}
    for b in result.bounds:
        shown = b["layer"] in jumps
        ax.plot(
            range(len(b["max"])),
            b["max"],
            color=None if shown else "0.75",
            label=f"layer {b['layer']}" if shown else None,
            linewidth=1.5 if shown else 0.8,
        )
    _finish(ax, [c["label"] for c in result.checkpoints], "attention-logit bound")
    _marked(ax, result, marks, 0.0)
    fig.tight_layout()
    return fig


def _forward_figure(result: SeriesResult, forward: Sequence[ProbeResult], marks: Sequence[str]):
    """Top: max |attention logit| per layer across the series (one line per layer, colored by depth);
    bottom: log Z (mean and max over the probe's positions)."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    n_layers = len(forward[0].attn_max_abs_logit)
    colors = plt.get_cmap("viridis")
    x = range(len(forward))
    for layer in range(n_layers):
        top.plot(
            x,
            [r.attn_max_abs_logit[layer] for r in forward],
            color=colors(layer / max(1, n_layers - 1)),
            label=f"layer {layer}" if n_layers <= 12 else None,
            linewidth=1.2,
        )
    if n_layers > 12:  # too many for a legend: the colour scale says the depth
        scale = plt.cm.ScalarMappable(cmap=colors, norm=plt.Normalize(0, n_layers - 1))
        fig.colorbar(scale, ax=top, label="layer")
    top.set_yscale("log")
    top.set_ylabel("max |attention logit|")
    if n_layers <= 12:
        top.legend(fontsize=7, ncol=2)
    bottom.plot(x, [r.log_z_mean for r in forward], marker="o", label="log Z, mean")
    bottom.plot(x, [r.log_z_max for r in forward], marker="o", label="log Z, max")
    bottom.set_ylabel("log Z (probe)")
    bottom.legend(fontsize=7)
    ticks = [r.label for r in forward]
    every = max(1, math.ceil(len(ticks) / 12))
    bottom.set_xticks(list(range(0, len(ticks), every)), ticks[::every], rotation=30, ha="right", fontsize=7)
    for ax in (top, bottom):
        _marked(ax, result, marks, 0.0)
    fig.tight_layout()
    return fig


def _finish(ax, ticks: Sequence[str], ylabel: str, most: int = 12) -> None:
    every = max(1, math.ceil(len(ticks) / most))  # a long series: every k-th label
    shown = range(0, len(ticks), every)
    ax.set_xticks(list(shown), [ticks[i] for i in shown], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


__all__ = [
    "adam_blocks",
    "by_group",
    "bound_jumps",
    "forward_blocks",
    "forward_jumps",
    "summary_lines",
    "top_moving",
    "write_series_report",
]
