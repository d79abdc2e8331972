from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

import tinylm
from tinylm.config import DataConfig
from tinylm.data import sources
from tinylm.data.loader import TokenShards
from tinylm.data.prepare import prepare, split_text
from tinylm.data.sources import SOURCES, DatasetSource, RemoteFile, fetch
from tinylm.errors import TinylmError
from tinylm.tokenizers import CharTokenizer, load_tokenizer, train_tokenizer


def test_the_split_is_the_first_ninety_percent_then_the_rest():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    train, val = split_text(text, 0.1)
    assert train == text[:900] and val == text[900:]
    assert split_text(text, 0.1) == (train, val)


def test_tiny_shakespeare_prepares_with_nanogpts_split_and_vocabulary(needs_mirror):
    data = prepare(DataConfig(source="tinyshakespeare", tokenizer="char"))
    meta = data.meta
    assert meta["splits"]["train"]["tokens"] == 1003854 and meta["splits"]["val"]["tokens"] == 111540
    assert data.tokenizer.vocab_size == 65 + 1  # nanoGPT's 65 characters, then <|endoftext|>
    assert len(data.split("val")) == 111540
    again = prepare(DataConfig(source="tinyshakespeare", tokenizer="char"))
    assert again.meta == meta


def test_preparing_again_is_a_no_op_until_the_text_changes(text_file, tmp_path):
    config = DataConfig(source=str(text_file), data_dir=str(tmp_path / "data"))
    first = prepare(config)
    stamp = (first.folder / "train_0000.bin").stat().st_mtime_ns
    assert (prepare(config).folder / "train_0000.bin").stat().st_mtime_ns == stamp
    text_file.write_text(text_file.read_text() + "zebra\n")
    changed = prepare(config)
    assert "z" in changed.tokenizer.chars
    assert not list(changed.folder.parent.glob("*.tmp-*"))


def test_token_files_hold_the_encoded_text(text_file, tmp_path):
    data = prepare(DataConfig(source=str(text_file), data_dir=str(tmp_path)))
    train_text, val_text = split_text(text_file.read_text(), 0.1)
    assert data.meta["dtype"] == "uint16"
    decoded = data.tokenizer.decode(np.fromfile(data.folder / "val_0000.bin", dtype=np.uint16).tolist())
    assert decoded == val_text
    assert data.meta["splits"]["train"]["bytes"] == len(train_text.encode())


def test_char_tokenizer_round_trips_and_saves(tmp_path):
    text = "héllo wörld ✓ 🙂\n"
    tokenizer = train_tokenizer("char", text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.fingerprint() == tokenizer.fingerprint()
    assert tokenizer.decode([tokenizer.end_of_text]) == "<|endoftext|>"
    assert tokenizer.token_byte_lengths()[tokenizer.encode("🙂")[0]] == 4


def test_characters_outside_the_vocabulary_are_named():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(TinylmError, match=r"outside this char tokenizer's vocabulary: 'é' \(U\+00E9\), 'z'"):
        tokenizer.encode("abéz")


def test_an_unknown_tokenizer_is_refused():
    with pytest.raises(TinylmError, match="unknown tokenizer 'word'; choose char or bpe:N"):
        train_tokenizer("word", "abc")
    with pytest.raises(TinylmError, match="give the vocabulary size as bpe:N"):
        train_tokenizer("bpe:many", "abc")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "data file is empty"),
        (b"  \n\n", "data file is empty"),
        (b"ok\xff\xfe", "not UTF-8 text (bad byte at offset 2)"),
    ],
)
def test_unusable_data_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(TinylmError, match=re.escape(message)):
        prepare(DataConfig(source=str(path)))


def test_a_missing_data_file_or_unknown_dataset_is_named(tmp_path):
    with pytest.raises(TinylmError, match=r"data file not found: .*nothere\.txt"):
        prepare(DataConfig(source=str(tmp_path / "nothere.txt")))
    with pytest.raises(TinylmError, match="unknown dataset 'shakespear'; choose one of: tinyshakespeare"):
        prepare(DataConfig(source="shakespear"))


def fake_source(tmp_path, content: bytes) -> DatasetSource:
    remote = RemoteFile(
        "input.txt", "https://example.invalid/input.txt", hashlib.sha256(content).hexdigest(), len(content)
    )
    return DatasetSource("fake", "fake", "test data", (remote,))


def test_a_mirrored_file_is_verified_and_cached(tmp_path, monkeypatch):
    source = fake_source(tmp_path, b"to be or not to be\n")
    (tmp_path / "mirror" / "fake").mkdir(parents=True)
    (tmp_path / "mirror" / "fake" / "input.txt").write_bytes(b"to be or not to be\n")
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "mirror"))
    path = fetch(source, source.files[0])
    assert path.parent == sources.cache_dir() / "datasets" / "fake" and path.read_bytes() == b"to be or not to be\n"
    (tmp_path / "mirror" / "fake" / "input.txt").unlink()
    assert fetch(source, source.files[0]) == path  # served from the cache from now on


def test_a_file_that_fails_its_checksum_is_not_kept(tmp_path, monkeypatch):
    source = fake_source(tmp_path, b"the real text\n")
    (tmp_path / "mirror" / "fake").mkdir(parents=True)
    (tmp_path / "mirror" / "fake" / "input.txt").write_bytes(b"a corrupted copy\n")
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(TinylmError, match="does not match the registry's sha256"):
        fetch(source, source.files[0])
    assert not list((sources.cache_dir() / "datasets" / "fake").iterdir())


def test_offline_without_cache_or_mirror_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "empty-mirror"))
    with pytest.raises(TinylmError) as error:
        fetch(SOURCES["tinyshakespeare"], SOURCES["tinyshakespeare"].files[0])
    message = str(error.value)
    assert str(sources.cache_dir() / "datasets" / "tinyshakespeare") in message
    assert str(tmp_path / "empty-mirror" / "tinyshakespeare") in message
    assert "TINYLM_OFFLINE" in message


def test_a_download_resumes_from_its_partial_file(tmp_path, monkeypatch):
    content = b"0123456789" * 100
    source = fake_source(tmp_path, content)
    target = tmp_path / "input.txt"
    target.with_name("input.txt.part").write_bytes(content[:300])
    requested = {}

    class Response:
        status = 206

        def __init__(self, request):
            requested["range"] = request.get_header("Range")
            self.rest = [content[300:]]

        def read(self, _size):
            return self.rest.pop() if self.rest else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda request, timeout: Response(request))
    assert sources.download(source.files[0], target).read_bytes() == content
    assert requested["range"] == "bytes=300-"


def test_batches_are_next_token_pairs_that_never_cross_a_file_end(tmp_path):
    for i, start in enumerate((0, 1000)):
        np.arange(start, start + 50, dtype=np.uint16).tofile(tmp_path / f"train_{i:04d}.bin")
    shards = TokenShards([tmp_path / "train_0000.bin", tmp_path / "train_0001.bin"], np.dtype(np.uint16))
    x, y = shards.sample_batch(200, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(y[:, -1] - x[:, 0] == 8)  # consecutive ids: no window spans the jump from 49 to 1000
    assert {int(t) // 1000 for t in x[:, 0]} == {0, 1}


def test_sequential_windows_predict_every_token_exactly_once(tmp_path):
    np.arange(0, 21, dtype=np.uint16).tofile(tmp_path / "val_0000.bin")
    shards = TokenShards([tmp_path / "val_0000.bin"], np.dtype(np.uint16))
    targets = torch.cat([y for _, y in shards.sequential_windows(8)])
    assert targets.tolist() == list(range(1, 21))


def test_meta_records_the_tokenizer(text_file, tmp_path):
    data = prepare(DataConfig(source=str(text_file), data_dir=str(tmp_path)))
    meta = json.loads((data.folder / "meta.json").read_text())
    assert meta["tokenizer"] == {"spec": "char", "fingerprint": data.tokenizer.fingerprint()}
    assert meta["vocab_size"] == data.tokenizer.vocab_size


@pytest.mark.parametrize(
    "text", ["héllo wörld ✓ 🙂\n", "ROMEO:\n\tWherefore art thou?  ", "漢字かなカナ", "\x00\x7f\u200b", ""]
)
def test_byte_level_bpe_round_trips_any_text(tmp_path, text):
    corpus = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50) + "😀 naïve café\n"
    tokenizer = train_tokenizer("bpe:300", corpus)
    assert tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode(text)) == text
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.fingerprint() == tokenizer.fingerprint()
    assert (tmp_path / "tokenizer.json").is_file()  # the standard Hugging Face file, loadable by other tools


def test_bpe_byte_lengths_add_up_to_the_utf8_size():
    tokenizer = train_tokenizer("bpe:320", "naïve café, 🙂 smile\n" * 40)
    text = "a naïve 🙂 café"
    lengths = tokenizer.token_byte_lengths()
    assert lengths[tokenizer.encode(text)].sum() == len(text.encode())
    assert lengths[tokenizer.end_of_text] == 0


def test_a_bpe_tokenizer_prepares_and_trains(text_file, tmp_path):
    result = tinylm.train(
        tinylm.load_config(None, tiny_overrides(text_file, tmp_path / "run", **{"data.tokenizer": "bpe:300"}))
    )
    run = tinylm.load(result.run_dir)
    assert run.tokenizer.spec.startswith("bpe:") and run.config.model.vocab_size == run.tokenizer.vocab_size
    assert run.evaluate().bpb > 0


def test_streaming_never_splits_a_character_across_pieces(text_file, tmp_path, monkeypatch):
    result = tinylm.train(
        tinylm.load_config(None, tiny_overrides(text_file, tmp_path / "run", **{"data.tokenizer": "bpe:300"}))
    )
    run = tinylm.load(result.run_dir)
    emoji_ids = run.tokenizer.encode("🙂")  # not in the training text: one token per byte
    assert len(emoji_ids) == 4
    scripted = [*run.tokenizer.encode("All"), *emoji_ids, *run.tokenizer.encode(" hi")]
    monkeypatch.setattr(tinylm.run, "generate_tokens", lambda *args: iter(scripted))
    pieces = list(run.stream("First", max_new_tokens=len(scripted)))
    assert "".join(pieces) == "All🙂 hi"
    assert all("\ufffd" not in piece for piece in pieces)
