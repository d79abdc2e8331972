"""Talking to a model: a conversation becomes a prompt, and `tinylm chat` is an interactive loop around it.

An instruction-tuned run carries a chat template (Hugging Face's Jinja format) in its folder, as `chat_template.jinja`
or as `chat_template` in `tokenizer_config.json`; its messages are rendered with it, and its end-of-turn token ends a
reply. A plain language model has no notion of turns: the conversation is one text that each message continues.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from tinylm.config import SampleConfig, check_sample_config
from tinylm.errors import TinylmError
from tinylm.generate import encode_prompt
from tinylm.run import Run
from tinylm.tokenizers import END_OF_TEXT, HuggingFaceTokenizer, Tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")
HELP = """\
Type a message and press Enter; the reply streams. Commands:
  /help                  this text
  /reset                 forget the conversation
  /set KEY VALUE         change a sampling setting, e.g. /set temperature 0.7 (keys: {keys})
  /settings              show the sampling settings
Ctrl-C stops a reply (the conversation goes on); Ctrl-D quits."""


@dataclass
class ChatFormat:
    """How a conversation (a list of {"role", "content"} messages) becomes the text a model continues."""

    template: str | None = None
    """A Jinja chat template, or None for a plain language model."""
    special_tokens: dict[str, str | None] | None = None
    """bos_token and eos_token, as the template refers to them."""

    @property
    def stop(self) -> list[str]:
        """Strings that end a reply: the end-of-turn token of an instruction-tuned model."""
        eos = (self.special_tokens or {}).get("eos_token")
        return [eos] if self.template and eos else []

    def prompt(self, messages: list[dict[str, str]]) -> str:
        for message in messages:
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise TinylmError(f"each message needs a role ({', '.join(ROLES)}) and a text content, not {message}")
        if self.template is None:
            return "".join(message["content"] for message in messages)
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # what transformers renders templates with

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return environment.from_string(self.template).render(
            messages=messages, add_generation_prompt=True, **(self.special_tokens or {})
        )

    def encode(self, tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of the prompt for `messages`."""
        text = self.prompt(messages)
        if self.template is None:
            return encode_prompt(tokenizer, text, "the conversation")
        return encode_chat_prompt(tokenizer, text)


def load_chat_format(folder: Path) -> ChatFormat:
    """The chat template a run folder carries, if any."""
    config_path = folder / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template_path = folder / CHAT_TEMPLATE_FILE
    template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
    if template is None:
        return ChatFormat()
    if not isinstance(template, str):
        raise TinylmError(f"{config_path}: give chat_template as one Jinja string (named templates are not supported)")

    def token_text(token: str | dict | None) -> str | None:
        return token.get("content") if isinstance(token, dict) else token

    return ChatFormat(template, {name: token_text(config.get(name)) for name in ("bos_token", "eos_token")})


def encode_chat_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat prompt. Unlike document text, a template's special tokens ("<|im_start|>") are
    meant as their special ids, so they are split out and mapped before the text between them is encoded."""
    special = {END_OF_TEXT: tokenizer.end_of_text}
    if isinstance(tokenizer, HuggingFaceTokenizer):
        special |= {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    pattern = "(" + "|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        ids += [special[part]] if part in special else tokenizer.encode(part) if part else []
    if not ids:
        raise TinylmError("the conversation is empty; send a message with some text")
    return ids


@dataclass
class ChatSession:
    """A run, its chat format and the conversation so far."""

    run: Run
    sampling: SampleConfig
    system: str | None = None
    """A system message that opens every conversation."""
    messages: list[dict[str, str]] = field(default_factory=list)
    chat_format: ChatFormat = field(init=False)

    def __post_init__(self) -> None:
        self.chat_format = load_chat_format(self.run.path)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, message: str) -> Iterator[str]:
        """Stream the reply to `message`; the conversation keeps whatever was shown, even when interrupted."""
        self.messages.append({"role": "user", "content": message})
        reply = {"role": "assistant", "content": ""}
        sampling = replace(self.sampling, stop=[*self.sampling.stop, *self.chat_format.stop])
        pieces = self.run.stream_ids([self.chat_format.encode(self.run.tokenizer, self.messages)], sampling)
        self.messages.append(reply)
        for piece in pieces:
            reply["content"] += piece.text
            if piece.text:
                yield piece.text

    def set(self, key: str, value: str) -> None:
        """Change one sampling setting from its text, e.g. set("temperature", "0.7")."""
        kinds = {"temperature": float, "top_p": float, "min_p": float, "repetition_penalty": float}
        kinds |= {"top_k": int, "max_new_tokens": int, "seed": int}
        key = key.replace("-", "_")
        if key not in kinds:
            raise TinylmError(f"cannot set '{key}'; settable: {', '.join(kinds)}")
        try:
            parsed = None if value.lower() in ("none", "null") and key in ("top_k", "seed") else kinds[key](value)
        except ValueError:
            raise TinylmError(f"{key} takes a number, not {value!r}") from None
        sampling = replace(self.sampling, **{key: parsed})
        check_sample_config(sampling)
        self.sampling = sampling


def chat_loop(session: ChatSession, read=input, write=sys.stdout.write, flush=sys.stdout.flush) -> None:
    """The interactive loop: read a line, answer a command or stream a reply, until end of input."""
    keys = ", ".join(f.name for f in fields(SampleConfig) if f.name not in ("prompt", "stop"))
    kind = "chat template" if session.chat_format.template else "plain language model: each message continues the text"
    write(f"tinylm chat with {session.run.path} ({kind}). /help for commands, Ctrl-D to quit.\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
            write("\n")
            continue
        command, *arguments = line.strip().split(maxsplit=2) or [""]
        try:
            if command == "/help":
                write(HELP.format(keys=keys) + "\n")
            elif command == "/reset":
                session.reset()
                write("(conversation cleared)\n")
            elif command == "/settings":
                write("".join(f"  {f.name} = {getattr(session.sampling, f.name)!r}\n" for f in fields(SampleConfig)))
            elif command == "/set":
                if len(arguments) != 2:
                    raise TinylmError("usage: /set KEY VALUE, e.g. /set temperature 0.7")
                session.set(*arguments)
                write(f"({arguments[0]} = {arguments[1]})\n")
            elif command.startswith("/"):
                raise TinylmError(f"unknown command {command}; /help lists them")
            elif line:
                try:
                    for text in session.reply(line):
                        write(text)
                        flush()
                except KeyboardInterrupt:
                    write(" [stopped]")
                write("\n")
        except TinylmError as error:
            write(f"error: {error}\n")
        flush()
