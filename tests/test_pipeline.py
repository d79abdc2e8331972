"""`tinylm pipeline`: the CPU recipe, shrunk, runs every stage end to end; run again it skips them all; an interrupted
stage goes on from its checkpoint and only what follows runs again; changed settings and bad recipes are refused in
one line before anything is written."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import REPO, TINY_PIPELINE, run_cli, tree_hashes

import tinylm
from tinylm.config import STORY_REQUESTS
from tinylm.runs import PIPELINE_FILE, output_kind

RECIPE = REPO / "configs" / "pipeline-tinystories-cpu.yaml"
STAGES = ["tokenizer", "pretrain", "sft", "eval", "report", "export"]


def pipeline_args(out: Path, *extra: str, **changes) -> list[str]:
    args = ["pipeline", str(RECIPE), "--out", str(out)]
    for key, value in {**TINY_PIPELINE, **changes}.items():
        args += [f"--{key}", str(value)]
    return [*args, *extra]


def test_the_cpu_recipe_shrunk_runs_every_stage_then_skips_them(needs_mirror, tmp_path, capsys):
    out = tmp_path / "pipeline"
    code, printed, err = run_cli(capsys, *pipeline_args(out))
    assert code == 0, err
    record = json.loads((out / PIPELINE_FILE).read_text())
    assert list(record["stages"]) == STAGES
    assert all(stage["done"] and stage["seconds"] >= 0 for stage in record["stages"].values())  # a cached one: 0.0
    for stage in STAGES:
        assert f"\n{stage} " in printed  # the time table
    assert output_kind(out / "pretrain") == "run" and output_kind(out / "sft") == "finetune"
    assert output_kind(out / "export" / "model.gguf") == "gguf"
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["bits_per_byte"]) == {"pretrain", "sft"}
    assert len(json.loads((out / "eval" / "stories.json").read_text())["stories"]) == 2
    assert [turn["request"] for turn in results["chat"]] == list(STORY_REQUESTS)
    report = (out / "report" / "report.md").read_text()
    assert "| pretrain | sft |" in report and "## Pipeline" in report and "## Chat with sft" in report
    gguf = pytest.importorskip("gguf")
    template = gguf.GGUFReader(str(out / "export" / "model.gguf")).fields["tokenizer.chat_template"].contents()
    assert template == (out / "sft" / "model" / "chat_template.jinja").read_text()  # llama.cpp chats as it learned
    chat_model = tinylm.load(out / "sft")
    assert chat_model.chat is not None and chat_model.reply([{"role": "user", "content": "Hi"}], max_new_tokens=3)

    before = tree_hashes(out)
    code, printed, err = run_cli(capsys, *pipeline_args(out))
    assert code == 0, err
    assert all(f"tinylm: {stage}: done already" in printed for stage in STAGES)
    assert tree_hashes(out) == before  # nothing written, not even pipeline.json

    code, _, err = run_cli(capsys, *pipeline_args(out, **{"sft.train.learning_rate": 0.01}))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "sft in" in err and "train.learning_rate 0.001 (the recipe now says 0.01)" in err and "--from sft" in err
    assert tree_hashes(out) == before

    code, printed, err = run_cli(capsys, *pipeline_args(out, "--from", "eval"))
    assert code == 0, err
    assert "tinylm: sft: done already" in printed and "tinylm: eval -> " in printed
    after = tree_hashes(out)
    for folder in ("tokenizer", "pretrain", "sft"):  # what comes before --from is never touched
        assert {k: v for k, v in after.items() if k.startswith(f"{folder}/")} == {
            k: v for k, v in before.items() if k.startswith(f"{folder}/")
        }


def test_an_interrupted_stage_goes_on_from_its_checkpoint_and_the_stages_before_it_are_kept(
    needs_mirror, tmp_path, capsys, monkeypatch
):
    from tinylm.training.engine import Engine

    train_step = Engine.train_step

    def ctrl_c_in_the_fine_tune(engine):  # a real SIGINT, as Ctrl-C sends, during the fine-tune's second step
        if engine.task.name == "fine-tuning" and engine.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(engine)

    monkeypatch.setattr(Engine, "train_step", ctrl_c_in_the_fine_tune)
    out = tmp_path / "pipeline"
    code, _, err = run_cli(capsys, *pipeline_args(out, **{"export.hf": "true"}))
    assert code == 1
    assert err.startswith("tinylm: error: sft: interrupted at step 2") and len(err.strip().splitlines()) == 1
    assert "the pipeline run again starts from sft" in err
    record = json.loads((out / PIPELINE_FILE).read_text())["stages"]
    assert record["pretrain"]["done"] and not record["sft"]["done"] and "eval" not in record
    kept = {k: v for k, v in tree_hashes(out).items() if k.startswith(("tokenizer/", "pretrain/"))}

    monkeypatch.setattr(Engine, "train_step", train_step)
    code, printed, err = run_cli(capsys, *pipeline_args(out, **{"export.hf": "true"}))
    assert code == 0, err
    assert "tinylm: pretrain: done already" in printed
    assert f"continuing {out / 'sft'} from its last checkpoint" in printed and "resumed" in printed
    assert json.loads((out / "sft" / "finetune.json").read_text())["steps"] == 4
    assert kept.items() <= tree_hashes(out).items()
    assert output_kind(out / "export" / "hf") == "hf"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (["--evl.stories", "2"], "unknown config key 'evl' (not a field of PipelineConfig); did you mean 'eval'?"),
        (["--eval.stories", "many"], "config key 'eval.stories' expects int, got 'many'"),
        (["--pretrain.model.mpl", "gelu"], "pretrain: unknown config key 'model.mpl'; did you mean 'model.mlp'?"),
        (["--pretrain.out", "x"], "pretrain.out is set by the pipeline"),
        (["--sft.base", "gpt2"], "sft.base is set by the pipeline (each fine-tune starts from the model of the stage"),
        (["--sft.lora_rr", "4"], "unknown config key 'sft.lora_rr' (not a field of FinetuneConfig); did you mean"),
        (["--sft", "{weights: full}"], "config key 'sft.data' is missing"),
        (["--sft.data", "missing.jsonl"], "sft: instruction data not found: missing.jsonl"),
        (["--sft.train.max_steps", "0"], "sft: train.max_steps must be at least 1, not 0"),
        (["--pretrain.model.mlp", "gelu"], "export: model.mlp is gelu: llama.cpp's gpt2 architecture computes"),
        (["--from", "dpo"], "--from dpo: this pipeline's stages are tokenizer, pretrain, sft, eval, report, export"),
        (["--eval.stories", "-1"], "eval.stories must be 0 or more"),
    ],
)
def test_a_bad_recipe_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, changes, message):
    out = tmp_path / "pipeline"
    code, _, err = run_cli(capsys, *pipeline_args(out), *changes)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_folder_that_is_no_pipeline_is_never_written_into(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    code, _, err = run_cli(capsys, *pipeline_args(out))
    assert code == 1 and "is not empty and is not a tinylm pipeline" in err
    assert list(out.iterdir()) == [out / "todo.txt"] and (out / "todo.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "pipeline", str(tmp_path / "missing.yaml"))
    assert code == 1 and "pipeline recipe not found" in err


def test_the_python_api_and_the_recipe_path_relative_to_the_recipe(tmp_path):
    config = tinylm.load_pipeline_config(RECIPE, {"out": str(tmp_path / "x"), "sft.train.max_steps": 7})
    assert config.pretrain["recipe"] == str(RECIPE.parent / "tinystories-cpu.yaml")
    assert config.sft["train"]["max_steps"] == 7 and config.sft["train"]["batch_size"] == 8
    assert config.export.gguf.quant == "q8_0" and config.out == str(tmp_path / "x")
