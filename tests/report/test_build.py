"""The report on hand-made run directories: every run listed, statuses right, numbers right.

Run directories are written through proxy.records (RunRecord / write_json), the same contract the
trainer uses, so these tests need no training.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import analysis
from proxy.records import RunRecord, write_json
from proxy.report import ReportError, build_report, main

VOCAB = 512
L0 = math.log(VOCAB)  # ~6.238


def make_run(
    root: Path,
    name: str,
    *,
    lr: float,
    qk_norm: str,
    status: str = "completed",
    final_loss: float = 3.0,
    steps: int = 60,
    spike_at: int | None = None,
    events: tuple[tuple[int, str], ...] = (),
    summary_extra: dict | None = None,
    metrics: bool = True,
) -> Path:
    """A run directory as the trainer would leave it (a slightly noisy decaying loss)."""
    run_dir = root / name
    record = RunRecord(run_dir)
    overrides = ["+experiment=unit", f"optim.lr={lr}", f"model.qk_norm={qk_norm}", "train.seed=0"]
    write_json(
        run_dir / "config.yaml",  # YAML is a superset of JSON
        {
            "model": {"n_layers": 2, "qk_norm": qk_norm, "vocab_size": None},
            "optim": {"lr": lr},
            "train": {"seed": 0, "steps": steps},
            "data": {"source": "synthetic", "synthetic": {"vocab_size": VOCAB}},
        },
    )
    record.update(
        status="running",
        run_name=name,
        sweep_id="sweep-1",
        overrides=overrides,
        steps_planned=steps,
        lr=lr,
        loss_at_init=L0,
        n_params=12345,
    )
    last = steps if status != "diverged" else steps // 2
    if metrics:
        for step in range(0, last + 1, 2):
            frac = step / steps
            loss = L0 + (final_loss - L0) * frac + 0.01 * ((step // 2) % 2)
            grad = 1.0 + 0.02 * ((step // 2) % 3)
            if spike_at is not None and step == spike_at:
                grad = 50.0
            row = {
                "train/loss": loss,
                "optim/grad_norm": grad,
                "optim/lr": lr,
                "attn/max_logit/layer_0": 5.0 + step * lr * 10,
                "attn/max_logit/layer_1": 3.0 + step,
                "attn/max_logit": max(5.0 + step * lr * 10, 3.0 + step),
                "output/logit_mean": -0.01 * step,
                "output/lse_mean": L0 - 0.02 * step,
            }
            if step % 20 == 0:
                row["val/loss"] = loss
            if status == "diverged" and step == last:
                row["train/loss"] = float("nan")
            record.log(step, row)
        for step, kind in events:
            record.event(step, kind, trigger="grad_norm", value=50.0, threshold=10.0, action="skipped")
    final = {
        "completed": {"final_val_loss": final_loss, "final_train_loss": final_loss},
        "diverged": {"diverged_at_step": last, "final_train_loss": float("nan")},
        "failed": {"error": "RuntimeError: CUDA out of memory"},
        "running": {},
    }[status]
    record.update(status=status, steps_completed=last if metrics else 0, **final, **(summary_extra or {}))
    record.close()
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 variants x 3 LRs; no-QK-norm diverges at the top LR, one run crashed, one still running."""
    root = tmp_path / "multirun"
    make_run(root, "0", lr=1e-3, qk_norm="off", final_loss=3.0)
    make_run(root, "1", lr=1e-2, qk_norm="off", final_loss=2.5, spike_at=40, events=((40, "skip_step"),))
    make_run(root, "2", lr=1e-1, qk_norm="off", status="diverged")
    make_run(root, "3", lr=1e-3, qk_norm="layernorm", final_loss=3.1)
    make_run(root, "4", lr=1e-2, qk_norm="layernorm", final_loss=2.4)
    make_run(root, "5", lr=1e-1, qk_norm="layernorm", status="failed", metrics=False)
    make_run(root, "6", lr=3e-1, qk_norm="layernorm", status="running", final_loss=2.9)
    return root


def test_report_files_and_run_table(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = build_report([sweep], out)
    for path in (result.html, result.markdown, result.csv):
        assert path.is_file() and path.stat().st_size > 0
    assert set(result.figures) == {
        "lr_vs_loss",
        "loss",
        "attn_max_logit",
        "output_logit_mean",
        "output_log_z",
        "grad_norm",
    }
    for png in result.figures.values():
        assert png.read_bytes()[:4] == b"\x89PNG"

    statuses = {row.name: row.status for row in result.runs}
    assert statuses == {
        "0": "completed",
        "1": "completed",
        "2": "diverged",
        "3": "completed",
        "4": "completed",
        "5": "failed",
        "6": "running",
    }
    assert result.shared_overrides == ("experiment=unit",)
    assert {row.variant for row in result.runs} == {"model.qk_norm=off", "model.qk_norm=layernorm"}

    with open(result.csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    by_name = {r["name"]: r for r in rows}
    assert by_name["5"]["error"] == "RuntimeError: CUDA out of memory"
    assert by_name["1"]["events"] == "skip_step:1"
    assert float(by_name["2"]["lr"]) == pytest.approx(0.1)

    html = result.html.read_text()
    assert html.count("data:image/png;base64,") == 6
    assert "<img" in html and 'src="figures/' not in html  # self-contained
    for text in ("CUDA out of memory", "diverged at step 30", "still running"):
        assert text in html
    md = result.markdown.read_text()
    assert "](figures/lr_vs_loss.png)" in md and "](figures/grad_norm.png)" in md
    assert md.count("| completed |") == 4
    assert "| model.qk_norm=off,optim.lr=0.01 | 40 | skip_step | grad_norm | 50 | 10 | action=skipped |" in md


def test_a_report_without_figures_has_the_same_tables(sweep: Path, tmp_path: Path) -> None:
    """figures=False (proxy-verdict --no-figures, a lease's science run): the tables, runs.csv and
    sensitivity as with figures, no PNG drawn, and the report says they were left out."""
    full = build_report([sweep], tmp_path / "full")
    bare = build_report([sweep], tmp_path / "bare", figures=False)
    assert bare.figures == {} and not (tmp_path / "bare" / "figures").exists()
    assert bare.csv.read_text() == full.csv.read_text() and bare.sensitivity == full.sensitivity
    md = bare.markdown.read_text()
    assert "figures left out" in md and "](figures/" not in md and "| completed |" in md
    assert "data:image/png" not in bare.html.read_text()


def test_report_lr_sensitivity_matches_hand_computation(sweep: Path, tmp_path: Path) -> None:
    result = build_report([sweep], tmp_path / "rep")
    off = result.sensitivity_of("model.qk_norm=off")
    # LRs 1e-3, 1e-2, 1e-1 -> losses 3.0, 2.5, L0 (diverged); best 2.5
    assert off.lrs == [1e-3, 1e-2, 1e-1]
    assert off.sensitivity == pytest.approx(((3.0 - 2.5) + 0 + (L0 - 2.5)) / 3)
    assert off.best_lr == 1e-2 and off.blown_up_lrs == [1e-1]
    assert (off.n_runs, off.n_diverged, off.n_failed, off.n_excluded) == (3, 1, 0, 0)

    qk = result.sensitivity_of("model.qk_norm=layernorm")
    # the failed run counts as L0 (no metrics: falls back to the summary's loss at init);
    # the running run (LR 0.3) is listed but not on the curve.
    assert qk.lrs == [1e-3, 1e-2, 1e-1]
    assert qk.sensitivity == pytest.approx(((3.1 - 2.4) + 0 + (L0 - 2.4)) / 3)
    assert (qk.n_runs, qk.n_failed, qk.n_excluded) == (4, 1, 1)
    assert "not finished" in qk.note


def test_report_spike_scores_and_options(sweep: Path, tmp_path: Path) -> None:
    result = build_report([sweep], tmp_path / "rep")
    rows = {row.name: row for row in result.runs}
    # run 1: 31 grad-norm points, the first 10 unscored, one spike at step 40 -> 1/21
    assert rows["1"].spike_score_grad_norm == pytest.approx(100 / 21)
    assert rows["0"].spike_score_grad_norm == 0.0
    assert rows["2"].spike_score_loss is not None and rows["2"].spike_score_loss > 0  # the NaN
    assert rows["5"].spike_score_loss is None  # no metrics at all
    assert rows["2"].max_attn_logit_peak == pytest.approx(5.0 + 30 * 0.1 * 10)  # from metrics: layer 0 at step 30

    loose = build_report(
        [sweep],
        tmp_path / "rep2",
        spikes=analysis.SpikeOptions(sigma=6, window=128, one_sided=True, min_history=25),
    )
    # only 6 points (steps 50..60) of run 1 are scored now, after the spike at step 40
    assert {row.name: row for row in loose.runs}["1"].spike_score_grad_norm == 0.0


def test_report_tolerates_missing_keys(tmp_path: Path) -> None:
    """An old run: no overrides, no loss at init, no attention stats; still reported."""
    run_dir = tmp_path / "old"
    record = RunRecord(run_dir)
    for step in range(0, 30, 3):
        record.log(step, {"train/loss": 5.0 - 0.1 * step})
    record.update(status="completed", lr=3e-3)
    record.close()
    result = build_report([run_dir], tmp_path / "rep")
    (row,) = result.runs
    assert row.variant == "defaults" and row.final_train_loss == pytest.approx(5.0 - 2.7)
    assert row.loss_at_init == pytest.approx(5.0)  # train loss at step 0
    assert "attn_max_logit" not in result.figures and "loss" in result.figures
    assert any("attn_max_logit" in note for note in result.notes)
    assert result.sensitivity[0].sensitivity == 0.0 and "single LR" in result.sensitivity[0].note


def test_cli_default_out_and_bad_path(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "--one-sided", "--spike-sigma", "6", "--spike-window", "128"]) == 0
    printed = capsys.readouterr().out
    assert (sweep / "report" / "report.html").is_file()
    assert str((sweep / "report" / "report.html").resolve()) in printed

    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such path" in err[0] and "nope" in err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no run directories" in capsys.readouterr().err

    assert main([str(sweep), "--spike-window", "1"]) == 2
    assert "window" in capsys.readouterr().err
    with pytest.raises(ReportError):
        build_report([], tmp_path / "x")


def test_console_script_entry_point(sweep: Path, tmp_path: Path) -> None:
    """`python -m proxy.report` exits 2 with one line on a bad path (what the console script runs)."""
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.report", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such path" in proc.stderr


def test_lr_range_restricts_sensitivity_not_the_curve(sweep: Path, tmp_path: Path) -> None:
    result = build_report([sweep], tmp_path / "rep", lr_range=(1e-3, 1e-2))
    off = result.sensitivity_of("model.qk_norm=off")
    assert off.lrs == [1e-3, 1e-2, 1e-1]  # the curve keeps every LR
    assert off.sensitivity == pytest.approx((3.0 - 2.5) / 2)
    assert "[0.001, 0.01] only" in result.markdown.read_text()
    none_inside = build_report([sweep], tmp_path / "rep2", lr_range=(1.0, 2.0))
    assert none_inside.sensitivity[0].sensitivity is None and "no swept LR inside" in none_inside.sensitivity[0].note
    with pytest.raises(ReportError, match="lr_range"):
        build_report([sweep], tmp_path / "rep3", lr_range=(1e-2, 1e-3))


def _rolled_back_run(root: Path) -> Path:
    """Steps 0..9, a spike at 6 rolls back to 4; replayed 4..7, a spike at 7 rolls back to 2;
    then 2..9 to the end: the kept trajectory is 0, 1, then the last 2..9."""
    record = RunRecord(root / "rb")
    write_json(root / "rb" / "summary.json", {"status": "completed", "run_name": "rb"})
    for step in range(0, 7):
        record.log(step, {"train/loss": 5.0 - 0.1 * step, "optim/grad_norm": 1.0})
    record.event(5, "skip_step", trigger="loss", value=9.0, threshold=6.0)  # on the first branch
    record.event(6, "rollback", trigger="grad_norm", value=7.0, threshold=2.0, restore_step=4, data_position=7)
    for step in range(4, 8):
        record.log(step, {"train/loss": 4.0 - 0.1 * step, "optim/grad_norm": 1.0})
    record.event(7, "rollback", trigger="grad_norm", value=8.0, threshold=2.0, restore_step=2, data_position=8)
    for step in range(2, 10):
        record.log(step, {"train/loss": 3.0 - 0.1 * step, "optim/grad_norm": 1.0})
    record.close()
    return root / "rb"


def test_rolled_back_steps_are_set_apart_from_the_kept_trajectory(tmp_path: Path) -> None:
    from proxy.records import load_run

    run = load_run(_rolled_back_run(tmp_path))
    steps, losses = run.series("train/loss")
    assert steps == list(range(10))
    assert losses[:2] == [5.0, 4.9] and losses[2:] == pytest.approx([3.0 - 0.1 * s for s in range(2, 10)])
    first, second = run.abandoned
    assert first.series("train/loss")[0] == [4, 5, 6] and first.rollback["step"] == 6
    # the second branch holds the replayed 4..7 and the first pass's 2, 3
    assert second.series("train/loss")[0] == [2, 3, 4, 5, 6, 7]
    assert [e["event"] for e in run.events] == ["skip_step", "rollback", "rollback"]
    assert [e.get("rolled_back", False) for e in run.events] == [True, True, False]
    # each event belongs to the first branch that threw it away
    assert first.events == [run.events[0]] and second.events == [run.events[1]]
    # the report draws it without error and scores spikes on the kept trajectory only
    result = build_report([tmp_path / "rb"], tmp_path / "report")
    assert result.runs[0].events == {"skip_step": 1, "rollback": 2}
    assert (tmp_path / "report" / "figures" / "loss.png").exists()
    # one run, one LR: no LR-sensitivity section or LR curve, a per-variant table instead
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Variants" in md and "## LR sensitivity" not in md
    assert not (tmp_path / "report" / "figures" / "lr_vs_loss.png").exists()


def test_resume_truncates_by_position_when_steps_repeat(tmp_path: Path) -> None:
    from proxy.records import load_run

    run_dir = _rolled_back_run(tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # 9 + 5 lines for the two abandoned branches, then steps 2..5 of the last: a checkpoint at step 6
    record = RunRecord(run_dir, resume=True)
    assert record.lines == len(lines)
    record.truncate_after(5, lines=18)
    record.log(6, {"train/loss": 0.0})
    record.close()
    run = load_run(run_dir)
    assert run.series("train/loss")[0] == [0, 1, 2, 3, 4, 5, 6]
    assert run.series("train/loss")[1][-1] == 0.0 and len(run.abandoned) == 2


def test_an_optimum_on_the_grids_edge_is_flagged_beside_its_sensitivity(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    for i, (lr, loss) in enumerate(((1e-3, 3.5), (1e-2, 3.2), (1e-1, 3.0))):  # still falling at the top LR
        make_run(root, str(i), lr=lr, qk_norm="off", final_loss=loss)
    for i, (lr, loss) in enumerate(((1e-3, 3.5), (1e-2, 3.0), (1e-1, 3.2))):  # bracketed
        make_run(root, str(10 + i), lr=lr, qk_norm="layernorm", final_loss=loss)
    result = build_report([root], tmp_path / "rep")
    edge, inside = result.sensitivity_of("model.qk_norm=off"), result.sensitivity_of("model.qk_norm=layernorm")
    assert edge.sensitivity is not None and "best LR 0.1 is the grid's highest" in edge.note
    assert "grid's" not in inside.note
    assert "best LR 0.1 is the grid's highest" in result.markdown.read_text()


def test_the_lr_figure_gives_the_curves_the_axis_and_names_the_loss_at_init() -> None:
    from proxy.report.figures import _lr_figure
    from proxy.report.tables import SensitivityRow

    row = SensitivityRow("v", "", None, [1e-3, 1e-2, 1e-1], [3.6, 3.4, 3.9], [], 6.2, 1e-2, 3.4, 0.2, 3, 0, 0, 0)
    fig = _lr_figure([row], {"v": "C0"})
    assert fig is not None
    low, high = fig.axes[0].get_ylim()
    assert high < 4.1 and low > 3.3  # not stretched to 6.2
    assert any("loss at init 6.2 (above the axis)" in t.get_text() for t in fig.legends[0].texts)
    blown = SensitivityRow("v", "", None, [1e-3, 1e-2], [3.6, 6.2], [1e-2], 6.2, 1e-3, 3.6, 1.3, 2, 1, 0, 0)
    assert _lr_figure([blown], {"v": "C0"}).axes[0].get_ylim()[1] > 6.2  # a run at the loss at init shows it


def test_a_legend_says_when_each_seed_is_its_own_line(tmp_path: Path) -> None:
    from proxy.analysis import SpikeOptions
    from proxy.records import load_run
    from proxy.report.figures import _Palette, _series_panels
    from proxy.report.tables import tabulate

    def legend(names: list[str], lrs: list[float]) -> list[str]:
        root = tmp_path / "-".join(names)
        for name, lr in zip(names, lrs):
            make_run(root, name, lr=lr, qk_norm="off", final_loss=3.0)
        tables = tabulate([load_run(p) for p in sorted(root.iterdir())], SpikeOptions())
        palette = _Palette(row.lr for row in tables.runs)
        fig = _series_panels("train/loss", tables.groups, palette, None, {}, "loss")
        return [t.get_text() for t in fig.legends[0].texts]

    assert "optim.lr=0.001 (a line per seed)" in legend(["a", "b"], [1e-3, 1e-3])  # two runs at one LR
    assert "optim.lr=0.001" in legend(["c", "d"], [1e-3, 1e-2])


def test_log_axes_are_labelled_without_mathtext(tmp_path: Path) -> None:
    """Run-dir text is drawn literally (no math), so a log axis's ticks must not be mathtext."""
    import matplotlib
    from matplotlib.figure import Figure

    from proxy.report.figures import LITERAL_TEXT, plain_log_ticks

    with matplotlib.rc_context(LITERAL_TEXT):
        fig = Figure()
        ax = fig.subplots()
        ax.plot([1, 2, 3], [1e-4, 1e-1, 10.0])
        ax.set_yscale("log")
        plain_log_ticks(fig)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and not any("$" in t or "mathdefault" in t for t in labels)
    assert "10⁻³" in labels and "1" in labels
