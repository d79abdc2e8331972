"""`tinylm report`: a run's report card from what its folder holds, and several runs side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli, tiny_overrides

import tinylm
from tinylm.model.budget import model_budget
from tinylm.runs import update_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs that differ by their learning rate, trained for 20 steps each."""
    root = tmp_path_factory.mktemp("report")
    text = root / "text.txt"
    text.write_text("The cat sat on the mat.\nThe dog ran to the park.\n" * 40)
    runs = []
    for name, rate in (("slow", 1e-3), ("fast", 1e-2)):
        overrides = tiny_overrides(text, root / name, **{"train.learning_rate": rate, "train.device": "cpu"})
        runs.append(tinylm.train(tinylm.load_config(None, overrides)).run_dir)
    return runs


def test_report_card_of_one_run_shows_what_how_losses_evaluations_and_a_sample(two_runs, capsys):
    run = two_runs[0]
    update_json(
        run / "eval.json",
        "benchmarks",
        {"tiny_choice": {"metrics": {"acc": 0.25, "acc_stderr": 0.1}, "num_fewshot": 0, "examples": 4, "limit": 4}},
    )
    stories = {"scores": {"distinct_1": 0.5, "judge": {"grammar": 6.5, "malformed": 1}}, "stories": [{}, {}]}
    (run / "stories.json").write_text(json.dumps(stories))
    code, out, err = run_cli(capsys, "report", str(run))
    assert code == 0, err
    report = (run / "report.md").read_text()
    assert out.strip() == f"wrote {run / 'report.md'}"
    config = tinylm.load(run).config
    assert f"| parameters | {model_budget(config.model, 8).parameters:,} |" in report
    assert "| tokens trained | 5,120 |" in report and "| steps | 20 |" in report  # 20 steps x 8 rows x 32 tokens
    assert f"torch {torch.__version__}" in report and "x 1, fp32 (from step 0)" in report
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if "val_loss" in r][-1]
    assert f"| final val loss | {last['val_loss']:.4f} nats/token (step 20) |" in report
    meta = json.loads((run / "data.json").read_text())["splits"]["val"]
    assert f"| final val bpb | {last['val_loss'] / math.log(2) * meta['tokens'] / meta['bytes']:.4f} |" in report
    assert "| tiny_choice | 0 | 4 | acc | 0.2500 | 0.1000 |" in report
    assert "| judge.grammar | 6.5000 |" in report and "| judge.malformed | 1 |" in report
    assert "## Sample (best weights)" in report and "![loss" in report
    assert (run / "report-loss.png").read_bytes().startswith(PNG_MAGIC)


def test_several_runs_side_by_side_in_one_table_and_one_plot(two_runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", *map(str, two_runs))
    assert code == 1 and "--out" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "report", *map(str, two_runs), "--out", str(tmp_path / "both"))
    assert code == 0, err
    report = (tmp_path / "both" / "report.md").read_text()
    assert "|  | slow | fast |" in report
    rates = next(line for line in report.splitlines() if line.startswith("| recipe |"))
    assert "learning_rate 0.001" in rates and "learning_rate 0.01" in rates
    assert (tmp_path / "both" / "report-loss.png").read_bytes().startswith(PNG_MAGIC)


def test_a_folder_that_is_not_a_run_gets_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == 1 and "not a run folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
