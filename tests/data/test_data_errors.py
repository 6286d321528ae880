"""Wrong data does not pass silently: text given as token ids, a data.dtype that disagrees with
meta.json, a trained tokenizer kept with the run (and read back on resume and in replays),
proxy-prepare naming its own flag."""

import json
import types

import numpy as np
import pytest

from proxy.config import Config, DataConfig, DataSource, as_dict, to_config
from proxy.data import DataError, build_source, prepare_main
from proxy.data.sources import looks_like_text
from proxy.data.text import BPETokenizer
from proxy.forensics.replay import kit_run_dir
from proxy.records import TOKENIZER_FILE
from proxy.train import train

TEXT = "".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}.\n" for i in range(200))


def memmap(path, **kw) -> DataConfig:
    return DataConfig(source=DataSource.memmap, path=str(path), **kw)


# --------------------------------------------------------------------------------------------
# text given to data.source=memmap
# --------------------------------------------------------------------------------------------
def test_memmap_refuses_a_text_file_naming_it(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    with pytest.raises(DataError) as err:
        build_source(memmap(corpus))
    message = str(err.value)
    assert "\n" not in message and str(corpus) in message
    assert "text, not uint16 token ids" in message and "data.source=text" in message and "proxy-prepare" in message


def test_memmap_refuses_text_whatever_its_name_and_dtype(tmp_path):
    (tmp_path / "train.bin").write_text(TEXT + "caf\u00e9 na\u00efve\n" * 10)  # UTF-8 text in a .bin
    for dtype in ("uint16", "uint32"):
        with pytest.raises(DataError, match=f"text, not {dtype} token ids"):
            build_source(memmap(tmp_path, dtype=dtype))


def test_memmap_folder_of_text_files_says_so(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(DataError, match="no train.bin; it holds .txt files: use data.source=text"):
        build_source(memmap(tmp_path))


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.integers(0, 50257, 30_000).astype(np.uint16),  # a GPT-2 sized vocabulary
        lambda rng: rng.integers(256, 65535, 30_000).astype(np.uint16),  # no id below 256
        lambda rng: rng.integers(0, 100_000, 30_000).astype(np.uint32),
        lambda rng: (np.arange(30_000) % 997).astype(np.uint16),
    ],
)
def test_token_ids_are_not_taken_for_text(make):
    tokens = make(np.random.default_rng(0))
    assert not looks_like_text(tokens.tobytes()[: 1 << 16])


def test_text_is_recognised_even_with_a_character_cut_at_the_end():
    data = ("na\u00efve caf\u00e9 " * 100).encode()
    assert looks_like_text(data) and looks_like_text(data[:-1])  # the 2-byte character cut in half
    assert not looks_like_text(b"")


# --------------------------------------------------------------------------------------------
# data.dtype against meta.json
# --------------------------------------------------------------------------------------------
def write_folder(folder, dtype: str, meta: dict | None):
    folder.mkdir(exist_ok=True)
    np.arange(300, 3300, dtype=dtype).tofile(folder / "train.bin")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))


def test_dtype_override_that_disagrees_with_meta_is_refused_naming_both(tmp_path):
    write_folder(tmp_path, "uint32", {"dtype": "uint32", "vocab_size": 4000})
    with pytest.raises(DataError) as err:
        build_source(memmap(tmp_path, dtype="uint16"))
    message = str(err.value)
    assert "data.dtype=uint16" in message and "uint32" in message and str(tmp_path / "meta.json") in message


def test_dtype_auto_follows_meta_and_an_agreeing_override_is_fine(tmp_path):
    write_folder(tmp_path, "uint32", {"dtype": "uint32", "vocab_size": 4000})
    assert DataConfig().dtype == "auto"
    assert build_source(memmap(tmp_path)).describe()["dtype"] == "uint32"
    assert build_source(memmap(tmp_path, dtype="uint32")).describe()["dtype"] == "uint32"


def test_dtype_without_meta_is_the_override_or_uint16(tmp_path):
    write_folder(tmp_path / "a", "uint32", None)
    assert build_source(memmap(tmp_path / "a", dtype="uint32")).vocab_size == 3300
    write_folder(tmp_path / "b", "uint16", None)
    assert build_source(memmap(tmp_path / "b")).describe()["dtype"] == "uint16"


def test_config_accepts_auto_and_rejects_other_dtypes():
    assert to_config({"data": {"dtype": "auto"}}).data.dtype == "auto"
    with pytest.raises(ValueError, match="data.dtype='int8' must be auto, uint16 or uint32"):
        to_config({"data": {"dtype": "int8"}})


# --------------------------------------------------------------------------------------------
# a trained BPE tokenizer stays with the run
# --------------------------------------------------------------------------------------------
def bpe_cfg(tmp_path, **train_keys) -> dict:
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = as_dict(Config())
    cfg["data"].update(source="text", path=str(tmp_path / "corpus.txt"), tokenizer="bpe", bpe_vocab_size=300)
    cfg["train"].update(
        steps=6, batch_size=2, seq_len=16, log_every=2, eval_every=3, eval_batches=1, progress="false", **train_keys
    )
    cfg["schedule"]["warmup_steps"] = 2
    return cfg


def test_text_bpe_run_saves_its_tokenizer_and_resume_reads_it_back(tmp_path, monkeypatch):
    run = tmp_path / "run"
    summary = train(bpe_cfg(tmp_path, ckpt_every=3, keep_checkpoints=5), run)
    saved = run / TOKENIZER_FILE
    assert summary["status"] == "completed" and summary["data"]["tokenizer_file"] == TOKENIZER_FILE
    tokenizer = BPETokenizer.load(saved)
    assert tokenizer.vocab_size == summary["data"]["vocab_size"]
    assert tokenizer.tokenizer.decode(tokenizer.tokenizer.encode("The quick brown fox").ids) == "The quick brown fox"

    # a resume must not train another tokenizer: it reads the run's own
    for newer in sorted((run / "checkpoints").glob("step_*.pt"))[1:]:
        newer.unlink()
    monkeypatch.setattr(BPETokenizer, "train", classmethod(lambda *a, **k: pytest.fail("retrained on resume")))
    resumed = train(bpe_cfg(tmp_path, ckpt_every=3, keep_checkpoints=5, resume=True), run)
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("step_0000003.pt")


def test_build_source_prefers_the_runs_tokenizer(tmp_path):
    cfg = DataConfig(source=DataSource.text, path=str(tmp_path / "corpus.txt"), tokenizer="bpe", bpe_vocab_size=300)
    (tmp_path / "corpus.txt").write_text(TEXT)
    other = BPETokenizer.train([b"completely different words " * 40], 270)
    run = tmp_path / "run"
    run.mkdir()
    (run / TOKENIZER_FILE).write_text(other.to_json())
    assert build_source(cfg, run_dir=run).vocab_size == other.vocab_size
    fresh = build_source(cfg)
    assert fresh.vocab_size != other.vocab_size
    assert fresh.save(tmp_path / "new") == [TOKENIZER_FILE]  # what the trainer writes into a new run
    assert BPETokenizer.load(tmp_path / "new" / TOKENIZER_FILE).vocab_size == fresh.vocab_size


def test_byte_level_and_synthetic_sources_save_nothing(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    byte = build_source(DataConfig(source=DataSource.text, path=str(tmp_path / "corpus.txt")))
    assert byte.save(tmp_path) == [] and build_source(DataConfig()).save(tmp_path) == []
    assert not (tmp_path / TOKENIZER_FILE).exists()


def test_spike_kit_replays_rebuild_the_source_from_the_kits_run(tmp_path):
    kit = types.SimpleNamespace(path=tmp_path / "run" / "spike_kits" / "step_0000040")
    assert kit_run_dir(kit) == tmp_path / "run"
    loose = types.SimpleNamespace(path=tmp_path / "copied_kit")
    assert kit_run_dir(loose) == tmp_path / "copied_kit"


# --------------------------------------------------------------------------------------------
# proxy-prepare names its own flag
# --------------------------------------------------------------------------------------------
def test_prepare_names_the_input_flag(tmp_path, capsys):
    assert prepare_main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--input={tmp_path / 'missing.txt'}: no such file or folder" in err and "data.path" not in err
