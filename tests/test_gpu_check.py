"""bench/gpu_check.py, the GPU check a lent GPU machine runs: on this CPU machine its --smoke mode runs every check's
code at tiny sizes and prints one valid JSON line per check; a failing or slow check is a line and the next one runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check

CPU_SKIPS = ["gpt2_compiled", "qlora"]
"""The checks that need CUDA, in order."""


def test_smoke_run_prints_one_json_line_per_check_and_runs_every_path_that_a_cpu_can():
    python_path = f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": python_path, "CUDA_VISIBLE_DEVICES": ""}  # the CPU's paths, on any machine
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]  # nothing else on stdout: training went to stderr
    by_name = {record["check"]: record for record in records}
    assert [record["check"] for record in records] == [check.name for check in gpu_check.CHECKS] + ["total"]
    for name in CPU_SKIPS:
        assert by_name[name] == {"check": name, "status": "skipped", "reason": "no CUDA"}
    ran = [record for record in records[:-1] if record["check"] not in CPU_SKIPS]
    assert all(record["status"] == "ok" and record["seconds"] > 0 for record in ran), ran
    assert by_name["environment"]["device"] == "cpu"
    assert (
        by_name["attention"]["sdpa_backends"]
        and "aten::scaled_dot_product_attention" in by_name["attention"]["attention_ops"]
    )
    eager = by_name["gpt2_eager"]
    assert eager["tokens_per_s"] > 0 and not eager["compiled"] and eager["mfu"] is None  # a CPU has no peak to meet
    assert math.isfinite(eager["last_loss"])
    assert by_name["fp16_scaler"]["precision"] == "fp16 autocast" and by_name["fp16_scaler"]["loss_scale"] > 0
    packed = by_name["packed_documents"]
    assert packed["sdpa_backends"] and packed["tokens_per_s"] > 0 and packed["random_windows_tokens_per_s"] > 0
    assert by_name["torchrun"]["steps"] == gpu_check.SMOKE["train.max_steps"]
    assert records[-1] == {
        "check": "total",
        "status": "ok",
        "failed": [],
        "skipped": CPU_SKIPS,
        "seconds": records[-1]["seconds"],
    }


def test_a_failing_check_and_one_past_its_time_are_lines_and_the_next_check_runs(monkeypatch, capsys):
    def broken(bench):
        raise RuntimeError("no kernel image is available\nsecond line")

    def slow(bench):
        time.sleep(30)

    checks = [gpu_check.Check("broken", broken, 30), gpu_check.Check("slow", slow, 1), gpu_check.CHECKS[0]]
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    began = time.perf_counter()
    assert gpu_check.main(["--smoke"]) == 1
    assert time.perf_counter() - began < 20
    broken_line, slow_line, environment, total = map(json.loads, capsys.readouterr().out.splitlines())
    assert broken_line["status"] == "failed" and broken_line["error"] == "RuntimeError: no kernel image is available"
    assert slow_line["status"] == "failed" and slow_line["error"] == "OutOfTime: over its 1 s"
    assert environment["status"] == "ok"
    assert total["status"] == "failed" and total["failed"] == ["broken", "slow"]


def test_checks_past_the_budget_are_skipped(capsys):
    assert gpu_check.main(["--smoke", "--budget", "0", "--only", "environment", "gpt2_eager"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["check"], line["status"]) for line in lines] == [
        ("environment", "skipped"),
        ("gpt2_eager", "skipped"),
        ("total", "ok"),
    ]
    assert lines[0]["reason"] == "--budget spent before it could start"


def test_the_qlora_checks_base_fine_tunes_unquantized_on_cpu(tmp_path):
    """The QLoRA check builds its own base (a GPT-2 and a BPE tokenizer, nothing downloaded): here it is fine-tuned
    without bits, which is all a CPU can do, so that the GPU run fails only where quantization does."""
    record = gpu_check.qlora(gpu_check.Bench("cpu", smoke=True, folder=tmp_path), bits=None)
    assert record["bits"] is None and record["trainable_parameters"] > 0
    assert math.isfinite(record["held_out_loss_before"]) and math.isfinite(record["held_out_loss_after"])


def test_without_cuda_the_full_check_refuses_in_one_line(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("--smoke runs every check's code at tiny sizes on CPU")
