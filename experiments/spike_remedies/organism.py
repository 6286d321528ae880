"""What the remedy studies run on the loss-spike organism share (experiments/loss_spikes: the tiny model
on a deterministic language, spiking in the low-noise phase): each arm's excursions, large ones, its
largest rise and final loss per seed, the numbers every such verdict reports, and the design checks
on the arm without a remedy. Used by clipping/protocol2 (ZClip) and skip_on_spikes (skip-step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from proxy.analysis import spread
from proxy.records import PROBE_LOSS, Run
from proxy.verdict import Verdict, load_module

SPIKES = Path(__file__).resolve().parents[1] / "loss_spikes"
P1 = load_module(SPIKES)  # the loss-spike study's definitions
P2 = load_module(SPIKES / "protocol2")  # the largest rise
LARGE = P1.LARGE
FINAL_STEPS = 200


def final_log_loss(run: Run) -> float:
    """Mean log10 probe loss over the last FINAL_STEPS logged steps (nan without a probe)."""
    values = [v for v in run.series(PROBE_LOSS)[1] if math.isfinite(v) and v > 0][-FINAL_STEPS:]
    return sum(math.log10(v) for v in values) / len(values) if values else math.nan


def events(run: Run, kind: str) -> int:
    """How many ``kind`` events (a remedy's: zclip, skip_step) the run recorded."""
    return sum(1 for e in run.events if e.get("event") == kind)


def collect(
    v: Verdict, runs: list[Run], arms: Sequence[str], seeds: Sequence[int], arm: Callable[[Run], Optional[str]]
) -> Optional["Arms"]:
    """The runs of ``arms`` x ``seeds`` measured and reported into ``v``; None (and a failed check
    naming what is short) where the sweep lacks an arm or a seed."""
    by_arm, missing = P1.runs_by_arm(runs, arms, seeds, arm=arm)
    if missing:
        v.check(f"the sweep has the arms {', '.join(arms)} with seeds {tuple(seeds)}", False, f"short: {missing}")
        return None
    measured = Arms.of(by_arm, seeds)
    measured.report(v, arms)
    return measured


@dataclass
class Arms:
    """Per arm, per seed (in ``seeds`` order): excursions, large ones, largest rise, final loss."""

    runs: dict[str, dict[int, Run]]
    seeds: Sequence[int]
    found: dict[str, dict[int, list[Any]]]
    large: dict[str, list[int]]
    rise: dict[str, list[float]]
    final: dict[str, list[float]]
    onsets: dict[str, dict[int, Any]]

    @classmethod
    def of(cls, by_arm: dict[str, dict[int, Run]], seeds: Sequence[int]) -> "Arms":
        found = {arm: {s: P1.excursions(r) for s, r in runs.items()} for arm, runs in by_arm.items()}
        return cls(
            by_arm,
            seeds,
            found,
            {arm: [sum(e.peak >= LARGE for e in found[arm][s]) for s in seeds] for arm in by_arm},
            {arm: [P2.largest_peak(by_arm[arm][s]) for s in seeds] for arm in by_arm},
            {arm: [final_log_loss(by_arm[arm][s]) for s in seeds] for arm in by_arm},
            {arm: {s: P1.onset(r) for s, r in runs.items()} for arm, runs in by_arm.items()},
        )

    def report(self, v: Verdict, arms: Sequence[str]) -> None:
        """The numbers every organism verdict reports, per arm."""
        for arm in arms:
            v.numbers[f"events/{arm}"] = {
                str(s): [f"{e.kind}@{e.step} peak {e.peak:.3g}" for e in self.found[arm][s]] for s in self.seeds
            }
            v.numbers[f"large_excursions/{arm}"] = self.large[arm]
            v.numbers[f"largest_rise/{arm}"] = [round(x, 4) for x in self.rise[arm]]
            v.numbers[f"final_log10_probe_loss/{arm}"] = spread(self.final[arm]).describe(".2f")

    def minus(self, arm: str, other: str) -> Any:
        """The paired difference of the final loss, ``arm`` minus ``other`` (a Spread)."""
        return spread(a - b for a, b in zip(self.final[arm], self.final[other]))

    def design(self, v: Verdict, control: str, what: str, without: str) -> bool:
        """The two design checks on the arm without a remedy (``control``); ``what`` names it,
        ``without`` says what it lacks ('without clipping')."""
        v.numbers["low_noise_onset"] = {arm: {str(s): o for s, o in x.items()} for arm, x in self.onsets.items()}
        v.design(
            f"the {what} arm reaches the low-noise phase (probe loss < {P1.LOW_NOISE} nats) by step {P1.ONSET_BY} "
            "in every seed",
            all(o is not None and o <= P1.ONSET_BY for o in self.onsets[control].values()),
            f"onset steps {list(self.onsets[control].values())}",
            "a run long enough to reach the low-noise phase",
        )
        v.design(
            f"the {what} arm has a large loss spike (peak >= {LARGE} nats) in >= 2 of 3 seeds",
            sum(n >= 1 for n in self.large[control]) >= 2,
            f"large excursions per seed {self.large[control]}",
            f"more seeds or longer runs, so that loss spikes occur {without}",
        )
        return v.testable
