"""The numbers a report is made of: spike scores, LR sensitivity, run variants and run names.

Pure functions over plain values (lists, numpy arrays, strings): no files, no plotting, so the
experiments' verdict steps and the tests can call them on anything.

Spike score (OLMo 2, arXiv 2501.00656): the percentage of points of a series that lie at least
``sigma`` standard deviations from the mean of the previous ``window`` values (7 sigma, 1000
values, both directions). OLMo-core's monitor uses 6 sigma over 128 values, upward only; both are
:class:`SpikeOptions` presets. Conventions this module fixes, because the definition leaves them
open and proxy runs are short:

- The history of a point is the previous ``window`` *finite* values, never the point itself.
- A point with fewer than ``min_history`` finite predecessors is not scored: it counts neither as
  a spike nor in the denominator. Requiring a full window would leave a 300-step proxy run with
  nothing to score; two predecessors would flag ordinary noise, because a standard deviation from
  two values is mostly luck. Ten is the default compromise.
- The standard deviation is the sample one (ddof=1). A point that differs from a history of
  identical values is a spike (infinitely many standard deviations away); one equal to it is not.
- A NaN or infinite value is always a scored spike, whatever its history: it is the largest
  excursion a series can make. It is left out of later points' histories.

LR sensitivity (Wortsman et al. 2023, arXiv 2309.14322): the mean over the swept learning rates
of ``min(loss(lr), loss_at_init) - best_loss``, where a diverged or failed run counts as the loss
at initialization and ``best_loss`` is the best loss over the range. 0 means every LR in the range
trains as well as the best one; ``loss_at_init - best_loss`` is the worst possible value.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional, Sequence, TypeGuard

import numpy as np

# Overrides that say where or how to run, not what is run (paths, resuming, progress bars,
# logging): left out of run names, run directory names and variants. Prefixes: "wandb." covers
# every wandb key. The one list; conf/config.yaml names run directories through run_dirname.
NON_VARIANT_KEYS = (
    "out_dir",
    "run_name",
    "train.resume",
    "train.progress",
    "wandb.",
    "tensorboard.",
    "hydra.",
    "hydra/",
)
# Overrides that make the points of one LR-sensitivity curve rather than a different recipe.
SWEEP_AXES = ("optim.lr", "train.seed")
# File systems cap one path component at 255 bytes, which a long override list passes: longer
# names keep their head and end in a hash of the whole, so they stay unique.
MAX_DIRNAME_BYTES = 200


# --------------------------------------------------------------------------------------------
# Spike score
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpikeOptions:
    """How a spike is detected. The defaults are OLMo 2's definition."""

    sigma: float = 7.0
    window: int = 1000
    one_sided: bool = False  # True: only excursions above the rolling mean count
    min_history: int = 10  # points with fewer finite predecessors are not scored

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"spike sigma={self.sigma} must be > 0")
        if self.window < 2:
            raise ValueError(f"spike window={self.window} must be >= 2")
        if not 2 <= self.min_history:
            raise ValueError(f"spike min_history={self.min_history} must be >= 2")

    def describe(self) -> str:
        side = "above" if self.one_sided else "from"
        return (
            f">= {self.sigma:g} sigma {side} the mean of the previous {self.window} values "
            f"(points with < {min(self.min_history, self.window)} predecessors not scored)"
        )


OLMO2_SPIKES = SpikeOptions()
OLMO_CORE_SPIKES = SpikeOptions(sigma=6.0, window=128, one_sided=True)


@dataclass(frozen=True)
class Spikes:
    """Per-point outcome of spike detection over one series."""

    is_spike: np.ndarray  # bool, one per input point
    scored: np.ndarray  # bool, one per input point: had enough history (or was non-finite)

    @property
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.is_spike)

    @property
    def score(self) -> Optional[float]:
        """Percentage of scored points that are spikes; None when nothing could be scored."""
        n = int(self.scored.sum())
        return 100.0 * int(self.is_spike.sum()) / n if n else None


def detect_spikes(values: Sequence[float] | np.ndarray, options: SpikeOptions = OLMO2_SPIKES) -> Spikes:
    """Mark every point that sits ``options.sigma`` standard deviations off its rolling history."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(x)
    is_spike = ~finite
    scored = ~finite

    # Work on the finite values only, so a NaN never enters a later point's history. Row j of
    # `windows` holds the `window` finite values before finite value j, NaN-padded at the start.
    clean = x[finite]
    n, window = clean.size, options.window
    min_history = min(options.min_history, window)
    if n > min_history:
        padded = np.concatenate([np.full(window, np.nan), clean])
        windows = np.lib.stride_tricks.sliding_window_view(padded[:-1], window)  # (n, window)
        count = np.minimum(np.arange(n), window)
        ok = count >= min_history
        spike_finite = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(ok)
        for start in range(0, rows.size, 4096):  # chunks bound the temporary (chunk x window)
            idx = rows[start : start + 4096]
            block = windows[idx]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(block, axis=1)
                std = np.nanstd(block, axis=1, ddof=1)
            deviation = clean[idx] - mean
            if not options.one_sided:
                deviation = np.abs(deviation)
            spike_finite[idx] = (deviation > 0) & (deviation >= options.sigma * std)
        positions = np.flatnonzero(finite)
        is_spike[positions] = spike_finite
        scored[positions] = ok
    return Spikes(is_spike=is_spike, scored=scored)


def spike_score(values: Sequence[float] | np.ndarray, options: SpikeOptions = OLMO2_SPIKES) -> Optional[float]:
    """OLMo 2's spike score of one series, in percent (None when no point could be scored)."""
    return detect_spikes(values, options).score


# --------------------------------------------------------------------------------------------
# LR sensitivity
# --------------------------------------------------------------------------------------------
def _is_number(value: object) -> TypeGuard[float]:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _per_run(value: float | Sequence[float], n: int, what: str) -> list[float]:
    values = [value] * n if not isinstance(value, (list, tuple, np.ndarray)) else list(value)
    if len(values) != n:
        raise ValueError(f"{n} runs but {len(values)} values of {what}")
    numbers: list[float] = []
    for v in values:
        if not _is_number(v):
            raise ValueError(f"{what} must be a finite number, got {v!r}")
        numbers.append(float(v))
    return numbers


def clipped_losses(
    losses: Sequence[Optional[float]],
    loss_at_init: float | Sequence[float],
    diverged: Optional[Sequence[bool]] = None,
) -> list[float]:
    """``min(loss, loss_at_init)`` per run; a diverged run or a missing/non-finite loss counts
    as the loss at initialization (Wortsman et al.)."""
    inits = _per_run(loss_at_init, len(losses), "loss at init")
    flags = [False] * len(losses) if diverged is None else list(diverged)
    if len(flags) != len(losses):
        raise ValueError(f"{len(losses)} losses but {len(flags)} diverged flags")
    return [
        init if bad or not _is_number(loss) else min(float(loss), init) for loss, init, bad in zip(losses, inits, flags)
    ]


def per_lr_losses(
    lrs: Sequence[float],
    losses: Sequence[Optional[float]],
    loss_at_init: float | Sequence[float],
    diverged: Optional[Sequence[bool]] = None,
) -> dict[float, float]:
    """Clipped loss per distinct LR, averaged over repeats (seeds), sorted by LR."""
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} learning rates but {len(losses)} losses")
    clipped = clipped_losses(losses, loss_at_init, diverged)
    by_lr: dict[float, list[float]] = {}
    for lr, loss in zip(lrs, clipped):
        if not (_is_number(lr) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {lr!r}")
        by_lr.setdefault(float(lr), []).append(loss)
    return {lr: float(np.mean(by_lr[lr])) for lr in sorted(by_lr)}


def lr_sensitivity(
    lrs: Sequence[float],
    losses: Sequence[Optional[float]],
    loss_at_init: float | Sequence[float],
    diverged: Optional[Sequence[bool]] = None,
    lr_range: Optional[tuple[float, float]] = None,
) -> float:
    """Wortsman et al.'s LR sensitivity of one variant: mean over LRs of min(l, l0) - l*.

    ``lrs``/``losses``/``diverged`` hold one entry per run (repeats at one LR are averaged first,
    so every LR weighs the same); ``loss_at_init`` is one value or one per run. ``lr_range``
    (inclusive) restricts the LRs, for when the optimum has moved and the range is shifted.
    Returns NaN when no run in the range trained below its loss at init: "every LR diverged" is
    not "insensitive", which the bare formula (0) would claim.
    """
    n = len(lrs)
    if not n:
        raise ValueError("lr_sensitivity needs at least one run")
    if len(losses) != n:
        raise ValueError(f"{n} learning rates but {len(losses)} losses")
    inits = _per_run(loss_at_init, n, "loss at init")
    flags = [False] * n if diverged is None else list(diverged)
    keep = [i for i in range(n) if lr_range is None or lr_range[0] <= lrs[i] <= lr_range[1]]
    if not keep:
        low, high = lr_range  # type: ignore[misc]
        raise ValueError(f"no learning rate inside the range [{low:g}, {high:g}]")
    lrs, inits = [lrs[i] for i in keep], [inits[i] for i in keep]
    clipped = clipped_losses([losses[i] for i in keep], inits, [flags[i] for i in keep])
    if all(c >= init for c, init in zip(clipped, inits)):
        return math.nan
    curve = per_lr_losses(lrs, clipped, inits)
    best = min(curve.values())
    return float(np.mean([loss - best for loss in curve.values()]))


# --------------------------------------------------------------------------------------------
# Effects across seeds, and grids that bracket their optimum (experiments/README.md's rules)
# --------------------------------------------------------------------------------------------
MIN_SEEDS = 3  # the fewest seeds an effect is judged on (Spread.clears)


@dataclass(frozen=True)
class Spread:
    """An effect measured once per seed: its mean, sample std and standard error."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    def clears(self, direction: int = 1, z: float = 2.0) -> bool:
        """The effect holds: every seed's value has the claimed sign (``direction`` +1 or -1)
        and the mean is more than ``z`` standard errors from 0. Needs at least 3 seeds."""
        if self.n < MIN_SEEDS or not all(math.isfinite(v) for v in self.values):
            return False
        signed = [direction * v for v in self.values]
        return all(v > 0 for v in signed) and direction * self.mean > z * self.sem

    def interval(self) -> tuple[float, float]:
        """The two-sided 95% Student-t interval of the mean (nan with fewer than 2 seeds)."""
        if self.n < 2:
            return math.nan, math.nan
        half = t_quantile_975(self.n - 1) * self.sem
        return self.mean - half, self.mean + half

    def describe(self, fmt: str = ".3g") -> str:
        if not self.values:
            return "no seeds"
        if self.n < 2:
            return f"{self.mean:{fmt}} (1 seed)"
        low, high = self.interval()
        return (
            f"{self.mean:{fmt}} ± {self.std:{fmt}} (sd over {self.n} seeds; 95% t interval [{low:{fmt}}, {high:{fmt}}])"
        )


# the 0.975 quantile of Student's t by degrees of freedom (two-sided 95%); 1.96 past 30
_T_975: tuple[float, ...] = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131),
    *(2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def t_quantile_975(df: int) -> float:
    return _T_975[df - 1] if 1 <= df <= len(_T_975) else 1.96


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at z = 1.96) of a proportion; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def spread(values: Iterable[float]) -> Spread:
    return Spread(tuple(float(v) for v in values))


def best_is_inside(curve: dict[float, float]) -> bool:
    """Whether an LR curve's best LR lies strictly inside its grid (not at either end): only then
    does the grid bracket the optimum, and an LR sensitivity of the curve mean what it says."""
    if len(curve) < 3:
        return False
    lrs = sorted(curve)
    best = min(lrs, key=lambda lr: curve[lr])
    return lrs[0] < best < lrs[-1]


@dataclass(frozen=True)
class CurvePoint:
    """One run on an LR curve: which curve (``group``), which seed, its LR and its result."""

    group: Hashable
    seed: int
    lr: float
    loss: Optional[float]  # final loss; None or NaN when the run failed
    loss_at_init: float
    diverged: bool = False


@dataclass(frozen=True)
class SeedCurve:
    """One seed's LR curve of one group: clipped loss per LR and its LR sensitivity."""

    curve: dict[float, float]
    sensitivity: float

    @property
    def bracketed(self) -> bool:
        return best_is_inside(self.curve)

    @property
    def best_lr(self) -> float:
        return min(self.curve, key=lambda lr: self.curve[lr])


def seed_curves(points: Iterable[CurvePoint]) -> dict[Hashable, dict[int, SeedCurve]]:
    """group -> seed -> that seed's LR curve and sensitivity: an effect on LR sensitivity is
    then measured once per seed (paired across groups by seed) and its spread is known."""
    by_key: dict[tuple[Hashable, int], list[CurvePoint]] = {}
    for p in points:
        by_key.setdefault((p.group, p.seed), []).append(p)
    result: dict[Hashable, dict[int, SeedCurve]] = {}
    for (group, seed), mine in by_key.items():
        args = (
            [p.lr for p in mine],
            [p.loss for p in mine],
            [p.loss_at_init for p in mine],
            [p.diverged for p in mine],
        )
        result.setdefault(group, {})[seed] = SeedCurve(per_lr_losses(*args), lr_sensitivity(*args))
    return {g: dict(sorted(seeds.items())) for g, seeds in result.items()}


# --------------------------------------------------------------------------------------------
# Variants: which runs belong on one LR curve
# --------------------------------------------------------------------------------------------
def parse_override(override: str) -> tuple[str, str]:
    """Hydra override string -> (key, value); '+', '++' and '~' prefixes are dropped."""
    text = override.strip()
    key, sep, value = text.partition("=")
    if not sep:  # '~key' deletes a key: keep the whole text as its own key
        return text, ""
    return key.lstrip("+~").strip(), value.strip()


def override_value(overrides: Iterable[str], key: str) -> Optional[str]:
    """The value given to ``key`` on the command line, or None."""
    found = None
    for item in overrides:
        k, v = parse_override(item)
        if k == key:
            found = v
    return found


def variant_of(overrides: Iterable[str], exclude: Sequence[str] = SWEEP_AXES) -> tuple[str, ...]:
    """A run's variant: its overrides without the swept LR, the seed and bookkeeping keys.

    Runs with the same variant are points of one LR-sensitivity curve. Sorted and normalised
    (``+key=v`` and ``key=v`` are the same), so the order on the command line does not matter.
    """
    kept = {}
    for item in overrides:
        key, value = parse_override(item)
        if key in exclude or key.startswith(NON_VARIANT_KEYS):
            continue
        kept[key] = value
    return tuple(k if k.startswith("~") else f"{k}={v}" for k, v in sorted(kept.items()))


def variant_labels(variants: Sequence[tuple[str, ...]]) -> tuple[dict[tuple[str, ...], str], tuple[str, ...]]:
    """Short labels: each variant minus the overrides every variant shares.

    Returns ``(labels, shared)``: ``labels[variant]`` is what tells it apart ("baseline" when it
    adds nothing to the shared overrides), ``shared`` is printed once in the report header.
    """
    distinct = list(dict.fromkeys(variants))
    if not distinct:
        return {}, ()
    shared = set(distinct[0]).intersection(*map(set, distinct[1:])) if len(distinct) > 1 else set()
    labels = {}
    for variant in distinct:
        rest = [item for item in variant if item not in shared]
        labels[variant] = ",".join(rest) if rest else ("baseline" if len(distinct) > 1 else "defaults")
    return labels, tuple(sorted(shared))


# --------------------------------------------------------------------------------------------
# Run names and run directory names
# --------------------------------------------------------------------------------------------
def is_variant_override(override: str) -> bool:
    """Whether a command-line override changes what is run (not a :data:`NON_VARIANT_KEYS` key)."""
    return not override.strip().lstrip("+~").startswith(NON_VARIANT_KEYS)


_OVERRIDE_START = re.compile(r",\s*(?=[+~]?[A-Za-z_][\w./-]*=)")  # a comma that starts another override


def split_overrides(text: str) -> list[str]:
    """The overrides of a ","-joined run name or variant label (``a.b=x,c.d=[1,2]``): split at the
    commas that start another override, so a list value keeps its commas; ", " is read too."""
    return [item for item in _OVERRIDE_START.split(text) if item] if text else []


def run_name_from(overrides: Iterable[str]) -> str:
    """A run's name: its variant overrides sorted and ","-joined ("default": none), spelled as
    typed. The same spelling and order as its folder (:func:`run_dirname`, after ``<job>_``) and
    as the report's label (which keeps only what varies across the runs shown)."""
    return ",".join(sorted(o for o in overrides if is_variant_override(o))) or "default"


def short_dirname(name: str, parts: Sequence[str] = ()) -> str:
    """``name`` if it fits :data:`MAX_DIRNAME_BYTES`, else its head and a hash of the whole.

    ``parts``, the overrides ``name`` joins with ",": the head then holds whole overrides only,
    as many as fit, since a cut one reads as a wrong value (``optim.lr=0.0001`` cut to
    ``optim.lr=0.00``). The run's summary keeps every override (``overrides``)."""
    raw = str(name).encode()
    if len(raw) <= MAX_DIRNAME_BYTES:
        return str(name)
    import hashlib

    digest = hashlib.sha1(raw).hexdigest()[:10]
    budget = MAX_DIRNAME_BYTES - len(digest) - 1
    whole = ""
    for part in parts:
        longer = f"{whole},{part}" if whole else str(part)
        if len(longer.encode()) > budget:
            break
        whole = longer
    return f"{whole or raw[:budget].decode(errors='ignore')}~{digest}"


def run_dirname(overrides: Iterable[str]) -> str:
    """A multirun job's directory name (after ``<job number>_``): its variant overrides sorted
    and ","-joined as Hydra's ``override_dirname`` would, cut by :func:`short_dirname`. A "/" in
    a value (``+experiment=spike_remedies/lab``, ``data.path=...``) becomes "-": one folder per job,
    not a tree (the run's summary keeps the overrides as typed)."""
    kept = sorted(str(o).replace("/", "-") for o in overrides if is_variant_override(str(o)))
    return short_dirname(",".join(kept), kept)


# --------------------------------------------------------------------------------------------
# Small helpers on series
# --------------------------------------------------------------------------------------------
def last_finite(values: Sequence[float]) -> Optional[float]:
    for value in reversed(values):
        if _is_number(value):
            return float(value)
    return None


def peak(values: Sequence[float]) -> Optional[float]:
    finite = [float(v) for v in values if _is_number(v)]
    return max(finite) if finite else None


def uniform_loss(vocab_size: Optional[int]) -> Optional[float]:
    """Cross-entropy of the uniform prediction, ln V: a model at init sits close to it."""
    return math.log(vocab_size) if vocab_size and vocab_size > 1 else None


__all__ = [
    "OLMO2_SPIKES",
    "OLMO_CORE_SPIKES",
    "MAX_DIRNAME_BYTES",
    "NON_VARIANT_KEYS",
    "SWEEP_AXES",
    "SpikeOptions",
    "MIN_SEEDS",
    "Spread",
    "best_is_inside",
    "spread",
    "Spikes",
    "clipped_losses",
    "detect_spikes",
    "last_finite",
    "lr_sensitivity",
    "override_value",
    "parse_override",
    "is_variant_override",
    "peak",
    "per_lr_losses",
    "run_dirname",
    "run_name_from",
    "split_overrides",
    "short_dirname",
    "spike_score",
    "uniform_loss",
    "variant_labels",
    "variant_of",
]
