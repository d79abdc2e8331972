from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import SHARED_MIRROR

from tinylm.data import sources
from tinylm.errors import TinylmError
from tinylm.tokenizers import (
    CharTokenizer,
    load_tokenizer,
    pretrained_tokenizer,
    train_tokenizer,
)

UNICODE_TEXTS = [
    "héllo wörld ✓ 🙂\n",
    "ROMEO:\n\tWherefore art thou?  ",
    "漢字かなカナ, Ελληνικά, русский, עברית, العربية",
    "\x00\x7f\u200b\r\n",
    "a literal <|endoftext|> inside a story",
    "",
]
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50) + "😀 naïve café\n"


def bpe_corpus() -> str:
    """Real text with enough distinct words for a BPE to reach its full vocabulary."""
    if (SHARED_MIRROR / "tinystories").is_dir():
        return (SHARED_MIRROR / "tinystories" / "TinyStories-valid.head1000.txt").read_text()[:300_000]
    return " ".join(f"word{i} story{i * 7} tale{i * 13}" for i in range(5000))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_tokenizer("bpe:512", [bpe_corpus()])


@pytest.fixture
def tokenizer_json(tmp_path, bpe_tokenizer):
    """A local tokenizer.json, as a user would have for GPT-Neo or any Hugging Face model."""
    bpe_tokenizer.save(tmp_path)
    return tmp_path / "tokenizer.json"


def every_kind(bpe_tokenizer, tokenizer_json):
    return {
        "char": train_tokenizer("char", ["".join(UNICODE_TEXTS) + CORPUS]),
        "bpe": bpe_tokenizer,
        "gpt2": pretrained_tokenizer("gpt2"),
        "tokenizer.json": pretrained_tokenizer(str(tokenizer_json)),
        "hf:folder": pretrained_tokenizer(f"hf:{tokenizer_json.parent}"),
    }


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_every_kind_of_tokenizer_round_trips_unicode_and_reloads(tmp_path, bpe_tokenizer, tokenizer_json, text):
    for kind, tokenizer in every_kind(bpe_tokenizer, tokenizer_json).items():
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, kind
        assert b"".join(tokenizer.token_bytes(token) for token in ids) == text.encode(), kind
        assert tokenizer.end_of_text not in ids, kind  # a literal separator in text stays text
        folder = tmp_path / kind.replace(":", "-").replace(".", "-")
        folder.mkdir()
        tokenizer.save(folder)
        loaded = load_tokenizer(folder)
        assert loaded.encode(text) == ids and loaded.fingerprint() == tokenizer.fingerprint(), kind
        assert loaded.spec == tokenizer.spec and loaded.end_of_text == tokenizer.end_of_text, kind


def test_bpe_has_exactly_the_vocabulary_it_was_asked_for(bpe_tokenizer):
    assert bpe_tokenizer.vocab_size == 512 and bpe_tokenizer.spec == "bpe:512"
    assert bpe_tokenizer.decode([bpe_tokenizer.end_of_text]) == "<|endoftext|>"


def test_bpe_that_cannot_reach_its_size_says_so():
    with pytest.raises(TinylmError, match=r"bpe:5000: the training text holds only \d+ tokens' worth of merges"):
        train_tokenizer("bpe:5000", ["tiny text " * 20])


def test_gpt2_is_the_real_gpt2_vocabulary():
    tokenizer = pretrained_tokenizer("gpt2")
    assert tokenizer.vocab_size == 50257 and tokenizer.end_of_text == 50256
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's published ids


def test_the_gpt2_files_the_tests_use_are_the_registry_files():
    folder = sources.cache_dir() / "datasets" / sources.GPT2_VOCABULARY_FOLDER
    for remote in sources.GPT2_VOCABULARY:
        assert hashlib.sha256((folder / remote.name).read_bytes()).hexdigest() == remote.sha256


def test_char_tokenizer_names_characters_outside_its_vocabulary():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(TinylmError, match=r"outside this char tokenizer's vocabulary: 'é' \(U\+00E9\), 'z'"):
        tokenizer.encode("abéz")
    assert tokenizer.decode([tokenizer.end_of_text]) == "<|endoftext|>"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("word", "unknown tokenizer 'word'; choose char, bpe:N (e.g. bpe:4096), gpt2, hf:NAME"),
        ("bpe:many", "give the vocabulary size as bpe:N with N from 257"),
        ("bpe:100", "give the vocabulary size as bpe:N with N from 257"),
        ("missing/tokenizer.json", "tokenizer file not found: missing/tokenizer.json"),
        ("hf:no-such-owner/no-such-tokenizer", "cannot load the Hugging Face tokenizer 'no-such-owner/no-such"),
    ],
)
def test_bad_tokenizer_specs_get_one_line(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TinylmError, match=re.escape(message)) as error:
        train_tokenizer(spec, ["some text"])
    assert "\n" not in str(error.value)


def test_a_tokenizer_without_an_end_of_text_token_is_refused(tmp_path, tokenizer_json):
    saved = json.loads(tokenizer_json.read_text())
    saved["added_tokens"] = []
    saved["model"]["vocab"] = {k: v for k, v in saved["model"]["vocab"].items() if k != "<|endoftext|>"}
    (tmp_path / "plain.json").write_text(json.dumps(saved))
    with pytest.raises(TinylmError, match="has no end-of-text token to separate documents"):
        pretrained_tokenizer(str(tmp_path / "plain.json"))


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path):
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    with pytest.raises(TinylmError, match=r"notes\.json is not a Hugging Face tokenizer\.json"):
        pretrained_tokenizer(str(tmp_path / "notes.json"))
