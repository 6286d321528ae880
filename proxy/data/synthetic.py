"""The built-in language: a seeded Zipfian sparse hidden Markov model, no download needed.

Each of ``n_states`` states emits one of ``emissions_per_state`` tokens and moves to one of
``transitions_per_state`` successors, both with Zipfian weights. Because it is an HMM, the
Bayes-optimal loss is computed exactly (the forward algorithm), so "how far from perfect" is a
number, not a guess: ``python -m proxy.data`` prints the default language's figures.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from proxy.config import DataConfig, SyntheticConfig
from proxy.data.sources import ENTROPY_STREAM, LANGUAGE_STREAM, DataError, TokenSource, entropy, row_generator


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
    rng = np.random.default_rng([cfg.seed, LANGUAGE_STREAM])
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
    if cfg.rare_rate > 0:  # after every draw: the language's structure is the plain one's
        emitted, emit_p = _with_rare_tokens(emitted, emit_p, V, cfg.rare_tokens, cfg.rare_rate)
        V += cfg.rare_tokens
    emission = np.zeros((S, V))
    np.put_along_axis(emission, emitted, np.broadcast_to(emit_p, emitted.shape), axis=1)
    return HMM(_stationary(transition), successors, _cdf(trans_p), emitted, _cdf(emit_p), transition, emission)


def _with_rare_tokens(
    emitted: np.ndarray, emit_p: np.ndarray, vocab_size: int, k: int, rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Every state's emissions, by rank, followed by ``k`` rare token ids of their own (vocab_size
    .. vocab_size + k - 1) at ``rate / k`` each, its own tokens scaled by 1 - rate: the ranks'
    weights stay shared by all states, as the sampler needs."""
    rare = np.broadcast_to(vocab_size + np.arange(k), (emitted.shape[0], k))
    return np.concatenate([emitted, rare], axis=1), np.concatenate([(1 - rate) * emit_p, np.full(k, rate / k)])


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


def language_entropy(cfg: SyntheticConfig, seq_len: int = 128, n_sequences: int = 512) -> LanguageEntropy:
    """Entropy figures of the synthetic language ``cfg`` (cached; ~0.1 s at the defaults), the
    deterministic sub-language included where it is mixed in."""
    figures = _language_entropy(_synthetic_key(cfg), seq_len, n_sequences)
    sub = Sublanguage.of(cfg)
    return sub.mixed(figures) if sub is not None else figures


@functools.lru_cache(maxsize=16)
def _language_entropy(key: tuple, seq_len: int, n_sequences: int) -> LanguageEntropy:
    hmm = _hmm_from_key(key)
    unigram = hmm.stationary @ hmm.emission
    # p(a, b) for consecutive tokens, summed over the hidden states behind each
    pair = hmm.emission.T @ (hmm.stationary[:, None] * hmm.transition) @ hmm.emission
    bigram = entropy(pair) - entropy(unigram)

    rng = np.random.default_rng([key[0], ENTROPY_STREAM])  # key[0] is the language seed
    tokens = sample_hmm(hmm, rng.random((n_sequences, 2, 2 * seq_len + 1)))
    losses = hmm_token_losses(hmm, tokens)
    per_sequence = losses[:, 1 : seq_len + 1].mean(-1)  # label positions of a seq_len window
    return LanguageEntropy(
        unigram_entropy=entropy(unigram),
        bigram_entropy=bigram,
        optimal_loss=float(per_sequence.mean()),
        optimal_loss_stderr=float(per_sequence.std(ddof=1) / math.sqrt(n_sequences)),
        entropy_rate=float(losses[:, seq_len + 1 :].mean()),
        seq_len=seq_len,
        n_sequences=n_sequences,
    )


_SYNTHETIC_FIELDS = (
    "seed",
    "vocab_size",
    "n_states",
    "zipf_exponent",
    "emissions_per_state",
    "transitions_per_state",
    "rare_rate",
    "rare_tokens",
)


def _synthetic_key(cfg: SyntheticConfig) -> tuple:
    return tuple(getattr(cfg, name) for name in _SYNTHETIC_FIELDS)


@functools.lru_cache(maxsize=16)
def _hmm_from_key(key: tuple) -> HMM:
    return build_hmm(SyntheticConfig(**dict(zip(_SYNTHETIC_FIELDS, key))))


def hmm_vocab(cfg: SyntheticConfig) -> int:
    """The HMM's tokens: vocab_size, and its rare tokens when it emits them."""
    return cfg.vocab_size + (cfg.rare_tokens if cfg.rare_rate > 0 else 0)


def language_vocab(cfg: SyntheticConfig) -> int:
    """The language's vocabulary: the HMM's tokens (rare ones included), then the sub-language's
    own when it is mixed in."""
    return hmm_vocab(cfg) + (cfg.sublanguage_tokens if cfg.sublanguage_fraction > 0 else 0)


@dataclass(frozen=True)
class Sublanguage:
    """A deterministic language on token ids of its own: a fixed cycle through ``cycle`` (a seeded
    permutation of the k ids after the HMM's), entered at a random point. Its first
    token names the row's language and its place in the cycle, so every later token is certain
    (Bayes loss 0): gradients from these rows vanish as the model learns them, while the rest of
    the loss stays at the HMM's level."""

    cycle: np.ndarray  # (k,) token ids
    fraction: float  # share of rows drawn from it

    @classmethod
    def of(cls, cfg: SyntheticConfig) -> Optional[Sublanguage]:
        if cfg.sublanguage_fraction <= 0:
            return None
        rng = np.random.default_rng([cfg.seed, LANGUAGE_STREAM, 1])
        return cls(hmm_vocab(cfg) + rng.permutation(cfg.sublanguage_tokens), cfg.sublanguage_fraction)

    def mix_into(self, tokens: np.ndarray, generators: list[np.random.Generator]) -> None:
        """Replace, in place, the rows whose own generator draws below ``fraction`` (drawn after the
        HMM's uniforms, so the other rows are the plain language's, bit for bit)."""
        k, length = self.cycle.size, tokens.shape[1]
        for i, g in enumerate(generators):
            chosen, start = g.random() < self.fraction, int(g.integers(k))
            if chosen:
                tokens[i] = self.cycle[(start + np.arange(length)) % k]

    def mixed(self, e: LanguageEntropy) -> LanguageEntropy:
        """The mixture's figures from the HMM's: a row's first token tells the languages apart, and
        the sub-language's later tokens are certain, so the conditional entropies (bigram, Bayes
        loss, rate) scale by the HMM's share; the unigram entropy gains the mixing entropy and the
        sub-language's ln k."""
        f, k = self.fraction, self.cycle.size
        mixing = -(f * math.log(f) + (1 - f) * math.log(1 - f))
        return LanguageEntropy(
            unigram_entropy=mixing + (1 - f) * e.unigram_entropy + f * math.log(k),
            bigram_entropy=(1 - f) * e.bigram_entropy,
            optimal_loss=(1 - f) * e.optimal_loss,
            optimal_loss_stderr=(1 - f) * e.optimal_loss_stderr,
            entropy_rate=(1 - f) * e.entropy_rate,
            seq_len=e.seq_len,
            n_sequences=e.n_sequences,
        )


def _check_synthetic(cfg: SyntheticConfig) -> None:
    checks = [
        (
            0 <= cfg.sublanguage_fraction < 1,
            f"data.synthetic.sublanguage_fraction={cfg.sublanguage_fraction} must be in [0, 1)",
        ),
        (
            cfg.sublanguage_tokens >= 2,
            f"data.synthetic.sublanguage_tokens={cfg.sublanguage_tokens} must be >= 2",
        ),
        (0 <= cfg.rare_rate < 1, f"data.synthetic.rare_rate={cfg.rare_rate} must be in [0, 1)"),
        (cfg.rare_tokens >= 1, f"data.synthetic.rare_tokens={cfg.rare_tokens} must be >= 1"),
        (cfg.seed >= 0, f"data.synthetic.seed={cfg.seed} must be >= 0"),
        (cfg.vocab_size >= 2, f"data.synthetic.vocab_size={cfg.vocab_size} must be >= 2"),
        (cfg.n_states >= 2, f"data.synthetic.n_states={cfg.n_states} must be >= 2"),
        (cfg.zipf_exponent >= 0, f"data.synthetic.zipf_exponent={cfg.zipf_exponent} must be >= 0"),
        (
            1 <= cfg.emissions_per_state <= cfg.vocab_size,
            f"data.synthetic.emissions_per_state={cfg.emissions_per_state} must be in [1, vocab_size={cfg.vocab_size}]",
        ),
        (
            1 <= cfg.transitions_per_state <= cfg.n_states,
            f"data.synthetic.transitions_per_state={cfg.transitions_per_state} must be in [1, n_states={cfg.n_states}]",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


class SyntheticSource(TokenSource):
    """Rows sampled on the fly from the synthetic HMM: an endless stream, so val is held out by
    construction (a different key), and no two batches repeat."""

    name = "synthetic-hmm"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        _check_synthetic(cfg.synthetic)
        self.hmm = _hmm_from_key(_synthetic_key(cfg.synthetic))
        self.sublanguage = Sublanguage.of(cfg.synthetic)
        self.vocab_size = language_vocab(cfg.synthetic)

    def _rows(self, split: str, index: int, rows: np.ndarray, length: int, attempt: int = 0) -> np.ndarray:
        generators = [row_generator(self.cfg.seed, split, index, int(r), attempt) for r in rows]
        tokens = sample_hmm(self.hmm, np.stack([g.random((2, length)) for g in generators]))
        if self.sublanguage is not None:
            self.sublanguage.mix_into(tokens, generators)
        return tokens

    def token_probabilities(self) -> np.ndarray:
        """Exact: the stationary state distribution through the emission table (and the
        sub-language's tokens, uniform over its cycle, at its share)."""
        probs = self.hmm.stationary @ self.hmm.emission
        if self.sublanguage is None:
            return probs
        f, k = self.sublanguage.fraction, self.sublanguage.cycle.size
        return np.concatenate([(1 - f) * probs, np.full(k, f / k)])

    def _describe(self) -> dict:
        s = self.cfg.synthetic
        info = {
            name: getattr(s, name)
            for name in _SYNTHETIC_FIELDS
            if name not in ("vocab_size", "rare_rate", "rare_tokens")
        }
        if s.rare_rate > 0:
            info["rare_rate"], info["rare_tokens"] = s.rare_rate, s.rare_tokens
        info["language_seed"] = info.pop("seed")
        if self.sublanguage is not None:
            info["sublanguage_fraction"] = s.sublanguage_fraction
            info["sublanguage_tokens"] = s.sublanguage_tokens
        info.update(language_entropy(s).as_dict())
        info["units"] = "nats/token"
        return info
