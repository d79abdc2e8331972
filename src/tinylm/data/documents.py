"""Files -> documents, each tagged with its split, streamed so a corpus of any size never sits in memory whole.

What a document is depends on the file:
- `.txt`: documents separated by `<|endoftext|>` (TinyStories); a file without separators is one document;
- `.raw` (WikiText's raw format): one document per article, an article starting at its ` = Title = ` line;
- `.jsonl`: one document per line, from its text field; `.json`: a list of strings or of objects with the text field;
- `.parquet`: one document per row of the text column;
- `hf:owner/name[:config]`: one document per row of a Hugging Face dataset, streamed.

Sources with official splits (TinyStories' valid file, WikiText's valid and test) keep them. Otherwise the documents
are split by `val_fraction`: evenly spread, documents 0, k, 2k, ... (k about 1 / val_fraction) are held out; a source
that is a single document (Tiny Shakespeare) holds out its last `val_fraction` of characters, as nanoGPT does.

Readers yield documents in blocks (lists) rather than one by one: on millions of short stories, the per-document cost
of the process that feeds the tokenizer workers is what limits the speed of a parallel prepare.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tinylm.config import DataConfig
from tinylm.data.sources import SOURCES, fetch, source_files
from tinylm.errors import TinylmError
from tinylm.tokenizers import END_OF_TEXT

FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
WIKITEXT_ARTICLE = re.compile(r"^ = [^=].* = $")
READ_BYTES = 1 << 22
BLOCK_DOCUMENTS = 1024  # documents per block from record-shaped files


@dataclass
class DocumentSource:
    """Where prepared data comes from: its name, a fingerprint of its inputs, and its documents by split."""

    name: str
    fingerprint: str
    """Changes whenever the input text may have changed: prepared data is reused only while it stays the same."""
    total_bytes: int | None
    """Bytes to read, for the progress bar (None when unknown, as for a streamed dataset)."""
    read: Callable[[], Iterator[tuple[str | None, list[str]]]]
    """Yields (split or None, block of documents); None means "split by val_fraction"."""
    val_fraction: float

    def documents(self) -> Iterator[tuple[str, list[str]]]:
        """Every document with its split, in blocks, in a deterministic order."""
        held: list[str] | None = None  # a first block of one document, until more show it is not the only one
        unsplit_count = 0
        for split, block in self.read():
            if split is not None:
                yield split, block
                continue
            if unsplit_count == 0 and len(block) == 1:
                held, unsplit_count = block, 1
                continue
            if held is not None:
                block, held = held + block, None
                unsplit_count = 0
            yield from self._split_by_fraction(block, unsplit_count)
            unsplit_count += len(block)
        if held is not None:  # a single document: its tail validates
            (only,) = held
            cut = int(len(only) * (1 - self.val_fraction))
            yield "train", [only[:cut]]
            yield "val", [only[cut:]]

    def _split_by_fraction(self, block: list[str], first_index: int) -> Iterator[tuple[str, list[str]]]:
        """Document i is held out when the count ceil(i * val_fraction) steps up: evenly spread, the exact share."""
        f = self.val_fraction
        train: list[str] = []
        val: list[str] = []
        for index, document in enumerate(block, first_index):
            (val if math.ceil((index + 1) * f) > math.ceil(index * f) else train).append(document)
        for split, documents in (("train", train), ("val", val)):
            if documents:
                yield split, documents

    def split_documents(self, *splits: str) -> Iterator[str]:
        return (document for split, block in self.documents() if split in splits for document in block)


def open_source(config: DataConfig) -> DocumentSource:
    """The documents of `config.source`: a registry dataset (and subset), a file or folder, or `hf:NAME[:CONFIG]`."""
    source, field, errors = config.source, config.text_field, config.encoding_errors
    if source.startswith("hf:"):
        return _huggingface_source(source[3:], field, config.val_fraction)
    if source in SOURCES:
        dataset = SOURCES[source]
        if dataset.instructions:
            raise TinylmError(
                f"'{source}' is an instruction set for fine-tuning: use `tinylm finetune --data {source}`"
            )
        remotes = source_files(dataset, config.subset)
        name = dataset.name if config.subset is None else f"{dataset.name}-{config.subset}"
        fingerprint = "|".join(remote.sha256 for remote in remotes)

        def read() -> Iterator[tuple[str | None, list[str]]]:
            # Fetched only when read: data prepared already needs no download, even once the raw files are deleted.
            for split, path in [(remote.split, fetch(dataset.folder, remote)) for remote in remotes]:
                for block in _reader_for_file(path)(path, field, errors):
                    yield split, block

        return DocumentSource(name, fingerprint, sum(r.size for r in remotes), read, config.val_fraction)
    if config.subset is not None:
        raise TinylmError(f"data.subset applies to registry datasets ({', '.join(SOURCES)}), not to {source}")
    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix in FILE_SUFFIXES:
            raise TinylmError(f"data file not found: {path}")
        raise TinylmError(
            f"unknown dataset '{source}'; choose one of: {', '.join(SOURCES)}, a .txt/.jsonl/.json/.parquet file or "
            "folder of them, or hf:owner/name for a Hugging Face dataset"
        )
    files = _files_in(path)

    def read_files() -> Iterator[tuple[str | None, list[str]]]:
        for file in files:
            for block in _reader_for_file(file)(file, field, errors):
                yield None, block

    name = path.stem if path.is_file() else path.name
    total_bytes = sum(f.stat().st_size for f in files)
    return DocumentSource(name, _files_fingerprint(path, files), total_bytes, read_files, config.val_fraction)


def _files_in(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise TinylmError(f"cannot read {path}: tinylm reads {', '.join(FILE_SUFFIXES)} files")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise TinylmError(f"{path} holds no {', '.join(FILE_SUFFIXES)} files")
    return files


def _files_fingerprint(root: Path, files: list[Path]) -> str:
    """A hash of the files' names and contents: prepared data is redone when any of them changes."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}|".encode())
        with open(file, "rb") as f:
            while block := f.read(READ_BYTES):
                digest.update(block)
    return digest.hexdigest()


Reader = Callable[[Path, str, str], Iterator[list[str]]]


def _reader_for_file(path: Path) -> Reader:
    readers = {".txt": read_text, ".raw": read_wikitext, ".jsonl": read_jsonl, ".json": read_json_list}
    return readers.get(path.suffix, read_parquet)


def decoded_chunks(path: Path, errors: str) -> Iterator[str]:
    """The file's text in pieces of a few MB, decoded as UTF-8; a bad byte is reported with its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise TinylmError(
                    f"{path} is not UTF-8 text: bad byte at offset {offset + error.start - len(decoder.getstate()[0])}"
                    "; convert it to UTF-8, or pass --errors replace (data.encoding_errors) to replace bad bytes"
                ) from None
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def read_text(path: Path, field: str = "text", errors: str = "strict") -> Iterator[list[str]]:
    """Documents separated by `<|endoftext|>`, with the whitespace around separators dropped; else the whole file."""
    parts: list[str] = []  # the document being read, in chunks: joined only when a separator ends it
    tail = ""  # the last characters read, where a separator cut by a chunk boundary begins
    separated = False
    for chunk in decoded_chunks(path, errors):
        if END_OF_TEXT not in tail + chunk:
            parts.append(chunk)
            tail = (tail + chunk)[1 - len(END_OF_TEXT) :]
            continue
        *documents, rest = ("".join(parts) + chunk).split(END_OF_TEXT)
        separated = True
        yield [stripped for stripped in map(str.strip, documents) if stripped]
        parts, tail = [rest], rest[1 - len(END_OF_TEXT) :]
    last = "".join(parts)
    if not separated and not last.strip():
        raise TinylmError(f"data file is empty: {path}; give a file with text in it")
    if last.strip():
        yield [last.strip() if separated else last]


def read_wikitext(path: Path, field: str = "text", errors: str = "strict") -> Iterator[list[str]]:
    """WikiText's raw files: one document per article; lines stay as they are, blank lines around articles go."""
    article: list[str] = []
    for line in _lines(decoded_chunks(path, errors)):
        if WIKITEXT_ARTICLE.match(line.rstrip("\n")):
            if "".join(article).strip():
                yield ["".join(article).rstrip()]
            article = []
        if article or line.strip():
            article.append(line)
    if "".join(article).strip():
        yield ["".join(article).rstrip()]


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    pending = ""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            yield line + "\n"
    if pending:
        yield pending


def read_jsonl(path: Path, field: str = "text", errors: str = "strict") -> Iterator[list[str]]:
    return _in_blocks(_jsonl_documents(path, field, errors))


def _jsonl_documents(path: Path, field: str, errors: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as error:
                raise TinylmError(
                    f"{path}:{number}: not UTF-8 (bad byte at offset {offset + error.start}); convert it to UTF-8, "
                    "or pass --errors replace (data.encoding_errors)"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TinylmError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove that line") from None
            text = _text_of(record, field, f"{path}:{number}")
            if text.strip():
                yield text


def read_json_list(path: Path, field: str = "text", errors: str = "strict") -> Iterator[list[str]]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8", errors=errors))
    except UnicodeDecodeError as error:
        raise TinylmError(f"{path} is not UTF-8 text: bad byte at offset {error.start}; convert it to UTF-8") from None
    except json.JSONDecodeError as error:
        raise TinylmError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg}); a .json file holds one list of documents"
        ) from None
    if not isinstance(records, list):
        raise TinylmError(
            f"{path} holds a JSON {type(records).__name__}, not a list of documents; use .jsonl for one per line"
        )
    texts = (
        record if isinstance(record, str) else _text_of(record, field, f"{path} item {index}")
        for index, record in enumerate(records)
    )
    return _in_blocks(text for text in texts if text.strip())


def _in_blocks(documents: Iterable[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for document in documents:
        block.append(document)
        if len(block) == BLOCK_DOCUMENTS:
            yield block
            block = []
    if block:
        yield block


def _text_of(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise TinylmError(f"{where}: no '{field}' field (it has: {fields}); name the text field with --text-field")
    text = record[field]
    if not isinstance(text, str):
        raise TinylmError(f"{where}: field '{field}' holds {type(text).__name__}, not text")
    return text


def read_parquet(path: Path, field: str = "text", errors: str = "strict") -> Iterator[list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TinylmError("reading .parquet files needs pyarrow: pip install 'tinylm[hf]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and OSError for files that are not parquet
        raise TinylmError(f"{path} is not a readable parquet file ({error})") from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise TinylmError(f"{path} has no '{field}' column (it has: {', '.join(columns)}); set --text-field")
    for batch in table.iter_batches(batch_size=BLOCK_DOCUMENTS, columns=[field]):
        yield [text for text in batch.column(0).to_pylist() if isinstance(text, str) and text.strip()]


def _huggingface_source(spec: str, field: str, val_fraction: float) -> DocumentSource:
    """A Hugging Face dataset `owner/name[:config]` (or a local folder of data files), streamed by `datasets`."""
    if os.environ.get("TINYLM_OFFLINE"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail at once rather than after network retries
    try:
        import datasets
    except ImportError:
        raise TinylmError("Hugging Face datasets need the `datasets` package: pip install 'tinylm[hf]'") from None
    name, _, subset = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    try:
        loaded = datasets.load_dataset(name, subset or None, streaming=True)
    except Exception as error:  # datasets raises many kinds: offline, unknown repository, bad config name
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TinylmError(
            f"cannot load the Hugging Face dataset '{spec}' ({reason}); check the name and config, go online, or "
            "give a local file"
        ) from None
    splits = {SPLIT_NAMES[s]: s for s in loaded if s in SPLIT_NAMES}
    if "train" not in splits:
        raise TinylmError(f"the Hugging Face dataset '{spec}' has no train split (it has: {', '.join(loaded)})")
    columns = loaded[splits["train"]].column_names
    if columns is not None and field not in columns:
        raise TinylmError(f"'{spec}' has no '{field}' column (it has: {', '.join(columns)}); set --text-field")
    has_val = "val" in splits

    def read() -> Iterator[tuple[str | None, list[str]]]:
        for split, hf_split in splits.items():
            texts = (
                _text_of(record, field, f"{spec} {hf_split} row {index}")
                for index, record in enumerate(loaded[hf_split])
            )
            for block in _in_blocks(text for text in texts if text.strip()):
                yield (None if split == "train" and not has_val else split), block

    local = Path(spec)
    if local.exists():
        return DocumentSource(f"hf-{local.name}", _files_fingerprint(local, _files_in(local)), None, read, val_fraction)
    return DocumentSource(f"hf-{spec.replace('/', '_').replace(':', '-')}", f"hf:{spec}", None, read, val_fraction)
