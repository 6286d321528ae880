"""Spike frequency protocol 2, step 1: each size's own LR from the bracket sweep (rule committed
before the bracket ran; README "Protocol 2").

Rule: per size (``model`` override), the LR of the lowest final val loss of the bracket's plain,
seed-10 runs; it must sit strictly inside the swept grid (else the grid is widened by one step on
that side and the rule applied again; this script says so and writes nothing). Writes
``lrs.json`` beside this file: the chosen LR per size and the bracket's losses behind it, and
prints the study's commands.

    python experiments/spike_frequency/protocol2/choose_lrs.py runs/spike_frequency/bracket_lab_<date>
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from proxy.analysis import override_value
from proxy.records import COMPLETED, atomic_write_text, find_runs, load_run

HERE = Path(__file__).resolve().parent
LRS_FILE = HERE / "lrs.json"


def bracket_losses(paths: Sequence[Path]) -> dict[str, dict[float, float]]:
    """size -> {LR: final val loss} over the completed runs under ``paths``."""
    losses: dict[str, dict[float, float]] = {}
    for path in find_runs(paths):
        run = load_run(path)
        size, lr = override_value(run.overrides, "model"), run.config_value("optim.lr")
        loss = run.summary.final_val_loss
        if run.status != COMPLETED or size is None or not isinstance(lr, (int, float)):
            continue
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.setdefault(size, {})[float(lr)] = float(loss)
    return losses


def choose(losses: dict[str, dict[float, float]]) -> tuple[dict[str, float], list[str]]:
    """The rule: per size the LR of the lowest loss; a size whose best LR is on the grid's edge is
    a problem (the second list), not a choice."""
    chosen, problems = {}, []
    for size, curve in sorted(losses.items()):
        grid = sorted(curve)
        best = min(grid, key=curve.__getitem__)
        if best in (grid[0], grid[-1]) or len(grid) < 3:
            problems.append(f"{size}: best LR {best:g} is on the edge of the grid {[f'{x:g}' for x in grid]}")
        else:
            chosen[size] = best
    return chosen, problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="the bracket sweep folder(s)")
    ap.add_argument("--out", type=Path, default=LRS_FILE, help="where the choice is written")
    args = ap.parse_args(argv)
    losses = bracket_losses(args.paths)
    if not losses:
        print(f"no completed bracket runs under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    chosen, problems = choose(losses)
    for size, curve in sorted(losses.items()):
        print(f"{size}: " + ", ".join(f"lr {lr:g} -> {loss:.4f}" for lr, loss in sorted(curve.items())))
    if problems:
        print("widen the grid by one step on that side and rerun the bracket: " + "; ".join(problems), file=sys.stderr)
        return 1
    record: dict[str, Any] = {
        "rule": "per size, the LR of the lowest final val loss of the bracket (plain, seed 10), strictly inside",
        "lr": chosen,
        "bracket_final_val_loss": {
            size: {f"{lr:g}": round(x, 4) for lr, x in sorted(curve.items())} for size, curve in losses.items()
        },
        "bracket": [str(p) for p in args.paths],
    }
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    for size, lr in sorted(chosen.items()):
        print(
            f"OMP_NUM_THREADS=1 proxy-train -m +experiment=spike_frequency/own_lr_lab model={size} "
            f"'sweep.lrs=[{lr:g}]' hydra/launcher=local"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
