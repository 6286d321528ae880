"""What a report leads with and how it reads: the headline (and a finding's verdict) on top,
runs named by what varies, tables that scroll, figures whose legends never cover a title, sharp
PNGs, the per-layer statistics the trainer logs, and spike marks that leave warm-up out.

Run directories are hand-made through proxy.records (tests/report/test_build.py's make_run and a
smaller writer here); no training.
"""

from __future__ import annotations

import io
import math
import re
import struct
from pathlib import Path
from typing import Any, Optional

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from proxy import analysis
from proxy.demo import headline
from proxy.records import RunRecord, load_run, write_json
from proxy.report import SpikeMarks, build_report, main
from proxy.report import figures as figs
from proxy.report.document import Callout, Table, markdown_callout, png_css_width, to_html
from proxy.report.headline import compared_names, num
from proxy.report.tables import RunRow, run_labels, tabulate
from proxy.verdict import judge_runs
from tests.report.test_build import make_run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """QK-norm off vs on at 3 LRs; off diverges at the top LR."""
    root = tmp_path / "multirun"
    make_run(root, "0", lr=1e-3, qk_norm="off", final_loss=3.0)
    make_run(root, "1", lr=1e-2, qk_norm="off", final_loss=2.5)
    make_run(root, "2", lr=1e-1, qk_norm="off", status="diverged")
    make_run(root, "3", lr=1e-3, qk_norm="layernorm", final_loss=3.1)
    make_run(root, "4", lr=1e-2, qk_norm="layernorm", final_loss=2.4)
    make_run(root, "5", lr=1e-1, qk_norm="layernorm", final_loss=2.9)
    return root


def write_run(
    root: Path,
    name: str,
    overrides: list[str],
    rows: dict[int, dict[str, float]],
    config: Optional[dict[str, Any]] = None,
    lr: float = 1e-2,
) -> Path:
    """A completed run directory with the given metric rows."""
    record = RunRecord(root / name)
    write_json(root / name / "config.yaml", {"optim": {"lr": lr}, "train": {"seed": 0}, **(config or {})})
    record.update(status="running", run_name=name, overrides=overrides, lr=lr, loss_at_init=6.0)
    for step, row in rows.items():
        record.log(step, row)
    last = rows[max(rows)].get("train/loss", 3.0)
    record.update(status="completed", final_train_loss=last, final_val_loss=last, steps_completed=max(rows))
    record.close()
    return root / name


# --------------------------------------------------------------------------------------------
# The headline, the runs table, the HTML layout (one report)
# --------------------------------------------------------------------------------------------
def test_report_leads_with_the_headline_read_off_its_tables(sweep: Path, tmp_path: Path) -> None:
    result = build_report([sweep], tmp_path / "rep")
    off, on = result.sensitivity_of("model.qk_norm=off"), result.sensitivity_of("model.qk_norm=layernorm")
    top = {row.variant: row for row in result.runs if row.lr == 1e-1}
    assert result.headline is not None
    lead = result.headline.lead
    # the variants compared by the one key that differs, the numbers the tables print
    assert lead.startswith("model.qk_norm: off vs layernorm (6 runs: 5 completed, 1 diverged)")
    assert f"LR sensitivity {num(off.sensitivity)} vs {num(on.sensitivity)}" in lead
    peak_off, peak_on = top["model.qk_norm=off"].max_attn_logit_peak, top["model.qk_norm=layernorm"].max_attn_logit_peak
    assert f"at LR 0.1: peak attention logit {num(peak_off)} vs {num(peak_on)}" in lead
    assert "diverged or failed 1/3 vs 0/3 runs" in lead
    # a diverged run has no final loss to quote: its status says what happened
    line_off, line_on = result.headline.variants
    assert "at LR 0.1: diverged, peak attention logit" in line_off and "final loss" not in line_off.split("at LR")[1]
    assert f"best LR 0.01 (loss {num(on.best_loss)})" in line_on and f"final loss {num(2.9)}" in line_on
    # proxy-demo prints the same headline
    assert headline(result) == result.headline.text() and headline(result)[0] == lead

    md = result.markdown.read_text()
    assert md.index("> **Result**") < md.index(lead) < md.index("runs from") < md.index("## LR sensitivity")
    html = result.html.read_text()
    assert html.index('<div class="callout">') < html.index("runs from")
    assert html.index(lead) < html.index("<h2>")


def test_runs_table_names_runs_by_what_varies_and_scrolls(sweep: Path, tmp_path: Path) -> None:
    result = build_report([sweep], tmp_path / "rep", lr_range=None)
    assert [row.label for row in result.runs][:3] == [
        "model.qk_norm=off,optim.lr=0.001",
        "model.qk_norm=off,optim.lr=0.01",
        "model.qk_norm=off,optim.lr=0.1",
    ]
    md = result.markdown.read_text()
    runs_md = md[md.index("## Runs\n") : md.index("## Curves")]
    # constant overrides stated once above the table, never in a row
    assert "Every run: experiment=unit, train.seed=0." in runs_md
    table = [line for line in runs_md.splitlines() if line.startswith("|")]
    assert table[0].startswith(
        "| run | status | final loss | max attn logit peak | spike % loss | spike % grad norm | events |"
    )
    assert all("experiment=unit" not in line and "seed" not in line for line in table)
    assert "| model.qk_norm=layernorm,optim.lr=0.1 | completed | 2.9 |" in runs_md
    # HTML: every table in its own sideways-scrolling box, the first column kept in view
    html = result.html.read_text()
    assert html.count('<div class="scroll"><table>') == html.count("<table>") >= 2
    assert ".scroll{overflow-x:auto" in html and "position:sticky;left:0" in html
    # figures: 200 DPI PNGs shown at their 100-DPI size (twice the pixels: sharp on HiDPI)
    png = result.figures["loss"].read_bytes()
    width_px = struct.unpack(">I", png[16:20])[0]
    assert png_css_width(png) == round(width_px / 2)
    assert f'width="{round(width_px / 2)}"' in html


def test_run_labels_keep_only_what_varies() -> None:
    def row(name: str, lr: Optional[float], seed: int) -> RunRow:
        return RunRow(name, f"/runs/{name}", "", "", lr, seed, "completed", *([None] * 12))

    rows = [row("a", 0.1, 0), row("b", 0.3, 0), row("c", 0.3, 0)]
    variants = [("experiment=x", "model.qk_norm=off")] * 3
    labels = {variants[0]: "experiment=x,model.qk_norm=off"}
    names, constant = run_labels(rows, variants, labels, ())
    # one variant: its overrides are constant; LR varies; two runs nothing tells apart get their folder
    assert constant == ("experiment=x", "model.qk_norm=off", "train.seed=0")
    assert names == ["optim.lr=0.1", "optim.lr=0.3 [b]", "optim.lr=0.3 [c]"]
    names, constant = run_labels(rows[:1], variants[:1], labels, ())
    assert names == ["a"] and "optim.lr=0.1" in constant  # a lone run: its folder


# --------------------------------------------------------------------------------------------
# A finding's verdict at the top of the report proxy-verdict writes
# --------------------------------------------------------------------------------------------
FAKE_VERDICT = """
from proxy.analysis import OLMO_CORE_SPIKES
from proxy.verdict import Verdict

REPORT_SPIKES = OLMO_CORE_SPIKES


def judge(report, runs):
    if len(runs) == 1:
        raise RuntimeError("judge broke")
    v = Verdict("fake finding", "nowhere")
    v.check("QK-norm lowers the LR sensitivity", True, "0.1 vs 0.5")
    v.check("QK-norm keeps logits below 50", False, "peak 185")
    return v
"""


def test_verdict_heads_the_report_proxy_verdict_writes(sweep: Path, tmp_path: Path) -> None:
    finding = tmp_path / "finding"
    finding.mkdir()
    (finding / "verdict.py").write_text(FAKE_VERDICT)
    verdict = judge_runs(finding, [sweep], tmp_path / "rep")
    assert verdict.label == "NOT REPRODUCED"
    md = (tmp_path / "rep" / "report.md").read_text()
    top = md[: md.index("runs from")]
    assert "> **Verdict: NOT REPRODUCED (fake finding)**" in top and "> 1 of 2 claims hold." in top
    # the claim that fails comes first, with what was measured
    assert top.index("FAILS: QK-norm keeps logits below 50 (measured: peak 185)") < top.index(
        "holds: QK-norm lowers the LR sensitivity (measured: 0.1 vs 0.5)"
    )
    assert top.index("**Result**") < top.index("**Verdict")
    html = (tmp_path / "rep" / "report.html").read_text()
    assert '<div class="callout fail"><p class="title">Verdict: NOT REPRODUCED (fake finding)</p>' in html
    # the declared detector scores spikes and marks them (warm-up left out)
    assert "Spike score (OLMo-core's detector)" in md
    assert "Red circles: points >= 6 sigma above the mean of the previous 128 values" in md
    assert "after warm-up" in md

    one = tmp_path / "one"
    make_run(one, "0", lr=1e-3, qk_norm="off")
    with pytest.raises(RuntimeError, match="judge broke"):
        judge_runs(finding, [one], tmp_path / "rep1")
    assert "**Verdict" not in (tmp_path / "rep1" / "report.md").read_text()  # the report still landed


# --------------------------------------------------------------------------------------------
# Figures: short titles, legends clear of titles, per-layer statistics
# --------------------------------------------------------------------------------------------
LONG = [
    ["+experiment=repeated_ngrams/lab", f"data.inject.enabled={a}", f"data.ngram_filter.enabled={b}"]
    for a in (False, True)
    for b in (False, True)
]
PARAMS = (
    "embed.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.mlp.fc_in.weight",
    "blocks.1.attn.qkv.weight",
    "final_norm.weight",
    "lm_head.weight",
)


def _rows(scale: float = 1.0) -> dict[int, dict[str, float]]:
    rows = {}
    for step in range(0, 40, 2):
        row = {
            "train/loss": 6.0 - 0.05 * step,
            "optim/grad_norm": 1.0 + 0.01 * (step % 3),
            "attn/max_logit/layer_0": 1.0 + step,
            "attn/max_logit/layer_1": 2.0 + step,
            "output/logit_mean": -0.01 * step,
        }
        for i, param in enumerate(PARAMS):
            row[f"grad_rms/{param}"] = scale * 1e-3 * (i + 1)
            row[f"update_rms/{param}"] = 1.0
            row[f"param_norm/{param}"] = 3.0 + i
        rows[step] = row
    return rows


@pytest.fixture
def long_tables(tmp_path: Path):
    runs = [load_run(write_run(tmp_path, f"r{i}", overrides, _rows())) for i, overrides in enumerate(LONG)]
    return tabulate(runs, analysis.OLMO2_SPIKES)


def _drawn(fig: MplFigure) -> Any:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def assert_titles_clear(fig: MplFigure) -> None:
    """No title wider than its panel, none overlapping another title or a legend."""
    renderer = _drawn(fig)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles = [ax.title.get_window_extent(renderer) for ax in axes]
    legends = [legend.get_window_extent(renderer) for legend in fig.legends]
    legends += [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
    assert titles and legends
    for ax, title in zip(axes, titles):
        assert title.width <= ax.get_window_extent(renderer).width * 1.02, ax.get_title()
    for i, title in enumerate(titles):
        assert not any(title.overlaps(legend) for legend in legends)
        assert not any(title.overlaps(other) for other in titles[i + 1 :])


def test_long_variant_labels_are_shortened_and_never_covered(long_tables) -> None:
    short = figs.short_labels([label for label, _ in long_tables.groups])
    assert (
        short["data.inject.enabled=False,data.ngram_filter.enabled=True"]
        == "inject.enabled=False, ngram_filter.enabled=True"
    )
    palette = figs._Palette(row.lr for row in long_tables.runs)
    attention = figs._attention_figure(long_tables.groups, palette)
    assert attention is not None and attention.axes[0].get_title().startswith("inject.enabled=False")
    assert_titles_clear(attention)
    marks = SpikeMarks()
    assert_titles_clear(figs._series_panels("optim/grad_norm", long_tables.groups, palette, marks, {}, "grad norm"))
    grad_rms = figs._parameter_figure(long_tables.groups, palette, "grad_rms/", figs.rms_of, "grad RMS")
    assert grad_rms is not None
    assert_titles_clear(grad_rms)


def test_lr_figure_legend_sits_below_the_axes(sweep: Path) -> None:
    from proxy.records import find_runs

    tables = tabulate([load_run(d) for d in find_runs([sweep])], analysis.OLMO2_SPIKES)
    fig = figs._lr_figure(tables.sensitivity, {label: "C0" for label, _ in tables.groups})
    renderer = _drawn(fig)
    (legend,) = fig.legends
    assert legend.get_window_extent(renderer).y1 < fig.axes[0].get_window_extent(renderer).y0


def test_per_layer_statistics_are_plotted(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "r", ["model.qk_norm=off"], _rows(scale=2.0)))
    series = figs.layer_series(run, "grad_rms/", figs.rms_of)
    assert list(series) == ["embed", "block 0", "block 1", "final_norm", "lm_head"]
    steps, values = series["block 0"]
    assert steps[:2] == [0, 2] and values[0] == pytest.approx(math.sqrt((4e-6 + 9e-6) / 2) * 2)
    norms = figs.layer_series(run, "param_norm/", figs.norm_of)["block 0"][1]
    assert norms[0] == pytest.approx(math.hypot(4.0, 5.0))
    assert figs.layer_of("blocks.12.attn.proj.weight") == ((1, 12, ""), "block 12")

    result = build_report([tmp_path / "r"], tmp_path / "rep")
    assert {"grad_rms", "update_rms", "param_norm"} <= set(result.figures)
    md = result.markdown.read_text()
    assert "](figures/update_rms.png)" in md and "Update RMS / LR per layer" in md


# --------------------------------------------------------------------------------------------
# Spike marks: the declared detector, warm-up left out; the scores as published
# --------------------------------------------------------------------------------------------
def test_spike_marks_leave_warmup_out_and_scores_do_not(tmp_path: Path) -> None:
    rows = {}
    for step in range(80):
        grad = 1.0 + 0.01 * (step % 2)
        if step in (15, 60):  # a warm-up blip, then a real spike
            grad = 20.0
        rows[step] = {"optim/grad_norm": grad, "train/loss": 5.0}
    run = load_run(write_run(tmp_path, "r", [], rows, config={"schedule": {"warmup_steps": 20}}))
    steps, values = run.series("optim/grad_norm")
    detector = analysis.SpikeOptions(sigma=6, window=128, one_sided=True)
    assert [steps[i] for i in figs.spike_marks(run, steps, values, SpikeMarks(detector))] == [60]
    assert [steps[i] for i in figs.spike_marks(run, steps, values, SpikeMarks(detector, skip_warmup=False))] == [15, 60]
    # the runs table scores both: OLMo 2's definition, as published
    scored = analysis.detect_spikes(values, analysis.OLMO2_SPIKES)
    (row,) = tabulate([run], analysis.OLMO2_SPIKES).runs
    assert row.spike_score_grad_norm == pytest.approx(scored.score) and scored.is_spike[15]
    # proxy-report --mark-warmup says so in the report
    assert main([str(tmp_path / "r"), "--out", str(tmp_path / "rep"), "--mark-warmup"]) == 0
    assert "warm-up included" in (tmp_path / "rep" / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------
def test_headline_numbers_and_names() -> None:
    assert [num(v) for v in (0.50371, 868000.0, 44.08, None, 3.0)] == ["0.504", "8.68e5", "44.1", "n/a", "3"]
    assert num(1.2e-5) == "1.2e-5"
    assert compared_names(["model.qk_norm=off", "model.qk_norm=layernorm"]) == "model.qk_norm: off vs layernorm"
    assert compared_names(["a=1, b=2", "a=1, b=3"]) == "b: 2 vs 3"
    assert compared_names(["a=1, b=2", "a=2, b=3"]) == "a=1, b=2 vs a=2, b=3"
    assert compared_names(["baseline", "a=1"]) == "baseline vs a=1"


def test_callout_and_png_width(tmp_path: Path) -> None:
    callout = Callout("Result", ["one", "two"], "lead text", "pass")
    assert markdown_callout(callout) == ["> **Result**", ">", "> lead text", ">", "> - one", "> - two", ""]
    html = to_html("t", [callout, Table(["a", "note"], [[1, "x"]], wrap=("note",))], tmp_path)
    assert '<div class="callout pass"><p class="title">Result</p><p>lead text</p><ul><li>one</li>' in html
    assert '<th class="wrap">note</th>' in html and '<td class="wrap">x</td>' in html
    fig = MplFigure(figsize=(4, 3))
    fig.subplots().plot([1, 2])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=200)
    assert png_css_width(buffer.getvalue()) == 400  # 800 px at 200 DPI: 400 CSS px
    no_phys = re.sub(rb"....pHYs.{9}....", b"", buffer.getvalue(), count=1, flags=re.S)
    assert png_css_width(no_phys) == 800 and png_css_width(b"GIF89a") is None
    figs.save_png(fig, tmp_path / "f.png")
    data = (tmp_path / "f.png").read_bytes()
    assert png_css_width(data) == 400 and data[25] == 3  # colour type 3: a palette PNG
