"""The tinystories-chat instruction set: TinyStories' training stories, each asked for by a request made from the story
alone, the same on every load, and never one of the stories a pretraining run on the same data holds out."""

from __future__ import annotations

import re

import pytest

from tinylm.config import DataConfig
from tinylm.data.documents import open_source
from tinylm.data.instructions import load_instructions, story_request
from tinylm.errors import TinylmError

STORY = (
    "Once upon a time, there was a girl named Lily. She found a shiny red ball in the garden. "
    "Lily threw the ball to her dog, Max, and they played until the sun went down."
)


def test_a_story_is_asked_for_by_its_words_or_its_first_sentence():
    request = story_request(STORY)
    assert request == story_request(STORY)
    words = re.fullmatch(r"Tell me a short story with the words (\w+), (\w+) and (\w+)\.", request)
    if words:
        assert all(word in STORY for word in words.groups()) and len(set(words.groups())) == 3
    else:
        assert request == "Tell me a story that starts with: Once upon a time, there was a girl named Lily."


def test_the_mirror_stories_become_a_fixed_chat_set_apart_from_pretraining_val_stories(needs_mirror):
    data = load_instructions("tinystories-chat:head10k", held_out_examples=20, max_examples=400)
    assert data == load_instructions("tinystories-chat:head10k", held_out_examples=20, max_examples=400)
    assert (len(data.train), len(data.held_out)) == (380, 20)
    conversations = data.train + data.held_out
    requests = [user["content"] for user, _ in conversations]
    assert sum(r.startswith("Tell me a short story with the words") for r in requests) > 100
    assert sum(r.startswith("Tell me a story that starts with: ") for r in requests) > 100
    for user, assistant in conversations:
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if user["content"].startswith("Tell me a story that starts with: "):
            opening = user["content"].removeprefix("Tell me a story that starts with: ")
            assert " ".join(assistant["content"].split()).startswith(opening)
    held_out = set(open_source(DataConfig(source="tinystories", subset="head10k")).split_documents("val"))
    assert not held_out & {assistant["content"] for _, assistant in conversations}


def test_unknown_instruction_data_is_one_line_naming_the_choices():
    with pytest.raises(TinylmError, match=r"instruction data not found: nope\.jsonl; .*tinystories-chat\[:SUBSET\]"):
        load_instructions("nope.jsonl", held_out_examples=1)
