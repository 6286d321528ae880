"""Adam's edge of stability, protocol 3: before the loss spikes of the loss-spike organism (issue 31,
item 4; criteria committed before the measurement).

Protocols 1 and 2 measured it before LR-provoked grad-norm spikes whose attention logits had already
reached 1e4-1e6: the preconditioned ratio sat above 1 from the first step of every window
(censored), a regime the theory does not describe. The loss-spike organism (experiments/loss_spikes)
is the regime it does: a near-zero loss, small attention logits, a spike after a long stable
stretch. One kit of it (seed 3, 30 steps of history) showed the preconditioned sharpness crossing
38/eta 7-10 steps before the spike and the plain one 2/eta only at it: one kit, an observation.

Here: the studied kit of each seed of the replay study's runs (experiments/spike_remedies/replay/
protocol2.py: the first large loss spike of seeds 20, 21, 23, 24, states from 50 steps before;
``replays.csv`` names each kit), measured with proxy/forensics/edge.py at every step from the
kit's earliest state through the spike step N: both eigenvalues of the loss of the run's probe
batch (``sharpness_batches=1``: the fixed held-out sample the spikes are counted on), 20 Lanczos
iterations each, coordinates with v = 0 left out of the preconditioner (``mask_unseen``).

Design check (else NOT TESTABLE AT THIS SCALE): in >= 3 of the 4 kits the preconditioned ratio
lambda_max(P^-1 H) / (38/eta) is below 1 at the window's first step (the window starts before any
crossing; a kit already above it is left-censored and cannot say when it crossed).
Criteria, on the uncensored kits (Cohen et al. 2022's adaptive edge of stability; Bai et al. 2025:
the spike follows the preconditioned sharpness passing the stability bound):
1. the preconditioned ratio reaches 1 strictly before the spike step N, in more than half of them;
2. it does so strictly before the plain ratio lambda_max(H) / (2/eta) reaches 1 (or the plain one
   never does through N), in more than half of them.
Reported: how many steps before N each crossing comes, the largest ratios, and Molybog et al.'s
update statistics (bimodality, cosine with -g) from the same replay.

``python experiments/adam_edge_of_stability/protocol3.py RUNS --replays CSV --out DIR``
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional, Sequence

from proxy.analysis import wilson_interval
from proxy.forensics import KitError
from proxy.records import atomic_write_text, find_runs, load_run, write_json
from proxy.report.document import to_markdown
from proxy.verdict import Verdict, load_script

study = load_script(Path(__file__).resolve().parent / "study.py")
SOURCE = (
    "Cohen et al. 2022 (arXiv 2207.14484), adaptive edge of stability: Adam is stable while "
    "lambda_max(P^-1 H) < (2 + 2 beta1) / ((1 - beta1) eta) = 38/eta; Bai et al. 2025 (arXiv 2506.04805): "
    "a loss spike follows the preconditioned sharpness passing that bound"
)
MIN_UNCENSORED = 3
WOULD_TEST = "kits with a longer history (capture.steps_before >= 100) on the organism, or more seeds"


def studied_kits(runs: Path, replays: Path) -> list[Path]:
    """The kit each seed's replay study used: ``replays.csv`` names its run folder and kit."""
    rows = list(csv.DictReader(replays.open(newline="")))
    by_run = {run_dir.name: run_dir for run_dir in find_runs([runs])}
    kits = []
    for row in rows:
        if row["run"] not in by_run:
            raise KitError(f"{replays}: run {row['run']} is not under {runs}")
        kits.append(by_run[row["run"]] / "spike_kits" / row["kit"])
    return kits


def judge(results: Sequence) -> Verdict:
    v = Verdict(finding="adam_edge_of_stability, protocol 3 (before the organism's loss spikes)", source=SOURCE)
    uncensored = [r for r in results if not r.crossing.adam.at_start]
    v.design(
        f"the window starts below the edge: preconditioned ratio < 1 at the first step in >= {MIN_UNCENSORED} "
        f"of the {len(results)} kits",
        len(uncensored) >= MIN_UNCENSORED,
        f"{len(uncensored)} of {len(results)} (censored: "
        + (", ".join(f"seed {r.seed}" for r in results if r.crossing.adam.at_start) or "none")
        + ")",
        WOULD_TEST,
    )
    if not v.testable:
        return v

    def share(flags: list[bool]) -> str:
        k, n = sum(flags), len(flags)
        lo, hi = wilson_interval(k, n)
        return f"{k} of {n} (Wilson 95% [{lo:.2f}, {hi:.2f}])"

    before = [bool(r.crossing.adam_before_spike) for r in uncensored]
    v.check(
        "the preconditioned ratio reaches 1 strictly before the spike step, in more than half of the kits",
        2 * sum(before) > len(before),
        share(before),
    )
    first = [bool(r.crossing.adam_before_spike and r.crossing.adam_first) for r in uncensored]
    v.check(
        "... and strictly before the plain ratio lambda_max(H) / (2/eta) reaches 1 (or it never does)",
        2 * sum(first) > len(first),
        share(first),
    )
    v.numbers["steps between the preconditioned crossing and the spike"] = {
        f"seed {r.seed}": r.crossing.adam.steps_before for r in results
    }
    v.numbers["steps between the plain crossing and the spike"] = {
        f"seed {r.seed}": r.crossing.gd.steps_before for r in results
    }
    v.numbers["largest ratios (preconditioned, plain)"] = {
        f"seed {r.seed}": [round(r.crossing.max_adam_ratio, 3), round(r.crossing.max_gd_ratio, 3)] for r in results
    }
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the replay study's sweep (spike_remedies/replay_lab)")
    parser.add_argument("--replays", type=Path, required=True, help="the replay study's replays.csv")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        results = []
        for kit in studied_kits(args.runs, args.replays):
            results.append(study.measure(kit, "cpu", args.iterations, 1, sharpness_batches=1, mask_unseen=True))
            r = results[-1]
            run = load_run(kit.parent.parent)
            print(
                f"seed {run.config_value('train.seed')}: preconditioned >= 1 at {study._crossed(r.crossing.adam)}, "
                f"plain at {study._crossed(r.crossing.gd)}"
            )
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict = judge(results)
    numbers = study.pooled(results)
    args.out.mkdir(parents=True, exist_ok=True)
    figure = study.aligned_figure(results, args.out / study.FIGURE).name
    summary = to_markdown("Per kit", study.summary_blocks(results, numbers, args.iterations, figure, 1))
    atomic_write_text(args.out / "verdict.md", verdict.to_markdown() + "\n" + summary)
    write_json(args.out / "verdict.json", verdict.to_json())
    write_json(
        args.out / "trajectories.json",
        {
            "iterations": args.iterations,
            "mask_unseen": True,
            "summary": numbers,
            "kits": [r.to_json() for r in results],
        },
    )
    print(f"{verdict.label}: {args.out / 'verdict.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
