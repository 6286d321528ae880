"""Repeated n-grams: OLMo 2 found that documents holding 32+ back-to-back copies of a 1-13 token
span cause grad-norm spikes. Detect them (:func:`find_repeated_ngrams`), plant them in clean rows
(:func:`plan_injection`, ``data.inject``), and filter them out (:func:`filter_repeated`,
``data.ngram_filter``). Pure array functions: the token sources (proxy/data/sources.py) call them
on each train batch and own the randomness they are given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch

from proxy.config import FilterMode, InjectionConfig, NgramFilterConfig, SpanSource

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)
DROP_ATTEMPTS = 4  # ngram_filter.mode=drop: fresh draws tried before a row is masked whole


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------
def find_repeated_ngrams(
    tokens: ArrayOrTensor, min_period: int = 1, max_period: int = 13, min_repeats: int = 32
) -> ArrayOrTensor:
    """Mask the tokens that lie in a run of ``min_repeats`` or more back-to-back copies of a span
    of ``min_period`` to ``max_period`` tokens (OLMo 2's definition of a repeated n-gram).

    ``tokens``: integer array or tensor, (T,) or (..., T), rows handled independently. Returns a
    bool mask of the same shape and kind (numpy in, numpy out; a tensor stays on its device).

    For a period p, a run of k full copies starting at i has ``x[t] == x[t - p]`` for every t in
    ``[i + p, i + k p)``: a run of ``(k - 1) p`` consecutive matches. So for each p we compare the
    sequence with itself shifted by p, measure each run of matches (running max of the last
    mismatch, forwards and backwards), keep runs of at least ``(min_repeats - 1) p`` and mark the
    run plus the p tokens before it, which is the first copy. The whole periodic stretch is
    marked, including a trailing partial copy, since it is just as predictable.
    """
    if not 1 <= min_period <= max_period:
        raise ValueError(f"need 1 <= min_period <= max_period, got {min_period}, {max_period}")
    if min_repeats < 2:
        raise ValueError(f"min_repeats={min_repeats} must be >= 2 (one copy is not a repeat)")
    # isinstance inline (not through a flag) so that each constraint of ArrayOrTensor narrows
    x = torch.from_numpy(np.ascontiguousarray(tokens)) if isinstance(tokens, np.ndarray) else tokens
    if x.ndim == 0 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer array of shape (..., T), got {x.dtype} {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    length = rows.shape[-1]
    for p in range(min_period, max_period + 1):
        need = (min_repeats - 1) * p  # matches in a run of min_repeats copies
        if need + p > length:
            break  # longer periods cannot fit either
        match = rows[:, p:] == rows[:, :-p]
        # only rows with enough matches in total can hold a long run; clean data has none
        candidates = torch.nonzero(match.sum(-1) >= need).squeeze(-1)
        if candidates.numel() == 0:
            continue
        long_run = _runs_at_least(match[candidates], need)
        mask[candidates, p:] |= long_run  # copies 2..k
        mask[candidates, :-p] |= long_run  # the first copy: the run shifted back by p
    mask = mask.reshape(x.shape)
    if isinstance(tokens, np.ndarray):
        return mask.numpy()
    return mask


def _runs_at_least(match: torch.Tensor, min_length: int) -> torch.Tensor:
    """For a (rows, n) bool tensor, mark the elements of runs of True at least min_length long."""
    n = match.shape[-1]
    pos = torch.arange(n, device=match.device).expand_as(match)
    # run length ending at j (forward) and starting at j (backward), 0 where match is False
    last_miss = torch.where(match, -1, pos).cummax(dim=-1).values
    ending = pos - last_miss
    next_miss = torch.where(match, n, pos).flip(-1).cummin(dim=-1).values.flip(-1)
    starting = next_miss - pos
    return match & (ending + starting - 1 >= min_length)


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plant:
    """One planted run: ``repeats`` copies of ``span`` starting at ``start`` of a batch row
    (positions of the ``seq_len + 1`` token row; label position = position - 1)."""

    row: int
    start: int
    span: np.ndarray

    @property
    def period(self) -> int:
        return len(self.span)


def in_window(index: int, inj: InjectionConfig) -> bool:
    """Whether step ``index`` lies in [start_step, end_step) (None: unbounded) and is one of
    every ``inj.every``-th steps counted from the window's start."""
    after_start = inj.start_step is None or index >= inj.start_step
    before_end = inj.end_step is None or index < inj.end_step
    on_beat = (index - (inj.start_step or 0)) % max(1, inj.every) == 0
    return after_start and before_end and on_beat


def fitting_periods(inj: InjectionConfig, length: int) -> list[int]:
    """The n-gram lengths whose run of ``inj.repeats`` copies fits a row of ``length`` tokens."""
    return [p for p in range(inj.min_period, inj.max_period + 1) if p * inj.repeats <= length]


def plan_injection(
    inj: InjectionConfig, tokens: np.ndarray, vocab_size: int, row_rng: Callable[[int], np.random.Generator]
) -> list[Plant]:
    """Which rows of ``tokens`` get a run, where, of which span (``fitting_periods`` must not be
    empty). ``row_rng(i)`` is row i's own generator, so a row's plan does not depend on the batch
    size or on the rank that holds the row."""
    length = tokens.shape[1]
    periods = fitting_periods(inj, length)
    plants = []
    for i in range(tokens.shape[0]):
        rng = row_rng(i)
        if rng.random() >= inj.fraction:
            continue
        period = periods[rng.integers(len(periods))]
        start = int(rng.integers(0, length - period * inj.repeats + 1))
        stop = start + period * inj.repeats
        if inj.span == SpanSource.data:
            # the row's own tokens: realistic, but the run may merge with its neighbours
            at = int(rng.integers(0, length - period + 1))
            span = tokens[i, at : at + period].copy()
        else:
            # distinct tokens make the span primitive (its smallest period is `period`), and
            # leaving out the neighbours keeps the run from merging into them: the planted run
            # is exactly `repeats` copies of a `period`-token n-gram
            neighbours = [tokens[i, start - 1]] if start > 0 else []
            neighbours += [tokens[i, stop]] if stop < length else []
            allowed = np.setdiff1d(np.arange(vocab_size), neighbours)
            span = rng.choice(allowed, period, replace=False)
        plants.append(Plant(i, start, span.astype(np.int64)))
    return plants


def apply_plants(tokens: np.ndarray, plants: list[Plant], repeats: int) -> np.ndarray:
    """Write the planted runs into ``tokens`` (in place); returns the mask of planted tokens."""
    planted = np.zeros(tokens.shape, dtype=bool)
    for plant in plants:
        stop = plant.start + plant.period * repeats
        tokens[plant.row, plant.start : stop] = np.tile(plant.span, repeats)
        planted[plant.row, plant.start : stop] = True
    return planted


# --------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------
def filter_repeated(
    flt: NgramFilterConfig, tokens: np.ndarray, redraw: Callable[[np.ndarray, int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, masked, rows dropped). mask: label the repeated stretches out. drop: draw a
    fresh row in place of each dirty one (a document removed from the corpus) with
    ``redraw(row_indices, attempt)``; a row still dirty after a few draws is masked whole."""
    detect = functools.partial(
        find_repeated_ngrams, min_period=flt.min_period, max_period=flt.max_period, min_repeats=flt.min_repeats
    )
    masked = detect(tokens)
    if flt.mode == FilterMode.mask:
        return tokens, masked, 0
    dirty = np.flatnonzero(masked.any(-1))
    dropped = dirty.size
    for attempt in range(1, DROP_ATTEMPTS + 1):
        if dirty.size == 0:
            break
        tokens[dirty] = redraw(dirty, attempt)
        masked[dirty] = detect(tokens[dirty])
        dirty = dirty[masked[dirty].any(-1)]
    masked[dirty] = True
    return tokens, masked, dropped
