"""Text <-> token ids, behind one interface for every kind of tokenizer.

A tokenizer is named by a spec string and saved as `tinylm_tokenizer.json` beside the data and in every run folder, so a
run always decodes with the exact vocabulary it was trained on:
- `char`: one token per character of the corpus;
- `bpe:N`: a byte-level BPE with N tokens (specials included) learned from the training split with Hugging Face
  `tokenizers`, saved as a standard `tokenizer.json`;
- `gpt2`: GPT-2's BPE through tiktoken (its two vocabulary files resolve like dataset files: cache, mirror, download);
- `hf:NAME`: a Hugging Face tokenizer by hub name or local folder, or the path of a `tokenizer.json` (GPT-Neo's, ...).

Documents are separated by the end-of-text token. Text inside a document is always encoded as ordinary text, so a
literal "<|endoftext|>" in a story stays characters and the special id only ever marks a real document boundary.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tinylm.errors import TinylmError
from tinylm.runs import write_atomically

TOKENIZER_FILE = "tinylm_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
# What other tokenizers call the token that ends a document, in order of preference.
END_OF_TEXT_NAMES = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
SPECS_HELP = "char, bpe:N (e.g. bpe:4096), gpt2, hf:NAME (a Hugging Face tokenizer) or the path of a tokenizer.json"


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: the bytes printable in Latin-1 as
    themselves, the others as chr(256), chr(257), ... in byte order. Character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + i): byte for i, byte in enumerate(others)}


BYTE_LEVEL = byte_level_alphabet()


class Tokenizer(ABC):
    """Encodes text to token ids and back; decode(encode(text)) == text for any text the tokenizer covers."""

    spec: str
    batches_use_every_core = False
    """True when `encode_batch` already spreads over all cores itself, so prepare need not fork workers for it."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def end_of_text(self) -> int:
        """The id that separates documents."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]] | list[np.ndarray]:
        """The ids of each text, as lists or arrays (prepare's hot path: an array spares a conversion)."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, even when it holds only part of a character (which `decode` would show
        as U+FFFD): the tokens' bytes joined are the text's UTF-8. Here: for tokenizers whose tokens are whole
        characters."""
        return self.decode([token]).encode()

    @abstractmethod
    def to_json(self) -> dict:
        """What `load_tokenizer` needs to rebuild this tokenizer, for `fingerprint` and for saving."""

    def fingerprint(self) -> str:
        """A hash of the vocabulary: prepared data and a run must agree on it."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, folder: Path) -> None:
        write_atomically(folder / TOKENIZER_FILE, json.dumps(self.to_json(), ensure_ascii=False))


class CharTokenizer(Tokenizer):
    """One token per Unicode character of the corpus, in code point order, then `<|endoftext|>`."""

    spec = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._code_points = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted: searchsorted finds ids

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise TinylmError("cannot build a char tokenizer from empty text")
        return cls("".join(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def end_of_text(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode: a 1 MB text takes milliseconds, not a Python loop per character."""
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._code_points, code_points)
        ids_in_range = np.minimum(ids, len(self.chars) - 1)
        unknown = self._code_points[ids_in_range] != code_points
        if unknown.any():
            missing = [chr(c) for c in dict.fromkeys(code_points[unknown].tolist())]  # in order of appearance
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise TinylmError(
                f"text has {len(missing)} character(s) outside this char tokenizer's vocabulary: {shown}{more}; "
                "use only characters that occur in the training text"
            )
        return ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        chars, n = self.chars, len(self.chars)
        return "".join(chars[i] if i < n else END_OF_TEXT for i in ids)

    def to_json(self) -> dict:
        return {"spec": self.spec, "chars": self.chars}


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: a `bpe:N` trained here, or one loaded by name or from tokenizer.json."""

    batches_use_every_core = True  # Rust threads: measured faster than the same work split over processes

    def __init__(self, backend: HFTokenizer, spec: str):
        self.backend = backend
        self.backend.encode_special_tokens = True  # document text is ordinary text (see the module docstring)
        self.spec = spec
        ids = [backend.token_to_id(name) for name in END_OF_TEXT_NAMES]
        if all(i is None for i in ids):
            raise TinylmError(
                f"tokenizer '{spec}' has no end-of-text token to separate documents (looked for "
                f"{', '.join(END_OF_TEXT_NAMES)}); use a tokenizer that has one"
            )
        self._end_of_text = next(i for i in ids if i is not None)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> HuggingFaceTokenizer:
        """GPT-2-style byte-level BPE: text is UTF-8 bytes, so every string encodes, merged into `vocab_size` tokens."""
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is out of vocabulary
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        if backend.get_vocab_size() != vocab_size:
            raise TinylmError(
                f"bpe:{vocab_size}: the training text holds only {backend.get_vocab_size():,} tokens' worth of "
                f"merges; give more training text or choose bpe:{backend.get_vocab_size()} or less"
            )
        return cls(backend, f"bpe:{vocab_size}")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def end_of_text(self) -> int:
        return self._end_of_text

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The fast variant skips the character offsets, which prepare never reads.
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        name = self.backend.id_to_token(token)
        if isinstance(self.backend.decoder, decoders.ByteLevel) and name and all(c in BYTE_LEVEL for c in name):
            return bytes(BYTE_LEVEL[c] for c in name)
        return super().token_bytes(token)

    def to_json(self) -> dict:
        return {"spec": self.spec, "tokenizer": json.loads(self.backend.to_str())}

    def save(self, folder: Path) -> None:
        write_atomically(folder / HF_TOKENIZER_FILE, self.backend.to_str(pretty=True))
        write_atomically(folder / TOKENIZER_FILE, json.dumps({"spec": self.spec, "file": HF_TOKENIZER_FILE}))


class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE (50,257 tokens, `<|endoftext|>` = 50256) through tiktoken, the fastest encoder for it."""

    spec = "gpt2"

    def __init__(self):
        try:
            import tiktoken
        except ImportError:
            raise TinylmError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from None
        from tiktoken_ext.openai_public import r50k_pat_str

        self.encoding = tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=self._ranks(), special_tokens={END_OF_TEXT: 50256}
        )

    @staticmethod
    def _ranks() -> dict[bytes, int]:
        """GPT-2's merges from its two files, converted once into tiktoken's own format (5x faster to load)."""
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

        from tinylm.data.sources import GPT2_VOCABULARY, GPT2_VOCABULARY_FOLDER, fetch

        vocab_bpe, encoder_json = (fetch(GPT2_VOCABULARY_FOLDER, remote) for remote in GPT2_VOCABULARY)
        converted = vocab_bpe.with_name("gpt2.tiktoken")
        if converted.is_file():
            return load_tiktoken_bpe(str(converted))
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
        partial = converted.with_name(f"{converted.name}.{os.getpid()}.part")
        lines = (base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items())
        partial.write_bytes(b"".join(lines))
        os.replace(partial, converted)
        return ranks

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def end_of_text(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]  # as ordinary text

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token)

    def to_json(self) -> dict:
        return {"spec": self.spec}


def train_tokenizer(spec: str, train_texts: Iterable[str], held_out_texts: Iterable[str] = ()) -> Tokenizer:
    """Build the tokenizer a spec names, learning its vocabulary from the training text where it has one to learn.

    A char vocabulary also reads the held-out text: a character seen only there could not be encoded otherwise, and
    listing which characters exist teaches the model nothing. A BPE covers every byte: it learns from train text only.
    """
    if spec == "char":
        return CharTokenizer.train(itertools.chain(train_texts, held_out_texts))
    if spec.startswith("bpe:"):
        return HuggingFaceTokenizer.train_bpe(train_texts, bpe_vocab_size(spec))
    return pretrained_tokenizer(spec)


def bpe_vocab_size(spec: str) -> int:
    size = spec.partition(":")[2]
    if not size.isdigit() or not 257 <= int(size) <= 1 << 20:
        raise TinylmError(f"tokenizer '{spec}': give the vocabulary size as bpe:N with N from 257, e.g. bpe:4096")
    return int(size)


def pretrained_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer with a fixed vocabulary: `gpt2`, `hf:NAME` or a tokenizer.json path."""
    if spec == "gpt2":
        return TiktokenTokenizer()
    if spec.startswith("hf:"):
        name = spec[3:]
        local = Path(name).expanduser()
        if (local / HF_TOKENIZER_FILE).is_file():
            return HuggingFaceTokenizer(HFTokenizer.from_file(str(local / HF_TOKENIZER_FILE)), spec)
        try:
            return HuggingFaceTokenizer(HFTokenizer.from_pretrained(name), spec)
        except Exception as error:  # the hub client raises many kinds: offline, unknown repo, no tokenizer.json
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TinylmError(
                f"cannot load the Hugging Face tokenizer '{name}' ({reason}); check the name, go online, or give "
                "a local folder or tokenizer.json path"
            ) from None
    if spec.endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TinylmError(f"tokenizer file not found: {path}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers reports a malformed file as a bare Exception
            raise TinylmError(f"{path} is not a Hugging Face tokenizer.json ({error})") from None
        return HuggingFaceTokenizer(backend, spec)
    raise TinylmError(f"unknown tokenizer '{spec}'; choose {SPECS_HELP}")


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer saved in `folder` (its TOKENIZER_FILE); a one-line TinylmError naming the file when it is
    missing or damaged. A file it names is read only from inside `folder`: a run folder is a unit, and a
    tokenizer file elsewhere would be used (and copied into exports) without anyone knowing."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TinylmError(f"no tokenizer in {folder} ({TOKENIZER_FILE} is missing)")
    damaged = f"{path} is damaged; restore it or write the folder again"
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise TinylmError(f"{damaged} ({type(error).__name__})") from None
    if not isinstance(saved, dict):
        raise TinylmError(damaged)
    spec = saved.get("spec")
    if spec == "char":
        if not isinstance(saved.get("chars"), str) or sorted(set(saved["chars"])) != list(saved["chars"]):
            raise TinylmError(f"{damaged} (its characters are not a sorted string)")
        return CharTokenizer(saved["chars"])
    if spec == "gpt2":
        return TiktokenTokenizer()
    if "file" in saved:
        inside = Path(folder).resolve()
        file = (inside / str(saved["file"])).resolve()
        if inside not in file.parents:
            raise TinylmError(f"{path} names {saved['file']!r}, outside {folder}; a tokenizer is read from its folder")
        try:
            return HuggingFaceTokenizer(HFTokenizer.from_file(str(file)), str(spec))
        except Exception as error:  # tokenizers reports a missing or malformed file as a bare Exception
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TinylmError(f"cannot read {file} ({reason}); restore it or write the folder again") from None
    raise TinylmError(f"{path} holds an unknown tokenizer spec {spec!r}; upgrade tinylm to read it")
