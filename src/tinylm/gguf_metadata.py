"""What a GGUF file says about its model beyond the weights and vocabulary, kept through `tinylm import` so that
`tinylm export --to gguf` writes it back: its name, licence and origin (`general.*`), the pre-tokenizer llama.cpp
splits text with (`tokenizer.ggml.pre`, e.g. SmolLM2's `smollm`) and its padding and unknown-token ids.

The import writes them into the run folder as `gguf_metadata.json` ({key: {"type": ..., "value": ...}}, the GGUF
value types by name); a run trained by tinylm has none and its export writes tinylm's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinylm.runs import read_json, write_atomically

GGUF_METADATA_FILE = "gguf_metadata.json"
# Keys another tinylm export would otherwise lose or write differently. Architecture, file type and quantization
# version describe the file being written, so they are the writer's, never carried.
CARRIED_KEYS = ("tokenizer.ggml.pre", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id")
WRITER_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def read_gguf_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """The carried keys of the GGUF file at `path`: every `general.*` one the writer does not own, and CARRIED_KEYS."""
    import gguf

    carried = {}
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if (key.startswith("general.") and key not in WRITER_KEYS) or key in CARRIED_KEYS:
            entry: dict[str, Any] = {"type": field.types[0].name, "value": field.contents()}
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                entry["item_type"] = field.types[-1].name
            carried[key] = entry
    return carried


def save_gguf_metadata(folder: Path, metadata: dict[str, dict[str, Any]]) -> None:
    write_atomically(folder / GGUF_METADATA_FILE, json.dumps(metadata, indent=1, ensure_ascii=False))


def load_gguf_metadata(folder: Path) -> dict[str, dict[str, Any]]:
    """The metadata an import kept in `folder`; empty for a run tinylm trained."""
    path = folder / GGUF_METADATA_FILE
    return read_json(path) if path.is_file() else {}
