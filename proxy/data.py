"""Token sources: a synthetic language (the default), memmapped token files, plain text; plus the
repeated n-gram injection and filtering that OLMo 2 found behind grad-norm spikes.

Every source answers one question, ``batch(split, index, batch_size, seq_len, rank, world_size)``,
and the answer is a pure function of ``(data.seed, split, index)``: each row of a batch comes from
its own random generator keyed by ``(seed, split, index, global row)``. So resuming, rolling back
or skipping S batches is index arithmetic, and with ``world_size`` ranks the global batch is the
single-process batch of ``batch_size * world_size`` rows, rank r holding rows
``[r * batch_size, (r + 1) * batch_size)``.

Sources
    synthetic  a Zipfian sparse hidden Markov model (below); no download, and its Bayes-optimal
               loss is computed exactly, so "how far from perfect" is a number, not a guess.
    memmap     nanoGPT's layout: a flat ``.bin`` of uint16/uint32 ids (a file, or a folder with
               ``train.bin`` and optionally ``val.bin``; a sibling ``meta.json`` gives the vocab).
    text       ``.txt`` files tokenized at load time, byte-level (vocab 256) or BPE
               (``tokenizers``); ``proxy-prepare`` turns text into the memmap layout once.

Train batches may then be perturbed (``data.inject``: plant a run of ``repeats`` copies of a
1-13 token span in a fraction of the rows) and/or filtered (``data.ngram_filter``: find such runs
and set their labels to -100, or replace the row). Both act on train batches only: the val stream
stays the same across arms, so val losses of filtered and unfiltered runs compare directly.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import numpy as np
import torch

from proxy.config import (
    DataConfig,
    DataSource,
    FilterMode,
    InjectionConfig,
    SpanSource,
    SyntheticConfig,
)

IGNORE_INDEX = -100
SPLITS = ("train", "val")
EOT = "<|endoftext|>"  # document separator of BPE vocabularies (byte-level uses byte 0)

# Streams of per-row randomness. Injection has its own, so switching it on leaves every clean row
# exactly as it was: an injected run and its control see the same data everywhere else.
_TOKENS, _INJECT, _LANGUAGE, _ENTROPY = 0, 1, 2, 3
_SPLIT_CODE = {"train": 0, "val": 1}
_DROP_ATTEMPTS = 4  # ngram_filter.mode=drop: fresh draws tried before a row is masked whole

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


class DataError(Exception):
    """Data that cannot be used: a missing or malformed file, or an impossible request."""


def row_generator(seed: int, split: str, index: int, row: int, attempt: int = 0,
                  stream: int = _TOKENS) -> np.random.Generator:
    """The random generator of one row of one batch; the whole key of its contents."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, row, attempt, stream])


# ============================================================================================
# Repeated n-gram detection
# ============================================================================================
def find_repeated_ngrams(tokens: ArrayOrTensor, min_period: int = 1, max_period: int = 13,
                         min_repeats: int = 32) -> ArrayOrTensor:
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
    is_numpy = isinstance(tokens, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(tokens)) if is_numpy else tokens
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
    return mask.numpy() if is_numpy else mask


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


# ============================================================================================
# The synthetic language: a Zipfian sparse hidden Markov model
# ============================================================================================
@dataclass(frozen=True)
class HMM:
    """A hidden Markov model stored twice: sparse tables to sample fast, dense to score exactly.

    Each of ``n_states`` states emits one of ``emissions_per_state`` tokens and moves to one of
    ``transitions_per_state`` successors, both with Zipfian weights (rank^-zipf_exponent). Token
    supports overlap between states, so the state is hidden: reading it off the context, which a
    model must learn to do, is what separates the optimal loss from the bigram loss. All states
    share the rank weights (what differs is which token or successor holds each rank), so a
    sample draws its ranks for every position at once.
    """

    stationary: np.ndarray  # (S,) start distribution, stationary under `transition`
    successors: np.ndarray  # (S, Kt) state ids, by rank
    successor_cdf: np.ndarray  # (Kt,) cumulative rank weights
    emitted: np.ndarray  # (S, Ke) token ids, by rank
    emitted_cdf: np.ndarray  # (Ke,)
    transition: np.ndarray  # (S, S) dense
    emission: np.ndarray  # (S, V) dense

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _cdf(probs: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(probs, axis=-1)
    cdf[..., -1] = 1.0  # a uniform draw in [0, 1) always lands inside
    return cdf


def build_hmm(cfg: SyntheticConfig) -> HMM:
    """The language ``cfg`` names; a pure function of its fields."""
    _check_synthetic(cfg)
    rng = np.random.default_rng([cfg.seed, _LANGUAGE])
    S, V = cfg.n_states, cfg.vocab_size
    Kt, Ke = cfg.transitions_per_state, cfg.emissions_per_state

    # Every state can reach the next one (a hidden ring through all states, at a random rank),
    # so the chain is irreducible and its stationary distribution covers every state.
    successors = np.empty((S, Kt), dtype=np.int64)
    for s in range(S):
        ring = (s + 1) % S
        others = rng.choice(np.setdiff1d(np.arange(S), [ring]), Kt - 1, replace=False)
        successors[s] = rng.permutation(np.append(others, ring))
    emitted = np.stack([rng.choice(V, Ke, replace=False) for _ in range(S)])
    trans_p, emit_p = zipf_weights(Kt, cfg.zipf_exponent), zipf_weights(Ke, cfg.zipf_exponent)

    transition = np.zeros((S, S))
    np.put_along_axis(transition, successors, np.broadcast_to(trans_p, (S, Kt)), axis=1)
    emission = np.zeros((S, V))
    np.put_along_axis(emission, emitted, np.broadcast_to(emit_p, (S, Ke)), axis=1)
    return HMM(_stationary(transition), successors, _cdf(trans_p), emitted, _cdf(emit_p),
               transition, emission)


def _stationary(transition: np.ndarray) -> np.ndarray:
    """pi with pi @ P = pi, sum(pi) = 1 (a least-squares solve; exact for an irreducible chain)."""
    S = transition.shape[0]
    system = np.vstack([transition.T - np.eye(S), np.ones((1, S))])
    target = np.zeros(S + 1)
    target[-1] = 1.0
    pi = np.linalg.lstsq(system, target, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def sample_hmm(hmm: HMM, uniforms: np.ndarray) -> np.ndarray:
    """Token sequences from uniform draws of shape (rows, 2, length): [:, 0] picks states, [:, 1]
    tokens (inverse CDF: index k where cdf[k-1] < u <= cdf[k]). Vectorised across rows and
    positions; only the state chain walks step by step, one gather per step."""
    rows, _, length = uniforms.shape
    state_u, token_u = uniforms[:, 0], uniforms[:, 1]
    successor_rank = np.searchsorted(hmm.successor_cdf, state_u)
    states = np.empty((rows, length), dtype=np.int64)
    states[:, 0] = np.searchsorted(_cdf(hmm.stationary), state_u[:, 0])
    for t in range(1, length):
        states[:, t] = hmm.successors[states[:, t - 1], successor_rank[:, t]]
    return hmm.emitted[states, np.searchsorted(hmm.emitted_cdf, token_u)]


def hmm_token_losses(hmm: HMM, tokens: np.ndarray) -> np.ndarray:
    """-log p(x_t | x_<t) in nats under the HMM itself, for every position of (rows, length)
    sequences the HMM can produce (e.g. sampled from it): the forward algorithm, with the state
    posterior renormalised each step."""
    rows, length = tokens.shape
    belief = np.broadcast_to(hmm.stationary, (rows, hmm.stationary.size))
    losses = np.empty((rows, length))
    for t in range(length):
        joint = belief * hmm.emission[:, tokens[:, t]].T  # p(state, x_t | x_<t)
        prob = joint.sum(-1)
        losses[:, t] = -np.log(prob)
        # einsum, not @: numpy's threaded BLAS is ~50x slower at this size on a busy 2-core box
        belief = np.einsum("bs,st->bt", joint / prob[:, None], hmm.transition)
    return losses


def _entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class LanguageEntropy:
    """What a model can achieve on the synthetic language, in nats per token.

    unigram_entropy   H(X): the loss of the best model that ignores context (exact).
    bigram_entropy    H(X_t | X_t-1): the best model that sees one previous token (exact).
    optimal_loss      mean over label positions 1..seq_len of -log p(x_t | x_<t) under the true
                      HMM: the Bayes-optimal train/val loss at this seq_len (forward algorithm,
                      exact per sequence, averaged over n_sequences sampled ones).
    optimal_loss_stderr   its standard error over those sequences.
    entropy_rate      the same loss at positions seq_len+1..2 seq_len: the long-context limit.
    """

    unigram_entropy: float
    bigram_entropy: float
    optimal_loss: float
    optimal_loss_stderr: float
    entropy_rate: float
    seq_len: int
    n_sequences: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def language_entropy(cfg: SyntheticConfig, seq_len: int = 128,
                     n_sequences: int = 512) -> LanguageEntropy:
    """Entropy figures of the synthetic language ``cfg`` (cached; ~0.1 s at the defaults)."""
    return _language_entropy(_synthetic_key(cfg), seq_len, n_sequences)


@functools.lru_cache(maxsize=16)
def _language_entropy(key: tuple, seq_len: int, n_sequences: int) -> LanguageEntropy:
    hmm = _hmm_from_key(key)
    unigram = hmm.stationary @ hmm.emission
    # p(a, b) for consecutive tokens, summed over the hidden states behind each
    pair = hmm.emission.T @ (hmm.stationary[:, None] * hmm.transition) @ hmm.emission
    bigram = _entropy(pair) - _entropy(unigram)

    rng = np.random.default_rng([key[0], _ENTROPY])  # key[0] is the language seed
    tokens = sample_hmm(hmm, rng.random((n_sequences, 2, 2 * seq_len + 1)))
    losses = hmm_token_losses(hmm, tokens)
    per_sequence = losses[:, 1 : seq_len + 1].mean(-1)  # label positions of a seq_len window
    return LanguageEntropy(
        unigram_entropy=_entropy(unigram),
        bigram_entropy=bigram,
        optimal_loss=float(per_sequence.mean()),
        optimal_loss_stderr=float(per_sequence.std(ddof=1) / math.sqrt(n_sequences)),
        entropy_rate=float(losses[:, seq_len + 1 :].mean()),
        seq_len=seq_len,
        n_sequences=n_sequences,
    )


_SYNTHETIC_FIELDS = ("seed", "vocab_size", "n_states", "zipf_exponent", "emissions_per_state",
                     "transitions_per_state")


def _synthetic_key(cfg: SyntheticConfig) -> tuple:
    return tuple(getattr(cfg, name) for name in _SYNTHETIC_FIELDS)


@functools.lru_cache(maxsize=16)
def _hmm_from_key(key: tuple) -> HMM:
    return build_hmm(SyntheticConfig(**dict(zip(_SYNTHETIC_FIELDS, key))))


def _check_synthetic(cfg: SyntheticConfig) -> None:
    checks = [
        (cfg.seed >= 0, f"data.synthetic.seed={cfg.seed} must be >= 0"),
        (cfg.vocab_size >= 2, f"data.synthetic.vocab_size={cfg.vocab_size} must be >= 2"),
        (cfg.n_states >= 2, f"data.synthetic.n_states={cfg.n_states} must be >= 2"),
        (cfg.zipf_exponent >= 0, f"data.synthetic.zipf_exponent={cfg.zipf_exponent} must be >= 0"),
        (1 <= cfg.emissions_per_state <= cfg.vocab_size,
         f"data.synthetic.emissions_per_state={cfg.emissions_per_state} must be in [1, vocab_size={cfg.vocab_size}]"),
        (1 <= cfg.transitions_per_state <= cfg.n_states,
         f"data.synthetic.transitions_per_state={cfg.transitions_per_state} must be in [1, n_states={cfg.n_states}]"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


# ============================================================================================
# Token sources
# ============================================================================================
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


@dataclass
class Batch:
    """A batch with what happened to it: the trainer needs only inputs and labels."""

    inputs: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where filtered
    injected: np.ndarray  # (B, T) bool: labels that were planted (before any filter ran)
    plants: list[Plant] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # flat 'data/...' keys for logging


class TokenSource(ABC):
    """Base of every source: subclasses supply rows of tokens, this class shapes them into
    batches and applies injection and filtering.

    ``last_batch_info`` holds the 'data/...' metrics of the most recent ``batch`` call
    (``data/injected_frac``, ``data/masked_tokens``, ... for the features switched on).
    """

    name = "source"
    vocab_size: int

    def __init__(self, cfg: DataConfig):
        _check_data(cfg)
        self.cfg = cfg
        self.last_batch_info: dict[str, float] = {}

    # -- what subclasses provide ---------------------------------------------------------------
    @abstractmethod
    def _rows(self, split: str, index: int, rows: np.ndarray, length: int,
              attempt: int = 0) -> np.ndarray:
        """(len(rows), length) int64 tokens; row r a function of (seed, split, index, r, attempt)."""

    @abstractmethod
    def _describe(self) -> dict:
        """The source's own figures for ``describe()`` (name, sizes, entropies)."""

    # -- the contract ----------------------------------------------------------------------------
    def batch(self, split: str, index: int, batch_size: int, seq_len: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both int64 (batch_size, seq_len), labels = inputs shifted by one."""
        out = self.sample(split, index, batch_size, seq_len, rank, world_size)
        self.last_batch_info = out.metrics
        return out.inputs, out.labels

    def describe(self) -> dict:
        info = {"name": self.name, "vocab_size": self.vocab_size, "seed": self.cfg.seed}
        info.update(self._describe())
        if self.cfg.inject.enabled:
            info["inject"] = _plain(self.cfg.inject)
        if self.cfg.ngram_filter.enabled:
            info["ngram_filter"] = _plain(self.cfg.ngram_filter)
        return info

    # -- the work --------------------------------------------------------------------------------
    def sample(self, split: str, index: int, batch_size: int, seq_len: int, rank: int = 0,
               world_size: int = 1) -> Batch:
        """``batch`` with the planted runs and metrics kept (for tests and inspection)."""
        _check_request(split, index, batch_size, seq_len, rank, world_size)
        rows = np.arange(rank * batch_size, (rank + 1) * batch_size)
        tokens = self._rows(split, index, rows, seq_len + 1)
        planted = np.zeros(tokens.shape, dtype=bool)
        plants: list[Plant] = []
        metrics: dict[str, float] = {}
        train = split == "train"

        if self.cfg.inject.enabled and train:
            if _in_window(index, self.cfg.inject):
                plants = self._plan_injection(index, rows, tokens)
            for plant in plants:
                stop = plant.start + plant.period * self.cfg.inject.repeats
                tokens[plant.row, plant.start : stop] = np.tile(plant.span, self.cfg.inject.repeats)
                planted[plant.row, plant.start : stop] = True
            metrics["data/injected_frac"] = float(planted[:, 1:].mean())
            metrics["data/injected_rows"] = float(len(plants))

        masked = np.zeros(tokens.shape, dtype=bool)
        if self.cfg.ngram_filter.enabled and train:
            tokens, masked, dropped = self._filter(split, index, rows, tokens)
            metrics["data/masked_tokens"] = float(masked[:, 1:].sum())
            if self.cfg.ngram_filter.mode == FilterMode.drop:
                metrics["data/dropped_rows"] = float(dropped)

        inputs = torch.from_numpy(tokens[:, :-1].copy())
        labels = torch.from_numpy(np.where(masked[:, 1:], IGNORE_INDEX, tokens[:, 1:]))
        return Batch(inputs, labels, planted[:, 1:], plants, metrics)

    def _plan_injection(self, index: int, rows: np.ndarray, tokens: np.ndarray) -> list[Plant]:
        """Which rows get a run, where, of which span. Row r's plan comes from its own generator,
        so it does not depend on the batch size or the rank that holds the row."""
        inj = self.cfg.inject
        length = tokens.shape[1]
        periods = [p for p in range(inj.min_period, inj.max_period + 1) if p * inj.repeats <= length]
        if not periods:
            raise DataError(
                f"data.inject: {inj.repeats} repeats of a {inj.min_period}-token span need "
                f"{inj.min_period * inj.repeats} tokens but a row has seq_len+1={length}"
            )
        plants = []
        for i, row in enumerate(rows):
            rng = row_generator(self.cfg.seed, "train", index, int(row), stream=_INJECT)
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
                allowed = np.setdiff1d(np.arange(self.vocab_size), neighbours)
                span = rng.choice(allowed, period, replace=False)
            plants.append(Plant(i, start, span.astype(np.int64)))
        return plants

    def _filter(self, split: str, index: int, rows: np.ndarray,
                tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, masked, rows dropped). mask: label the repeated stretches out. drop: draw a
        fresh row in place of each dirty one (a document removed from the corpus); a row still
        dirty after a few draws is masked whole."""
        flt = self.cfg.ngram_filter
        detect = functools.partial(find_repeated_ngrams, min_period=flt.min_period,
                                   max_period=flt.max_period, min_repeats=flt.min_repeats)
        masked = detect(tokens)
        if flt.mode == FilterMode.mask:
            return tokens, masked, 0
        dirty = np.flatnonzero(masked.any(-1))
        dropped = dirty.size
        for attempt in range(1, _DROP_ATTEMPTS + 1):
            if dirty.size == 0:
                break
            tokens[dirty] = self._rows(split, index, rows[dirty], tokens.shape[1], attempt)
            masked[dirty] = detect(tokens[dirty])
            dirty = dirty[masked[dirty].any(-1)]
        masked[dirty] = True
        return tokens, masked, dropped


def _in_window(index: int, inj: InjectionConfig) -> bool:
    """Whether step ``index`` lies in [start_step, end_step) (None: unbounded)."""
    after_start = inj.start_step is None or index >= inj.start_step
    before_end = inj.end_step is None or index < inj.end_step
    return after_start and before_end


def _check_request(split: str, index: int, batch_size: int, seq_len: int, rank: int,
                   world_size: int) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    if index < 0:
        raise DataError(f"batch index={index} must be >= 0")
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")


def _plain(obj) -> dict:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in obj.__dict__.items()}


# --------------------------------------------------------------------------------------------
class SyntheticSource(TokenSource):
    """Rows sampled on the fly from the synthetic HMM: an endless stream, so val is held out by
    construction (a different key), and no two batches repeat."""

    name = "synthetic-hmm"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.hmm = _hmm_from_key(_synthetic_key(cfg.synthetic))
        self.vocab_size = cfg.synthetic.vocab_size

    def _rows(self, split: str, index: int, rows: np.ndarray, length: int,
              attempt: int = 0) -> np.ndarray:
        uniforms = np.stack([
            row_generator(self.cfg.seed, split, index, int(r), attempt).random((2, length))
            for r in rows
        ])
        return sample_hmm(self.hmm, uniforms)

    def _describe(self) -> dict:
        s = self.cfg.synthetic
        info = {name: getattr(s, name) for name in _SYNTHETIC_FIELDS if name != "vocab_size"}
        info["language_seed"] = info.pop("seed")
        info.update(language_entropy(s).as_dict())
        info["units"] = "nats/token"
        return info


# --------------------------------------------------------------------------------------------
class ArraySource(TokenSource):
    """Random windows of a token array per split: memmapped ``.bin`` files or tokenized text."""

    def __init__(self, cfg: DataConfig, name: str, train: np.ndarray, val: np.ndarray,
                 vocab_size: int, details: dict):
        super().__init__(cfg)
        self.name, self.vocab_size, self.details = name, vocab_size, details
        self.splits = {"train": train, "val": val}
        for split, arr in self.splits.items():
            if len(arr) < 2:
                raise DataError(f"{cfg.path}: the {split} split has {len(arr)} tokens; need at least 2")

    def _rows(self, split: str, index: int, rows: np.ndarray, length: int,
              attempt: int = 0) -> np.ndarray:
        data = self.splits[split]
        if length > len(data):
            raise DataError(f"{self.cfg.path}: the {split} split has {len(data)} tokens, fewer than "
                            f"seq_len+1={length}")
        out = np.empty((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            start = row_generator(self.cfg.seed, split, index, int(r), attempt).integers(0, len(data) - length + 1)
            out[i] = data[start : start + length]
        return out

    def _describe(self) -> dict:
        train = self.splits["train"]
        sample = np.asarray(train[: 1 << 22], dtype=np.int64)
        counts = np.bincount(sample, minlength=self.vocab_size)
        return {
            **self.details,
            "path": str(self.cfg.path),
            "train_tokens": int(len(train)),
            "val_tokens": int(len(self.splits["val"])),
            "unigram_entropy": _entropy(counts / counts.sum()),
            "units": "nats/token",
        }


def _split_tail(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(tokens) - max(1, int(round(len(tokens) * val_fraction)))
    return tokens[:cut], tokens[cut:]


# -- memmap ------------------------------------------------------------------------------------
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def load_memmap(cfg: DataConfig) -> ArraySource:
    """``data.path``: a .bin file (val = its tail) or a folder with train.bin [and val.bin]."""
    path = _existing(cfg.path)
    folder = path if path.is_dir() else path.parent
    meta = _read_meta(folder / "meta.json")
    dtype = meta.get("dtype", cfg.dtype)
    if dtype not in _DTYPES:
        raise DataError(f"{folder / 'meta.json'}: dtype {dtype!r} must be uint16 or uint32")
    if path.is_dir():
        train_file = path / "train.bin"
        if not train_file.is_file():
            raise DataError(f"{path}: folder has no train.bin")
        train = _open_bin(train_file, dtype)
        val_file = path / "val.bin"
        if val_file.is_file():
            val, val_source = _open_bin(val_file, dtype), "val.bin"
        else:
            train, val = _split_tail(train, cfg.val_fraction)
            val_source = f"tail {cfg.val_fraction:g} of train.bin"
    else:
        train, val = _split_tail(_open_bin(path, dtype), cfg.val_fraction)
        val_source = f"tail {cfg.val_fraction:g} of {path.name}"
    if "vocab_size" in meta:
        vocab = int(meta["vocab_size"])
    else:
        vocab = max(_max_token(f, dtype) for f in _bin_files(path)) + 1
    return ArraySource(cfg, "memmap", train, val, vocab, {"dtype": dtype, "val_source": val_source})


def _existing(path: Optional[str]) -> Path:
    if not path:
        raise DataError("data.path is not set")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path}: no such file or folder")
    return p


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _open_bin(path: Path, dtype: str) -> np.memmap:
    size = path.stat().st_size
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if size == 0:
        raise DataError(f"{path}: file is empty")
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
    return np.memmap(path, dtype=_DTYPES[dtype], mode="r")


def _bin_files(path: Path) -> list[Path]:
    return [f for f in (path / "train.bin", path / "val.bin") if f.is_file()] if path.is_dir() else [path]


@functools.lru_cache(maxsize=32)
def _max_token_cached(path: str, size: int, mtime_ns: int, dtype: str) -> int:
    data = np.memmap(path, dtype=_DTYPES[dtype], mode="r")
    chunk = 1 << 24
    return int(max(data[i : i + chunk].max() for i in range(0, len(data), chunk)))


def _max_token(path: Path, dtype: str) -> int:
    """The largest id in a .bin (scanned once per file version; meta.json makes it unnecessary)."""
    stat = path.stat()
    return _max_token_cached(str(path), stat.st_size, stat.st_mtime_ns, dtype)


# -- text ----------------------------------------------------------------------------------------
def read_documents(path: Path) -> list[bytes]:
    """The .txt file at ``path``, or every .txt file under the folder (sorted), as documents."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt files in folder")
    docs = [f.read_bytes() for f in files]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path}: text is empty")
    return docs


class ByteTokenizer:
    """Bytes are tokens (vocab 256); byte 0, which text never holds, separates documents."""

    name = "byte"
    vocab_size = 256

    def encode(self, docs: Sequence[bytes]) -> np.ndarray:
        return np.frombuffer(b"\x00".join(docs), dtype=np.uint8).astype(np.int64)


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library; ``<|endoftext|>`` separates documents."""

    name = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot = tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, docs: Sequence[bytes], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_decode(docs), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise DataError(f"{path}: not a tokenizers JSON file ({_first_line(exc)})") from None

    def encode(self, docs: Sequence[bytes]) -> np.ndarray:
        ids: list[int] = []
        for i, enc in enumerate(self.tokenizer.encode_batch(_decode(docs))):
            if i and self.eot is not None:
                ids.append(self.eot)
            ids.extend(enc.ids)
        return np.asarray(ids, dtype=np.int64)


def _decode(docs: Sequence[bytes]) -> list[str]:
    try:
        return [d.decode("utf-8") for d in docs]
    except UnicodeDecodeError as exc:
        raise DataError(f"text is not UTF-8 ({exc.reason} at byte {exc.start}); use the byte tokenizer") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def make_tokenizer(kind: str, docs: Sequence[bytes], bpe_vocab_size: int):
    """``kind``: byte | bpe (trained on ``docs`` now) | path to a tokenizers JSON file."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if bpe_vocab_size < 257:
            raise DataError(f"BPE vocab size {bpe_vocab_size} must be > 256 (the byte alphabet)")
        return BPETokenizer.train(docs, bpe_vocab_size)
    path = Path(kind).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer={kind!r} must be byte, bpe or a tokenizer .json file")
    return BPETokenizer.load(path)


def load_text(cfg: DataConfig) -> ArraySource:
    docs = read_documents(_existing(cfg.path))
    tokenizer = make_tokenizer(cfg.tokenizer, docs, cfg.bpe_vocab_size)
    train, val = _split_tail(tokenizer.encode(docs), cfg.val_fraction)
    details = {"tokenizer": tokenizer.name, "documents": len(docs),
               "val_source": f"tail {cfg.val_fraction:g} of the text"}
    return ArraySource(cfg, "text", train, val, tokenizer.vocab_size, details)


# ============================================================================================
# Construction
# ============================================================================================
def _check_data(cfg: DataConfig) -> None:
    inj, flt = cfg.inject, cfg.ngram_filter
    checks = [
        (cfg.seed >= 0, f"data.seed={cfg.seed} must be >= 0"),
        (0.0 < cfg.val_fraction < 1.0, f"data.val_fraction={cfg.val_fraction} must be in (0, 1)"),
        (1 <= inj.min_period <= inj.max_period,
         f"data.inject: need 1 <= min_period <= max_period, got {inj.min_period}, {inj.max_period}"),
        (inj.repeats >= 2, f"data.inject.repeats={inj.repeats} must be >= 2"),
        (0.0 <= inj.fraction <= 1.0, f"data.inject.fraction={inj.fraction} must be in [0, 1]"),
        (inj.start_step is None or inj.start_step >= 0, f"data.inject.start_step={inj.start_step} must be >= 0"),
        (inj.start_step is None or inj.end_step is None or inj.start_step < inj.end_step,
         f"data.inject.start_step={inj.start_step} must be < end_step={inj.end_step}"),
        (1 <= flt.min_period <= flt.max_period,
         f"data.ngram_filter: need 1 <= min_period <= max_period, got {flt.min_period}, {flt.max_period}"),
        (flt.min_repeats >= 2, f"data.ngram_filter.min_repeats={flt.min_repeats} must be >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


def build_source(cfg: DataConfig) -> TokenSource:
    """The token source ``cfg`` describes. Raises DataError (one line) on bad files or settings."""
    source = DataSource(cfg.source)
    if source == DataSource.synthetic:
        built: TokenSource = SyntheticSource(cfg)
    elif source == DataSource.memmap:
        built = load_memmap(cfg)
    else:
        built = load_text(cfg)
    if cfg.inject.enabled and built.vocab_size < cfg.inject.max_period + 2:
        raise DataError(f"data.inject.max_period={cfg.inject.max_period} needs a vocabulary of at "
                        f"least {cfg.inject.max_period + 2} tokens, the data has {built.vocab_size}")
    return built


# ============================================================================================
# proxy-prepare: text -> train.bin / val.bin / meta.json
# ============================================================================================
def prepare(input_path: str, out_dir: str, tokenizer: str = "byte", vocab_size: int = 4096,
            val_fraction: float = 0.05) -> dict:
    """Tokenize text once into the memmap layout; returns the meta.json contents."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in (0, 1)")
    if tokenizer not in ("byte", "bpe"):
        raise DataError(f"--tokenizer {tokenizer!r} must be byte or bpe")
    docs = read_documents(_existing(input_path))
    tok = make_tokenizer(tokenizer, docs, vocab_size)
    train, val = _split_tail(tok.encode(docs), val_fraction)
    if len(train) < 2:
        raise DataError(f"{input_path}: too little text to split ({len(train) + len(val)} tokens)")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    train.astype(_DTYPES[dtype]).tofile(out / "train.bin")
    val.astype(_DTYPES[dtype]).tofile(out / "val.bin")
    if isinstance(tok, BPETokenizer):
        tok.tokenizer.save(str(out / "tokenizer.json"))
    meta = {"vocab_size": tok.vocab_size, "dtype": dtype, "tokenizer": tok.name,
            "train_tokens": int(len(train)), "val_tokens": int(len(val)),
            "documents": len(docs), "source": str(input_path)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prepare_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="proxy-prepare",
        description="Tokenize .txt files into train.bin / val.bin / meta.json for data.source=memmap.")
    parser.add_argument("--input", required=True, help="a .txt file or a folder of them")
    parser.add_argument("--out", required=True, help="output folder (then data.path=<out>)")
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"])
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="tail held out for val")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens, "
          f"vocab {meta['vocab_size']} ({meta['tokenizer']}, {meta['dtype']})")
    return 0


if __name__ == "__main__":  # python -m proxy.data: the default synthetic language's figures
    print(json.dumps(build_source(DataConfig()).describe(), indent=2))
