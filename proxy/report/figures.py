"""The report's figures: curves over steps per variant (one line per LR), per-layer statistics
(max attention logit, grad RMS, update RMS / LR, parameter norm), and final loss against the LR.
Each function returns a matplotlib ``Figure`` (drawn with Agg, no display needed) or None when no
run logged what it plots.

Panels are titled by what tells the variants apart, with dotted keys cut to their shortest
unambiguous ending (``data.inject.enabled=True`` -> ``inject.enabled=True``) and wrapped to the
panel's width; legends sit outside the axes. PNGs are saved at :data:`FIGURE_DPI` (sharp on HiDPI
screens; the HTML report shows them at their 100-DPI size).
"""

from __future__ import annotations

import io
import math
import re
import statistics
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display
from matplotlib.lines import Line2D

from proxy import analysis
from proxy.analysis import SpikeOptions
from proxy.records import (
    ATTN_MAX_LOGIT_LAYER,
    EVENT,
    GRAD_NORM,
    GRAD_RMS,
    OUTPUT_LOGIT_MEAN,
    OUTPUT_LSE_MEAN,
    PARAM_NORM,
    STEP,
    TRAIN_LOSS,
    UPDATE_RMS,
    VAL_LOSS,
    Branch,
    Run,
    atomic_write_bytes,
)
from proxy.report.document import fmt
from proxy.report.tables import BLOWN_UP, LR_KEY, RunRow, SensitivityRow, Tables, finite, layer_index, layer_keys

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # matplotlib >= 3.8; a name for annotations only

MAX_LAYER_PANELS = 6
FIGURE_DPI = 200  # 2x the 100 DPI the figures are laid out for: sharp on HiDPI screens
TITLE_FONTSIZE = 9
Groups = list[tuple[str, list[tuple[RunRow, Run]]]]


# --------------------------------------------------------------------------------------------
# Spike marks: which points the figures circle
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpikeMarks:
    """The points circled as spikes: those ``detector`` flags, leaving out (``skip_warmup``) the
    steps before a run's ``schedule.warmup_steps``, where the LR ramps up and every variant shows a
    blip. Marks only: the spike scores of the runs table keep their published definition."""

    detector: SpikeOptions = analysis.OLMO2_SPIKES
    skip_warmup: bool = True

    def describe(self) -> str:
        text = f"points {self.detector.describe()}"
        return text + (
            ", after warm-up (steps before schedule.warmup_steps not marked)"
            if self.skip_warmup
            else ", warm-up included"
        )


def warmup_steps(run: Run) -> int:
    value = run.config_value("schedule.warmup_steps")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def spike_marks(run: Run, steps: Sequence[int], values: Sequence[float], marks: SpikeMarks) -> list[int]:
    """Indices into ``values`` of the points to circle."""
    first = warmup_steps(run) if marks.skip_warmup else 0
    return [int(i) for i in analysis.detect_spikes(values, marks.detector).indices if steps[i] >= first]


# --------------------------------------------------------------------------------------------
# Labels and titles
# --------------------------------------------------------------------------------------------
def _shortest_endings(keys: Iterable[str]) -> dict[str, str]:
    """Each dotted key cut to its shortest ending no other key shares (a.b.c -> b.c or c)."""
    keys = sorted(set(keys))
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            ending = ".".join(parts[-n:])
            if not any(other != key and (other == ending or other.endswith("." + ending)) for other in keys):
                break
        short[key] = ending
    return short


def short_labels(labels: Sequence[str]) -> dict[str, str]:
    """Variant labels ("a.b=x,c.d=y", the run name's spelling) as figure titles: each override's
    key cut to its shortest unambiguous ending among the keys the labels use (what tells the
    variants apart, no more), ", "-joined so that a long title can wrap."""
    items = {label: [item.partition("=") for item in analysis.split_overrides(label)] for label in labels}
    short = _shortest_endings(key for parts in items.values() for key, sep, _ in parts if sep)
    return {
        label: ", ".join(f"{short[key]}={value}" if sep else key for key, sep, value in parts)
        for label, parts in items.items()
    }


def wrap(text: str, width_in: float, fontsize: float = TITLE_FONTSIZE) -> str:
    """``text`` wrapped to fit ``width_in`` inches at ``fontsize`` (an average glyph is ~0.6 em)."""
    chars = max(12, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) or text


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class _Palette:
    """One colour per LR, the same in every figure (log scale, so 1e-3..1e-1 spread evenly)."""

    def __init__(self, lrs: Iterable[Optional[float]]):
        values = sorted({lr for lr in lrs if lr})
        self.lrs = values
        low, high = (values[0], values[-1]) if values else (1.0, 1.0)
        self.norm = LogNorm(vmin=low / 1.0001, vmax=high * 1.0001)
        self.cmap = colormaps["plasma"]

    def color(self, lr: Optional[float]) -> Any:
        if not lr or len(self.lrs) < 2:
            return "tab:blue"
        return self.cmap(0.05 + 0.8 * float(self.norm(lr)))

    def handles(self, per_seed: bool = False) -> list[Line2D]:
        """One legend entry per LR; ``per_seed``: a panel draws several runs (seeds) at one LR."""
        tail = " (a line per seed)" if per_seed else ""
        return [Line2D([], [], color=self.color(lr), label=f"{LR_KEY}={lr:g}{tail}") for lr in self.lrs]


EVENT_MARKERS = ("v", "^", "s", "D", "P", "*", "h", "<", ">")


PANEL_WIDTH = 4.2  # inches, the curves' panels


def _grid(
    n_panels: int, n_cols: int, width: float = PANEL_WIDTH, height: float = 3.0, **kw: Any
) -> tuple[Figure, np.ndarray]:
    n_cols = max(1, min(n_cols, n_panels))
    n_rows = math.ceil(n_panels / n_cols)
    fig = Figure(figsize=(width * n_cols + 1.6, height * n_rows + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False, **kw))
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, axes


TRIGGER_KEYS = {"loss": TRAIN_LOSS, "grad_norm": GRAD_NORM}  # an event's trigger -> its series


def _event_branch(run: Run, event: dict[str, Any]) -> Optional[Branch]:
    """The abandoned branch an event happened on (a rollback ends its own branch), or None."""
    return next((b for b in run.abandoned if b.rollback is event or any(e is event for e in b.events)), None)


def _mark_events(
    ax: Any,
    run: Run,
    key: str,
    steps: Sequence[int],
    values: Sequence[float],
    kinds: dict[str, str],
    color: Any,
) -> None:
    """Put each event (remedy action) on the run's curve of ``key``: at its trigger value when it
    fired on this series, else at the nearest logged step before it, on the branch it happened on
    (a rollback and what preceded it sit on the abandoned branch, not on the replayed steps)."""
    for event in run.events:
        step = event.get(STEP)
        if not isinstance(step, (int, float)):
            continue
        value = event.get("value")
        if TRIGGER_KEYS.get(str(event.get("trigger"))) == key and finite(value):
            y = float(value)
        else:
            branch = _event_branch(run, event)
            b_steps, b_values = branch.series(key) if branch is not None else (steps, values)
            if not b_steps:
                continue
            i = max(0, int(np.searchsorted(b_steps, step, side="right")) - 1)
            y = b_values[i]
        if finite(y):
            kind = str(event.get(EVENT))
            ax.plot(
                [step],
                [y],
                linestyle="none",
                marker=kinds[kind],
                color=color,
                markeredgecolor="black",
                markersize=7,
                zorder=5,
            )


def _series_panels(
    key: str,
    groups: Groups,
    palette: _Palette,
    marks: Optional[SpikeMarks],
    kinds: dict[str, str],
    ylabel: str,
    log_y: bool = False,
    overlay: Optional[str] = None,
    ylim_top: Optional[float] = None,
) -> Optional[Figure]:
    """A panel per variant, one line per run coloured by LR; spikes, events, divergence marked."""
    if not any(run.series(key)[0] for _, members in groups for _, run in members):
        return None
    fig, axes = _grid(len(groups), 3, sharey=True)
    marked = {"spike": False, "blown": False, "abandoned": False}  # legend entries for what is drawn
    titles = short_labels([label for label, _ in groups])
    for ax, (label, members) in zip(axes.flat, groups):
        for row, run in sorted(members, key=lambda m: m[0].lr or 0):
            steps, values = run.series(key)
            color = palette.color(row.lr)
            plot_values = [v if (finite(v) and (v > 0 or not log_y)) else np.nan for v in values]
            ax.plot(steps, plot_values, color=color, linewidth=1.2)
            for branch in run.abandoned:  # steps a rollback threw away, then re-ran
                b_steps, b_values = branch.series(key)
                marked["abandoned"] |= bool(b_steps)
                ax.plot(
                    b_steps,
                    [v if (finite(v) and (v > 0 or not log_y)) else np.nan for v in b_values],
                    color=color,
                    linewidth=0.9,
                    linestyle=":",
                    alpha=0.8,
                )
            if overlay:
                o_steps, o_values = run.series(overlay)
                # a point per eval, no line between: a line drawn across the steps between evals
                # reads as a loss that lags the train loss
                ax.plot(o_steps, o_values, color=color, linestyle="none", marker="o", markersize=3)
            if marks and values:
                finite_hits = [i for i in spike_marks(run, steps, values, marks) if finite(plot_values[i])]
                marked["spike"] |= bool(finite_hits)
                ax.plot(
                    [steps[i] for i in finite_hits],
                    [plot_values[i] for i in finite_hits],
                    linestyle="none",
                    marker="o",
                    markerfacecolor="none",
                    markeredgecolor="red",
                    markersize=9,
                    zorder=6,
                )
            _mark_events(ax, run, key, steps, plot_values, kinds, color)
            if row.status in BLOWN_UP and steps:
                last = analysis.last_finite(plot_values)
                if last is not None:
                    marked["blown"] = True
                    ax.plot(
                        [steps[-1]],
                        [last],
                        marker="X",
                        color=color,
                        markeredgecolor="black",
                        markersize=9,
                        zorder=6,
                    )
        ax.set_title(wrap(titles[label], PANEL_WIDTH), fontsize=TITLE_FONTSIZE)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if ylim_top is not None:
        bottom, top = axes.flat[0].get_ylim()
        if top > ylim_top > bottom:
            axes.flat[0].set_ylim(bottom, ylim_top)
    per_seed = any(len([r for r, _ in members if r.lr == lr]) > 1 for _, members in groups for lr in palette.lrs)
    _legend(fig, palette, kinds, marked["spike"], marked["blown"], overlay, marked["abandoned"], per_seed)
    return fig


def _legend(
    fig: Figure,
    palette: _Palette,
    kinds: dict[str, str],
    spikes: bool,
    blown: bool,
    overlay: Optional[str] = None,
    abandoned: bool = False,
    per_seed: bool = False,
) -> None:
    handles = palette.handles(per_seed)
    if overlay:
        handles.append(
            Line2D([], [], color="gray", linestyle="none", marker="o", markersize=3, label=f"{overlay} (at each eval)")
        )
    if abandoned:
        handles.append(Line2D([], [], color="gray", linestyle=":", label="rolled back"))
    if spikes:
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                markeredgecolor="red",
                label="spike",
            )
        )
    if blown:
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="X",
                color="gray",
                markeredgecolor="black",
                label="diverged / failed",
            )
        )
    for kind, marker in kinds.items():
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker=marker,
                color="gray",
                markeredgecolor="black",
                label=f"event: {kind}",
            )
        )
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)


LAYER_PANEL_WIDTH = 3.4  # inches, the per-layer panels
Series = tuple[list[int], list[float]]


def _pick_columns(columns: list[str]) -> list[str]:
    """At most MAX_LAYER_PANELS columns, spread evenly, the first and last kept."""
    if len(columns) <= MAX_LAYER_PANELS:
        return columns
    picks = np.linspace(0, len(columns) - 1, MAX_LAYER_PANELS).round().astype(int)
    return [columns[i] for i in sorted(set(picks))]


def _layer_grid(
    groups: Groups,
    palette: _Palette,
    columns: list[str],
    series: Callable[[Run, str], Series],
    ylabel: str,
) -> Figure:
    """Rows: variants; columns: layers; one line per run coloured by LR, log scale."""
    columns = _pick_columns(columns)
    fig = Figure(figsize=(LAYER_PANEL_WIDTH * len(columns) + 1.6, 2.8 * len(groups) + 0.4), layout="constrained")
    axes = fig.subplots(len(groups), len(columns), squeeze=False, sharey=True)
    titles = short_labels([label for label, _ in groups])
    for r, (label, members) in enumerate(groups):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            ax.set_yscale("log")
            for row, run in sorted(members, key=lambda m: m[0].lr or 0):
                steps, values = series(run, column)
                ax.plot(
                    steps,
                    [v if finite(v) and v > 0 else np.nan for v in values],
                    color=palette.color(row.lr),
                    linewidth=1.2,
                )
            ax.grid(alpha=0.3)
            ax.set_title(wrap(f"{titles[label]} | {column}", LAYER_PANEL_WIDTH), fontsize=TITLE_FONTSIZE)
            if r == len(groups) - 1:
                ax.set_xlabel("step")
        axes[r, 0].set_ylabel(ylabel)
    fig.legend(handles=palette.handles(), loc="outside right upper", fontsize=8)
    return fig


def _attention_figure(groups: Groups, palette: _Palette) -> Optional[Figure]:
    """Max attention logit per layer (block 0 first: where Wortsman et al. see growth)."""
    layers = sorted({k for _, members in groups for _, run in members for k in layer_keys(run)}, key=layer_index)
    if not layers:
        return None
    names = {f"layer {key[len(ATTN_MAX_LOGIT_LAYER) :]}": key for key in layers}
    return _layer_grid(
        groups, palette, list(names), lambda run, column: run.series(names[column]), "max attention logit"
    )


# --------------------------------------------------------------------------------------------
# Per-layer parameter statistics (grad RMS, update RMS / LR, parameter norm)
# --------------------------------------------------------------------------------------------
BLOCK = re.compile(r"blocks\.(\d+)\.")


def layer_of(param: str) -> tuple[tuple[int, int, str], str]:
    """(sort key, name) of the layer a parameter belongs to: ``blocks.<i>.*`` -> 'block i', else
    the module (embed first, then the blocks, then the rest: final_norm, lm_head)."""
    match = BLOCK.match(param)
    if match:
        return (1, int(match[1]), ""), f"block {match[1]}"
    module = param.split(".")[0]
    return (0 if "embed" in module else 2, 0, module), module


def rms_of(values: Sequence[float]) -> float:
    """One RMS for a layer from its tensors' RMS values, each tensor weighted equally."""
    return math.sqrt(sum(v * v for v in values) / len(values))


def norm_of(values: Sequence[float]) -> float:
    """The L2 norm of a layer from its tensors' norms (exact)."""
    return math.sqrt(sum(v * v for v in values))


def layer_series(run: Run, prefix: str, combine: Callable[[Sequence[float]], float]) -> dict[str, Series]:
    """{layer: (steps, values)} of the per-parameter metrics ``prefix`` + name, combined per layer
    and step; a non-finite value of any tensor makes its layer's point NaN."""
    out: dict[str, Series] = {}
    for row in run.metrics:
        per_layer: dict[str, list[float]] = {}
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                per_layer.setdefault(layer_of(key[len(prefix) :])[1], []).append(float(value))
        for layer, values in per_layer.items():
            steps, combined = out.setdefault(layer, ([], []))
            steps.append(row[STEP])
            combined.append(combine(values) if all(map(math.isfinite, values)) else math.nan)
    return out


def _parameter_figure(
    groups: Groups, palette: _Palette, prefix: str, combine: Callable[[Sequence[float]], float], ylabel: str
) -> Optional[Figure]:
    per_run = {id(run): layer_series(run, prefix, combine) for _, members in groups for _, run in members}
    params = {
        key[len(prefix) :]
        for _, members in groups
        for _, run in members
        for key in run.keys()
        if key.startswith(prefix)
    }
    if not params:
        return None
    columns = [name for _, name in sorted({layer_of(p) for p in params})]
    empty: Series = ([], [])
    return _layer_grid(groups, palette, columns, lambda run, column: per_run[id(run)].get(column, empty), ylabel)


LR_FIGURE_WIDTH = 7.5  # inches


def _lr_figure(sensitivity: list[SensitivityRow], variant_colors: dict[str, Any]) -> Optional[Figure]:
    """Final loss against the LR, one line per variant; the legend below the axes."""
    rows = [row for row in sensitivity if row.lrs]
    if not rows:
        return None
    fig = Figure(figsize=(LR_FIGURE_WIDTH, 4.5), layout="constrained")
    ax = fig.subplots()
    names = short_labels([row.variant for row in rows])
    for row in rows:
        color = variant_colors[row.variant]
        label = wrap(f"{names[row.variant]} (sens. {fmt(row.sensitivity)})", LR_FIGURE_WIDTH / 2, 8)
        ax.plot(row.lrs, row.losses, marker="o", color=color, label=label)
        blown = [(lr, loss) for lr, loss in zip(row.lrs, row.losses) if lr in row.blown_up_lrs]
        if blown:
            ax.plot(*zip(*blown), linestyle="none", marker="X", markersize=11, color=color, markeredgecolor="black")
    inits = [row.loss_at_init for row in rows if row.loss_at_init is not None]
    if inits:
        init = statistics.median(inits)
        losses = [x for row in rows for x in row.losses if finite(x)]
        if losses and max(losses) < init:  # the curves get the axis; the loss at init stays named
            low, high = min(losses), max(losses)
            pad = 0.08 * (high - low) if high > low else 0.05 * abs(high) or 0.05
            ax.set_ylim(low - pad, high + pad)
            ax.plot([], [], color="gray", linestyle=":", label=f"loss at init {init:.3g} (above the axis)")
        else:
            ax.axhline(init, color="gray", linestyle=":", label="loss at init")
    ax.plot(
        [],
        [],
        linestyle="none",
        marker="X",
        color="gray",
        markeredgecolor="black",
        label="diverged / failed (counts as loss at init)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final loss, min(loss, loss at init)")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Every figure of a report
# --------------------------------------------------------------------------------------------
CAPTIONS = {
    "lr_vs_loss": "Final loss vs peak LR, one line per variant; X: diverged or failed (plotted at the loss at init).",
    "loss": "Train loss (lines) and val loss (points, one per eval) per variant, one colour per LR. Red circles: "
    "loss spikes; X: end of a diverged/failed run; other markers: trainer events.",
    "attn_max_logit": "Max attention logit per layer (log scale), one line per LR.",
    "output_logit_mean": "Mean output logit per variant, one line per LR "
    "(with log Z = 0 it is the mean log-probability, at most -ln V).",
    "output_log_z": "log Z (mean log-sum-exp of the output logits, the gap between logits and "
    "log-probabilities) per variant, one line per LR; z-loss pulls it toward 0.",
    "grad_norm": "Global grad norm (log scale) per variant, one line per LR. "
    "Red circles: detected spikes; other markers: trainer events.",
    "grad_rms": "Gradient RMS per layer before clipping (log scale; a layer's tensors weighted equally), "
    "one line per LR. Adam's epsilon matters once it nears this.",
    "update_rms": "Update RMS / LR per layer (log scale; a layer's tensors weighted equally), one line per "
    "LR: the size of the optimizer's step direction, about 1 for a healthy Adam step, smaller when the "
    "gradient RMS falls toward epsilon (Wortsman et al. section 3.4).",
    "param_norm": "Parameter norm per layer (L2 over the layer's tensors, log scale), one line per LR.",
}


# Run names, overrides and parameter names come from run dirs: text, never matplotlib math ("$\\x$")
LITERAL_TEXT: dict[RcKeyType, bool] = {"text.parse_math": False}


def draw_figures(tables: Tables, marks: SpikeMarks, folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Draw every figure the runs have data for into ``folder`` (PNG at :data:`FIGURE_DPI`), spikes
    circled as ``marks`` says; returns {name: path} in :data:`CAPTIONS` order and notes on the
    figures that could not be drawn. Every label is drawn as literal text."""
    with matplotlib.rc_context(LITERAL_TEXT), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # it would quote the glyph raw
        return _draw_figures(tables, marks, folder)


def _draw_figures(tables: Tables, marks: SpikeMarks, folder: Path) -> tuple[dict[str, Path], list[str]]:
    groups, rows, sensitivity = tables.groups, tables.runs, tables.sensitivity
    palette = _Palette(row.lr for row in rows)
    kinds = {
        k: EVENT_MARKERS[i % len(EVENT_MARKERS)]
        for i, k in enumerate(
            sorted({str(e.get(EVENT)) for _, members in groups for _, r in members for e in r.events})
        )
    }
    variant_colors = {label: f"C{i % 10}" for i, (label, _) in enumerate(groups)}
    inits = [row.loss_at_init for row in rows if finite(row.loss_at_init)]
    loss_top = 1.15 * max(inits) if inits else None  # a diverged run must not flatten everyone else
    swept = any(len(row.lrs) > 1 for row in sensitivity)  # an LR curve to draw
    candidates = {
        "lr_vs_loss": _lr_figure(sensitivity, variant_colors) if swept else None,
        "loss": _series_panels(TRAIN_LOSS, groups, palette, marks, kinds, "loss", overlay=VAL_LOSS, ylim_top=loss_top),
        "attn_max_logit": _attention_figure(groups, palette),
        "output_logit_mean": _series_panels(OUTPUT_LOGIT_MEAN, groups, palette, None, kinds, "output logit mean"),
        "output_log_z": _series_panels(OUTPUT_LSE_MEAN, groups, palette, None, kinds, "log Z"),
        "grad_norm": _series_panels(GRAD_NORM, groups, palette, marks, kinds, "grad norm", log_y=True),
        "grad_rms": _parameter_figure(groups, palette, GRAD_RMS, rms_of, "grad RMS"),
        "update_rms": _parameter_figure(groups, palette, UPDATE_RMS, rms_of, "update RMS / LR"),
        "param_norm": _parameter_figure(groups, palette, PARAM_NORM, norm_of, "parameter norm"),
    }
    figures: dict[str, Path] = {}
    notes: list[str] = []
    for name, fig in candidates.items():
        if fig is None:
            if name != "lr_vs_loss" or swept:
                notes.append(f"no figure '{name}': no run logged the metrics it needs")
            continue
        figures[name] = folder / f"{name}.png"
        save_png(fig, figures[name])
    return figures, notes


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_label(value: float, _: Any = None) -> str:
    """A log axis's tick as plain text: 10⁻³ at a power of ten, the number elsewhere."""
    if value <= 0 or not math.isfinite(value):
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return "1" if round(exponent) == 0 else "10" + str(round(exponent)).translate(_SUPERSCRIPT)
    return f"{value:g}"


def plain_log_ticks(fig: Any) -> None:
    """Log axes labelled without mathtext: matplotlib writes their ticks as ``$10^{-3}$``, which
    :data:`LITERAL_TEXT` (run-dir text is never parsed as math) would print raw. Minor ticks are
    labelled only where an axis spans less than a decade (as matplotlib does)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in fig.axes:
        for axis, scale, limits in (
            (ax.yaxis, ax.get_yscale(), ax.get_ylim()),
            (ax.xaxis, ax.get_xscale(), ax.get_xlim()),
        ):
            if scale != "log":
                continue
            axis.set_major_formatter(FuncFormatter(_power_label))
            low, high = sorted(limits)
            narrow = low > 0 and high / low < 10
            axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if narrow else NullFormatter())


def save_png(fig: Figure, path: Path, dpi: int = FIGURE_DPI) -> None:
    """``fig`` as a PNG at ``dpi``, reduced to a 256-colour palette (a third of the bytes of a
    full-colour PNG, the same to the eye: line plots use few colours; the quantizer that keeps
    each pixel closest, so a lone red spike circle stays red). Log axes get plain-text ticks."""
    from PIL import Image  # matplotlib's own dependency

    plain_log_ticks(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = Image.open(buffer).convert("RGB")
    palette = image.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    png = io.BytesIO()
    palette.save(png, format="png", optimize=True, dpi=(dpi, dpi))
    atomic_write_bytes(path, png.getvalue())  # whole or not at all: report.md never links a torn figure
