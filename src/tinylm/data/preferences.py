"""Preference pairs for DPO: a prompt and two answers to it, the chosen one preferred to the rejected one.

A file (.jsonl, one object per line, or .json, a list of objects) holds pairs in either form:
- plain: {"prompt": ..., "chosen": ..., "rejected": ...}: the prompt is one user turn;
- chat:  {"messages": [{"role": ..., "content": ...}, ...], "chosen": ..., "rejected": ...}: the conversation so far,
         and two versions of the assistant's next turn, each a string or {"role": "assistant", "content": ...}.
Each answer is encoded as the assistant's turn after the prompt, through the chat template as instruction data is
(data/instructions.py), with labels on that turn only: the chosen and the rejected row of a pair share their prompt
tokens and differ in the labelled answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.data.instructions import (
    IGNORE,
    Encode,
    Messages,
    Render,
    Row,
    ShuffledRows,
    checked_messages,
    encode_conversation,
    padded,
    read_records,
    split_held_out,
)
from tinylm.errors import TinylmError

PAIR_FORMS = "{prompt, chosen, rejected} or {messages, chosen, rejected}"


@dataclass
class PreferencePair:
    prompt: Messages
    """The conversation the answers follow, up to the assistant's turn."""
    chosen: str
    rejected: str

    def conversations(self) -> tuple[Messages, Messages]:
        """The prompt answered with the chosen answer, and with the rejected one."""
        chosen, rejected = ([*self.prompt, {"role": "assistant", "content": a}] for a in (self.chosen, self.rejected))
        return chosen, rejected


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    held_out: list[PreferencePair]


def as_pair(record: object, where: str) -> PreferencePair:
    """A preference record in either form as a PreferencePair, or a one-line error naming `where`."""
    if (
        not isinstance(record, dict)
        or "chosen" not in record
        or "rejected" not in record
        or (("prompt" in record) == ("messages" in record))
    ):
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise TinylmError(
            f"{where}: a preference pair needs 'chosen', 'rejected' and either 'prompt' or 'messages'; it has {keys}"
        )
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise TinylmError(f"{where}: 'prompt' must be a string (or give the conversation as 'messages')")
        prompt = [{"role": "user", "content": record["prompt"]}]
    else:
        prompt = checked_messages(record["messages"], where)
        if not prompt or prompt[-1]["role"] == "assistant":
            raise TinylmError(
                f"{where}: 'messages' must end before the assistant's turn that 'chosen' and 'rejected' give"
            )
    return PreferencePair(prompt, answer(record["chosen"], where), answer(record["rejected"], where))


def answer(value: object, where: str) -> str:
    """The text of an answer given as a string or as an assistant message."""
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    if not isinstance(value, str):
        raise TinylmError(
            f'{where}: \'chosen\' and \'rejected\' must each be a string or {{"role": "assistant", "content": ...}}'
        )
    return value


def load_preferences(spec: str, held_out_examples: int, max_examples: int | None = None) -> PreferenceData:
    """The pairs of a local .jsonl/.json file, split into train and held out (spread evenly through the file)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TinylmError(f"preference data not found: {spec}; give a .jsonl/.json file of pairs ({PAIR_FORMS})")
    pairs = [as_pair(record, where) for where, record in read_records(path)][:max_examples]
    return PreferenceData(*split_held_out(pairs, held_out_examples, spec))


class TokenizedPairs(ShuffledRows):
    """Encoded pairs, each answer's row cut to `max_length` tokens, served as padded batches of (ids, labels) with a
    pair per row. A pair whose chosen or rejected answer would be cut away entirely is dropped."""

    def __init__(self, pairs: list[PreferencePair], render: Render, encode: Encode, max_length: int, pad_id: int = 0):
        self.rows: list[tuple[Row, Row]] = []
        for pair in pairs:
            encoded = [encode_conversation(c, render, encode, last_turn_only=True) for c in pair.conversations()]
            chosen, rejected = ((ids[:max_length], labels[:max_length]) for ids, labels in encoded)
            if all(any(label != IGNORE for label in labels) for _, labels in (chosen, rejected)):
                self.rows.append((chosen, rejected))
        if not self.rows:
            raise TinylmError(f"no pair has both answers within --max-length {max_length} tokens; raise --max-length")
        self.pad_id = pad_id

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), each (len(indices), 2, longest row): each pair's chosen row, then its rejected row, padded
        as `padded` pads."""
        ids, labels = padded([row for i in indices for row in self.rows[i]], self.pad_id)
        return ids.view(len(indices), 2, -1), labels.view(len(indices), 2, -1)
