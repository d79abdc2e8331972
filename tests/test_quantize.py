"""int8 on CPU: `tinylm.load(path, quantize="int8")` and `--quantize int8` on generate, chat, serve and eval turn every
linear layer into an int8 one whose logits and bits per byte stay near float32's; bad values are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_TEXT, bpe_tokenizer, make_run, run_cli, tinylm_logits, untrained_run
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

import tinylm
from tinylm.cli import build_parser
from tinylm.errors import TinylmError
from tinylm.tokenizers import CharTokenizer

LLAMA_STYLE = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def greedy(run: tinylm.Run, prompt: str) -> str:
    return run.generate(prompt, max_new_tokens=16, temperature=0)


def test_int8_replaces_every_linear_layer_and_stays_near_float32(tmp_path):
    run = make_run(tmp_path / "run", bpe_tokenizer(), **LLAMA_STYLE, n_embd=64, block_size=64)
    int8 = tinylm.load(run.path, quantize="int8")
    linear = sum(isinstance(m, nn.Linear) for m in run.model.modules())
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == linear == 2 * 5 + 1  # qkv proj gate up proj
    assert not any(type(m) is nn.Linear for m in int8.model.modules())
    assert next(int8.model.parameters()).device.type == "cpu"

    ids = run.tokenizer.encode(SMALL_TEXT[:200])[:64]
    exact, approximate = tinylm_logits(run, ids), tinylm_logits(int8, ids)
    error = ((approximate - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.15  # measured 0.09: random weights, one scale per matrix (bits per byte: the next test)
    text = int8.generate("First", max_new_tokens=8, temperature=0)
    assert text.startswith("First") and len(int8.tokenizer.encode(text)) > len(int8.tokenizer.encode("First"))


def test_eval_and_generate_take_quantize_int8(tmp_path, capsys):
    run = untrained_run(tmp_path / "run")
    results = {}
    for options in ([], ["--quantize", "int8"]):
        code, out, err = run_cli(capsys, "eval", str(run), "--json", *options)
        assert code == 0, err
        results[bool(options)] = json.loads(out)["val"]
    assert results[True]["bytes"] == results[False]["bytes"]
    assert results[True]["bpb"] != results[False]["bpb"]
    assert abs(results[True]["bpb"] - results[False]["bpb"]) < 0.02 * results[False]["bpb"]
    code, out, err = run_cli(
        capsys, "generate", str(run), "--quantize", "int8", "--prompt", "All", "--max-new-tokens", "5"
    )
    assert code == 0 and out.startswith("All"), err


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval"])
def test_every_inference_command_has_the_one_quantize_option(tmp_path, capsys, command):
    args = build_parser().parse_args([command, str(tmp_path), "--quantize", "int8"])
    assert args[command].quantize == "int8"
    code, _, err = run_cli(capsys, command, str(tmp_path), "--quantize", "int4")
    assert code == 1 and "'quantize' expects one of 'int8'" in err and len(err.strip().splitlines()) == 1


def test_load_refuses_an_unknown_kind_and_a_device_other_than_cpu(tmp_path):
    run = untrained_run(tmp_path / "run")
    with pytest.raises(TinylmError, match="quantize 'int4' is not known; choose int8 or null"):
        tinylm.load(run, quantize="int4")
    with pytest.raises(TinylmError, match="--quantize int8 runs on CPU and the model is on meta"):
        tinylm.load(run, device="meta", quantize="int8")


def test_serve_quantize_int8_answers_the_openai_client(tmp_path):
    """`tinylm serve --quantize int8` in its own process answers with the int8 model's text, not float32's."""
    import socket
    import subprocess
    import sys
    import time

    openai = pytest.importorskip("openai")
    fp32 = make_run(tmp_path / "run", CharTokenizer.train([SMALL_TEXT]), scale=0.3, block_size=64)
    run, int8 = fp32.path, tinylm.load(fp32.path, quantize="int8")
    # A prompt whose greedy continuation int8 changes: the server's answer then tells which model it ran.
    prompt = next(p for p in ("All", "First", "Speak", "Before") if greedy(int8, p) != greedy(fp32, p))
    with socket.socket() as probe:  # a free port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tinylm", "serve", str(run), "--port", str(port), "--quantize", "int8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                answer = client.completions.create(model="run", prompt=prompt, max_tokens=16, temperature=0)
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert prompt + answer.choices[0].text == greedy(int8, prompt)
    finally:
        process.terminate()
        process.wait(timeout=10)
