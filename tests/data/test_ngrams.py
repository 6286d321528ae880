"""Repeated n-gram detection, injection and filtering (proxy/data/ngrams.py)."""

import numpy as np
import pytest
import torch

from proxy.config import DataConfig, FilterMode, InjectionConfig, NgramFilterConfig, SpanSource
from proxy.data import IGNORE_INDEX, DataError, build_source, find_repeated_ngrams

SEQ_LEN = 128  # rows of 129 tokens: 32 repeats fit for periods 1..4


def plant(row: np.ndarray, start: int, span: np.ndarray, repeats: int) -> np.ndarray:
    out = row.copy()
    out[start : start + len(span) * repeats] = np.tile(span, repeats)
    return out


def full_rows(inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The seq_len + 1 token rows a batch was cut from."""
    return torch.cat([inputs, labels[:, -1:]], 1).numpy()


def contains(row: np.ndarray, span: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(row, len(span))
    return bool((windows == span).all(-1).any())


def background(length: int, seed: int) -> np.ndarray:
    """Tokens with no repeats at all: consecutive ids are never equal at any lag <= 13."""
    return (np.arange(length) * 7919 + seed) % 100_003


@pytest.mark.parametrize("period", range(1, 14))
def test_detector_marks_exactly_the_planted_run(period):
    span = np.arange(period) + 200_000  # distinct, and absent from the background
    row = plant(background(600, period), 50, span, 32)
    expected = np.zeros(600, dtype=bool)
    expected[50 : 50 + 32 * period] = True
    np.testing.assert_array_equal(find_repeated_ngrams(row), expected)


@pytest.mark.parametrize("period", [1, 2, 5, 13])
def test_threshold_is_a_count_of_full_copies(period):
    span = np.arange(period) + 200_000
    row31 = plant(background(600, 1), 10, span, 31)
    assert not find_repeated_ngrams(row31).any()
    # 31 copies plus a partial one (period - 1 tokens) are still 31 full copies
    if period > 1:
        partial = row31.copy()
        partial[10 + 31 * period : 10 + 32 * period - 1] = span[:-1]
        assert not find_repeated_ngrams(partial).any()
    # 32 copies plus a partial tail: the tail is part of the periodic stretch and is masked too
    row = plant(background(600, 1), 10, span, 32)
    tail = min(period - 1, 3)
    row[10 + 32 * period : 10 + 32 * period + tail] = span[:tail]
    mask = find_repeated_ngrams(row)
    assert np.flatnonzero(mask).tolist() == list(range(10, 10 + 32 * period + tail))
    # a lower min_repeats finds the 31-copy run
    assert find_repeated_ngrams(row31, min_repeats=31).sum() == 31 * period


def test_detector_is_batched_and_keeps_the_input_kind():
    rng = np.random.default_rng(0)
    rows = np.stack([background(300, s) for s in range(6)])
    for r, period in enumerate([1, 3, 7]):
        rows[2 * r] = plant(rows[2 * r], int(rng.integers(0, 300 - 32 * period)), np.arange(period) + 500_000, 32)
    batched = find_repeated_ngrams(rows, max_period=7)
    assert batched.dtype == np.bool_ and batched.shape == rows.shape
    for r in range(6):
        np.testing.assert_array_equal(batched[r], find_repeated_ngrams(rows[r], max_period=7))
    assert batched[::2].any(-1).all() and not batched[1::2].any()
    as_tensor = find_repeated_ngrams(torch.from_numpy(rows.reshape(2, 3, 300)), max_period=7)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (2, 3, 300)
    np.testing.assert_array_equal(as_tensor.reshape(6, 300).numpy(), batched)


def test_period_range_is_respected():
    row = plant(background(600, 3), 0, np.arange(6) + 200_000, 32)
    assert find_repeated_ngrams(row, min_period=1, max_period=6).any()
    assert not find_repeated_ngrams(row, min_period=7, max_period=13).any()
    # min_period 2 still sees a run of one token: "aa" repeated is also a period-2 run
    ones = plant(background(600, 3), 0, np.array([200_000]), 64)
    assert find_repeated_ngrams(ones, min_period=2, max_period=2).sum() == 64


def test_detector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_repeats"):
        find_repeated_ngrams(np.zeros(10, dtype=np.int64), min_repeats=1)
    with pytest.raises(ValueError, match="min_period"):
        find_repeated_ngrams(np.zeros(10, dtype=np.int64), min_period=5, max_period=4)
    with pytest.raises(ValueError, match="integer"):
        find_repeated_ngrams(np.zeros(10))


def test_no_false_positives_on_the_synthetic_corpus():
    source = build_source(DataConfig())
    for index in range(4):
        x, _ = source.batch("train", index, 16, 1024)
        assert not find_repeated_ngrams(x).any()


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------
def injecting(**kw) -> DataConfig:
    inject = dict(enabled=True, fraction=0.25)
    inject.update(kw)
    return DataConfig(inject=InjectionConfig(**inject))


def test_injection_plants_exact_runs_at_the_configured_rate():
    clean = build_source(DataConfig())
    source = build_source(injecting())
    rows = planted_rows = 0
    periods = set()
    for index in range(40):
        batch = source.sample("train", index, 16, SEQ_LEN)
        tokens = full_rows(batch.inputs, batch.labels)
        reference = full_rows(*clean.batch("train", index, 16, SEQ_LEN))
        touched = np.zeros(tokens.shape, dtype=bool)
        for p in batch.plants:
            stop = p.start + 32 * p.period
            np.testing.assert_array_equal(tokens[p.row, p.start : stop], np.tile(p.span, 32))
            assert len(set(p.span.tolist())) == p.period  # a primitive span
            touched[p.row, p.start : stop] = True
            periods.add(p.period)
        # everything outside the planted runs is the clean data, untouched
        np.testing.assert_array_equal(tokens[~touched], reference[~touched])
        np.testing.assert_array_equal(batch.injected, touched[:, 1:])
        assert batch.metrics["data/injected_frac"] == pytest.approx(touched[:, 1:].mean())
        assert batch.metrics["data/injected_rows"] == len(batch.plants)
        # the detector finds exactly the planted runs: they do not merge with their neighbours
        np.testing.assert_array_equal(find_repeated_ngrams(tokens), touched)
        rows += 16
        planted_rows += len(batch.plants)
    # 640 Bernoulli(0.25) rows: 160 expected, sd ~11
    assert 125 <= planted_rows <= 195
    assert periods == {1, 2, 3, 4}  # every period whose 32 copies fit in 129 tokens


def test_injection_respects_the_step_window_and_spares_val():
    source = build_source(injecting(fraction=1.0, start_step=5, end_step=8))
    clean = build_source(DataConfig())
    for index in range(12):
        batch = source.sample("train", index, 4, SEQ_LEN)
        inside = 5 <= index < 8
        assert (len(batch.plants) == 4) == inside and (len(batch.plants) == 0) == (not inside)
        if not inside:
            assert torch.equal(batch.inputs, clean.batch("train", index, 4, SEQ_LEN)[0])
    for index in range(5, 8):
        assert torch.equal(source.batch("val", index, 4, SEQ_LEN)[0], clean.batch("val", index, 4, SEQ_LEN)[0])


def test_isolated_poison_batches_land_on_every_nth_step_only():
    source = build_source(injecting(fraction=1.0, start_step=10, end_step=40, every=10))
    poisoned = [i for i in range(45) if source.sample("train", i, 2, SEQ_LEN).plants]
    assert poisoned == [10, 20, 30]
    with pytest.raises(DataError, match="every=0"):
        build_source(injecting(every=0))


def test_injection_periods_and_data_spans():
    source = build_source(injecting(fraction=1.0, min_period=3, max_period=13, repeats=8, span=SpanSource.data))
    clean = build_source(DataConfig())
    seen = set()
    for index in range(6):
        batch = source.sample("train", index, 8, SEQ_LEN)
        reference = full_rows(*clean.batch("train", index, 8, SEQ_LEN))
        assert len(batch.plants) == 8
        for p in batch.plants:
            assert 3 <= p.period <= 13
            assert contains(reference[p.row], p.span)  # a span of the row's own data
            seen.add(p.period)
    assert len(seen) >= 8


def test_injection_is_sharded_like_the_data():
    source = build_source(injecting(fraction=0.5))
    whole = source.sample("train", 3, 8, SEQ_LEN)
    parts = [source.sample("train", 3, 2, SEQ_LEN, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
    assert sum(len(p.plants) for p in parts) == len(whole.plants)


def test_injection_that_cannot_fit_is_one_clear_error():
    source = build_source(injecting(min_period=5, repeats=32))
    with pytest.raises(DataError, match="need 160 tokens"):
        source.batch("train", 0, 2, SEQ_LEN)


# --------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------
def test_mask_filter_ignores_exactly_the_planted_labels():
    cfg = injecting(fraction=0.3)
    cfg.ngram_filter = NgramFilterConfig(enabled=True, mode=FilterMode.mask)
    source = build_source(cfg)
    total_planted = 0
    for index in range(10):
        batch = source.sample("train", index, 16, SEQ_LEN)
        ignored = (batch.labels == IGNORE_INDEX).numpy()
        np.testing.assert_array_equal(ignored, batch.injected)
        assert batch.metrics["data/masked_tokens"] == ignored.sum()
        total_planted += batch.injected.sum()
    assert total_planted > 0
    _, val_labels = source.batch("val", 0, 16, SEQ_LEN)
    assert (val_labels != IGNORE_INDEX).all()  # val is never filtered


def test_drop_filter_replaces_dirty_rows():
    cfg = injecting(fraction=0.5)
    cfg.ngram_filter = NgramFilterConfig(enabled=True, mode=FilterMode.drop)
    source = build_source(cfg)
    clean = build_source(DataConfig())
    batch = source.sample("train", 2, 16, SEQ_LEN)
    assert len(batch.plants) > 0
    assert batch.metrics["data/dropped_rows"] == len(batch.plants)
    assert batch.metrics["data/masked_tokens"] == 0
    assert (batch.labels != IGNORE_INDEX).all()
    assert not find_repeated_ngrams(batch.inputs).any()
    reference = clean.batch("train", 2, 16, SEQ_LEN)[0]
    replaced = sorted(p.row for p in batch.plants)
    kept = [r for r in range(16) if r not in replaced]
    assert torch.equal(batch.inputs[kept], reference[kept])
    assert not torch.equal(batch.inputs[replaced], reference[replaced])
    source.batch("train", 2, 16, SEQ_LEN)
    assert source.last_batch_info["data/dropped_rows"] == len(batch.plants)
