"""Load on `tinylm serve` over loopback: N completion requests, C at a time; failures and latency percentiles.

The server is the real command (`python -m tinylm serve`) in its own process, on 127.0.0.1 and a free port, serving a
run folder made here: a ~15M-parameter GPT (random weights) with a character vocabulary. Each request asks for
--max-tokens tokens at temperature 0.8 with its own seed. Everything is bounded: a timeout per request and overall.

    OMP_NUM_THREADS=1 python bench/serve_load.py --requests 200 --concurrency 8
    OMP_NUM_THREADS=1 python bench/serve_load.py --requests 200 --concurrency 8 --score   # lm-eval's log-likelihoods
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from decode import SLM_15M  # bench/decode.py: the script's folder is on the path

from tinylm.config import Config
from tinylm.model import build_model, count_parameters
from tinylm.runs import CONFIG_FILE, WEIGHTS_FILE, save_weights, write_yaml
from tinylm.tokenizers import CharTokenizer

PROMPTS = ["Once upon a time", "The little dog", "She opened the door and", "In the morning, Tom"]


def random_run(folder: Path) -> int:
    """A run folder a server can load: config, character tokenizer, random weights. Returns the parameter count."""
    tokenizer = CharTokenizer.train([string.printable])
    config = Config(model=replace(SLM_15M, vocab_size=tokenizer.vocab_size), out=str(folder))
    folder.mkdir(parents=True)
    write_yaml(folder / CONFIG_FILE, config.to_dict())
    tokenizer.save(folder)
    torch.manual_seed(0)
    model = build_model(config.model)
    save_weights(model, folder / WEIGHTS_FILE)
    return count_parameters(model)["total"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(run_dir: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python -m tinylm serve RUN_DIR OPTIONS` in its own process on 127.0.0.1 and a free port, once it answers
    /health: yields its URL, and stops it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "tinylm", "serve", str(run_dir), "--port", str(port), "--device", "cpu", *options]
    server = subprocess.Popen(command, env=env or {**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the server did not start: {server.communicate()[1].decode()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def send_load(
    url: str,
    model: str,
    requests: int,
    concurrency: int,
    max_tokens: int,
    timeout: float,
    headers: dict[str, str] | None = None,
    score: bool = False,
) -> tuple[list[tuple[bool, float, int]], float]:
    """`requests` completion requests, `concurrency` at a time, each with its own seed: (ok, seconds, completion
    tokens) for each, and the wall time of all. With `score`, each asks for its prompt's log-probabilities as
    lm-eval's log-likelihood requests do (echo, logprobs 1, max_tokens 1) instead of sampling."""

    def request(index: int) -> tuple[bool, float, int]:
        body = {
            "model": model,
            "prompt": PROMPTS[index % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "seed": index,
        }
        if score:
            body |= {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
        start = time.perf_counter()
        try:
            response = httpx.post(url + "/v1/completions", json=body, timeout=timeout, headers=headers)
            ok = response.status_code == 200
            tokens = response.json()["usage"]["completion_tokens"] if ok else 0
        except httpx.HTTPError:
            ok, tokens = False, 0
        return ok, time.perf_counter() - start, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(request, range(requests)))
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per request.")
    parser.add_argument("--score", action="store_true", help="Log-likelihood requests (echo + logprobs), as lm-eval's.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "bench-15m"
        parameters = random_run(run_dir)
        with running_server(run_dir, "--max-concurrent", str(args.concurrency)) as url:
            results, elapsed = send_load(
                url, run_dir.name, args.requests, args.concurrency, args.max_tokens, args.timeout, score=args.score
            )
    latencies = sorted(seconds for ok, seconds, _ in results if ok)
    if len(latencies) < 2:
        raise SystemExit(f"{args.requests - len(latencies)} of {args.requests} requests failed")
    quantiles = statistics.quantiles(latencies, n=100)
    report = {
        "model_parameters": parameters,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": 1 if args.score else args.max_tokens,
        "score": args.score,
        "failures": sum(not ok for ok, _, _ in results),
        "latency_s": {"p50": round(quantiles[49], 3), "p95": round(quantiles[94], 3), "max": round(latencies[-1], 3)},
        "requests_per_s": round(args.requests / elapsed, 2),
        "completion_tokens_per_s": round(sum(tokens for _, _, tokens in results) / elapsed, 1),
        "wall_s": round(elapsed, 1),
        "torch_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
