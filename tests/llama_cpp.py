"""Run a real llama.cpp on a GGUF file from Python: tests/llama_cpp.mjs under node, with node-llama-cpp's prebuilt
CPU binaries from the folder `make test` installs them into (build/node-llama-cpp, or $NODE_LLAMA_CPP_DIR).
Used by tests/test_gguf_export.py and the llama.cpp benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "llama_cpp.mjs"
INSTALL = Path(os.environ.get("NODE_LLAMA_CPP_DIR", ROOT / "build" / "node-llama-cpp"))


def missing() -> str | None:
    """Why llama.cpp cannot run here, in one line; None when it can."""
    if shutil.which("node") is None:
        return "node is not installed: the llama.cpp checks need node and npm"
    if not (INSTALL / "node_modules" / "node-llama-cpp").is_dir():
        return f"node-llama-cpp is not installed in {INSTALL}: `make build/node-llama-cpp/.installed`"
    return None


def run_llama_cpp(job: dict, timeout: float = 300) -> dict:
    """llama.cpp's answer to `job` (see tests/llama_cpp.mjs for what a job asks)."""
    done = subprocess.run(
        ["node", str(SCRIPT)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NODE_LLAMA_CPP_DIR": str(INSTALL), "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {job['model']}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)
