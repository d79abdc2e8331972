"""The lm-eval adapter (`tinylm.harness`) against lm-eval's own `hf` model on the same exported model and the same
local tasks (task YAMLs over jsonl files written here): the same per-example log-likelihoods and the same scores."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_TEXT, run_cli, tree_hashes, untrained_run

pytest.importorskip("lm_eval")

WORDS = ["First", "All", "Citizen", "you", "know", "speak", "people", "enemy", "die", "famish"]


def write_tasks(folder: Path) -> dict[str, Path]:
    """Three tasks over local jsonl files, one per kind of request: multiple choice (loglikelihood), a whole text
    (loglikelihood_rolling) and an answer to generate (generate_until)."""
    folder.mkdir(parents=True, exist_ok=True)
    choice = [{"question": f"{w}:", "choices": [" yes", " no", " all"], "label": i % 3} for i, w in enumerate(WORDS)]
    texts = [{"text": SMALL_TEXT[i * 60 : i * 60 + 90]} for i in range(6)]
    answers = [{"question": f"Say {w}:", "answer": w.lower()} for w in WORDS[:4]]
    for name, rows in (("choice", choice), ("texts", texts), ("answers", answers)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {file}\n"
    yamls = {
        "tiny_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: choices\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "tiny_texts": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "tiny_answers": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    }
    paths = {}
    for (task, body), data in zip(yamls.items(), ("choice", "texts", "answers")):
        paths[task] = folder / f"{task}.yaml"
        paths[task].write_text(f"task: {task}\n" + common.format(file=folder / f"{data}.jsonl") + body)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny run whose characters cover the tasks', its Hugging Face export, and the tasks."""
    from tinylm.hf import export_hf

    root = tmp_path_factory.mktemp("harness")
    tasks = write_tasks(root / "tasks")
    text = SMALL_TEXT + "".join(path.read_text() for path in (root / "tasks").glob("*.jsonl"))
    run = untrained_run(root / "run", text=text)
    return run, export_hf(run, root / "hf"), tasks


def per_example(samples: list[dict]) -> list:
    return [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]


def test_adapter_matches_lm_evals_hf_model_on_the_same_export(setup):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tinylm.harness import benchmark

    run, hf_folder, tasks = setup
    ours = benchmark(str(run), [str(path) for path in tasks.values()], batch_size=4, log_samples=True)
    manager = TaskManager(include_path=str(next(iter(tasks.values())).parent))
    hf = HFLM(pretrained=str(hf_folder), device="cpu", batch_size=4, dtype="float32")
    theirs = simple_evaluate(model=hf, tasks=list(tasks), task_manager=manager, log_samples=True)
    for task in ("tiny_choice", "tiny_texts"):
        mine, reference = per_example(ours.samples[task]), per_example(theirs["samples"][task])
        assert len(mine) == len(reference) > 0
        for a, b in zip(mine, reference):
            a_values = [x[0] if isinstance(x, tuple | list) else x for x in a]
            b_values = [x[0] if isinstance(x, tuple | list) else x for x in b]
            assert a_values == pytest.approx(b_values, abs=1e-4)
            if task == "tiny_choice":
                assert [x[1] for x in a] == [x[1] for x in b]  # the same greedy flags
    for task in tasks:
        for metric, value in ours.scores[task]["metrics"].items():
            expected = theirs["results"][task][f"{metric},none"]
            if math.isnan(value):
                assert math.isnan(expected)
            else:
                assert value == pytest.approx(expected, rel=1e-4, abs=1e-6), (task, metric)
    assert per_example(ours.samples["tiny_answers"]) == per_example(theirs["samples"]["tiny_answers"])


def test_cli_scores_a_folder_of_tasks_and_records_eval_json(setup, capsys):
    run, _, tasks = setup
    folder = next(iter(tasks.values())).parent
    code, out, err = run_cli(capsys, "eval", str(run), "--tasks", f"{folder},tiny_choice", "--limit", "3", "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert set(printed["benchmarks"]) == {"tiny_choice", "tiny_texts", "tiny_answers"}
    assert printed["benchmarks"]["tiny_choice"]["examples"] == 3
    saved = json.loads((run / "eval.json").read_text())
    assert saved["benchmarks"]["tiny_choice"] == printed["benchmarks"]["tiny_choice"]
    # A later evaluation of one task replaces that task's record and keeps the others.
    code, out, err = run_cli(capsys, "eval", str(run), "--tasks", str(tasks["tiny_choice"]), "--num-fewshot", "1")
    assert code == 0, err
    assert "| tiny_choice | 1 |" in out and "acc" in out
    saved = json.loads((run / "eval.json").read_text())
    assert saved["benchmarks"]["tiny_choice"]["num_fewshot"] == 1 and "tiny_texts" in saved["benchmarks"]


def test_hub_tasks_offline_fail_in_one_line_naming_the_dataset(setup, capsys):
    run, _, _ = setup
    before = tree_hashes(run)
    code, _, err = run_cli(capsys, "eval", str(run), "--tasks", "hellaswag", "--limit", "2")
    assert code == 1
    assert err.count("\n") == 1 and "hellaswag" in err and "Rowan/hellaswag" in err
    assert tree_hashes(run) == before


@pytest.mark.parametrize(
    ("tasks", "message"),
    [("no_such_task_anywhere", "no lm-eval task"), ("{run}/config.yaml", "not an lm-eval task YAML")],
)
def test_bad_task_names_fail_in_one_line(setup, capsys, tasks, message):
    run, _, _ = setup
    code, _, err = run_cli(capsys, "eval", str(run), "--tasks", tasks.format(run=run))
    assert code == 1 and message in err and err.count("\n") == 1


def test_lm_evals_command_line_runs_the_tinylm_model(setup, tmp_path):
    run, _, tasks = setup
    command = [sys.executable, "-m", "tinylm.harness", "run", "--model", "tinylm", "--device", "cpu"]
    command += [
        "--model_args",
        f"pretrained={run}",
        "--tasks",
        str(tasks["tiny_choice"]),
        "--output_path",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    written = list((tmp_path / "out").rglob("results*.json"))
    assert written and "tiny_choice" in json.loads(written[0].read_text())["results"]
