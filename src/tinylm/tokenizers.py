"""Text <-> token ids, behind one interface for every kind of tokenizer.

A tokenizer is named by a spec string and saved as `tinylm_tokenizer.json` beside the data and in every run folder, so a
run always decodes with the exact vocabulary it was trained on:
- `char`: one token per character of the corpus;
- `bpe:N`: a byte-level BPE with N tokens learned from the training split (Hugging Face `tokenizers`), stored as a
  standard `tokenizer.json` beside ours.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tinylm.errors import TinylmError

TOKENIZER_FILE = "tinylm_tokenizer.json"
END_OF_TEXT = "<|endoftext|>"


class Tokenizer(ABC):
    """Encodes text to token ids and back; decode(encode(text)) == text for any text the tokenizer covers."""

    spec: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def to_json(self) -> dict: ...

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte."""

    @property
    def end_of_text(self) -> int:
        return self.special_tokens[END_OF_TEXT]

    def fingerprint(self) -> str:
        """A hash of the vocabulary: prepared data and a run must agree on it."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, folder: Path) -> None:
        (folder / TOKENIZER_FILE).write_text(json.dumps(self.to_json(), ensure_ascii=False))


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
    def special_tokens(self) -> dict[str, int]:
        return {END_OF_TEXT: len(self.chars)}

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

    def decode(self, ids: Iterable[int]) -> str:
        chars, n = self.chars, len(self.chars)
        return "".join(chars[i] if i < n else END_OF_TEXT for i in ids)

    def to_json(self) -> dict:
        return {"spec": self.spec, "chars": self.chars}

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode()) for c in self.chars] + [0], dtype=np.int64)


class ByteLevelBPETokenizer(Tokenizer):
    """GPT-2-style byte-level BPE: text is UTF-8 bytes, so every string encodes, merged into a learned vocabulary."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        self.spec = f"bpe:{backend.get_vocab_size()}"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> ByteLevelBPETokenizer:
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
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        return {END_OF_TEXT: self.backend.token_to_id(END_OF_TEXT)}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"spec": "bpe", "tokenizer": json.loads(self.backend.to_str())}

    def save(self, folder: Path) -> None:
        self.backend.save(str(folder / "tokenizer.json"))
        (folder / TOKENIZER_FILE).write_text(json.dumps({"spec": "bpe", "file": "tokenizer.json"}))

    def token_byte_lengths(self) -> np.ndarray:
        # In the byte-level alphabet each byte is one character, so a token's byte count is its string length.
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = set(self.special_tokens.values())
        for token, token_id in self.backend.get_vocab().items():
            lengths[token_id] = 0 if token_id in special else len(token)
        return lengths


def train_tokenizer(spec: str, train_text: str, held_out_text: str = "") -> Tokenizer:
    """Build the tokenizer a spec names, learning its vocabulary from the training text.

    A char vocabulary also reads the held-out text: a character seen only there could not be encoded otherwise, and
    listing which characters exist teaches the model nothing. A BPE covers every byte: it learns from train text only.
    """
    if spec == "char":
        return CharTokenizer.train([train_text, held_out_text])
    kind, _, size = spec.partition(":")
    if kind == "bpe":
        if not size.isdigit() or not 257 <= int(size) <= 1 << 20:
            raise TinylmError(f"tokenizer '{spec}': give the vocabulary size as bpe:N with N from 257, e.g. bpe:4096")
        return ByteLevelBPETokenizer.train([train_text], int(size))
    raise TinylmError(f"unknown tokenizer '{spec}'; choose char or bpe:N (e.g. bpe:4096)")


def load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TinylmError(f"no tokenizer in {folder} ({TOKENIZER_FILE} is missing)")
    saved = json.loads(path.read_text())
    if saved.get("spec") == "char":
        return CharTokenizer(saved["chars"])
    if saved.get("spec") == "bpe":
        return ByteLevelBPETokenizer(HFTokenizer.from_file(str(folder / saved["file"])))
    raise TinylmError(f"{path} holds an unknown tokenizer spec {saved.get('spec')!r}; upgrade tinylm to read it")
