"""Predict the next model size's instability from the smaller ones (Wortsman et al. 2023, Sec. 3.1.3
and 3.4: instabilities of large models can be predicted from the scaling of small-model quantities).

Reads a size ladder's ``runs.csv`` (default: the committed protocol-2 sweep of
experiments/lr_sensitivity_scaling, widths 32/64/128 at 2 layers, two recipes, 6 LRs x 3 seeds,
300 steps) and, before the next size is run, writes what it will measure:

- **peak max attention logit** per (recipe, LR): log10 of the median over seeds, fitted as a
  straight line in ln N (N = non-embedding parameters) and evaluated at the next size. Wortsman et
  al. saw runs whose max logit passed ~1e4 diverge: the prediction also says whether the next size
  crosses 1e4 at each LR.
- **LR sensitivity** per recipe: per seed (proxy.analysis.seed_curves), a straight line in ln N,
  evaluated at the next size; the prediction is the mean over seeds, its spread the sd.

``python experiments/extrapolation/predict.py [--ladder runs.csv] [--d-model 256]`` writes
predictions.json and predictions.md beside this file (or --out). The verdict (verdict.py) compares
them with the next size's runs (conf/experiment/extrapolation/lab.yaml).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from proxy.analysis import CurvePoint, override_value, seed_curves
from proxy.config import DataConfig, to_config
from proxy.data import build_source
from proxy.model import build_model
from proxy.records import atomic_write_text, write_json
from proxy.report.document import markdown_table

HERE = Path(__file__).resolve().parent
LADDER = HERE.parent / "lr_sensitivity_scaling" / "results" / "protocol2" / "runs.csv"
RECIPES = ("none", "qknorm_zloss")
LOGIT_LIMIT = 1e4  # Wortsman et al.: runs whose max attention logit passed ~1e4 diverged


def _recipe(overrides: str) -> Optional[str]:
    return override_value([o.strip() for o in overrides.split(",")], "stability")


def read_ladder(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            recipe = _recipe(row["overrides"])
            if recipe in RECIPES and row["status"] in ("completed", "diverged"):
                rows.append({**row, "recipe": recipe})
    return rows


def ladder_curves(rows: list[dict], recipe: str) -> dict:
    """size (non-embedding parameters) -> seed -> LR curve (proxy.analysis.SeedCurve) of ``recipe``,
    from a runs.csv's rows (:func:`read_ladder`)."""
    points = [
        CurvePoint(
            group=int(r["n_params_non_embedding"]),
            seed=int(r["seed"]),
            lr=float(r["lr"]),
            loss=float(r["final_val_loss"]) if r["final_val_loss"] else None,
            loss_at_init=float(r["loss_at_init"]),
            diverged=r["status"] == "diverged",
        )
        for r in rows
        if r["recipe"] == recipe
    ]
    return seed_curves(points)


def line_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Least-squares line through (xs, ys), evaluated at x."""
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope * x + intercept)


def params_non_embedding(d_model: int, template: dict) -> int:
    """Non-embedding parameters of the ladder's model at width ``d_model`` (built, not guessed)."""
    vocab = build_source(DataConfig()).vocab_size
    cfg = to_config({"model": {**template, "d_model": d_model}}).model
    return build_model(cfg, vocab).n_params(non_embedding=True)


def predict(rows: list[dict], n_next: dict[str, int]) -> dict:
    """``n_next``: recipe -> non-embedding parameters of the next size (QK-norm adds a few)."""
    sizes_of = {rc: sorted({int(r["n_params_non_embedding"]) for r in rows if r["recipe"] == rc}) for rc in RECIPES}
    out: dict = {
        "ladder_params_non_embedding": sizes_of,
        "next_params_non_embedding": n_next,
        "logit": {},
        "sensitivity": {},
    }
    # peak max attention logit: median over seeds per (recipe, LR, size), log10 linear in ln N
    peaks: dict[tuple[str, float, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["max_attn_logit_peak"]:
            peaks[(r["recipe"], float(r["lr"]), int(r["n_params_non_embedding"]))].append(
                float(r["max_attn_logit_peak"])
            )
    for recipe in RECIPES:
        sizes, x_next = sizes_of[recipe], math.log(n_next[recipe])
        for lr in sorted({lr for (rc, lr, _) in peaks if rc == recipe}):
            pts = [(n, statistics.median(peaks[(recipe, lr, n)])) for n in sizes if (recipe, lr, n) in peaks]
            if len(pts) < 2:
                continue
            log10 = line_at([math.log(n) for n, _ in pts], [math.log10(p) for _, p in pts], x_next)
            out["logit"][f"{recipe}/lr={lr:g}"] = {
                "ladder": [p for _, p in pts],
                "predicted": 10**log10,
                "predicted_log10": log10,
                "crosses_1e4": 10**log10 > LOGIT_LIMIT,
            }
    # LR sensitivity per seed, linear in ln N
    for recipe in RECIPES:
        sizes, x_next = sizes_of[recipe], math.log(n_next[recipe])
        curves = ladder_curves(rows, recipe)
        seeds = sorted(set.intersection(*(set(curves[n]) for n in sizes)))
        per_seed = {
            s: line_at([math.log(n) for n in sizes], [curves[n][s].sensitivity for n in sizes], x_next) for s in seeds
        }
        values = list(per_seed.values())
        out["sensitivity"][recipe] = {
            "ladder": {str(n): statistics.fmean(curves[n][s].sensitivity for s in seeds) for n in sizes},
            "per_seed": {str(s): v for s, v in per_seed.items()},
            "predicted": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
        }
    return out


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(HERE.parents[1]))
    except ValueError:
        return str(path)


def write(pred: dict, out: Path, ladder: Path, d_model: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pred = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ladder": _shown(ladder),
        "next_d_model": d_model,
        **pred,
    }
    write_json(out / "predictions.json", pred)
    logit_rows = [
        [k, ", ".join(f"{p:.3g}" for p in v["ladder"]), f"{v['predicted']:.3g}", v["crosses_1e4"]]
        for k, v in pred["logit"].items()
    ]
    sens_rows = [
        [k, ", ".join(f"{x:.3f}" for x in v["ladder"].values()), f"{v['predicted']:.3f} ± {v['sd']:.3f}"]
        for k, v in pred["sensitivity"].items()
    ]
    lines = [
        f"# Predictions for d_model={d_model} ({pred['next_params_non_embedding']['none']:,} non-embedding "
        f"parameters), written {pred['written']} before its runs",
        "",
        f"Ladder: `{_shown(ladder)}` (non-embedding parameters {pred['ladder_params_non_embedding']}).",
        "",
        "## Peak max attention logit (median over seeds; log10 linear in ln N)",
        "",
        *markdown_table(["recipe / LR", "ladder", "predicted", "crosses 1e4"], logit_rows),
        "## LR sensitivity (per seed, linear in ln N; mean ± sd over seeds)",
        "",
        *markdown_table(["recipe", "ladder", "predicted"], sens_rows),
    ]
    atomic_write_text(out / "predictions.md", "\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ladder", type=Path, default=LADDER, help="runs.csv of the size ladder")
    parser.add_argument("--d-model", type=int, default=256, help="the width to predict")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if not args.ladder.is_file():
        print(f"error: no ladder at {args.ladder}", file=sys.stderr)
        return 2
    rows = read_ladder(args.ladder)
    template = {"d_model": 64, "n_layers": 2, "n_heads": 4}  # the tiny model the ladder widens
    n_next = {
        "none": params_non_embedding(args.d_model, {**template, "qk_norm": "off"}),
        "qknorm_zloss": params_non_embedding(args.d_model, {**template, "qk_norm": "layernorm"}),
    }
    write(predict(rows, n_next), args.out, args.ladder, args.d_model)
    print(f"predictions -> {args.out / 'predictions.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
