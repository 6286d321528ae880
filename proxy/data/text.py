"""Plain text as a token source: ``.txt`` files tokenized at load time, byte-level (vocab 256) or
BPE (the ``tokenizers`` library); and ``proxy-prepare``, which tokenizes text once into the memmap
layout (``train.bin`` / ``val.bin`` / ``meta.json``) that ``data.source=memmap`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import numpy as np

from proxy.config import DataConfig
from proxy.data.sources import (
    CONTROL_LIMIT,
    TEXT_CONTROLS,
    TOKEN_DTYPES,
    ArraySource,
    DataError,
    existing_path,
    split_tail,
)
from proxy.records import TOKENIZER_FILE, atomic_write, atomic_write_text, output_dir

EOT = "<|endoftext|>"  # document separator of BPE vocabularies (byte-level uses byte 0)


class Document(bytes):
    """A document's bytes, knowing the file they came from (for errors that name it)."""

    path: Path

    def __new__(cls, data: bytes, path: Path) -> "Document":
        doc = super().__new__(cls, data)
        doc.path = path
        return doc


def check_text(path: str | Path, data: bytes) -> None:
    """DataError naming ``path`` unless ``data`` is text, whatever the tokenizer: no NUL byte
    (the byte tokenizer's document separator, and the mark of a binary file), valid UTF-8 (the
    offset of the first bad byte named), and at most :data:`CONTROL_LIMIT` of its first MiB
    other control bytes."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: not text (a NUL byte at offset {nul}: a binary file, or UTF-16?)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 at byte {exc.start} ({exc.reason}); re-encode it as UTF-8") from None
    head = data[: 1 << 20]
    control = sum(1 for b in head if (b < 32 or b == 127) and b not in TEXT_CONTROLS)
    if head and control / len(head) > CONTROL_LIMIT:
        raise DataError(
            f"{path}: not text ({control / len(head):.0%} of its first {len(head)} bytes are control characters)"
        )


def read_documents(path: Path) -> list[Document]:
    """The .txt file at ``path``, or every .txt file under the folder (sorted), as documents
    (empty files left out). The tokenizer checks that they are text: UTF-8 for BPE, and
    :func:`check_text` for both."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt files in folder")
    docs = []
    for f in files:
        if path.is_dir() and f.is_symlink():  # rglob does not enter linked folders; linked files neither
            raise DataError(f"{f}: a link in the corpus folder {path}; proxy reads only the folder's own files")
        if not f.is_file():  # a FIFO or a device would block the read
            raise DataError(f"{f}: not a regular file")
        data = f.read_bytes()
        if data:
            docs.append(Document(data, f))
    if not docs:
        raise DataError(f"{path}: text is empty")
    return docs


class ByteTokenizer:
    """Bytes are tokens (vocab 256); byte 0, which text never holds, separates documents."""

    name = "byte"
    vocab_size = 256

    def encode(self, docs: Sequence[bytes]) -> np.ndarray:
        for doc in docs:
            check_text(getattr(doc, "path", "text"), doc)
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
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(_decode(docs), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise DataError(f"{path}: not a tokenizers JSON file ({_first_line(exc)})") from None

    def to_json(self) -> str:
        """The tokenizer as a tokenizers JSON file's text (``Tokenizer.from_file`` reads it)."""
        return self.tokenizer.to_str()

    def encode(self, docs: Sequence[bytes]) -> np.ndarray:
        ids: list[int] = []
        for i, enc in enumerate(self.tokenizer.encode_batch(_decode(docs))):
            if i and self.eot is not None:
                ids.append(self.eot)
            ids.extend(enc.ids)
        return np.asarray(ids, dtype=np.int64)


def _decode(docs: Sequence[bytes]) -> list[str]:
    texts = []
    for doc in docs:
        check_text(getattr(doc, "path", "text"), doc)
        texts.append(doc.decode("utf-8"))
    return texts


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


def load_text(cfg: DataConfig, run_dir: Optional[Path] = None) -> ArraySource:
    """The text at ``data.path``, tokenized. A BPE tokenizer (trained now, or read from
    ``data.tokenizer``) goes with the source, to be saved as the run's tokenizer.json; with
    ``run_dir`` (a resume, a spike kit's replay) the run's own tokenizer.json is used instead of
    training a new one, so the ids are the ones the run was trained on."""
    docs = read_documents(existing_path(cfg.path))
    saved = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
    if saved is not None and saved.is_symlink():
        raise DataError(f"{saved} is a link; proxy reads only the run dir's own files")
    if cfg.tokenizer != "byte" and saved is not None and saved.is_file():
        tokenizer = BPETokenizer.load(saved)
    else:
        tokenizer = make_tokenizer(cfg.tokenizer, docs, cfg.bpe_vocab_size)
    train, val = split_tail(tokenizer.encode(docs), cfg.val_fraction)
    details = {
        "tokenizer": tokenizer.name,
        "documents": len(docs),
        "val_source": f"tail {cfg.val_fraction:g} of the text",
    }
    tokenizer_json = None
    if isinstance(tokenizer, BPETokenizer):
        tokenizer_json = tokenizer.to_json()
        details["tokenizer_file"] = TOKENIZER_FILE
    return ArraySource(cfg, "text", train, val, tokenizer.vocab_size, details, tokenizer_json=tokenizer_json)


# ============================================================================================
# proxy-prepare: text -> train.bin / val.bin / meta.json
# ============================================================================================
def prepare(
    input_path: str, out_dir: str, tokenizer: str = "byte", vocab_size: int = 4096, val_fraction: float = 0.05
) -> dict:
    """Tokenize text once into the memmap layout; returns the meta.json contents."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in (0, 1)")
    if tokenizer not in ("byte", "bpe"):
        raise DataError(f"--tokenizer {tokenizer!r} must be byte or bpe")
    docs = read_documents(existing_path(input_path, key="--input"))
    tok = make_tokenizer(tokenizer, docs, vocab_size)
    train, val = split_tail(tok.encode(docs), val_fraction)
    if len(train) < 2:
        raise DataError(f"{input_path}: too little text to split ({len(train) + len(val)} tokens)")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    out = output_dir(out_dir, what="prepared data")
    for name, ids in (("train.bin", train), ("val.bin", val)):
        array = np.ascontiguousarray(ids.astype(TOKEN_DTYPES[dtype]))

        def write_array(f: BinaryIO, a: np.ndarray = array) -> None:
            f.write(a.data.cast("B"))  # a.data: memoryview(a)

        atomic_write(out / name, write_array)
    meta = {
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "tokenizer": tok.name,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "documents": len(docs),
        "source": str(input_path),
    }
    if isinstance(tok, BPETokenizer):
        atomic_write_text(out / TOKENIZER_FILE, tok.to_json())
        meta["vocab_size_requested"] = vocab_size
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: the folder is whole
    return meta


def shrunk_vocabulary(meta: dict) -> Optional[str]:
    """The line that says a BPE vocabulary came out smaller than asked (a small corpus has too
    few pairs to merge); None when it did not."""
    asked = meta.get("vocab_size_requested")
    if asked is None or meta["vocab_size"] >= asked:
        return None
    return (
        f"note: the text gives only {meta['vocab_size']} BPE tokens of the --vocab-size {asked} asked for "
        f"(too few distinct pairs to merge); meta.json records both"
    )


def prepare_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="proxy-prepare",
        description="Tokenize .txt files into train.bin / val.bin / meta.json for data.source=memmap.",
    )
    parser.add_argument("--input", required=True, help="a .txt file or a folder of them")
    parser.add_argument("--out", required=True, help="output folder (then data.path=<out>)")
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"])
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="tail held out for val")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    except (DataError, OSError, ValueError) as exc:  # ValueError: UnsafePathError, an --out that is a link
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens, "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']}, {meta['dtype']})"
    )
    shrunk = shrunk_vocabulary(meta)
    if shrunk:
        print(shrunk, file=sys.stderr)
    return 0
