"""Documents -> a tokenizer and token shards: `<data_dir>/<name>-<tokenizer>/{train,val,test}_NNNN.bin` + `meta.json`.

Shards are flat arrays of token ids (uint16 when the vocabulary fits, else uint32), each document followed by the
end-of-text token, at most `shard_tokens` per file, read back through memory maps. Documents are tokenized in batches
by a pool of worker processes while the main process reads ahead and writes, so memory stays flat however large the
corpus. Everything is written into a staging folder renamed into place at the end: an interrupted prepare leaves
nothing a later run would trust. Preparing is skipped when `meta.json` records the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.config import DataConfig
from tinylm.data.documents import DocumentSource, open_source
from tinylm.data.loader import TokenShards
from tinylm.data.sources import cache_dir
from tinylm.errors import TinylmError
from tinylm.runs import process_alive, write_failure
from tinylm.tokenizers import HF_TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 2
META_FILE = "meta.json"
BATCH_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortise the hand-over
DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}


@dataclass
class PreparedData:
    folder: Path
    meta: dict
    tokenizer: Tokenizer

    def split(self, name: str) -> TokenShards:
        if name not in self.meta["splits"]:
            raise TinylmError(
                f"the data in {self.folder} has no '{name}' split; it has {', '.join(self.meta['splits'])}"
            )
        info = self.meta["splits"][name]
        return TokenShards([self.folder / f for f in info["files"]], np.dtype(self.meta["dtype"]))

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse to pair a model with data tokenized by another vocabulary: its ids would mean other text."""
        if self.meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
            raise TinylmError(
                f"the data in {self.folder} was tokenized with another vocabulary ({self.meta['tokenizer']['spec']}, "
                f"fingerprint {self.meta['tokenizer']['fingerprint']}) than this run's ({tokenizer.spec}, "
                f"{tokenizer.fingerprint()}); use data prepared with the run's tokenizer"
            )


def prepare(config: DataConfig, force: bool = False) -> PreparedData:
    """Tokenize the source into token shards, or reuse those prepared from the same inputs (unless `force`)."""
    source = open_source(config)
    inputs = hashlib.sha256(
        json.dumps(
            [
                FORMAT_VERSION,
                source.fingerprint,
                config.tokenizer,
                _local_tokenizer_hash(config.tokenizer),
                config.val_fraction,
                config.shard_tokens,
                config.token_dtype,
                config.text_field,
                config.encoding_errors,
            ]
        ).encode()
    ).hexdigest()
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else cache_dir() / "data"
    folder = data_dir / f"{source.name}-{_folder_name(config.tokenizer)}"
    meta_path = folder / META_FILE
    if meta_path.is_file() and not force:
        meta = _read_meta(meta_path)
        if meta is not None and meta.get("inputs") == inputs:
            try:
                return checked_data(folder, meta)
            except TinylmError as damage:  # prepared data is a cache of the source: make it again
                tqdm.write(f"tinylm: {damage}; preparing it again")

    _remove_abandoned_staging(folder)
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        tokenizer = train_tokenizer(
            config.tokenizer, source.split_documents("train"), held_out_texts=source.split_documents("val", "test")
        )
        tokenizer.save(staging)
        dtype = token_dtype(tokenizer, config.token_dtype)
        splits = write_shards(
            source, tokenizer, staging, dtype, config.shard_tokens, config.num_proc or available_cpus()
        )
        for split in ("train", "val"):
            if splits.get(split, {}).get("tokens", 0) < 2:
                raise TinylmError(
                    f"the {split} split of {config.source} is empty; give more text or change data.val_fraction"
                )
        meta = {
            "format": FORMAT_VERSION,
            "source": config.source,
            "subset": config.subset,
            "inputs": inputs,
            "tokenizer": {"spec": tokenizer.spec, "fingerprint": tokenizer.fingerprint()},
            "vocab_size": tokenizer.vocab_size,
            "end_of_text": tokenizer.end_of_text,
            "dtype": dtype.name,
            "val_fraction": config.val_fraction,
            "shard_tokens": config.shard_tokens,
            "splits": splits,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        failure = write_failure(error, data_dir)  # a full disk, a folder that cannot be written: one line
        if failure is not None:
            raise failure from None
        raise
    shutil.rmtree(folder, ignore_errors=True)  # stale data from other inputs
    os.replace(staging, folder)
    return PreparedData(folder, meta, tokenizer)


def _read_meta(path: Path) -> dict | None:
    """meta.json as a mapping, or None when it cannot be read (the data is then prepared again)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


SHARD_NAME = re.compile(r"(train|val|test)_\d{4}\.bin")


def checked_data(folder: Path, meta: dict) -> PreparedData:
    """The prepared data in `folder` once what meta.json says of it holds (cheap checks, no token read): its
    tokenizer has the recorded fingerprint, each shard is a plain file name inside `folder` whose size is the one its
    token count gives. A one-line TinylmError naming what is wrong otherwise: a shard cut short by a full disk or an
    edit would otherwise be trained on as if it were whole."""
    meta_path = folder / META_FILE
    try:
        dtype = DTYPES[meta["dtype"]]
        fingerprint, splits, shard_tokens = meta["tokenizer"]["fingerprint"], meta["splits"], meta["shard_tokens"]
        shards = {name: (list(info["files"]), int(info["tokens"])) for name, info in splits.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TinylmError(f"{meta_path} is damaged") from None
    tokenizer = load_tokenizer(folder)
    if tokenizer.fingerprint() != fingerprint:
        raise TinylmError(f"the tokenizer in {folder} is not the one {meta_path} records")
    for name, (files, tokens) in shards.items():
        if len(files) != -(-tokens // shard_tokens):
            raise TinylmError(f"{meta_path} lists {len(files)} {name} shards for {tokens:,} tokens: it is damaged")
        for index, file in enumerate(files):
            if not isinstance(file, str) or not SHARD_NAME.fullmatch(file):
                raise TinylmError(f"{meta_path} names a shard {file!r} that tinylm does not write: it is damaged")
            expected = min(shard_tokens, tokens - index * shard_tokens) * dtype.itemsize
            path = folder / file
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                found = "is missing" if size is None else f"holds {size:,} bytes, not {expected:,}"
                raise TinylmError(f"{path} {found}")
    return PreparedData(folder, meta, tokenizer)


def _folder_name(spec: str) -> str:
    """`bpe:4096` -> `bpe4096`; a tokenizer file path -> its name and a short hash of the path."""
    if spec.endswith(".json") or "/" in spec:
        path_hash = hashlib.sha256(spec.encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9.-]+', '_', Path(spec).stem or spec).strip('_')}-{path_hash}"
    return spec.replace(":", "")


def _local_tokenizer_hash(spec: str) -> str:
    """The content of a local tokenizer file is an input too: data prepared with its old version is stale."""
    path = Path(spec.removeprefix("hf:")).expanduser()
    tokenizer_file = path / HF_TOKENIZER_FILE if path.is_dir() else path
    return hashlib.sha256(tokenizer_file.read_bytes()).hexdigest() if tokenizer_file.is_file() else ""


def token_dtype(tokenizer: Tokenizer, requested: str) -> np.dtype:
    fits_uint16 = tokenizer.vocab_size <= 1 << 16
    if requested == "auto":
        return DTYPES["uint16" if fits_uint16 else "uint32"]
    if requested == "uint16" and not fits_uint16:
        raise TinylmError(
            f"the {tokenizer.spec} tokenizer has {tokenizer.vocab_size:,} tokens, more than uint16 holds (65,536); "
            "use data.token_dtype uint32 or auto"
        )
    return DTYPES[requested]


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_shards(
    source: DocumentSource, tokenizer: Tokenizer, folder: Path, dtype: np.dtype, shard_tokens: int, num_proc: int
) -> dict:
    """Tokenize every document into per-split shards in `folder`; the counts of each split, for meta.json."""
    writers: dict[str, ShardWriter] = {}
    counts: dict[str, dict[str, int]] = {}
    bar = tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {source.name}", disable=None)
    try:
        with bar:
            batches = _encoded_batches(_batches(source.documents()), tokenizer, folder, dtype, num_proc)
            for split, batch, (ids, batch_bytes) in batches:
                if split not in writers:
                    writers[split] = ShardWriter(folder, split, dtype, shard_tokens)
                    counts[split] = {"documents": 0, "bytes": 0, "chars": 0}
                writers[split].write(ids)
                counts[split]["documents"] += sum(not isinstance(document, DocumentPiece) for document in batch)
                counts[split]["bytes"] += batch_bytes
                counts[split]["chars"] += sum(len(document) for document in batch)
                bar.update(batch_bytes)
    except BaseException:
        for writer in writers.values():  # no file left open (on a full disk: none keeping its space taken)
            writer.close()
        raise
    in_order = sorted(writers, key=("train", "val", "test").index)
    return {
        split: {"files": writers[split].close(), "tokens": writers[split].tokens, **counts[split]} for split in in_order
    }


class DocumentPiece(str):
    """A part of a long document that is not its end: no end-of-text token follows its ids."""


def _batches(blocks: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, list[str]]]:
    """Documents in batches of about BATCH_CHARS of text, one split per batch, each split's documents in order. A
    longer document goes in pieces (see `_pieces`), so a file that is one huge line costs what many documents do."""
    pending: dict[str, list[str]] = {}
    chars: dict[str, int] = {}
    for split, block in blocks:
        for document in block:
            for piece in _pieces(document) if len(document) > BATCH_CHARS else (document,):
                pending.setdefault(split, []).append(piece)
                chars[split] = chars.get(split, 0) + len(piece)
                if chars[split] >= BATCH_CHARS:
                    yield split, pending.pop(split)
                    chars[split] = 0
    yield from ((split, batch) for split, batch in pending.items() if batch)


def _pieces(document: str) -> Iterator[str]:
    """`document` in pieces of at most BATCH_CHARS characters, all but the last a DocumentPiece. Each cut is made
    before a space that precedes a non-space where there is one: a word boundary, where byte-level BPE (GPT-2's
    pre-tokenizer, tinylm's bpe) starts a new token anyway, so the ids are those of the whole document."""
    start = 0
    while len(document) - start > BATCH_CHARS:
        end = start + BATCH_CHARS
        cut = document.rfind(" ", start + 1, end)
        while cut > start and document[cut + 1].isspace():
            cut = document.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        yield DocumentPiece(document[start:cut])
        start = cut
    yield document[start:]


def _encoded_batches(
    batches: Iterator[tuple[str, list[str]]], tokenizer: Tokenizer, folder: Path, dtype: np.dtype, num_proc: int
) -> Iterator[tuple[str, list[str], tuple[np.ndarray, int]]]:
    """Each batch with its token ids, in order, while this process reads ahead and writes.

    A tokenizer whose batches already use every core (Hugging Face's Rust threads) is driven from one thread; any other
    is run in `num_proc` forked worker processes. At most 2 batches per worker are in flight, so memory stays flat.
    """
    global _worker_tokenizer
    _worker_tokenizer = tokenizer  # for this process, and for workers forked from it
    try:
        if num_proc <= 1:
            with _tokenizers_parallelism(False):
                for split, batch in batches:
                    yield split, batch, _encode_documents(batch, dtype)
            return
        if tokenizer.batches_use_every_core:
            workers, pool = 1, ThreadPool(1)
        else:
            fork = os.name == "posix"
            context = multiprocessing.get_context("fork" if fork else "spawn")
            initializer = None if fork else _load_worker_tokenizer  # spawned workers start empty: they load it
            workers, pool = num_proc, context.Pool(num_proc, initializer, (folder,))
        # Forked workers must not use the tokenizer's threads (the pool is the parallelism); saying so in the
        # environment they inherit also spares the user tokenizers' fork warning.
        with _tokenizers_parallelism(tokenizer.batches_use_every_core), pool:
            in_flight: deque = deque()
            for split, batch in batches:
                in_flight.append((split, batch, pool.apply_async(_encode_documents, (batch, dtype))))
                if len(in_flight) >= 2 * workers:
                    done_split, done_batch, result = in_flight.popleft()
                    yield done_split, done_batch, result.get()
            while in_flight:
                done_split, done_batch, result = in_flight.popleft()
                yield done_split, done_batch, result.get()
    finally:
        _worker_tokenizer = None


@contextmanager
def _tokenizers_parallelism(enabled: bool) -> Iterator[None]:
    """Hugging Face tokenizers' own threads on or off, for the duration."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(folder: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(folder)


def _encode_documents(documents: list[str], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """The documents' ids, each document followed by the end-of-text token, and their UTF-8 size (counted here, in
    the worker, to keep the main process free)."""
    tokenizer = _worker_tokenizer
    end = np.array([tokenizer.end_of_text], dtype=dtype)
    pieces = []
    for document, ids in zip(documents, tokenizer.encode_batch(documents)):
        pieces.append(np.asarray(ids, dtype=dtype))
        if not isinstance(document, DocumentPiece):
            pieces.append(end)
    return np.concatenate(pieces), sum(len(document.encode()) for document in documents)


class ShardWriter:
    """Appends token ids to `<split>_0000.bin`, `<split>_0001.bin`, ..., starting a new file every `shard_tokens`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self._file = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._room == 0:
                self._next_file()
            part, ids = ids[: self._room], ids[self._room :]
            self._file.write(memoryview(part))  # not ndarray.tofile, whose OSError on a full disk has no errno
            self._room -= part.size
            self.tokens += part.size

    def _next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self.files.append(f"{self.split}_{len(self.files):04d}.bin")
        self._file = open(self.folder / self.files[-1], "wb")  # noqa: SIM115 (closed by the next file or close())
        self._room = self.shard_tokens

    def close(self) -> list[str]:
        if self._file is not None:
            self._file.close()
        return self.files


def _remove_abandoned_staging(folder: Path) -> None:
    """Staging folders left by a prepare that was killed (its process is gone) are deleted, never used."""
    for staging in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = staging.name.rpartition("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
