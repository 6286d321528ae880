"""Adam's edge of stability before LR-provoked spikes, measured on the spike kits of a sweep.

Claim under test (an open question, so this reports a measured answer with its uncertainty, not a
verdict): before a loss spike, Adam's preconditioned sharpness lambda_max(P^-1 H) crosses its
stability threshold (2 + 2 beta1) / ((1 - beta1) eta) = 38/eta (Cohen et al. 2022, adaptive edge
of stability), and it does so earlier than the plain sharpness lambda_max(H) crosses gradient
descent's 2/eta; alongside, the Adam update distribution, which Molybog et al. (2023) report
turning bimodal, and decorrelated from the descent direction, before divergence.

For every spike kit under the given run or sweep directories (proxy/train/capture.py writes them;
the clipping sub-study of experiments/spike_remedies captures them at 20 steps before each spike),
:func:`proxy.forensics.edge.edge_trajectory` replays the kit from its pre-spike state through the
spike, without the run's remedy, and measures both ratios at every step before its update. Per kit:
the first step where each ratio is >= 1 and how many steps before the spike, and the largest
ratios. Over kits: the fraction where the preconditioned ratio reaches 1 strictly before the spike
step, and the fraction where it reaches 1 strictly before the plain ratio does (or the plain one
never does), each with a 95% Wilson interval. Kits are counted as independent trials; they are
not quite (a run can hold several kits, and a seed fixes init and data for every arm and LR), so
the number of distinct seeds and runs is reported beside them, and the fractions per seed.

``python experiments/adam_edge_of_stability/study.py RUNS... --out DIR [--iterations N]`` writes
``trajectories.json`` (every measured step of every kit, and the pooled numbers), ``summary.md``
and ``ratios_aligned.png`` (every kit's two ratios against the step relative to its spike).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from proxy.config import RemedyKind
from proxy.forensics import KIT_JSON, KitError, find_kits, load_kit
from proxy.forensics.edge import EdgeTrajectory, FirstCrossing, edge_trajectory, first_crossing, sharpness_loss
from proxy.forensics.replay import kit_run_dir
from proxy.records import atomic_write_text, find_runs, save_figure, write_json
from proxy.report.document import Block, Figure, Heading, Items, Paragraph, Table, to_markdown

FIGURE = "ratios_aligned.png"
Z95 = 1.959963984540054  # the two-sided 95% normal quantile


@dataclass
class KitResult:
    kit: str
    run: str
    seed: int
    lr: float  # the run's peak LR
    remedy: str
    grad_clip: float
    trajectory: EdgeTrajectory
    crossing: FirstCrossing

    def to_json(self) -> dict[str, Any]:
        return {
            "kit": self.kit,
            "run": self.run,
            "seed": self.seed,
            "lr": self.lr,
            "remedy": self.remedy,
            "grad_clip": self.grad_clip,
            "trajectory": self.trajectory.to_json(),
        }


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (NaN, NaN without trials)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def kit_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Every spike kit at or below ``paths``: a kit itself, a run directory, or a sweep of runs."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise KitError(f"no such path: {path}")
        found.update(k.resolve() for k in find_kits(path))
        if not (path / KIT_JSON).is_file():  # a sweep: the kits of every run below
            found.update(k.resolve() for run in find_runs([path]) for k in find_kits(run))
    return sorted(found)


def measure(
    path: Path, device: str, iterations: int, every: int, sharpness_batches: int = 0, mask_unseen: bool = False
) -> KitResult:
    kit = load_kit(path)
    traj = edge_trajectory(kit, device, iterations, every, sharpness_batches, mask_unseen)
    cfg = kit.config
    return KitResult(
        kit=str(path),
        run=kit_run_dir(kit).name,
        seed=int(cfg.train.seed),
        lr=float(cfg.optim.lr),
        remedy=RemedyKind(cfg.remedy.kind).value,
        grad_clip=float(cfg.optim.grad_clip),
        trajectory=traj,
        crossing=first_crossing(traj),
    )


BIMODAL = 5 / 9  # Sarle's coefficient of a uniform distribution: above it, more bimodal than flat


def _fraction(results: Sequence[KitResult], ask: Callable[[KitResult], bool]) -> dict[str, Any]:
    """k of n kits where ``ask`` holds, the Wilson interval and the per-seed breakdown."""
    n = len(results)
    k = sum(bool(ask(r)) for r in results)
    lo, hi = wilson(k, n)
    per_seed = defaultdict(lambda: [0, 0])
    for r in results:
        per_seed[r.seed][0] += bool(ask(r))
        per_seed[r.seed][1] += 1
    return {
        "k": k,
        "n": n,
        "fraction": k / n if n else math.nan,
        "wilson95": [lo, hi],
        "per_seed": {str(s): f"{a}/{b}" for s, (a, b) in sorted(per_seed.items())},
    }


def _ends(r: KitResult, key: str) -> tuple[float, float]:
    """A per-step quantity at the first measured step and at the spike step (the last row)."""
    steps = r.trajectory.steps
    return getattr(steps[0], key), getattr(steps[-1], key)


def pooled(results: Sequence[KitResult]) -> dict[str, Any]:
    """The fractions over kits, with Wilson intervals, and the per-seed breakdown.

    A ratio already >= 1 at a kit's first measured step crossed, if ever, before the window: such
    a kit cannot say how long before the spike the crossing came (left-censored). The crossing
    question proper is asked of the kits whose preconditioned ratio started the window below 1."""
    out: dict[str, Any] = {
        "kits": len(results),
        "seeds": sorted({r.seed for r in results}),
        "runs": len({r.run for r in results}),
        "kits_replaying_the_run": sum(r.trajectory.replays_run for r in results),
    }
    out["adam_before_spike"] = _fraction(results, lambda r: r.crossing.adam_before_spike)
    out["adam_before_plain"] = _fraction(results, lambda r: r.crossing.adam_first)
    out["plain_before_spike"] = _fraction(
        results, lambda r: r.crossing.gd.step is not None and r.crossing.gd.step < r.crossing.spike_step
    )
    out["adam_at_start"] = _fraction(results, lambda r: r.crossing.adam.at_start)
    out["plain_at_start"] = _fraction(results, lambda r: r.crossing.gd.at_start)
    below = [r for r in results if not r.crossing.adam.at_start]
    out["adam_crossed_in_window"] = _fraction(below, lambda r: r.crossing.adam_crossed_in_window)
    out["adam_in_window_before_plain"] = _fraction(
        below, lambda r: r.crossing.adam_crossed_in_window and r.crossing.adam_first
    )
    leads = [r.crossing.adam.steps_before for r in results if r.crossing.adam_before_spike]
    out["adam_steps_before_spike"] = sorted(leads)
    out["adam_steps_before_spike_in_window"] = sorted(
        r.crossing.adam.steps_before for r in below if r.crossing.adam_crossed_in_window
    )
    # Molybog et al.: the update distribution turns bimodal, and decorrelates from -g, before divergence
    bc = [_ends(r, "update_bimodality") for r in results]
    cos = [_ends(r, "update_cosine") for r in results]
    out["update_bimodality"] = {"at_start": [a for a, _ in bc], "at_spike": [b for _, b in bc]}
    out["update_cosine"] = {"at_start": [a for a, _ in cos], "at_spike": [b for _, b in cos]}
    out["bimodal_at_spike"] = _fraction(results, lambda r: _ends(r, "update_bimodality")[1] > BIMODAL)
    out["bimodality_rises"] = _fraction(
        results, lambda r: _ends(r, "update_bimodality")[1] > _ends(r, "update_bimodality")[0]
    )
    out["cosine_falls"] = _fraction(results, lambda r: _ends(r, "update_cosine")[1] < _ends(r, "update_cosine")[0])
    return out


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _g(value: Optional[float]) -> str:
    if value is None:
        return "never"
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _crossed(c) -> str:
    if c.step is None:
        return "never"
    return f"{c.step} ({c.steps_before} before{', at the start' if c.at_start else ''})"


def _fraction_line(what: str, q: dict[str, Any]) -> str:
    lo, hi = q["wilson95"]
    per_seed = ", ".join(f"seed {s}: {v}" for s, v in q["per_seed"].items()) or "no kits"
    return f"{what}: {q['k']} of {q['n']} kits ({_g(q['fraction'])}; 95% Wilson {_g(lo)}–{_g(hi)}); per seed {per_seed}"


def summary_blocks(
    results: Sequence[KitResult],
    numbers: dict[str, Any],
    iterations: int,
    figure: Optional[str],
    sharpness_batches: int = 0,
) -> list[Block]:
    beta1s = sorted({r.trajectory.beta1 for r in results})
    bound = ", ".join(f"{(2 + 2 * b) / (1 - b):.3g}/η (β₁={b:g})" for b in beta1s) or "38/η"
    blocks: list[Block] = [
        Paragraph(
            f"{numbers['kits']} spike kits from {numbers['runs']} runs, {len(numbers['seeds'])} distinct "
            f"seeds ({', '.join(map(str, numbers['seeds']))}). Each kit replayed from its pre-spike state "
            f"through the spike without the run's remedy; at every step, before its update, λmax(H) "
            f"against 2/η and λmax(P⁻¹H) against {bound} (Lanczos, {iterations} Hessian-vector products "
            f"per eigenvalue, on {sharpness_loss(sharpness_batches)}). {numbers['kits_replaying_the_run']} of "
            f"{numbers['kits']} replays repeat the run's recorded losses bit for bit (the others: the "
            "run's remedy acted in the window, or another device)."
        ),
        Heading("Measured answer"),
        Items(
            [
                _fraction_line("preconditioned ratio ≥ 1 strictly before the spike step", numbers["adam_before_spike"]),
                _fraction_line(
                    "preconditioned ratio ≥ 1 strictly before the plain ratio (or the plain never)",
                    numbers["adam_before_plain"],
                ),
                _fraction_line(
                    "plain ratio ≥ 1 strictly before the spike step (context)", numbers["plain_before_spike"]
                ),
                _fraction_line(
                    "preconditioned ratio already ≥ 1 at the window's first measured step (the crossing, "
                    "if any, came earlier: left-censored)",
                    numbers["adam_at_start"],
                ),
                _fraction_line(
                    "plain ratio already ≥ 1 at the window's first measured step", numbers["plain_at_start"]
                ),
                _fraction_line(
                    "of the kits whose preconditioned ratio started below 1: it reached 1 strictly before the spike",
                    numbers["adam_crossed_in_window"],
                ),
                _fraction_line(
                    "... and strictly before the plain ratio (or the plain never)",
                    numbers["adam_in_window_before_plain"],
                ),
                "steps between the preconditioned crossing and the spike, where it came before: "
                + (", ".join(map(str, numbers["adam_steps_before_spike"])) or "none")
                + " (of which seen inside the window: "
                + (", ".join(map(str, numbers["adam_steps_before_spike_in_window"])) or "none")
                + ")",
                f"Adam update bimodality coefficient (Sarle; 1/3 normal, 5/9 uniform, → 1 bimodal), median over kits: "
                f"{_g(_median(numbers['update_bimodality']['at_start']))} at the first measured step, "
                f"{_g(_median(numbers['update_bimodality']['at_spike']))} at the spike",
                _fraction_line("update bimodality above 5/9 at the spike", numbers["bimodal_at_spike"]),
                _fraction_line(
                    "update bimodality higher at the spike than at the window's start", numbers["bimodality_rises"]
                ),
                f"cos(update, −gradient), median over kits: {_g(_median(numbers['update_cosine']['at_start']))} at "
                f"the first measured step, {_g(_median(numbers['update_cosine']['at_spike']))} at the spike; "
                + _fraction_line("lower at the spike than at the start", numbers["cosine_falls"]),
                "kits count as independent trials in the intervals; several kits of one run, and one seed's "
                "runs across LRs and arms, are not, so read them against the number of seeds",
            ]
        ),
        Heading("Per kit"),
        Table(
            [
                "run",
                "seed",
                "LR",
                "remedy",
                "clip",
                "spike step",
                "trigger",
                "from step",
                "P⁻¹H ratio ≥ 1 at (steps before)",
                "H ratio ≥ 1 at (steps before)",
                "max P⁻¹H ratio",
                "max H ratio",
                "replays run",
            ],
            [
                [
                    r.run,
                    r.seed,
                    r.lr,
                    r.remedy,
                    r.grad_clip,
                    r.crossing.spike_step,
                    r.trajectory.trigger,
                    r.trajectory.start_step,
                    _crossed(r.crossing.adam),
                    _crossed(r.crossing.gd),
                    r.crossing.max_adam_ratio,
                    r.crossing.max_gd_ratio,
                    r.trajectory.replays_run,
                ]
                for r in results
            ],
            wrap=("run",),
        ),
    ]
    if figure:
        blocks += [
            Figure(figure, "each kit's ratios against the step relative to its spike (dashed); dotted: the threshold")
        ]
    return blocks


def aligned_figure(results: Sequence[KitResult], path: Path) -> Path:
    """Both ratios of every kit against (step - spike step), log y, coloured by the peak LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lrs = sorted({r.lr for r in results})
    colours = {lr: plt.get_cmap("viridis")(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "gd_ratio", "λmax(H) / (2/η)"),
        (axes[1], "adam_ratio", "λmax(P⁻¹H) / ((2+2β₁)/((1−β₁)η))"),
    ):
        for r in results:
            steps = r.trajectory.steps
            values = [v if v > 0 else math.nan for v in (getattr(s, key) for s in steps)]
            ax.plot(
                [s.step - r.crossing.spike_step for s in steps],
                values,
                "-",
                marker=".",
                lw=1,
                alpha=0.7,
                color=colours[r.lr],
            )
        ax.axhline(1.0, color="red", ls=":", lw=1)
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("steps relative to the spike")
        ax.set_title(title, fontsize=9)
    for lr in lrs:
        axes[0].plot([], [], color=colours[lr], label=f"LR {lr:g}")
    if lrs:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="kit, run or sweep directories")
    parser.add_argument("--out", type=Path, required=True, help="where trajectories.json, summary.md and the figure go")
    parser.add_argument("--iterations", type=int, default=20, help="Hessian-vector products per eigenvalue")
    parser.add_argument("--every", type=int, default=1, help="measure every N-th step (the spike step always)")
    parser.add_argument("--device", default="cpu", help="cpu (bitwise replays of CPU runs) or cuda")
    parser.add_argument(
        "--sharpness-batches",
        type=int,
        default=0,
        help="0: eigenvalues of each step's own batch loss; N: of the loss over the run's first N "
        "held-out batches, one fixed sample at every step (N times the cost)",
    )
    parser.add_argument(
        "--mask-unseen",
        action="store_true",
        help="leave coordinates Adam has never had a gradient for (v = 0) out of the preconditioned operator",
    )
    args = parser.parse_args(argv)
    try:
        if args.iterations < 1 or args.every < 1 or args.sharpness_batches < 0:
            raise KitError(
                f"--iterations={args.iterations} and --every={args.every} must be >= 1, "
                f"--sharpness-batches={args.sharpness_batches} >= 0"
            )
        paths = kit_dirs(args.runs)
        if not paths:
            raise KitError(f"no spike kit under {', '.join(map(str, args.runs))}")
        results = []
        for path in paths:
            results.append(
                measure(path, args.device, args.iterations, args.every, args.sharpness_batches, args.mask_unseen)
            )
            c = results[-1].crossing
            print(f"{path}: preconditioned ≥ 1 at {_crossed(c.adam)}, plain at {_crossed(c.gd)}")
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    numbers = pooled(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "trajectories.json",
        {
            "iterations": args.iterations,
            "every": args.every,
            "sharpness_batches": args.sharpness_batches,
            "mask_unseen": args.mask_unseen,
            "summary": numbers,
            "kits": [r.to_json() for r in results],
        },
    )
    figure = aligned_figure(results, args.out / FIGURE).name
    atomic_write_text(
        args.out / "summary.md",
        to_markdown(
            "Adam's edge of stability before spikes",
            summary_blocks(results, numbers, args.iterations, figure, args.sharpness_batches),
        ),
    )
    print(_fraction_line("preconditioned ratio ≥ 1 before the spike", numbers["adam_before_spike"]))
    print(_fraction_line("preconditioned before plain", numbers["adam_before_plain"]))
    print(f"-> {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
