"""Token sources: a synthetic language (the default), memmapped token files, plain text; plus the
repeated n-gram injection and filtering that OLMo 2 found behind grad-norm spikes.

    sources.py    the contract (``batch(split, index, ...)``, a pure function of the index),
                  :class:`TokenSource`, memmapped ``.bin`` files (nanoGPT's layout)
    synthetic.py  a Zipfian sparse hidden Markov model whose Bayes-optimal loss is known exactly
    text.py       ``.txt`` tokenized at load time (byte or BPE), and ``proxy-prepare``
    ngrams.py     find / plant / filter runs of a repeated 1-13 token span

Train batches may be perturbed (``data.inject``) and/or filtered (``data.ngram_filter``); the val
stream is never touched, so val losses of filtered and unfiltered runs compare directly.
:func:`build_source` is the one constructor the trainer calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from proxy.config import DataConfig, DataSource
from proxy.data.ngrams import Plant, find_repeated_ngrams
from proxy.data.sources import (
    IGNORE_INDEX,
    SPLITS,
    ArraySource,
    Batch,
    DataError,
    TokenSource,
    load_memmap,
    row_generator,
)
from proxy.data.synthetic import (
    HMM,
    LanguageEntropy,
    SyntheticSource,
    build_hmm,
    hmm_token_losses,
    language_entropy,
    sample_hmm,
    zipf_weights,
)
from proxy.data.text import load_text, prepare, prepare_main


def build_source(cfg: DataConfig, run_dir: Optional[Path] = None) -> TokenSource:
    """The token source ``cfg`` describes. Raises DataError (one line) on bad files or settings.

    ``run_dir``: an existing run whose files the source reuses (its tokenizer.json: a resume or a
    replay must see the ids the run saw). ``source.save(run_dir)`` writes them for a new run."""
    source = DataSource(cfg.source)
    if source == DataSource.synthetic:
        built: TokenSource = SyntheticSource(cfg)
    elif source == DataSource.memmap:
        built = load_memmap(cfg)
    else:
        built = load_text(cfg, run_dir)
    if cfg.inject.enabled and built.vocab_size < cfg.inject.max_period + 2:
        raise DataError(
            f"data.inject.max_period={cfg.inject.max_period} needs a vocabulary of at "
            f"least {cfg.inject.max_period + 2} tokens, the data has {built.vocab_size}"
        )
    return built


__all__ = [
    "HMM",
    "IGNORE_INDEX",
    "SPLITS",
    "ArraySource",
    "Batch",
    "DataError",
    "LanguageEntropy",
    "Plant",
    "SyntheticSource",
    "TokenSource",
    "build_hmm",
    "build_source",
    "find_repeated_ngrams",
    "hmm_token_losses",
    "language_entropy",
    "prepare",
    "prepare_main",
    "row_generator",
    "sample_hmm",
    "zipf_weights",
]
