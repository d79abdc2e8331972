from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL_TEXT, run_cli, tiny_overrides

import tinylm
from tinylm.config import DataConfig, ModelConfig
from tinylm.data import prepare as prepare_module
from tinylm.data import sources
from tinylm.data.documents import open_source, read_text, read_wikitext
from tinylm.data.loader import PackedRows, TokenShards
from tinylm.data.prepare import prepare, token_dtype
from tinylm.errors import TinylmError
from tinylm.model import build_model
from tinylm.tokenizers import CharTokenizer, train_tokenizer

STORIES = [f"Story {i}: Tom saw a {'big ' * (i % 4)}dog. 🙂 It was fun.\nThe end." for i in range(40)]


@pytest.fixture
def stories_file(tmp_path):
    """Shaped like TinyStories: stories separated by <|endoftext|> lines."""
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORIES) + "\n<|endoftext|>\n")
    return path


def shard_tokens(data, split: str) -> list[int]:
    dtype = np.dtype(data.meta["dtype"])
    return np.concatenate(
        [np.fromfile(data.folder / f, dtype=dtype) for f in data.meta["splits"][split]["files"]]
    ).tolist()


def documents_of(config: DataConfig) -> dict[str, list[str]]:
    by_split: dict[str, list[str]] = {}
    for split, block in open_source(config).documents():
        by_split.setdefault(split, []).extend(block)
    return by_split


def flat(blocks) -> list[str]:
    return [document for block in blocks for document in block]


def test_documents_are_the_texts_between_separators(stories_file):
    assert flat(read_text(stories_file)) == STORIES


def test_a_separator_cut_by_a_read_boundary_still_separates(tmp_path, monkeypatch):
    monkeypatch.setattr("tinylm.data.documents.READ_BYTES", 7)
    path = tmp_path / "s.txt"
    path.write_text("first story<|endoftext|>second story<|endoftext|>third")
    assert flat(read_text(path)) == ["first story", "second story", "third"]


def test_a_file_without_separators_is_one_document_kept_verbatim(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text("  ROMEO:\nBut soft!\n\n")
    assert flat(read_text(path)) == ["  ROMEO:\nBut soft!\n\n"]


def test_wikitext_is_split_into_articles(tmp_path):
    path = tmp_path / "wiki.valid.raw"
    path.write_text(
        " \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n More . \n \n = Beta = \n \n Beta text . \n"
    )
    articles = flat(read_wikitext(path))
    assert len(articles) == 2
    assert articles[0].startswith(" = Alpha = \n") and "= = Section = =" in articles[0]
    assert articles[1] == " = Beta = \n \n Beta text ."


def test_the_real_wikitext_validation_file_has_its_60_articles(needs_mirror):
    documents = documents_of(DataConfig(source="wikitext2", subset="valid"))
    assert len(documents["train"]) + len(documents["val"]) == 60
    assert documents["val"][0].startswith(" = Homarus gammarus = ")


def test_prepared_data_needs_no_raw_files_again(needs_mirror, monkeypatch):
    config = DataConfig(source="wikitext2", subset="test", tokenizer="bpe:1024")
    first = prepare(config)
    monkeypatch.delenv("TINYLM_DATASETS_MIRROR")
    (sources.cache_dir() / "datasets" / "wikitext-2-raw" / "wiki.test.raw").unlink()  # deleted to save space
    assert prepare(config).meta == first.meta


def test_the_real_tinystories_part_has_its_stories(needs_mirror):
    documents = documents_of(DataConfig(source="tinystories", subset="head10k"))
    assert len(documents["train"]) + len(documents["val"]) == 1728  # 1727 whole stories and the cut last one
    assert all("<|endoftext|>" not in d and d == d.strip() for d in documents["train"])


def test_held_out_documents_are_spread_evenly_and_deterministically(stories_file):
    config = DataConfig(source=str(stories_file), val_fraction=0.1)
    documents = documents_of(config)
    assert documents["val"] == [STORIES[i] for i in range(0, 40, 10)]
    assert len(documents["train"]) == 36 and documents_of(config) == documents


def test_a_single_document_holds_out_its_tail_as_nanogpt_does(tmp_path):
    text = "".join(chr(65 + i % 26) for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    assert documents_of(DataConfig(source=str(tmp_path / "one.txt"), val_fraction=0.1)) == {
        "train": [text[:900]],
        "val": [text[900:]],
    }


def test_jsonl_json_and_parquet_files_and_folders_read_their_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"story": s, "id": i}) for i, s in enumerate(STORIES[:3])))
    (folder / "b.json").write_text(json.dumps([{"story": s} for s in STORIES[3:5]]))
    pq.write_table(pa.table({"story": STORIES[5:8], "n": [1, 2, 3]}), folder / "more" / "c.parquet")
    (folder / "notes.md").write_text("not data")
    documents = documents_of(DataConfig(source=str(folder), text_field="story"))
    assert sorted(documents["train"] + documents["val"]) == sorted(STORIES[:8])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no 'text' field \(it has: body\)"),
        ("bad.jsonl", b'{"text": 5}\n', r"bad\.jsonl:1: field 'text' holds int, not text"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"bad\.jsonl:2: not UTF-8 \(bad byte at offset 25\)"),
        ("bad.json", b'{"text": "one"}', r"holds a JSON dict, not a list of documents"),
        ("bad.txt", b"", "data file is empty"),
        ("bad.txt", b"  \n\n", "data file is empty"),
        ("bad.txt", b"ok\xff\xfe", r"not UTF-8 text: bad byte at offset 2; .* --errors replace"),
        ("bad.csv", b"a,b", r"cannot read .*bad\.csv: tinylm reads \.txt, \.raw, \.jsonl, \.json, \.parquet files"),
    ],
)
def test_unusable_data_files_are_refused_with_where_and_why(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TinylmError, match=message):
        prepare(DataConfig(source=str(path)))
    assert not list(tmp_path.glob("**/*.bin"))


def test_a_bad_byte_far_into_a_file_is_reported_at_its_offset(tmp_path, monkeypatch):
    monkeypatch.setattr("tinylm.data.documents.READ_BYTES", 1000)
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * 2500 + "é".encode()[:1] + b"b" * 10)
    with pytest.raises(TinylmError, match="bad byte at offset 2500;"):
        prepare(DataConfig(source=str(path)))


def test_errors_replace_goes_on_past_bad_bytes(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 20)
    data = prepare(DataConfig(source=str(path), encoding_errors="replace"))
    assert "\ufffd" in data.tokenizer.chars


def test_a_missing_file_or_unknown_dataset_is_named(tmp_path):
    with pytest.raises(TinylmError, match=r"data file not found: .*nothere\.jsonl"):
        prepare(DataConfig(source=str(tmp_path / "nothere.jsonl")))
    with pytest.raises(TinylmError, match="unknown dataset 'shakespear'; choose one of: tinyshakespeare, tinystories"):
        prepare(DataConfig(source="shakespear"))
    with pytest.raises(TinylmError, match=r"data\.subset applies to registry datasets"):
        prepare(DataConfig(source=str(tmp_path), subset="head10k"))


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300", "gpt2"])
def test_shards_hold_exactly_the_documents_each_followed_by_end_of_text(stories_file, tmp_path, tokenizer):
    config = DataConfig(source=str(stories_file), tokenizer=tokenizer, shard_tokens=97, data_dir=str(tmp_path / "d"))
    data = prepare(config)
    documents = documents_of(config)
    for split in ("train", "val"):
        expected = []
        for document in documents[split]:
            expected += [*data.tokenizer.encode(document), data.tokenizer.end_of_text]
        info = data.meta["splits"][split]
        assert shard_tokens(data, split) == expected
        assert len(info["files"]) == -(-len(expected) // 97) and info["tokens"] == len(expected)
        assert info["documents"] == len(documents[split])
        assert info["bytes"] == sum(len(d.encode()) for d in documents[split])
        assert all(
            (data.folder / f).stat().st_size <= 97 * np.dtype(data.meta["dtype"]).itemsize for f in info["files"]
        )


def test_parallel_and_single_process_preparation_write_the_same_shards(stories_file, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 200)  # many batches, so the pool really shares them out
    results = []
    for num_proc in (1, 2):
        config = DataConfig(
            source=str(stories_file), tokenizer="bpe:300", num_proc=num_proc, data_dir=str(tmp_path / str(num_proc))
        )
        data = prepare(config)
        results.append({split: shard_tokens(data, split) for split in data.meta["splits"]})
    assert results[0] == results[1]


def test_meta_records_tokenizer_dtype_and_counts(stories_file, tmp_path):
    data = prepare(DataConfig(source=str(stories_file), tokenizer="gpt2", data_dir=str(tmp_path)))
    meta = json.loads((data.folder / "meta.json").read_text())
    assert meta["tokenizer"] == {"spec": "gpt2", "fingerprint": data.tokenizer.fingerprint()}
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["end_of_text"] == 50256
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40


def test_preparing_again_is_a_no_op_until_the_text_changes_or_forced(stories_file, tmp_path):
    config = DataConfig(source=str(stories_file), data_dir=str(tmp_path / "data"))
    first = prepare(config)
    stamp = (first.folder / "train_0000.bin").stat().st_mtime_ns
    assert (prepare(config).folder / "train_0000.bin").stat().st_mtime_ns == stamp
    assert (prepare(config, force=True).folder / "train_0000.bin").stat().st_mtime_ns != stamp
    stories_file.write_text(stories_file.read_text() + "A zebra story.\n")
    changed = prepare(config)
    assert "z" in changed.tokenizer.chars
    assert not list(changed.folder.parent.glob("*.tmp-*"))


def test_a_changed_tokenizer_file_prepares_again(stories_file, tmp_path):
    corpus = "".join(STORIES) * 20
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train_tokenizer("bpe:300", [corpus]).save(tmp_path / "a")
    train_tokenizer("bpe:320", [corpus]).save(tmp_path / "b")
    tokenizer_file = tmp_path / "mine" / "tokenizer.json"
    tokenizer_file.parent.mkdir()
    shutil.copyfile(tmp_path / "a" / "tokenizer.json", tokenizer_file)
    config = DataConfig(source=str(stories_file), tokenizer=str(tokenizer_file), data_dir=str(tmp_path / "data"))
    assert prepare(config).meta["vocab_size"] == 300
    assert prepare(config).folder.name.startswith("stories-tokenizer-")
    shutil.copyfile(tmp_path / "b" / "tokenizer.json", tokenizer_file)
    assert prepare(config).meta["vocab_size"] == 320


def test_an_interrupted_prepare_leaves_nothing_a_later_run_trusts(stories_file, tmp_path, monkeypatch):
    config = DataConfig(source=str(stories_file), shard_tokens=50, data_dir=str(tmp_path / "data"))
    written = []
    real_write = prepare_module.ShardWriter.write

    def write_then_die(self, ids):
        real_write(self, ids)
        written.append(ids.size)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.ShardWriter, "write", write_then_die)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 100)
    with pytest.raises(KeyboardInterrupt):
        prepare(config)
    assert not list((tmp_path / "data").iterdir())  # no folder, no meta.json, no shard
    monkeypatch.undo()
    (tmp_path / "data" / "stories-char.tmp-999999999").mkdir(parents=True)  # left by a process killed outright
    data = prepare(config)
    assert data.meta["splits"]["train"]["tokens"] > 0
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["stories-char"]


def test_a_vocabulary_too_large_for_the_dtype_is_refused():
    big = CharTokenizer("".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000)))
    with pytest.raises(TinylmError, match=r"70,001 tokens, more than uint16 holds \(65,536\); use data.token_dtype"):
        token_dtype(big, "uint16")
    assert token_dtype(big, "auto") == np.uint32
    assert token_dtype(CharTokenizer("ab"), "auto") == np.uint16


def test_data_tokenized_with_another_vocabulary_is_refused(stories_file, tmp_path, capsys):
    overrides = tiny_overrides(stories_file, tmp_path / "run", **{"data.data_dir": str(tmp_path / "data")})
    run_dir = tinylm.train(tinylm.load_config(None, overrides)).run_dir
    stories_file.write_text(stories_file.read_text() + "Zoë's new story, with new letters: qxj.\n")
    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--train.max-steps", "30")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(r"was tokenized with another vocabulary \(char, fingerprint \w+\) than", err)


def test_hugging_face_datasets_read_local_data_files_without_the_hub(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    for split, stories in (("train", STORIES[:30]), ("validation", STORIES[30:])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in stories))
    data = prepare(DataConfig(source=f"hf:{folder}", tokenizer="char", data_dir=str(tmp_path / "data")))
    assert data.meta["splits"]["train"]["documents"] == 30 and data.meta["splits"]["val"]["documents"] == 10
    with pytest.raises(TinylmError, match=r"has no 'story' column \(it has: text\); set --text-field"):
        prepare(DataConfig(source=f"hf:{folder}", text_field="story"))


def test_an_unreachable_hugging_face_dataset_gets_one_line():
    pytest.importorskip("datasets")
    with pytest.raises(TinylmError, match="cannot load the Hugging Face dataset 'no-such-owner/no-such-set'") as error:
        prepare(DataConfig(source="hf:no-such-owner/no-such-set"))
    assert "\n" not in str(error.value)


def test_batches_are_next_token_pairs_that_never_cross_a_shard_end(tmp_path):
    for i, start in enumerate((0, 1000)):
        np.arange(start, start + 50, dtype=np.uint16).tofile(tmp_path / f"train_{i:04d}.bin")
    shards = TokenShards([tmp_path / "train_0000.bin", tmp_path / "train_0001.bin"], np.dtype(np.uint16))
    x, y = shards.sample_batch(200, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(y[:, -1] - x[:, 0] == 8)  # consecutive ids: no window spans the jump from 49 to 1000
    assert {int(t) // 1000 for t in x[:, 0]} == {0, 1}


def test_train_prepares_tinystories_with_a_trained_bpe_on_first_use(needs_mirror, tmp_path):
    overrides = {
        "data.source": "tinystories",
        "data.subset": "head10k",
        "data.tokenizer": "bpe:512",
        "model.block_size": 32,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.max_steps": 4,
        "train.eval_interval": 4,
        "train.eval_batches": 1,
        "sample.prompt": "Once upon a time",
        "sample.max_new_tokens": 5,
        "out": str(tmp_path / "run"),
    }
    result = tinylm.train(tinylm.load_config(None, overrides))
    run = tinylm.load(result.run_dir)
    assert run.tokenizer.spec == "bpe:512" and run.config.model.vocab_size == 512
    assert (result.run_dir / "tokenizer.json").is_file()
    assert re.match(r"Once upon a time", result.sample)


def packed_rows(tmp_path, lengths: list[int], block_size: int, seed: int = 0) -> PackedRows:
    """Documents of these lengths (tokens 1..9, each followed by end-of-text 0) in one shard file, packed."""
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.append(rng.integers(1, 10, n), 0) for n in lengths]).astype(np.uint16)
    path = tmp_path / "train_0000.bin"
    tokens.tofile(path)
    return PackedRows(TokenShards([path], np.dtype(np.uint16)), 0, block_size, seed)


def test_packed_rows_hold_every_token_once_per_epoch_and_start_at_document_starts(tmp_path):
    lengths = [int(n) for n in np.random.default_rng(1).integers(1, 40, 300)] + [70, 95]  # two longer than a row
    packed = packed_rows(tmp_path, lengths, block_size=32)
    tokens = packed.split.shards[0]
    document_starts = {0, *(np.flatnonzero(np.asarray(tokens) == 0)).tolist()}
    for epoch in (0, 1):
        rows = packed.epoch(epoch)
        covered = sorted(p for row in rows for _, start, length in row for p in range(start, start + length))
        assert covered == list(range(len(tokens)))  # every token once
        assert all(sum(length for _, _, length in row) <= 32 for row in rows)
        assert sum(sum(length for _, _, length in row) == 32 for row in rows) >= len(rows) - 2  # full but the last
        mid_document = sum(length for row in rows for _, start, length in row if start not in document_starts)
        assert mid_document < 0.1 * len(tokens)  # the rest of a cut, and the long documents' later pieces
        assert sum(row[0][1] in document_starts for row in rows) > 0.9 * len(rows)
    assert packed.epoch(0) != packed.epoch(1)  # each epoch its own shuffle
    assert packed_rows(tmp_path, lengths, block_size=32).epoch(1) == packed.epoch(1)  # the seed alone decides


def test_packed_batches_predict_each_true_next_token_and_number_the_documents(tmp_path):
    packed = packed_rows(tmp_path, [5, 3, 9, 2, 30, 4], block_size=16)
    tokens = np.asarray(packed.split.shards[0]).astype(np.int64)
    rows = packed.epoch(0)
    inputs, targets, documents = packed.batch(0, len(rows) + 1)  # one row into the next epoch
    assert inputs.shape == targets.shape == documents.shape == (len(rows) + 1, 16)
    for i, row in enumerate(rows):
        position = 0
        for document, (_, start, length) in enumerate(row):
            assert inputs[i, position : position + length].tolist() == tokens[start : start + length].tolist()
            following = tokens[start + 1 : start + length + 1].tolist()
            assert targets[i, position : position + len(following)].tolist() == following
            assert documents[i, position : position + length].eq(document).all()
            position += length
        assert targets[i, position:].eq(-1).all() and (position == 16 or documents[i, position:].gt(document).all())
    next_epoch = np.concatenate([tokens[start : start + length] for _, start, length in packed.epoch(1)[0]])
    assert inputs[-1, : len(next_epoch)].tolist() == next_epoch.tolist()  # row len(rows) is epoch 1's first
    _, half, _ = packed.batch(0, 4, rows=slice(2, 4))
    assert torch.equal(half, targets[2:4])


def test_attention_stays_inside_each_packed_document():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = torch.randint(1, 20, (1, 16))
    documents = torch.tensor([[0] * 6 + [1] * 10])
    changed = tokens.clone()
    changed[0, :6] = (changed[0, :6] + 1) % 20
    with torch.no_grad():
        separate, mixed = model(tokens, documents=documents)[0], model(tokens)[0]
        torch.testing.assert_close(model(changed, documents=documents)[0][:, 6:], separate[:, 6:])
        assert not torch.allclose(model(changed)[0][:, 6:], mixed[:, 6:])  # without documents it would leak
        torch.testing.assert_close(separate[:, :6], mixed[:, :6])  # the first document sees the same either way


def test_training_on_packed_documents_lowers_the_loss(text_file, tmp_path):
    overrides = tiny_overrides(text_file, tmp_path / "run", **{"data.packing": "bos", "train.log_interval": 1})
    result = tinylm.train(tinylm.load_config(None, overrides))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] and math.isfinite(result.best_val_loss)


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300"])
def test_a_document_longer_than_a_batch_is_tokenized_in_pieces_to_the_same_ids(tmp_path, monkeypatch, tokenizer):
    """One huge line costs the memory of a batch, not of the line: it goes in pieces cut at word boundaries."""
    text = (SMALL_TEXT.replace("\n", " ") + "  double  spaces,\tand tabs ") * 6  # one document, no separator
    (tmp_path / "one.txt").write_text(text)
    config = DataConfig(source=str(tmp_path / "one.txt"), tokenizer=tokenizer, data_dir=str(tmp_path / "d"))
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 300)
    pieces = list(prepare_module._pieces(text))
    assert "".join(pieces) == text and len(pieces) > 20 and max(map(len, pieces)) <= 300
    assert all(isinstance(piece, prepare_module.DocumentPiece) for piece in pieces[:-1])
    assert not isinstance(pieces[-1], prepare_module.DocumentPiece)
    data = prepare(config)
    documents = documents_of(config)
    for split in ("train", "val"):
        (document,) = documents[split]
        assert shard_tokens(data, split) == [*data.tokenizer.encode(document), data.tokenizer.end_of_text]
        assert data.meta["splits"][split]["documents"] == 1
