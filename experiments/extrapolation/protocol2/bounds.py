"""Protocol 2's predictions and tolerance bounds, from committed runs only, written before its run.

Protocol 1 (experiments/extrapolation/verdict.py) judged its predictions for d_model=256 against
round-number bounds (a factor of 2 for the peak max attention logit, 0.05 nats for LR sensitivity)
that were tighter than the noise (issue 31 item 2). Protocol 2 keeps the claim and the ladder, and
sets every bound from measured seed spread:

- **prediction**: per seed of the committed ladder (widths 32/64/128, seeds 0-2), a straight line
  in ln N (N = non-embedding parameters) through that seed's log10 peak max logit at an LR, or its
  LR sensitivity, evaluated at d=256; the prediction is the mean over the ladder's seeds and its
  standard error ``se_pred`` their sd over sqrt(n);
- **measurement noise**: the seed sd of the same quantity at d=256 itself, from protocol 1's three
  committed d=256 seeds (0-2) -- the noise a 5-seed mean of fresh seeds carries is sd / sqrt(5);
- **bound**: 2 x sqrt(se_pred^2 + sd_256^2 / 5), for a 5-seed mean of fresh seeds (3-7).

``python experiments/extrapolation/protocol2/bounds.py`` writes bounds.json beside this file.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import predict as p1  # noqa: E402  (protocol 1's ladder reader, recipes and parameter count)

from proxy.records import write_json  # noqa: E402

D256_RUNS = HERE.parent / "results" / "runs.csv"  # protocol 1's measurement of d=256, seeds 0-2
FRESH_SEEDS = (3, 4, 5, 6, 7)
Z = 2.0


def _sensitivities(rows: list[dict], recipe: str) -> dict[int, dict[int, float]]:
    """size (non-embedding params) -> seed -> LR sensitivity, from a runs.csv's rows."""
    return {n: {s: c.sensitivity for s, c in seeds.items()} for n, seeds in p1.ladder_curves(rows, recipe).items()}


def _log10_peaks(rows: list[dict], recipe: str) -> dict[float, dict[int, dict[int, float]]]:
    """LR -> size -> seed -> log10 of the run's peak max attention logit."""
    out: dict[float, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["recipe"] == recipe and r["max_attn_logit_peak"]:
            out[float(r["lr"])][int(r["n_params_non_embedding"])][int(r["seed"])] = math.log10(
                float(r["max_attn_logit_peak"])
            )
    return out


def _predicted(per_size: dict[int, dict[int, float]], x_next: float) -> tuple[float, float, int]:
    """Mean over the seeds present at every size of each seed's line in ln N at ``x_next``; its
    standard error; the number of seeds."""
    sizes = sorted(per_size)
    seeds = sorted(set.intersection(*(set(per_size[n]) for n in sizes)))
    xs = [math.log(n) for n in sizes]
    values = [float(np.polyval(np.polyfit(xs, [per_size[n][s] for n in sizes], 1), x_next)) for s in seeds]
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se, len(values)


def _entry(predicted: float, se: float, n_ladder: int, at_256: list[float]) -> dict:
    sd = statistics.stdev(at_256) if len(at_256) > 1 else math.nan
    bound = Z * math.sqrt(se**2 + sd**2 / len(FRESH_SEEDS))
    return {
        "predicted": predicted,
        "se_pred": se,
        "ladder_seeds": n_ladder,
        "sd_at_256": sd,
        "seeds_at_256": len(at_256),
        "bound": bound,
    }


def bounds(ladder_rows: list[dict], d256_rows: list[dict], n_next: dict[str, int]) -> dict:
    out: dict = {"fresh_seeds": list(FRESH_SEEDS), "z": Z, "logit_log10": {}, "sensitivity": {}}
    for recipe in p1.RECIPES:
        x_next = math.log(n_next[recipe])
        ladder, at_256 = _log10_peaks(ladder_rows, recipe), _log10_peaks(d256_rows, recipe)
        for lr in sorted(ladder):
            if len(ladder[lr]) < 2:
                continue
            pred, se, n = _predicted(ladder[lr], x_next)
            measured = [v for per_seed in at_256.get(lr, {}).values() for v in per_seed.values()]
            out["logit_log10"][f"{recipe}/lr={lr:g}"] = _entry(pred, se, n, measured)
        pred, se, n = _predicted(_sensitivities(ladder_rows, recipe), x_next)
        measured = [v for per_seed in _sensitivities(d256_rows, recipe).values() for v in per_seed.values()]
        out["sensitivity"][recipe] = _entry(pred, se, n, measured)
    return out


def main() -> int:
    template = {"d_model": 64, "n_layers": 2, "n_heads": 4}
    n_next = {
        "none": p1.params_non_embedding(256, {**template, "qk_norm": "off"}),
        "qknorm_zloss": p1.params_non_embedding(256, {**template, "qk_norm": "layernorm"}),
    }
    result = bounds(p1.read_ladder(p1.LADDER), p1.read_ladder(D256_RUNS), n_next)
    result = {"ladder": p1._shown(p1.LADDER), "d256_noise_from": p1._shown(D256_RUNS), "next_d_model": 256, **result}
    write_json(HERE / "bounds.json", result)
    for kind in ("logit_log10", "sensitivity"):
        for key, e in result[kind].items():
            print(
                f"{kind} {key}: predicted {e['predicted']:.3f} (se {e['se_pred']:.3f}), "
                f"sd at 256 {e['sd_at_256']:.3f}, bound ±{e['bound']:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
