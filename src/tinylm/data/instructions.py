"""Instruction data for fine-tuning: conversations rendered with a chat template, as token ids with labels on the
responses only.

A file (.jsonl, one object per line, or .json, a list of objects) holds examples in either form:
- Alpaca: {"instruction": ..., "input": ... (may be empty or absent), "output": ...}
- chat:   {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
An Alpaca example is read as a two-message chat: the user says the instruction (and, after a blank line, the input),
the assistant answers the output. So both forms take one path from here on.

`tinystories-chat` is an instruction set derived from TinyStories (`story_chats`): each training story becomes a
request for it, made from the story alone ("Tell me a short story with the words ...", or "Tell me a story that starts
with: <its first sentence>"), answered by the story. It teaches a story model to tell stories on request.

Each conversation is rendered with the tokenizer's own chat template, or DEFAULT_CHAT_TEMPLATE when it has none. The
model learns only what the assistant says: every other token gets the label IGNORE (-100), which the loss skips.
Rendering and encoding go piece by piece (prompt, response, prompt, response, ...), exactly as a chat is encoded when
the model answers: the prompt is encoded on its own and the reply's tokens follow it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from tinylm.config import DataConfig
from tinylm.data.documents import open_source
from tinylm.data.sources import SOURCES, fetch
from tinylm.errors import TinylmError

IGNORE = -100
"""The label of a token the loss skips (PyTorch's cross_entropy ignore_index)."""

# For tokenizers without a chat template (GPT-2's, tinylm's own). Markdown-like headers that any byte-level tokenizer
# encodes; the answer ends with the end-of-text token, so generation knows when to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' ~ message['role'] | capitalize ~ ':\\n' ~ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

FINAL_ANSWER = re.compile(r"####\s*([^\n]+?)\s*$")
"""GSM8K's convention: a worked answer ends with a line `#### 42`, the final answer to check."""
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
"""A number as worked answers write one: 72, 1,200, 0.25, -3."""

Messages = list[dict[str, str]]
Render = Callable[[Messages, bool], str]
"""(messages, add_generation_prompt) -> the conversation as text."""
Encode = Callable[[str], list[int]]
"""Rendered text -> token ids, the template's special tokens included."""
Example = TypeVar("Example")


@dataclass
class InstructionData:
    train: list[Messages]
    held_out: list[Messages]


def read_examples(path: Path) -> list[Messages]:
    """Every example of a .jsonl or .json file, as a conversation; a malformed one stops with its place named."""
    return [as_messages(record, where) for where, record in read_records(path)]


def read_records(path: Path) -> list[tuple[str, object]]:
    """Every record of a .jsonl (one JSON object per line) or .json (a list) file, each with its place in the file
    ("data.jsonl:3") for the error that names it."""
    try:
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            records = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
        elif path.suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, list):
                raise TinylmError(f"{path} must hold a JSON list of examples, not a {type(loaded).__name__}")
            records = [(f"{path} example {n}", record) for n, record in enumerate(loaded, 1)]
        else:
            raise TinylmError(f"{path}: fine-tuning data must be a .jsonl or .json file of examples")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TinylmError(f"{path} is not valid JSON ({error}); fix the file or give another --data") from None
    if not records:
        raise TinylmError(f"{path} holds no examples")
    return records


def as_messages(record: object, where: str) -> Messages:
    """An Alpaca or chat example as a list of {role, content} messages."""
    if isinstance(record, dict) and "messages" in record:
        messages = checked_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise TinylmError(f"{where}: the conversation has no assistant message to learn from")
        return messages
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        fields = {key: record.get(key) or "" for key in ("instruction", "input", "output")}
        if not all(isinstance(value, str) for value in fields.values()):
            raise TinylmError(f"{where}: instruction, input and output must be strings")
        prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise TinylmError(
        f"{where}: an example needs 'instruction' and 'output' (Alpaca form) or 'messages' (chat form); it has {keys}"
    )


def checked_messages(messages: object, where: str) -> Messages:
    """A record's 'messages' as a list of {role, content} messages, or a one-line error naming `where`."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise TinylmError(f'{where}: \'messages\' must be a list of {{"role": ..., "content": ...}} objects')
    return [{"role": m["role"], "content": m["content"]} for m in messages]


STORY_CHAT_SETS = {"tinystories-chat": "tinystories"}
"""Instruction sets derived from a story dataset (`story_chats`), by name: `NAME` or `NAME:SUBSET` (a subset of the
stories, e.g. tinystories-chat:head10k, what the offline mirror holds)."""


def load_instructions(spec: str, held_out_examples: int, max_examples: int | None = None) -> InstructionData:
    """The examples of a registry dataset (gsm8k, alpaca), a derived story set (tinystories-chat) or a local file,
    split into train and held out."""
    check_instruction_data(spec)
    name, _, subset = spec.partition(":")
    if name in STORY_CHAT_SETS:
        stories = open_source(DataConfig(source=STORY_CHAT_SETS[name], subset=subset or None))
        examples = story_chats(itertools.islice(stories.split_documents("train"), max_examples))
    else:
        dataset = SOURCES.get(spec)
        paths = [fetch(dataset.folder, remote) for remote in dataset.files] if dataset else [Path(spec).expanduser()]
        examples = [example for path in paths for example in read_examples(path)][:max_examples]
        if dataset and dataset.restore_final_answers:
            examples = [with_final_answer(example) for example in examples]
    return InstructionData(*split_held_out(examples, held_out_examples, spec))


def split_held_out(examples: list[Example], held_out_examples: int, spec: str) -> tuple[list[Example], list[Example]]:
    """(train, held out): the held-out examples spread evenly through `examples`, so the split depends on the data
    alone (not on a seed) and stays the same from run to run."""
    if len(examples) <= held_out_examples:
        raise TinylmError(
            f"{spec} has {len(examples)} examples, not more than the {held_out_examples} held out; "
            "give more data or lower --held-out-examples"
        )
    held = {len(examples) * i // held_out_examples for i in range(held_out_examples)}
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def check_instruction_data(spec: str) -> None:
    """Refuse, in one line, instruction data that is neither a dataset name nor a file, before any work."""
    if spec in SOURCES or spec.partition(":")[0] in STORY_CHAT_SETS or Path(spec).expanduser().is_file():
        return
    names = [name for name, source in SOURCES.items() if source.instructions] + [
        f"{n}[:SUBSET]" for n in STORY_CHAT_SETS
    ]
    raise TinylmError(
        f"instruction data not found: {spec}; give a .jsonl/.json file or a dataset name ({', '.join(names)})"
    )


# Words too common to make a story's request its own: the picked words should say what the story is about.
COMMON_WORDS = frozenset(
    "the and was were with said that this there then they them their she "  # noqa: SIM905 (reads as text)
    "her his him for you your but had have has one day not are very what when who all can could would "
    "will too out saw did from into just like some time upon once little big lot got get went come came "
    "see look looked want wanted play played always because after before again other others each every "
    "made make how our its also than about back".split()
)
STORY_WORDS = 3
"""Words of the story a "with the words" request names."""


def story_chats(stories: Iterable[str]) -> list[Messages]:
    """Each story as a conversation: a request for it (`story_request`), answered by the story itself."""
    chats = []
    for story in stories:
        story = story.strip()
        chats.append([{"role": "user", "content": story_request(story)}, {"role": "assistant", "content": story}])
    return chats


def story_request(story: str) -> str:
    """A request that `story` answers, picked from the story alone, so that it is the same on every machine: half the
    stories (by their hash) are asked for with three of their less common words, the rest by their first sentence."""
    digest = hashlib.sha256(story.encode()).digest()
    words = re.findall(r"[A-Za-z'\u2019]+", story)  # a word with an apostrophe (don't, Lily's) is never picked
    found = dict.fromkeys(w for w in words if w.isalpha() and len(w) >= 3 and w.lower() not in COMMON_WORDS)
    if digest[0] % 2 and len(found) >= STORY_WORDS:
        *first, last = random.Random(digest).sample(sorted(found), STORY_WORDS)
        return f"Tell me a short story with the words {', '.join(first)} and {last}."
    sentence = re.match(r"\s*(.+?[.!?])(?=\s|$)", story, re.S)
    opening = " ".join((sentence[1] if sentence else story).split())
    return f"Tell me a story that starts with: {opening}"


def final_answer(text: str) -> str | None:
    """The checkable final answer of a response (`#### 1,200.` gives "1200"), or None when it has none. Thousands
    separators, a currency sign and a closing full stop are dropped, so answers compare as their values."""
    found = FINAL_ANSWER.search(text.strip())
    if found is None:
        return None
    answer = found[1].replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        number = float(answer)
    except ValueError:
        return answer
    return str(int(number)) if number.is_integer() else str(number)


def with_final_answer(messages: Messages) -> Messages:
    """The conversation with a `#### N` line closing its response, as the original GSM8K has: N is the first number
    after the response's last `=` (without one, its last number). Against the original's lines this gives the same
    value for 98.9% of GSM8K's train set (the rest are mostly units: 25 cents written $0.25)."""
    response = messages[-1]["content"]
    equals = response.rfind("=")
    numbers = NUMBER.findall(response[equals + 1 :] if equals >= 0 else response)
    if final_answer(response) is not None or not numbers:
        return messages
    number = numbers[0] if equals >= 0 else numbers[-1]
    return [*messages[:-1], {**messages[-1], "content": f"{response}\n#### {number.replace(',', '')}"}]


def encode_conversation(
    messages: Messages, render: Render, encode: Encode, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels: the ids themselves on assistant turns (their closing
    end-of-turn token included), IGNORE everywhere else. Messages after the last assistant turn teach nothing and
    are left out. With `last_turn_only`, the earlier assistant turns are context too (a preference pair's answer)."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    last_turn = max((turn for turn, message in enumerate(messages) if message["role"] == "assistant"), default=-1)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:turn], True)
        full = render(messages[: turn + 1], False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise TinylmError(
                "the chat template renders a conversation differently from its beginning, so prompt and response "
                "tokens cannot be told apart; use a tokenizer with a prefix-consistent template"
            )
        prompt_ids, response_ids = encode(prompt[len(rendered) :]), encode(full[len(prompt) :])
        learned = response_ids if turn == last_turn or not last_turn_only else [IGNORE] * len(response_ids)
        ids += prompt_ids + response_ids
        labels += [IGNORE] * len(prompt_ids) + learned
        rendered = full
    return ids, labels


Row = tuple[list[int], list[int]]
"""The token ids of one encoded conversation and their labels."""


def padded(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), each (len(rows), longest row); shorter rows are padded on the right with IGNORE labels, so a
    causal model's real tokens never see the padding."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(rows):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


class ShuffledRows(ABC):
    """Rows of training data served in a reshuffled order per epoch, as padded tensors (`batch`)."""

    rows: list

    def __len__(self) -> int:
        return len(self.rows)

    @abstractmethod
    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """The rows at `indices` as tensors whose first dimension is the row."""

    def training_batch(
        self, step: int, batch_size: int, seed: int, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, ...]:
        """`rows` of the batch of optimizer step `step`: consecutive rows of a reshuffled pass over the data per
        epoch."""
        positions = range(step * batch_size, (step + 1) * batch_size)[rows]
        return self.batch(shuffled_positions(len(self.rows), positions, seed))


def shuffled_positions(count: int, positions: range, seed: int) -> list[int]:
    """The item at each of `positions` of passes over `count` items laid end to end, each pass (epoch) a shuffle that
    depends only on (seed, epoch), so a resumed run draws the same items."""
    orders = {}
    for epoch in {p // count for p in positions}:
        orders[epoch] = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
    return [orders[p // count][p % count] for p in positions]


class TokenizedExamples(ShuffledRows):
    """Encoded conversations cut to `max_length` tokens, served as padded batches of (ids, labels).

    With `pack`, the conversations are laid end to end and cut into rows of exactly max_length tokens: no padding, so
    every token computed is trained on (a row's later conversations attend to its earlier ones, which short examples
    tolerate well). Without it, each conversation is one row, cut at max_length; one whose response would be cut
    away entirely is dropped.
    """

    def __init__(
        self,
        conversations: list[Messages],
        render: Render,
        encode: Encode,
        max_length: int,
        pack: bool = False,
        pad_id: int = 0,
    ):
        encoded = [encode_conversation(messages, render, encode) for messages in conversations]
        if pack:
            ids = [i for example_ids, _ in encoded for i in example_ids]
            labels = [label for _, example_labels in encoded for label in example_labels]
            cuts = range(0, len(ids) - max_length + 1, max_length)
            self.rows = [(ids[c : c + max_length], labels[c : c + max_length]) for c in cuts]
        else:
            cut = [(ids[:max_length], labels[:max_length]) for ids, labels in encoded]
            self.rows = [(ids, labels) for ids, labels in cut if any(label != IGNORE for label in labels)]
        if not self.rows:
            raise TinylmError(f"no example has a response within --max-length {max_length} tokens; raise --max-length")
        self.pad_id = pad_id

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), each (len(indices), longest row), padded as `padded` pads."""
        return padded([self.rows[i] for i in indices], self.pad_id)
