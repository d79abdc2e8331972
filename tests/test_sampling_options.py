"""One table of sampling values, each sent through every way in: the command line (`tinylm generate`), the Python API
(`tinylm.load(...).generate`), chat's `/set` and the server. Each value must get the same verdict everywhere: good
(it samples, the same text where the settings are the same) or a one-line error."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
from conftest import run_cli, untrained_run

import tinylm
from tinylm.chat import ChatSession, chat_loop
from tinylm.errors import TinylmError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from tinylm.serve import REQUEST_FIELDS, ServeLimits, create_app

PROMPT = "All:"
NEW_TOKENS = 2  # every case samples this many tokens, unless it sets max_new_tokens itself
inf, nan = math.inf, math.nan

CASES = [  # (SampleConfig field, value, good?)
    ("temperature", 0, True),
    ("temperature", 0.7, True),
    ("temperature", -1, False),
    ("temperature", inf, False),
    ("temperature", nan, False),
    ("top_p", 0, False),
    ("top_p", 0.5, True),
    ("top_p", 1, True),
    ("top_p", 1.5, False),
    ("top_p", nan, False),
    ("top_k", -1, False),
    ("top_k", 0, True),
    ("top_k", 5, True),
    ("top_k", None, True),
    ("top_k", 1.5, False),
    ("min_p", 0, True),
    ("min_p", 0.1, True),
    ("min_p", 1, False),
    ("min_p", -0.1, False),
    ("min_p", nan, False),
    ("repetition_penalty", 0, False),
    ("repetition_penalty", 1.3, True),
    ("repetition_penalty", inf, False),
    ("repetition_penalty", nan, False),
    ("max_new_tokens", 0, True),
    ("max_new_tokens", -1, False),
    ("max_new_tokens", 3, True),
    ("seed", 0, True),
    ("seed", None, True),
    ("seed", 1.5, False),
    ("stop", ["\n"], True),
    ("stop", [], True),
    ("stop", [""], False),
    ("seed", 2**70, False),
    ("presence_penalty", 1.5, True),
    ("presence_penalty", -2, True),
    ("presence_penalty", 2.5, False),
    ("presence_penalty", nan, False),
    ("frequency_penalty", 0.5, True),
    ("frequency_penalty", -3, False),
    ("frequency_penalty", inf, False),
    ("logit_bias", {}, True),
    ("logit_bias", {3: -100, 4: 5.5}, True),  # typed as JSON, whose keys are strings: {"3": -100, "4": 5.5}
    ("logit_bias", {3: 101}, False),
    ("logit_bias", {99999: 1}, False),  # outside the vocabulary
    ("logit_bias", {-1: 1}, False),
    ("logit_bias", {3: nan}, False),
    ("logit_bias", ["3"], False),
]


def as_text(value) -> str:
    """How a person types the value on the command line or after /set."""
    return json.dumps(value) if isinstance(value, list | dict) else "null" if value is None else str(value)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("options") / "story")


@pytest.fixture(scope="module")
def run(run_dir):
    return tinylm.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def server(run):
    return TestClient(create_app(run, ServeLimits(max_prompt_tokens=200, max_tokens=64, max_concurrent=2)))


@pytest.mark.parametrize(("field", "value", "good"), CASES, ids=[f"{f}={as_text(v)}" for f, v, _ in CASES])
def test_a_sampling_value_gets_the_same_verdict_everywhere(run_dir, run, server, capsys, field, value, good):
    options = {"max_new_tokens": NEW_TOKENS, field: value}
    deterministic = options.get("seed", 1337) is not None  # the run's sample.seed unless the case changes it

    try:
        api_text = run.generate(PROMPT, **options)
    except TinylmError as error:
        api_text, api_error = None, str(error)
    assert (api_text is not None) == good, api_error

    flags = [arg for key, text in options.items() for arg in (f"--{key.replace('_', '-')}", as_text(text))]
    code, out, err = run_cli(capsys, "generate", str(run_dir), "--prompt", PROMPT, *flags)
    assert (code == 0) == good, err
    if good and deterministic:
        assert out == api_text + "\n"
    if not good:
        assert err.startswith("tinylm: error: ") and err.count("\n") == 1, err

    lines, written = iter([f"/set {field} {as_text(value)}"]), []

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat_loop(ChatSession(run, run.sampling()), read=read, write=written.append, flush=lambda: None)
    answer = written[-2]  # before the newline that ends the session
    assert answer.startswith("error: ") != good, answer

    # The request carries the run's settings (the server's own defaults are OpenAI's), so good ones give the same text.
    settings = asdict(run.sampling(max_new_tokens=NEW_TOKENS)) | {field: value}
    body = {names[-1]: settings[name] for name, (names, _) in REQUEST_FIELDS.items()}
    response = server.post(
        "/v1/completions",
        content=json.dumps({"model": "story", "prompt": PROMPT, **body}),  # json.dumps writes inf and nan as JS does
        headers={"Content-Type": "application/json"},
    )
    assert (response.status_code == 200) == good, response.text
    if good and deterministic:
        assert PROMPT + response.json()["choices"][0]["text"] == api_text
    if not good:
        error = response.json()["error"]
        assert response.status_code == 400 and error["type"] == "invalid_request_error", error
