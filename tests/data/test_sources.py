"""Token sources (proxy/data/): determinism, sharding, the synthetic language's entropy, memmap
and text loading, proxy-prepare, and one-line errors on bad files."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from proxy.config import DataConfig, DataSource, SyntheticConfig
from proxy.data import (
    DataError,
    build_hmm,
    build_source,
    hmm_token_losses,
    language_entropy,
    prepare_main,
    sample_hmm,
)


# --------------------------------------------------------------------------------------------
# Contract: deterministic, next-token labels, sharded
# --------------------------------------------------------------------------------------------
def test_batches_are_pure_functions_of_seed_split_index():
    a, b = build_source(DataConfig()), build_source(DataConfig())
    x, y = a.batch("train", 7, 4, 32)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next tokens
    a.batch("train", 3, 4, 32)  # what came before does not matter
    assert torch.equal(a.batch("train", 7, 4, 32)[0], x)
    assert torch.equal(b.batch("train", 7, 4, 32)[0], x)
    assert not torch.equal(a.batch("train", 8, 4, 32)[0], x)
    assert not torch.equal(a.batch("val", 7, 4, 32)[0], x)
    other_seed = build_source(DataConfig(seed=1))
    assert not torch.equal(other_seed.batch("train", 7, 4, 32)[0], x)


def test_ranks_split_the_global_batch_without_overlap(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16) % 997
    tokens.tofile(tmp_path / "tokens.bin")
    for cfg in (DataConfig(), DataConfig(source=DataSource.memmap, path=str(tmp_path / "tokens.bin"))):
        source = build_source(cfg)
        for split in ("train", "val"):
            x, y = source.batch(split, 4, 8, 16)
            parts = [source.batch(split, 4, 2, 16, rank=r, world_size=4) for r in range(4)]
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert len({tuple(row.tolist()) for row in x}) == 8  # distinct rows


def test_bad_requests_are_data_errors():
    source = build_source(DataConfig())
    with pytest.raises(DataError, match="split='test'"):
        source.batch("test", 0, 2, 8)
    with pytest.raises(DataError, match="rank=2"):
        source.batch("train", 0, 2, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="index=-1"):
        source.batch("train", -1, 2, 8)


# --------------------------------------------------------------------------------------------
# The synthetic language
# --------------------------------------------------------------------------------------------
def test_optimal_loss_is_far_below_unigram_entropy():
    cfg = SyntheticConfig()
    e = language_entropy(cfg)
    # the documented margins (README): >= 1 nat between unigram and optimal, context beyond one
    # token is worth something, and the estimate is precise
    assert e.unigram_entropy - e.optimal_loss >= 1.0
    assert e.unigram_entropy > e.bigram_entropy > e.optimal_loss + 0.1
    assert e.optimal_loss_stderr < 0.02
    assert abs(e.entropy_rate - e.optimal_loss) < 0.05  # the state is found within a few tokens
    info = build_source(DataConfig(synthetic=cfg)).describe()
    assert info["optimal_loss"] == e.optimal_loss and info["vocab_size"] == cfg.vocab_size


def test_forward_algorithm_matches_brute_force():
    """On a tiny HMM, -log p from the forward algorithm equals the sum over all state paths."""
    cfg = SyntheticConfig(
        seed=3, vocab_size=4, n_states=3, emissions_per_state=2, transitions_per_state=2, zipf_exponent=1.0
    )
    hmm = build_hmm(cfg)
    length = 4
    sequences = np.array(list(itertools.product(range(4), repeat=length)))
    brute = np.zeros(len(sequences))
    for path in itertools.product(range(3), repeat=length):
        p = hmm.stationary[path[0]] * np.ones(len(sequences))
        for t, s in enumerate(path):
            if t:
                p *= hmm.transition[path[t - 1], s]
            p *= hmm.emission[s, sequences[:, t]]
        brute += p
    possible = brute > 0  # the forward algorithm scores sequences the HMM can produce
    assert 1 < possible.sum() < len(sequences)
    model = np.exp(-hmm_token_losses(hmm, sequences[possible]).sum(-1))
    np.testing.assert_allclose(model, brute[possible], rtol=1e-10)
    assert model.sum() == pytest.approx(1.0)


def test_sampler_draws_from_the_hmm():
    cfg = SyntheticConfig(n_states=8, vocab_size=32, emissions_per_state=6, transitions_per_state=3)
    hmm = build_hmm(cfg)
    tokens = sample_hmm(hmm, np.random.default_rng(0).random((400, 2, 100)))
    counts = np.bincount(tokens.ravel(), minlength=32) / tokens.size
    assert 0.5 * np.abs(counts - hmm.stationary @ hmm.emission).sum() < 0.02
    # every token of the support is reachable, nothing outside it is drawn
    assert set(np.unique(tokens)) == set(np.flatnonzero(hmm.stationary @ hmm.emission))


def test_a_deterministic_sublanguage_mixes_in_on_tokens_of_its_own():
    """data.synthetic.sublanguage_fraction: that share of rows walks a fixed cycle through token
    ids after the HMM's; the other rows are the plain language's bit for bit, and the figures
    scale by the HMM's share (the sub-language costs nothing once its first token is seen)."""
    plain_cfg = SyntheticConfig()
    mixed_cfg = SyntheticConfig(sublanguage_fraction=0.25, sublanguage_tokens=16)
    plain, mixed = build_source(DataConfig(synthetic=plain_cfg)), build_source(DataConfig(synthetic=mixed_cfg))
    assert mixed.vocab_size == 512 + 16 and plain.vocab_size == 512
    x_plain, _ = plain.batch("train", 3, 64, 32)
    x_mixed, y_mixed = mixed.batch("train", 3, 64, 32)
    sub = (x_mixed >= 512).any(1)
    assert 8 <= int(sub.sum()) <= 24  # ~25 % of 64 rows
    assert torch.equal(x_mixed[~sub], x_plain[~sub])
    assert bool((x_mixed[sub] >= 512).all())  # a sub-language row is all its own tokens
    # the successor of every sub-language token is one and the same token (a cycle)
    pairs = {(int(a), int(b)) for row_x, row_y in zip(x_mixed[sub], y_mixed[sub]) for a, b in zip(row_x, row_y)}
    successor = dict(pairs)
    assert len(successor) == len(pairs) and sorted(successor) == sorted(successor.values())
    assert len(successor) == 16
    e, m = language_entropy(plain_cfg), language_entropy(mixed_cfg)
    assert m.optimal_loss == pytest.approx(0.75 * e.optimal_loss)
    assert m.bigram_entropy == pytest.approx(0.75 * e.bigram_entropy)
    probs = mixed.token_probabilities()
    assert probs.shape == (528,) and probs.sum() == pytest.approx(1.0)
    # the unigram entropy of the mixed token distribution, computed directly
    seen = probs[probs > 0]
    assert m.unigram_entropy == pytest.approx(float(-(seen * np.log(seen)).sum()))
    with pytest.raises(DataError, match="sublanguage_fraction=1.0 must be in"):
        build_source(DataConfig(synthetic=SyntheticConfig(sublanguage_fraction=1.0)))


def test_rare_tokens_inside_the_hmm_keep_its_figures_exact():
    """data.synthetic.rare_rate: every state emits, at that rate, one of rare_tokens ids of their own
    (after the HMM's, before a sub-language's). On the deterministic language the Bayes loss is the
    rare draws' alone: p ln(k / p) - (1 - p) ln(1 - p) per token, computed by the HMM machinery."""
    p, k = 0.01, 16
    det = SyntheticConfig(emissions_per_state=1, transitions_per_state=1, rare_rate=p, rare_tokens=k)
    src = build_source(DataConfig(synthetic=det))
    assert src.vocab_size == 512 + k
    x, _ = src.batch("train", 0, 64, 128)
    rare = x >= 512
    assert 0.005 < float(rare.float().mean()) < 0.02 and int(x.max()) < 512 + k
    e = language_entropy(det)
    assert e.entropy_rate == pytest.approx(p * math.log(k / p) - (1 - p) * math.log(1 - p), rel=0.05)
    probs = src.token_probabilities()
    assert probs.shape == (512 + k,) and probs.sum() == pytest.approx(1.0)
    assert probs[512:] == pytest.approx(np.full(k, p / k))
    # with a sub-language as well, its tokens come after the rare ones
    both = build_source(DataConfig(synthetic=SyntheticConfig(rare_rate=p, rare_tokens=k, sublanguage_fraction=0.5)))
    assert both.vocab_size == 512 + k + 64
    xs, _ = both.batch("train", 0, 32, 32)
    sub_rows = (xs >= 512 + k).all(1)
    assert bool(sub_rows.any()) and bool((xs[~sub_rows] < 512 + k).all())
    # off by default: the plain language is unchanged
    assert build_source(DataConfig()).vocab_size == 512
    with pytest.raises(DataError, match="rare_rate=1.0 must be in"):
        build_source(DataConfig(synthetic=SyntheticConfig(rare_rate=1.0)))


def test_bad_synthetic_settings_are_one_line_errors():
    with pytest.raises(DataError, match="data.synthetic.transitions_per_state=9 must be in"):
        build_source(DataConfig(synthetic=SyntheticConfig(n_states=8, transitions_per_state=9)))
    with pytest.raises(DataError, match="data.val_fraction"):
        build_source(DataConfig(val_fraction=1.5))


# --------------------------------------------------------------------------------------------
# memmap
# --------------------------------------------------------------------------------------------
def is_window_of(row: np.ndarray, data: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(data, len(row))
    return bool((windows == row).all(-1).any())


def test_memmap_folder_with_meta(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 70_000, 3000).astype(np.uint32)
    val = rng.integers(0, 70_000, 500).astype(np.uint32)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 80_000, "dtype": "uint32"}))
    source = build_source(DataConfig(source=DataSource.memmap, path=str(tmp_path)))
    assert source.vocab_size == 80_000
    x, y = source.batch("train", 0, 4, 64)
    full = torch.cat([x, y[:, -1:]], 1).numpy()
    assert all(is_window_of(row, train) for row in full)
    xv, _ = source.batch("val", 0, 4, 64)
    assert all(is_window_of(row, val) for row in xv.numpy())
    info = source.describe()
    assert info["train_tokens"] == 3000 and info["val_tokens"] == 500 and info["dtype"] == "uint32"


def test_memmap_single_file_holds_out_its_tail(tmp_path):
    data = (np.arange(2000) % 300).astype(np.uint16)
    data[-100:] = 299  # the tail is recognisable
    data.tofile(tmp_path / "corpus.bin")
    source = build_source(DataConfig(source=DataSource.memmap, path=str(tmp_path / "corpus.bin"), val_fraction=0.05))
    assert source.vocab_size == 300  # max id + 1 without meta.json
    xv, _ = source.batch("val", 0, 3, 50)
    assert (xv == 299).all()
    x, _ = source.batch("train", 0, 8, 50)
    assert all(is_window_of(row, data[:1900]) for row in x.numpy())


@pytest.mark.parametrize(
    "setup, path, message",
    [
        (lambda d: None, "nothing.bin", "no such file or folder"),
        (lambda d: (d / "empty.bin").write_bytes(b""), "empty.bin", "file is empty"),
        (lambda d: (d / "odd.bin").write_bytes(b"\x01\x02\x03"), "odd.bin", "not a whole number of uint16"),
        (lambda d: (d / "sub").mkdir(), "sub", "folder has no train.bin"),
        (
            lambda d: (
                (d / "m").mkdir(),
                (d / "m" / "train.bin").write_bytes(b"\0" * 64),
                (d / "m" / "meta.json").write_text("{oops"),
            ),
            "m",
            "not valid JSON",
        ),
    ],
)
def test_memmap_bad_files_are_one_line_errors(tmp_path, setup, path, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        build_source(DataConfig(source=DataSource.memmap, path=str(tmp_path / path)))
    assert "\n" not in str(err.value)


def test_sequence_longer_than_the_data_is_a_data_error(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "small.bin")
    source = build_source(DataConfig(source=DataSource.memmap, path=str(tmp_path / "small.bin")))
    with pytest.raises(DataError, match="fewer than seq_len\\+1=129"):
        source.batch("train", 0, 1, 128)


# --------------------------------------------------------------------------------------------
# text and proxy-prepare
# --------------------------------------------------------------------------------------------
TEXT = "".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}.\n" for i in range(200))


def test_text_source_byte_level(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text("second document\n" * 20)
    source = build_source(DataConfig(source=DataSource.text, path=str(tmp_path)))
    assert source.vocab_size == 256 and source.describe()["documents"] == 2
    x, y = source.batch("train", 0, 4, 32)
    stream = np.frombuffer(TEXT.encode() + b"\0" + b"second document\n" * 20, dtype=np.uint8)
    assert all(is_window_of(row, stream) for row in torch.cat([x, y[:, -1:]], 1).numpy())


def test_text_source_bpe(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    source = build_source(
        DataConfig(source=DataSource.text, path=str(tmp_path / "a.txt"), tokenizer="bpe", bpe_vocab_size=300)
    )
    assert 257 <= source.vocab_size <= 300
    x, _ = source.batch("train", 0, 2, 16)
    assert int(x.max()) < source.vocab_size


def test_prepare_then_load_as_memmap(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    for tokenizer in ("byte", "bpe"):
        out = tmp_path / tokenizer
        code = prepare_main(
            [
                "--input",
                str(tmp_path / "corpus.txt"),
                "--out",
                str(out),
                "--tokenizer",
                tokenizer,
                "--vocab-size",
                "320",
            ]
        )
        assert code == 0
        meta = json.loads((out / "meta.json").read_text())
        train = np.fromfile(out / "train.bin", dtype=np.uint16)
        assert meta["train_tokens"] == len(train) and meta["val_tokens"] > 0
        source = build_source(DataConfig(source=DataSource.memmap, path=str(out)))
        assert source.vocab_size == meta["vocab_size"]
        source.batch("train", 0, 2, 32)
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    byte_meta = json.loads((tmp_path / "byte" / "meta.json").read_text())
    assert byte_meta["train_tokens"] + byte_meta["val_tokens"] == len(TEXT)  # one byte, one token
    assert byte_meta["val_tokens"] == pytest.approx(0.05 * len(TEXT), abs=1)
    # the saved BPE tokenizer is usable by the text source
    text = build_source(
        DataConfig(
            source=DataSource.text,
            path=str(tmp_path / "corpus.txt"),
            tokenizer=str(tmp_path / "bpe" / "tokenizer.json"),
        )
    )
    assert text.vocab_size == json.loads((tmp_path / "bpe" / "meta.json").read_text())["vocab_size"]
    assert "wrote" in capsys.readouterr().out


def test_prepare_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert prepare_main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or folder" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert prepare_main(["--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no .txt files" in capsys.readouterr().err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfeabc")
    assert prepare_main(["--input", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o"), "--tokenizer", "bpe"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
