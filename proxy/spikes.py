"""The one spike definition: the detector every part of proxy asks "is this value a spike?".

The remedies (skip-step, rollback: proxy/train/remedies.py) and spike capture
(proxy/train/capture.py) test each step's loss and grad norm with :class:`SpikeDetector`; the
loss-spike count of a run (:func:`loss_spikes`, in its summary and in the report) scores the loss
on a fixed held-out batch with the same detector, and tells a spike (the loss rises past the bar
and comes back within ``recovery`` steps) from a collapse (it does not come back). Pure Python:
the report reads it without torch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from proxy.config import DetectorConfig, SpikeBaseline

Number = Union[float, int, Any]  # a Python number, or a 0-dim tensor (float() reads it)


@dataclass
class Spike:
    trigger: str  # "loss" | "grad_norm"
    value: float
    threshold: float  # mean + sigma * std of the window; nan when too little history


class SpikeDetector:
    """One-sided rolling spike test on the loss and on the grad norm.

    Each series keeps its last ``window`` *accepted* values; once ``min_history`` are in, a value
    is a spike when it exceeds the bar of its ``baseline``:

    - ``trend`` (default): fit a straight line to the logs of the last ``TREND_WINDOW`` values,
      predict the next, and scale its residuals robustly (1.4826 x MAD, at least ``MIN_SCALE``):
      the bar is ``exp(prediction + sigma * scale)``. A loss or grad norm still falling steeply
      early in a run is its own baseline, so a 3x jump at step 40 is seen, where a window mean
      still holding the descent sits far above it.
    - ``mean``: ``mean + sigma * std`` (population std) of the window: OLMo-core's
      SkipStepOptimizer (6 sigma over 128 steps), kept exactly as published.

    A non-finite value is always a spike, history or not: it is the largest spike there is.
    Spikes are not added to the history, so one bad step cannot raise the bar for the next.
    """

    SERIES = ("loss", "grad_norm")
    TREND_WINDOW = 32  # the local trend: recent enough to follow the early descent
    MIN_SCALE = 0.01  # log units: a perfectly smooth series still needs a ~6% jump at 6 sigma

    def __init__(
        self,
        sigma: float = 6.0,
        window: int = 128,
        min_history: int = 20,
        baseline: SpikeBaseline | str = SpikeBaseline.trend,
    ):
        if sigma <= 0 or window < 2 or not 2 <= min_history <= window:
            raise ValueError(
                f"SpikeDetector: need sigma > 0 and 2 <= min_history <= window, got sigma={sigma}, "
                f"window={window}, min_history={min_history}"
            )
        self.sigma, self.window, self.min_history = sigma, window, min_history
        self.baseline = SpikeBaseline(baseline)
        self.history: dict[str, deque[float]] = {name: deque(maxlen=window) for name in self.SERIES}

    @classmethod
    def of(cls, cfg: DetectorConfig) -> SpikeDetector:
        """The detector a config's ``remedy.detector`` / ``capture.detector`` describes."""
        return cls(cfg.sigma, cfg.window, cfg.min_history, cfg.baseline)

    @property
    def armed(self) -> bool:
        """Whether both series hold enough history for a finite bar."""
        return all(len(v) >= self.min_history for v in self.history.values())

    def threshold(self, series: str) -> float:
        values = self.history[series]
        if len(values) < self.min_history:
            return math.nan
        if self.baseline == SpikeBaseline.mean or any(v <= 0 for v in values):
            mean = math.fsum(values) / len(values)
            var = math.fsum((v - mean) ** 2 for v in values) / len(values)
            return mean + self.sigma * math.sqrt(var)
        return self._trend_bar(list(values)[-self.TREND_WINDOW :])

    def _trend_bar(self, recent: list[float]) -> float:
        logs = [math.log(v) for v in recent]
        n = len(logs)
        xs = range(n)
        x_mean, y_mean = (n - 1) / 2, math.fsum(logs) / n
        sxx = math.fsum((x - x_mean) ** 2 for x in xs)
        slope = math.fsum((x - x_mean) * (y - y_mean) for x, y in zip(xs, logs)) / sxx
        fitted = [y_mean + slope * (x - x_mean) for x in xs]
        residuals = sorted(abs(y - f) for y, f in zip(logs, fitted))
        mad = residuals[n // 2] if n % 2 else 0.5 * (residuals[n // 2 - 1] + residuals[n // 2])
        scale = max(1.4826 * mad, self.MIN_SCALE)
        prediction = y_mean + slope * (n - x_mean)
        return math.exp(prediction + self.sigma * scale)

    def test(self, loss: Optional[Number], grad_norm: Optional[Number]) -> Optional[Spike]:
        """The first series (loss, then grad norm) that spikes, or None. Changes nothing."""
        for series, raw in zip(self.SERIES, (loss, grad_norm)):
            if raw is None:
                continue
            value = float(raw)
            bar = self.threshold(series)
            if not math.isfinite(value) or value > bar:  # nan bar (no history): only non-finite
                return Spike(series, value, bar)
        return None

    def accept(self, loss: Optional[Number], grad_norm: Optional[Number]) -> None:
        for series, raw in zip(self.SERIES, (loss, grad_norm)):
            if raw is not None:
                self.history[series].append(float(raw))

    def state_dict(self) -> dict[str, Any]:
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.SERIES:
            self.history[name] = deque(state.get(name, []), maxlen=self.window)


# --------------------------------------------------------------------------------------------
# Loss spikes: rise and recovery, told apart from a collapse
# --------------------------------------------------------------------------------------------
LOSS_SPIKE_DETECTOR = DetectorConfig()  # the remedies' default detector: 6 sigma on the trend/MAD baseline
LOSS_SPIKE_RECOVERY = 100  # steps (of the series) within which a spike comes back under its bar


@dataclass(frozen=True)
class LossSpike:
    """An excursion of a loss series past its bar: ``kind`` "spike" (it came back under the bar
    within the recovery window) or "collapse" (it did not)."""

    kind: str
    step: int  # where it crossed the bar
    peak_step: int
    peak: float
    bar: float  # the bar at the crossing
    back_step: Optional[int]  # where it came back (a spike), None (a collapse)


def loss_spikes(
    steps: Sequence[int],
    values: Sequence[float],
    detector: DetectorConfig = LOSS_SPIKE_DETECTOR,
    recovery: int = LOSS_SPIKE_RECOVERY,
) -> list[LossSpike]:
    """The excursions of a loss series (a fixed held-out batch's loss, logged every step) past
    :class:`SpikeDetector`'s trend bar. An excursion that falls back under the bar it crossed
    within ``recovery`` points is a spike; one that does not, a collapse (after which the
    detector starts over from the new level). Values during an excursion never enter the history."""
    online = SpikeDetector.of(detector)
    found: list[LossSpike] = []
    i, n = 0, len(values)
    while i < n:
        value = float(values[i])
        hit = online.test(value, None)
        if hit is None or not math.isfinite(hit.threshold):
            if math.isfinite(value):
                online.accept(value, None)
            i += 1
            continue
        bar, start = hit.threshold, i
        end = min(n, i + 1 + recovery)
        back = next((j for j in range(i + 1, end) if math.isfinite(values[j]) and values[j] <= bar), None)
        stretch = range(start, back if back is not None else end)
        finite = [j for j in stretch if math.isfinite(values[j])]
        peak_at = max(finite, key=lambda j: values[j]) if finite else start
        found.append(
            LossSpike(
                "spike" if back is not None else "collapse",
                int(steps[start]),
                int(steps[peak_at]),
                float(values[peak_at]),
                bar,
                int(steps[back]) if back is not None else None,
            )
        )
        if back is None:  # a new level: judge what follows against itself
            online = SpikeDetector.of(detector)
            i = end
        else:
            i = back
    return found


__all__ = ["LOSS_SPIKE_DETECTOR", "LOSS_SPIKE_RECOVERY", "LossSpike", "Number", "Spike", "SpikeDetector", "loss_spikes"]
