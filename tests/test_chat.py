from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

import pytest
import torch
from conftest import REPO, SMALL_TEXT, untrained_run

import tinylm
from tinylm.chat import ChatSession, chat_loop
from tinylm.tokenizers import HuggingFaceTokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def chat_run(tmp_path) -> tinylm.Run:
    """An instruction-tuned-looking run: a BPE with ChatML's special tokens and a chat template beside it."""
    tokenizer = HuggingFaceTokenizer.train_bpe([SMALL_TEXT], 300)
    tokenizer.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder = untrained_run(tmp_path / "chat", tokenizer=tokenizer, bias=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return tinylm.load(folder)


def test_a_chat_template_renders_the_conversation_with_its_special_tokens(chat_run):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"}]
    text = chat_run.chat.render(messages, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSpeak<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_run.chat_prompt(messages)
    start = chat_run.tokenizer.backend.token_to_id("<|im_start|>")
    assert ids.count(start) == 3 and chat_run.tokenizer.decode(ids) == text
    end_of_turn = chat_run.tokenizer.backend.token_to_id("<|im_end|>")
    assert chat_run.stop_ids == {end_of_turn, chat_run.tokenizer.end_of_text}
    assert chat_run.tokenizer.encode("<|im_end|>") != [end_of_turn]  # in a plain prompt it is ordinary text


def test_a_reply_ends_at_the_end_of_turn_token(chat_run):
    # Make every position predict <|im_end|>: the final norm outputs that token's (tied) embedding, scaled.
    model = chat_run.model
    end_of_turn = chat_run.tokenizer.backend.token_to_id("<|im_end|>")
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(model.token_embedding.weight[end_of_turn] * 100)
    session = ChatSession(chat_run, chat_run.sampling(temperature=0, max_new_tokens=20))
    assert list(session.reply("Speak")) == []
    assert session.messages[-1] == {"role": "assistant", "content": ""}


def test_a_plain_model_continues_the_conversation_as_one_text(tmp_path):
    run = tinylm.load(untrained_run(tmp_path / "plain"))
    session = ChatSession(run, run.sampling(temperature=0, max_new_tokens=10))
    first = "".join(session.reply("All:"))
    assert run.generate("All:", temperature=0, max_new_tokens=10) == "All:" + first
    second = "".join(session.reply("Speak"))
    assert run.generate("All:" + first + "Speak", temperature=0, max_new_tokens=10).endswith(second)


def test_the_loop_answers_commands_and_keeps_going_after_errors(tmp_path):
    run = tinylm.load(untrained_run(tmp_path / "plain"))
    session = ChatSession(run, run.sampling(temperature=0, max_new_tokens=5))
    lines = iter(["/help", "/set temperature 0.7", "/set top_p 2", "/set colour blue", "/settings", "All:", "/reset"])
    shown: list[str] = []

    def read(prompt: str) -> str:
        shown.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat_loop(session, read=read, write=shown.append, flush=lambda: None)
    out = "".join(shown)
    assert "/reset" in out and "(temperature = 0.7)" in out and session.sampling.temperature == 0.7
    assert "error: top_p must be in (0, 1]" in out and "error: cannot set 'colour'" in out
    assert "  top_p = 1.0" in out and "(conversation cleared)" in out and session.messages == []


def read_until(fd: int, text: str, more_bytes: int = 0, timeout: float = 60) -> str:
    """Terminal output up to `text` and then at least `more_bytes` more."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen or len(seen.split(text.encode(), 1)[1]) < more_bytes:
        assert time.monotonic() < deadline, f"waited for {text!r}; got ...{seen.decode(errors='replace')[-300:]!r}"
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 4096)
    return seen.decode(errors="replace")


def ctrl_d_until_exit(fd: int, pid: int, timeout: float = 30) -> int:
    """Ctrl-D at the prompt, again if need be, until the process ends; its wait status.

    readline sets the terminal up anew at each prompt and may drop a key typed while it does, so one Ctrl-D sent the
    moment the prompt shows can be lost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.write(fd, b"\x04")
        for _ in range(10):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            try:
                if select.select([fd], [], [], 0.1)[0]:
                    os.read(fd, 4096)
            except OSError:  # EIO: the terminal's other end closed, the process is ending
                time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"tinylm chat did not end within {timeout} s of Ctrl-D")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_in_a_terminal_ctrl_c_stops_one_reply_and_ctrl_d_ends_the_session(tmp_path):
    import pty

    run_dir = untrained_run(tmp_path / "plain")
    command = [sys.executable, "-m", "tinylm", "chat", str(run_dir), "--temperature", "0"]
    command += ["--max-new-tokens", "10000000"]  # a reply that only Ctrl-C ends
    pid, fd = pty.fork()
    if pid == 0:  # the child: tinylm chat, with the pseudo-terminal as its controlling terminal
        os.chdir(REPO)
        # exec keeps an ignored or blocked SIGINT, and Python then installs no KeyboardInterrupt for Ctrl-C: a user's
        # terminal delivers it, whatever an earlier test left in this process
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.execv(sys.executable, command)
    try:
        read_until(fd, ">>> ")
        os.write(fd, b"All:\n")
        read_until(fd, "All:\r\n", more_bytes=20)  # the reply is streaming
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(fd, "[stopped]\r\n>>> ")
        os.write(fd, b"/set max_new_tokens 3\n")
        read_until(fd, "(max_new_tokens = 3)")
        os.write(fd, b"Speak\n")
        read_until(fd, ">>> ")
        assert os.waitstatus_to_exitcode(ctrl_d_until_exit(fd, pid)) == 0
    finally:
        os.close(fd)
