"""The device spike detector decides as the one spike definition (proxy/spikes.py) does."""

from __future__ import annotations

import math
import random

import pytest
import torch

from proxy.config import DetectorConfig
from proxy.spikes import SpikeDetector
from proxy.train.device_detector import DeviceSpikeDetector


def _series(seed: int, steps: int) -> list[tuple[float, float]]:
    """A falling loss and a noisy norm with planted spikes, a level shift, zeros and non-finite values."""
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        loss = 6.0 * math.exp(-t / 150) + 2.0 + rng.gauss(0, 0.01)
        norm = math.exp(rng.gauss(0, 0.3)) * (1 + t / 100)
        if rng.random() < 0.05:
            loss *= rng.choice([1.05, 1.5, 3.0])
        if rng.random() < 0.05:
            norm *= rng.choice([2.0, 10.0, 100.0])
        if t == steps // 2:
            loss = rng.choice([math.nan, math.inf])
        if steps // 3 <= t < steps // 3 + 5:
            norm = 0.0 if seed % 2 else norm  # a value <= 0: the mean baseline's fallback
        if t > 3 * steps // 4:
            loss += 1.0  # a level shift the trend has to follow
        out.append((float(torch.tensor(loss, dtype=torch.float32)), float(torch.tensor(norm, dtype=torch.float32))))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        DetectorConfig(),
        DetectorConfig(baseline="mean"),
        DetectorConfig(sigma=0.5, window=5, min_history=3),
        DetectorConfig(sigma=3.0, window=40, min_history=7),
        DetectorConfig(sigma=2.0, window=16, min_history=4, baseline="mean"),
    ],
    ids=["trend", "mean", "hair-trigger", "window-40", "mean-16"],
)
def test_device_detector_decides_as_the_spike_definition_step_for_step(cfg):
    lanes = [_series(seed, 400) for seed in range(4)]
    hosts = [SpikeDetector.of(cfg) for _ in lanes]
    device = DeviceSpikeDetector(cfg, len(lanes), torch.device("cpu"))
    spikes = 0
    for t in range(400):
        live = torch.tensor([t % 7 != k for k in range(len(lanes))])  # a lane sits a step out now and then
        judged = device.observe(
            torch.tensor([lane[t][0] for lane in lanes]), torch.tensor([lane[t][1] for lane in lanes]), live
        )
        for k, (host, lane) in enumerate(zip(hosts, lanes)):
            if not live[k]:
                assert not judged.spike[k]
                continue
            spike = host.test(*lane[t])
            assert bool(judged.spike[k]) == (spike is not None), (t, k, spike)
            if spike is None:
                host.accept(*lane[t])
                continue
            spikes += 1
            assert SpikeDetector.SERIES[int(judged.trigger[k])] == spike.trigger
            assert float(judged.value[k]) == spike.value or math.isnan(spike.value)
            bar = float(judged.bar[k])
            assert (math.isnan(bar) and math.isnan(spike.threshold)) or bar == pytest.approx(spike.threshold, rel=1e-9)
        for k, host in enumerate(hosts):  # the history itself, in the checkpoint format
            if t % 97 == 0:
                assert device.state_dict(k) == host.state_dict()
    assert spikes > 20  # the series do spike: the comparison is not between two silent detectors


def test_device_detector_state_round_trips_through_the_spike_definitions_format():
    cfg = DetectorConfig(sigma=3.0, window=8, min_history=3)
    host = SpikeDetector.of(cfg)
    for loss, norm in _series(1, 30):
        if host.test(loss, norm) is None:
            host.accept(loss, norm)
    device = DeviceSpikeDetector(cfg, 2, torch.device("cpu"))
    device.load_state_dict(1, host.state_dict())
    assert device.state_dict(1) == host.state_dict()
    assert device.state_dict(0) == {"loss": [], "grad_norm": []}
    for loss, norm in _series(2, 30):
        judged = device.observe(torch.tensor([1.0, loss]), torch.tensor([1.0, norm]))
        spike = host.test(loss, norm)
        assert bool(judged.spike[1]) == (spike is not None)
        if spike is None:
            host.accept(loss, norm)
    assert device.state_dict(1) == host.state_dict()


def test_device_detector_refuses_what_the_spike_definition_refuses():
    with pytest.raises(ValueError, match="min_history"):
        DeviceSpikeDetector(DetectorConfig(window=4, min_history=8), 1, torch.device("cpu"))
