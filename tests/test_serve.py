from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import untrained_run

import tinylm

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from tinylm.serve import ServeLimits, create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


class Server:
    """tinylm serve in a thread, on 127.0.0.1 and a free port the OS picks."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tinylm.load(untrained_run(tmp_path_factory.mktemp("serve") / "story"), device="cpu")
    with Server(create_app(run, ServeLimits(max_prompt_tokens=200, max_tokens=64, max_concurrent=2))) as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_completes_chats_and_lists_the_model(client):
    assert [model.id for model in client.models.list()] == ["story"]
    completion = client.completions.create(model="story", prompt="All:", max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason in ("length", "stop") and completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    again = client.completions.create(model="story", prompt="All:", max_tokens=12, temperature=0)
    assert again.choices[0].text == choice.text
    batch = client.completions.create(model="story", prompt=["All:", "First"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == choice.text[
        : len(batch.choices[0].text)
    ]
    chat = client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "Speak"}], max_tokens=8, seed=1
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == 5


def test_streaming_gives_the_same_text_piece_by_piece(client):
    whole = client.completions.create(model="story", prompt="First", max_tokens=20, temperature=0).choices[0].text
    stream = client.completions.create(model="story", prompt="First", max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "First"}], max_tokens=20, temperature=0, stream=True
    )
    deltas = list(chat)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == whole


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ('{"model": "story", "prompt": "All:",', 400, "not valid JSON"),
        ({"model": "gpt-9", "prompt": "All:"}, 404, "does not exist"),
        ({"model": "story", "prompt": "All:", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "story", "prompt": "All:", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "story", "prompt": "All: " * 100}, 400, "at most 200"),
        ({"model": "story", "prompt": "Ω"}, 400, "outside this char tokenizer's vocabulary"),
        ({"model": "story", "prompt": ""}, 400, "empty"),
        ({"model": "story", "prompt": "All:", "top_p": 2}, 400, "top_p"),
        ({"model": "story"}, 400, "prompt"),
        ({"model": "story", "prompt": "All:", "n": 3}, 400, "n must be 1"),
    ],
)
def test_bad_requests_get_4xx_with_an_openai_error_body(server, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_the_openai_client_sees_an_unknown_model_as_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_requests_beyond_the_concurrency_limit_get_429_and_health_stays_responsive(server):
    body = {"model": "story", "prompt": "All:", "max_tokens": 64, "temperature": 1, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(2)]
        responses = [stream.__enter__() for stream in streams]  # two streams hold both slots
        try:
            assert all(response.status_code == 200 for response in responses)
            busy = http.post("/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            assert http.get("/health").json()["status"] == "ok"
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        deadline = time.monotonic() + 20
        while http.post("/v1/completions", json={**body, "stream": False}).status_code == 429:
            assert time.monotonic() < deadline, "the slots were never given back"
            time.sleep(0.1)


def test_the_playground_page_is_served_without_anything_from_elsewhere(server):
    page = httpx.get(server.url + "/").text
    assert "<textarea" in page and "/v1/completions" in page
    assert "http://" not in page and "https://" not in page


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no extra package needed."""

    def __init__(self, profile: Path):
        to_browser, self.commands = os.pipe()
        self.events, from_browser = os.pipe()

        def give_pipes_to_the_browser() -> None:
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe"]
        self.process = subprocess.Popen(
            [*command, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=give_pipes_to_the_browser,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method: str, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:  # skip events until the answer to this call
            while b"\0" not in self.buffer:
                chunk = os.read(self.events, 1 << 16)
                assert chunk, "Chromium closed the DevTools pipe"
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                assert "error" not in answer, answer
                return answer["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.commands)
        os.close(self.events)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium for the browser test: apt-get install -y chromium")
def test_the_playground_streams_a_completion_in_a_headless_browser(server, tmp_path):
    """A person's steps in a real browser: the page loads, the form is filled in and submitted, and the text streams
    into the page: the same text the API gives."""
    expected = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "story", "prompt": "All:", "max_tokens": 30, "temperature": 0, "top_p": 0.95},
    ).json()["choices"][0]["text"]
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        deadline = time.monotonic() + 60
        while "story" not in (browser.evaluate("document.getElementById('model').textContent") or ""):
            assert time.monotonic() < deadline, "the page never showed the model's name"
            time.sleep(0.1)
        browser.evaluate(
            "document.getElementById('prompt').value = 'All:';"
            "document.getElementById('temperature').value = '0';"
            "document.getElementById('max_tokens').value = '30';"
            "document.getElementById('generate').click();"
        )
        while not browser.evaluate("document.getElementById('status').textContent").startswith("done"):
            assert time.monotonic() < deadline, f"no end of stream: {browser.evaluate('document.body.innerText')}"
            time.sleep(0.02)
        assert browser.evaluate("document.getElementById('completion').textContent") == expected
        assert browser.evaluate("document.getElementById('status').textContent") == "done (length)"
    finally:
        browser.close()
