"""`tinylm chat`: an interactive loop around a conversation with a model.

An instruction-tuned model (a run folder holding a chat template, a fine-tune, a Hugging Face chat model) is talked to
through its chat template, and its end-of-turn token ends a reply; a plain language model has no notion of turns: the
conversation is one text that each message continues (see `Run.chat_prompt`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

from tinylm.config import SampleConfig, check_sample_config, setting_from_text
from tinylm.errors import TinylmError
from tinylm.generate import check_logit_bias
from tinylm.run import Run

SETTABLE = [f.name for f in fields(SampleConfig) if f.name != "prompt"]  # a chat's prompt is its conversation

HELP = """\
Type a message and press Enter; the reply streams. Commands:
  /help                  this text
  /reset                 forget the conversation
  /set KEY VALUE         change a sampling setting, e.g. /set temperature 0.7 (keys: {keys})
  /settings              show the sampling settings
Ctrl-C stops a reply (the conversation goes on); Ctrl-D quits."""


@dataclass
class ChatSession:
    """A run and the conversation so far."""

    run: Run
    sampling: SampleConfig
    system: str | None = None
    """A system message that opens every conversation."""
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, message: str) -> Iterator[str]:
        """Stream the reply to `message`; the conversation keeps whatever was shown, even when interrupted."""
        self.messages.append({"role": "user", "content": message})
        reply = {"role": "assistant", "content": ""}
        pieces = self.run.stream_ids([self.run.chat_prompt(self.messages)], self.sampling)
        self.messages.append(reply)
        for piece in pieces:
            reply["content"] += piece.text
            if piece.text:
                yield piece.text

    def set(self, key: str, value: str) -> None:
        """Change one sampling setting from its text, read by the field's type as the command line reads it:
        set("temperature", "0.7"), set("seed", "null"), set("stop", '["\\n\\n"]')."""
        key = key.replace("-", "_")
        if key not in SETTABLE:
            raise TinylmError(f"cannot set '{key}'; settable: {', '.join(SETTABLE)}")
        sampling = replace(self.sampling, **{key: setting_from_text(SampleConfig, key, value)})
        check_sample_config(sampling)
        check_logit_bias(sampling, self.run.model.config.vocab_size)
        self.sampling = sampling


def chat_loop(session: ChatSession, read=input, write=None, flush=None) -> None:
    """The interactive loop: read a line, answer a command or stream a reply, until end of input. Output goes to
    whatever sys.stdout is when it is called, unless `write` and `flush` say otherwise."""
    write, flush = write or sys.stdout.write, flush or sys.stdout.flush
    keys = ", ".join(SETTABLE)
    kind = "chat template" if session.run.chat else "plain language model: each message continues the text"
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
        except UnicodeDecodeError:  # bytes that are not UTF-8 (a terminal in another encoding): the chat goes on
            line = None
        if line is None or not _is_text(line):  # or the same bytes kept as surrogate escapes (a C locale)
            write("error: that line is not UTF-8 text; set your terminal to UTF-8 and type it again\n")
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


def _is_text(line: str) -> bool:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
