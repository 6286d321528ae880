"""The token-source contract and the sources that read token arrays (memmapped ``.bin`` files).

Every source answers one question, ``batch(split, index, batch_size, seq_len, rank, world_size)``,
and the answer is a pure function of ``(data.seed, split, index)``: each row of a batch comes from
its own random generator keyed by ``(seed, split, index, global row)`` (:func:`row_generator`).
So resuming, rolling back or skipping S batches is index arithmetic, and with ``world_size``
ranks the global batch is the single-process batch of ``batch_size * world_size`` rows, rank r
holding rows ``[r * batch_size, (r + 1) * batch_size)``.

:class:`TokenSource` shapes rows into batches and applies the repeated n-gram injection and
filtering (proxy/data/ngrams.py) to train batches; subclasses supply the rows:
:class:`ArraySource` (here: memmap ``.bin`` files, and tokenized text from proxy/data/text.py)
and ``SyntheticSource`` (proxy/data/synthetic.py).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from proxy.config import DataConfig, FilterMode
from proxy.data import ngrams
from proxy.records import (
    DATA_DROPPED_ROWS,
    DATA_INJECTED_FRAC,
    DATA_INJECTED_ROWS,
    DATA_MASKED_TOKENS,
    TOKENIZER_FILE,
    atomic_write_text,
    read_json,
)

IGNORE_INDEX = -100
SPLITS = ("train", "val")

# Streams of per-row randomness. Injection has its own, so switching it on leaves every clean row
# exactly as it was: an injected run and its control see the same data everywhere else.
TOKENS_STREAM, INJECT_STREAM, LANGUAGE_STREAM, ENTROPY_STREAM = 0, 1, 2, 3
_SPLIT_CODE = {"train": 0, "val": 1}


class DataError(Exception):
    """Data that cannot be used: a missing or malformed file, or an impossible request."""


def row_generator(
    seed: int, split: str, index: int, row: int, attempt: int = 0, stream: int = TOKENS_STREAM
) -> np.random.Generator:
    """The random generator of one row of one batch; the whole key of its contents."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, row, attempt, stream])


def entropy(probs: np.ndarray) -> float:
    """Shannon entropy in nats of a probability vector (zeros ignored)."""
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


# ============================================================================================
# The contract
# ============================================================================================
@dataclass
class Batch:
    """A batch with what happened to it: the trainer needs only inputs and labels."""

    inputs: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where filtered
    injected: np.ndarray  # (B, T) bool: labels that were planted (before any filter ran)
    plants: list[ngrams.Plant] = field(default_factory=list)
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
    def _rows(self, split: str, index: int, rows: np.ndarray, length: int, attempt: int = 0) -> np.ndarray:
        """(len(rows), length) int64 tokens; row r a function of (seed, split, index, r, attempt)."""

    @abstractmethod
    def _describe(self) -> dict:
        """The source's own figures for ``describe()`` (name, sizes, entropies)."""

    def token_probabilities(self) -> Optional[np.ndarray]:
        """Each token id's share of the training data (exact where the source knows it), or None."""
        return None

    def save(self, run_dir: Path) -> list[str]:
        """Write what a run needs to read its checkpoints back (a trained tokenizer) into
        ``run_dir``; returns the file names written. Most sources need nothing."""
        return []

    def check_seq_len(self, seq_len: int) -> None:
        """DataError (one line) if no row of ``seq_len`` + 1 tokens can be cut from every split:
        asked before a run claims its directory, not found at its first batch. A source that
        generates its tokens (the synthetic language) has rows of any length."""
        return None

    # -- the contract ----------------------------------------------------------------------------
    def batch(
        self, split: str, index: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
    def sample(
        self, split: str, index: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
    ) -> Batch:
        """``batch`` with the planted runs and metrics kept (for tests and inspection)."""
        _check_request(split, index, batch_size, seq_len, rank, world_size)
        rows = np.arange(rank * batch_size, (rank + 1) * batch_size)
        tokens = self._rows(split, index, rows, seq_len + 1)
        planted = np.zeros(tokens.shape, dtype=bool)
        plants: list[ngrams.Plant] = []
        metrics: dict[str, float] = {}
        train = split == "train"

        inj = self.cfg.inject
        if inj.enabled and train:
            if ngrams.in_window(index, inj):
                plants = self._plan_injection(index, rows, tokens)
                planted = ngrams.apply_plants(tokens, plants, inj.repeats)
            metrics[DATA_INJECTED_FRAC] = float(planted[:, 1:].mean())
            metrics[DATA_INJECTED_ROWS] = float(len(plants))

        masked = np.zeros(tokens.shape, dtype=bool)
        flt = self.cfg.ngram_filter
        if flt.enabled and train:

            def redraw(dirty: np.ndarray, attempt: int) -> np.ndarray:
                return self._rows(split, index, rows[dirty], tokens.shape[1], attempt)

            tokens, masked, dropped = ngrams.filter_repeated(flt, tokens, redraw)
            metrics[DATA_MASKED_TOKENS] = float(masked[:, 1:].sum())
            if flt.mode == FilterMode.drop:
                metrics[DATA_DROPPED_ROWS] = float(dropped)

        inputs = torch.from_numpy(tokens[:, :-1].copy())
        labels = torch.from_numpy(np.where(masked[:, 1:], IGNORE_INDEX, tokens[:, 1:]))
        return Batch(inputs, labels, planted[:, 1:], plants, metrics)

    def _plan_injection(self, index: int, rows: np.ndarray, tokens: np.ndarray) -> list[ngrams.Plant]:
        """The planted runs of train batch ``index``; row r's plan comes from its own generator."""
        inj = self.cfg.inject
        if not ngrams.fitting_periods(inj, tokens.shape[1]):
            raise DataError(
                f"data.inject: {inj.repeats} repeats of a {inj.min_period}-token span need "
                f"{inj.min_period * inj.repeats} tokens but a row has seq_len+1={tokens.shape[1]}"
            )
        return ngrams.plan_injection(
            inj,
            tokens,
            self.vocab_size,
            lambda i: row_generator(self.cfg.seed, "train", index, int(rows[i]), stream=INJECT_STREAM),
        )


def _check_request(split: str, index: int, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
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


def _check_data(cfg: DataConfig) -> None:
    inj, flt = cfg.inject, cfg.ngram_filter
    checks = [
        (cfg.seed >= 0, f"data.seed={cfg.seed} must be >= 0"),
        (0.0 < cfg.val_fraction < 1.0, f"data.val_fraction={cfg.val_fraction} must be in (0, 1)"),
        (
            1 <= inj.min_period <= inj.max_period,
            f"data.inject: need 1 <= min_period <= max_period, got {inj.min_period}, {inj.max_period}",
        ),
        (inj.repeats >= 2, f"data.inject.repeats={inj.repeats} must be >= 2"),
        (inj.every >= 1, f"data.inject.every={inj.every} must be >= 1"),
        (0.0 <= inj.fraction <= 1.0, f"data.inject.fraction={inj.fraction} must be in [0, 1]"),
        (inj.start_step is None or inj.start_step >= 0, f"data.inject.start_step={inj.start_step} must be >= 0"),
        (
            inj.start_step is None or inj.end_step is None or inj.start_step < inj.end_step,
            f"data.inject.start_step={inj.start_step} must be < end_step={inj.end_step}",
        ),
        (
            1 <= flt.min_period <= flt.max_period,
            f"data.ngram_filter: need 1 <= min_period <= max_period, got {flt.min_period}, {flt.max_period}",
        ),
        (flt.min_repeats >= 2, f"data.ngram_filter.min_repeats={flt.min_repeats} must be >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


# ============================================================================================
# Token arrays: memmapped .bin files (and tokenized text, proxy/data/text.py)
# ============================================================================================
class ArraySource(TokenSource):
    """Random windows of a token array per split: memmapped ``.bin`` files or tokenized text.
    ``tokenizer_json``: the tokenizers JSON that made the ids (text with BPE), saved in the run dir."""

    def __init__(
        self,
        cfg: DataConfig,
        name: str,
        train: np.ndarray,
        val: np.ndarray,
        vocab_size: int,
        details: dict,
        tokenizer_json: Optional[str] = None,
    ):
        super().__init__(cfg)
        self.name, self.vocab_size, self.details = name, vocab_size, details
        self.tokenizer_json = tokenizer_json
        self.splits = {"train": train, "val": val}
        for split, arr in self.splits.items():
            if len(arr) < 2:
                raise DataError(f"{cfg.path}: the {split} split has {len(arr)} tokens; need at least 2")

    def check_seq_len(self, seq_len: int) -> None:
        for split, data in self.splits.items():
            if seq_len + 1 > len(data):
                raise DataError(
                    f"{self.cfg.path}: the {split} split has {len(data)} tokens, fewer than seq_len+1={seq_len + 1}"
                )

    def _rows(self, split: str, index: int, rows: np.ndarray, length: int, attempt: int = 0) -> np.ndarray:
        data = self.splits[split]
        self.check_seq_len(length - 1)
        out = np.empty((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            start = row_generator(self.cfg.seed, split, index, int(r), attempt).integers(0, len(data) - length + 1)
            out[i] = data[start : start + length]
        return out

    def token_probabilities(self) -> np.ndarray:
        """Counted over (the first 4M tokens of) the train split."""
        sample = np.asarray(self.splits["train"][: 1 << 22], dtype=np.int64)
        counts = np.bincount(sample, minlength=self.vocab_size).astype(np.float64)
        return counts / counts.sum()

    def save(self, run_dir: Path) -> list[str]:
        """The tokenizer as ``<run_dir>/tokenizer.json`` (unchanged if it is already there)."""
        if self.tokenizer_json is None:
            return []
        path = Path(run_dir) / TOKENIZER_FILE
        if not (path.is_file() and path.read_text() == self.tokenizer_json):
            atomic_write_text(path, self.tokenizer_json)
        return [TOKENIZER_FILE]

    def _describe(self) -> dict:
        train = self.splits["train"]
        sample = np.asarray(train[: 1 << 22], dtype=np.int64)
        counts = np.bincount(sample, minlength=self.vocab_size)
        return {
            **self.details,
            "path": str(self.cfg.path),
            "train_tokens": int(len(train)),
            "val_tokens": int(len(self.splits["val"])),
            "unigram_entropy": entropy(counts / counts.sum()),
            "units": "nats/token",
        }


def split_tail(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(tokens) - max(1, int(round(len(tokens) * val_fraction)))
    return tokens[:cut], tokens[cut:]


TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
AUTO_DTYPE = "auto"  # data.dtype: meta.json's dtype, else uint16
DEFAULT_DTYPE = "uint16"
META_FILE = "meta.json"

# what text looks like (shared with proxy/data/text.py): no NUL byte, and at most CONTROL_LIMIT of
# its bytes control characters other than the ones text holds
CONTROL_LIMIT = 0.05
TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")
SNIFF_BYTES = 1 << 16  # how much of a .bin is looked at to tell text from token ids


def looks_like_text(head: bytes) -> bool:
    """Whether ``head`` reads as UTF-8 text. Token ids never do: a uint32 id below 2^24 has a
    NUL byte, and a uint16 file of a real vocabulary holds ids below 256 (punctuation, bytes)
    and ids whose bytes are not valid UTF-8."""
    if not head or b"\x00" in head:
        return False
    data = np.frombuffer(head, dtype=np.uint8)
    control = ((data < 32) | (data == 127)) & ~np.isin(data, list(TEXT_CONTROLS))
    if control.mean() > CONTROL_LIMIT:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut by the end of the sample still counts
        return exc.reason == "unexpected end of data" and exc.start >= len(head) - 3
    return True


def resolve_dtype(requested: str, meta: dict, meta_path: Path) -> str:
    """The token dtype: meta.json's where it has one, ``data.dtype`` where it has none. An
    explicit ``data.dtype`` that disagrees with meta.json is refused, naming both."""
    stored = meta.get("dtype")
    if stored is not None and stored not in TOKEN_DTYPES:
        raise DataError(f"{meta_path}: dtype {stored!r} must be uint16 or uint32")
    if requested == AUTO_DTYPE:
        return stored or DEFAULT_DTYPE
    if requested not in TOKEN_DTYPES:
        raise DataError(f"data.dtype={requested!r} must be auto, uint16 or uint32")
    if stored is not None and stored != requested:
        raise DataError(
            f"data.dtype={requested} disagrees with {meta_path} (dtype {stored}): drop the "
            "override (meta.json decides) or fix meta.json"
        )
    return requested


def load_memmap(cfg: DataConfig) -> ArraySource:
    """``data.path``: a .bin file (val = its tail) or a folder with train.bin [and val.bin]."""
    path = existing_path(cfg.path)
    folder = path if path.is_dir() else path.parent
    meta = _read_meta(folder / META_FILE)
    dtype = resolve_dtype(cfg.dtype, meta, folder / META_FILE)
    train: np.ndarray  # a memmap, or a view of one (split_tail)
    val: np.ndarray
    if path.is_dir():
        train_file = path / "train.bin"
        if not train_file.is_file():
            hint = "; it holds .txt files: use data.source=text, or proxy-prepare" if any(path.glob("*.txt")) else ""
            raise DataError(f"{path}: folder has no train.bin{hint}")
        train = _open_bin(train_file, dtype)
        val_file = path / "val.bin"
        if val_file.is_file():
            val, val_source = _open_bin(val_file, dtype), "val.bin"
        else:
            train, val = split_tail(train, cfg.val_fraction)
            val_source = f"tail {cfg.val_fraction:g} of train.bin"
    else:
        train, val = split_tail(_open_bin(path, dtype), cfg.val_fraction)
        val_source = f"tail {cfg.val_fraction:g} of {path.name}"
    if "vocab_size" in meta:
        vocab = int(meta["vocab_size"])
    else:
        vocab = max(_max_token(f, dtype) for f in _bin_files(path)) + 1
    return ArraySource(cfg, "memmap", train, val, vocab, {"dtype": dtype, "val_source": val_source})


def existing_path(path: Optional[str], key: str = "data.path") -> Path:
    """``path`` as an existing file or folder; DataError naming ``key`` (the config key or the
    command-line flag it came from) otherwise."""
    if not path:
        raise DataError(f"{key} is not set")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key}={path}: no such file or folder")
    return p


def _read_meta(path: Path) -> dict:
    if not path.is_file() and not path.is_symlink():
        return {}
    try:
        return read_json(path, limit=1 << 20)
    except (OSError, ValueError) as exc:  # StoredFileError, UnsafePathError: one line naming the file
        raise DataError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def _open_bin(path: Path, dtype: str) -> np.memmap:
    size = path.stat().st_size
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    if size == 0:
        raise DataError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if looks_like_text(head):
        raise DataError(_text_not_tokens(path, head, dtype))
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


def _text_not_tokens(path: Path, head: bytes, dtype: str) -> str:
    """The one line refusing a text file given as token ids, with the ids it would have read."""
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    ids = np.frombuffer(head[: len(head) - len(head) % itemsize], dtype=TOKEN_DTYPES[dtype])
    seen = f" (as {dtype} ids {int(ids.min())}..{int(ids.max())})" if len(ids) else ""
    return (
        f"{path}: this is text, not {dtype} token ids{seen}; train on it with data.source=text, "
        f"or tokenize it once with proxy-prepare --input {path} --out DIR and set data.path=DIR"
    )


def _bin_files(path: Path) -> list[Path]:
    return [f for f in (path / "train.bin", path / "val.bin") if f.is_file()] if path.is_dir() else [path]


@functools.lru_cache(maxsize=32)
def _max_token_cached(path: str, size: int, mtime_ns: int, dtype: str) -> int:
    data = np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")
    chunk = 1 << 24
    return int(max(data[i : i + chunk].max() for i in range(0, len(data), chunk)))


def _max_token(path: Path, dtype: str) -> int:
    """The largest id in a .bin (scanned once per file version; meta.json makes it unnecessary)."""
    stat = path.stat()
    return _max_token_cached(str(path), stat.st_size, stat.st_mtime_ns, dtype)
