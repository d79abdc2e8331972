"""What an imported GGUF says about itself is read, kept in the run folder and read back; what describes the file
(architecture, file type) is not carried."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm.gguf_metadata import GGUF_METADATA_FILE, load_gguf_metadata, read_gguf_metadata, save_gguf_metadata

gguf = pytest.importorskip("gguf")


def test_carried_keys_are_read_kept_and_read_back(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_name("Tiny 7M")
    writer.add_license("apache-2.0")
    writer.add_languages(["en", "fr"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_pre("smollm")
    writer.add_pad_token_id(2)
    writer.add_eos_token_id(2)  # the vocabulary's own ids are rebuilt from the run's tokenizer, not carried
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    metadata = read_gguf_metadata(tmp_path / "m.gguf")
    assert metadata == {
        "general.name": {"type": "STRING", "value": "Tiny 7M"},
        "general.license": {"type": "STRING", "value": "apache-2.0"},
        "general.languages": {"type": "ARRAY", "value": ["en", "fr"], "item_type": "STRING"},
        "tokenizer.ggml.pre": {"type": "STRING", "value": "smollm"},
        "tokenizer.ggml.padding_token_id": {"type": "UINT32", "value": 2},
    }
    assert load_gguf_metadata(tmp_path) == {}  # a run tinylm trained has none
    save_gguf_metadata(tmp_path, metadata)
    assert (tmp_path / GGUF_METADATA_FILE).is_file() and load_gguf_metadata(tmp_path) == metadata
