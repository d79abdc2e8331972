"""Raw text -> a tokenizer and token files: `<data_dir>/<name>-<tokenizer>/{train,val}_0000.bin` + `meta.json`.

Token files are flat arrays of uint16 ids (uint32 when the vocabulary needs it), read back through memory maps.
Preparing is skipped when `meta.json` says the same text, tokenizer and split were prepared already.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.config import DataConfig
from tinylm.data.loader import TokenShards
from tinylm.data.sources import cache_dir, read_source_text
from tinylm.errors import TinylmError
from tinylm.tokenizers import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass
class PreparedData:
    folder: Path
    meta: dict
    tokenizer: Tokenizer

    def split(self, name: str) -> TokenShards:
        info = self.meta["splits"][name]
        return TokenShards([self.folder / f for f in info["files"]], np.dtype(self.meta["dtype"]))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters train, the rest validate: the same split every time."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def prepare(config: DataConfig, force: bool = False) -> PreparedData:
    """Tokenize the source into token files, or reuse those prepared from the same inputs (unless `force`)."""
    text, name = read_source_text(config.source)
    inputs = hashlib.sha256(
        f"{FORMAT_VERSION}|{config.tokenizer}|{config.val_fraction}|".encode() + text.encode()
    ).hexdigest()
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else cache_dir() / "data"
    folder = data_dir / f"{name}-{config.tokenizer.replace(':', '').replace('/', '_')}"
    meta_path = folder / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("inputs") == inputs:
            return PreparedData(folder, meta, load_tokenizer(folder))

    splits = dict(zip(SPLITS, split_text(text, config.val_fraction)))
    for split, part in splits.items():
        if not part.strip():
            raise TinylmError(
                f"the {split} split of {config.source} is empty; give more text or change data.val_fraction"
            )
    tokenizer = train_tokenizer(config.tokenizer, splits["train"], held_out_text=splits["val"])
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)

    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    meta = {
        "format": FORMAT_VERSION,
        "source": config.source,
        "inputs": inputs,
        "tokenizer": {"spec": tokenizer.spec, "fingerprint": tokenizer.fingerprint()},
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": config.val_fraction,
        "splits": {},
    }
    for split, part in splits.items():
        file_name = f"{split}_0000.bin"
        ids = np.asarray(tokenizer.encode(part), dtype=dtype)
        ids.tofile(staging / file_name)
        meta["splits"][split] = {
            "files": [file_name],
            "tokens": int(ids.size),
            "bytes": len(part.encode()),
            "chars": len(part),
            "documents": 1,
        }
    tokenizer.save(staging)
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)  # stale data from other inputs
    os.replace(staging, folder)
    return PreparedData(folder, meta, tokenizer)
