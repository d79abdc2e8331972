"""Bad input, tried as a careless or hostile user would, against every command: each case must end in a non-zero exit
with ONE line on stderr that names the culprit, no traceback, and every file that existed before byte-identical after
(nothing new left behind either, `.tmp` staging included).

The table is built from a few prepared outputs shared by the whole module (a trained run with two checkpoints, a
fine-tune of it, a Hugging Face export of it): each case copies what it needs into its own folder and damages the
copy. Damaged run folders are crossed with every command that reads a run folder, so a reader that forgets a check
shows up once per command that inherits it.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL_TEXT, capitals_examples, tiny_overrides, tree_hashes

import tinylm
from tinylm.cli import main
from tinylm.training.checkpoint import load_checkpoint

# --- Shared outputs -------------------------------------------------------------------------------------------------

SHARED_OPTIONS = {"data.tokenizer": "bpe:300", "train.device": "cpu", "train.keep_checkpoints": 2}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A trained run (byte-level BPE, checkpoints at steps 2 and 4), a LoRA fine-tune of it, its Hugging Face export,
    its text and prepared data, and an instruction file. Read only: cases copy what they damage."""
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINYLM_CACHE", str(root / "cache"))
        patch.setenv("TINYLM_OFFLINE", "1")
        text = root / "text.txt"
        text.write_text(SMALL_TEXT * 4)
        overrides = tiny_overrides(
            text,
            root / "run",
            **SHARED_OPTIONS,
            **{
                "data.data_dir": str(root / "data"),
                "model.block_size": 128,
                "train.max_steps": 4,
                "train.eval_interval": 2,
            },
        )
        run = tinylm.train(tinylm.load_config(None, overrides)).run_dir
        instructions = root / "capitals.jsonl"
        instructions.write_text("".join(json.dumps(e) + "\n" for e in capitals_examples(30)))
        finetune = [
            "finetune",
            *("--base", str(run), "--data", str(instructions), "--out", str(root / "ft")),
            *("--held-out-examples", "4", "--max-length", "128", "--train.max-steps", "2", "--train.batch-size", "4"),
            *("--train.device", "cpu"),
        ]
        assert main(finetune) == 0
        assert main(["export", str(run), "--to", "hf", str(root / "hf")]) == 0
    return {"run": run, "text": text, "ft": root / "ft", "hf": root / "hf", "instructions": instructions}


# --- Running a case -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    trace: str | None
    """The traceback when the command raised instead of answering."""


def attempt(capsys, argv: list[str], stdin: str = "") -> Outcome:
    capsys.readouterr()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code, trace = main(argv), None
    except BaseException:  # SystemExit too: a command must return its exit status
        code, trace = None, traceback.format_exc()
    finally:
        sys.stdin = saved_stdin
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err, trace)


def assert_refused(capsys, folder: Path, argv: list[str], culprit: str, stdin: str = "") -> None:
    """The command fails in one line naming `culprit`, and everything under `folder` is as it was: the same files with
    the same bytes, and nothing new but data prepared into the cache (`train` prepares before it checks the data)."""
    before = tree_hashes(folder)
    outcome = attempt(capsys, argv, stdin)
    assert outcome.trace is None, outcome.trace
    lines = outcome.err.strip().splitlines()
    assert outcome.code != 0 and len(lines) == 1, outcome.err
    assert "Traceback" not in outcome.err and lines[0].startswith("tinylm: error: ")
    assert culprit.lower() in lines[0].lower(), lines[0]
    after = tree_hashes(folder)
    assert {name: after.get(name) for name in before} == before
    assert [name for name in after.keys() - before.keys() if not name.startswith("cache/data/")] == []
    assert [name for name in after if name.endswith((".tmp", ".old")) or ".tmp-" in name] == []


# --- Damage done to a copy of a run folder --------------------------------------------------------------------------


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return damage


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def edit_config(section: str, key: str, value) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config[section][key] = value
        (folder / "config.yaml").write_text(yaml.safe_dump(config))

    return damage


def outside_tokenizer(folder: Path) -> None:
    """A tokenizer file that is valid, but outside the run folder, named by a relative path."""
    shutil.copy(folder / "tokenizer.json", folder.parent / "elsewhere.json")
    (folder / "tinylm_tokenizer.json").write_text(json.dumps({"spec": "bpe:300", "file": "../elsewhere.json"}))


CONFIG_DAMAGE = {
    "config-not-yaml": (write("config.yaml", "model: [unclosed\n  : :"), "config.yaml"),
    "config-empty": (write("config.yaml", ""), "config.yaml"),
    "config-a-list": (write("config.yaml", "- 1\n- 2\n"), "config.yaml"),
    "config-python-tag": (write("config.yaml", "model: !!python/object/apply:os.system ['true']\n"), "config.yaml"),
    "config-not-utf8": (write("config.yaml", b"model:\n  n_embd: \xff\xfe\n"), "config.yaml"),
    "config-unknown-key": (edit_config("model", "n_embed", 32), "config.yaml"),
    "config-wrong-type": (edit_config("model", "n_layer", "two"), "config.yaml"),
    "config-bad-value": (edit_config("model", "n_head", 3), "config.yaml"),
}
WEIGHTS_DAMAGE = {
    "weights-half": (truncate("model.safetensors", 0.5), "model.safetensors"),
    "weights-empty": (truncate("model.safetensors", 0), "model.safetensors"),
    "weights-10-bytes": (write("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"), "model.safetensors"),
    "weights-garbage": (write("model.safetensors", bytes(range(256)) * 64), "model.safetensors"),
    "weights-missing": (remove("model.safetensors"), "model.safetensors"),
    "shapes-wider": (edit_config("model", "n_embd", 64), "model.safetensors"),
    "shapes-deeper": (edit_config("model", "n_layer", 3), "model.safetensors"),
    "shapes-vocabulary": (edit_config("model", "vocab_size", 512), "model.safetensors"),
}
TOKENIZER_DAMAGE = {
    "tokenizer-not-json": (write("tinylm_tokenizer.json", "{not json"), "tinylm_tokenizer.json"),
    "tokenizer-empty": (write("tinylm_tokenizer.json", ""), "tinylm_tokenizer.json"),
    "tokenizer-a-list": (write("tinylm_tokenizer.json", "[1, 2]"), "tinylm_tokenizer.json"),
    "tokenizer-chars-not-text": (write("tinylm_tokenizer.json", '{"spec": "char", "chars": 5}'), "tinylm_tokenizer"),
    "tokenizer-escapes-folder": (
        write("tinylm_tokenizer.json", '{"spec": "bpe:300", "file": "../../../../../../etc/passwd"}'),
        "outside",
    ),
    "tokenizer-elsewhere": (outside_tokenizer, "outside"),
    "tokenizer-file-garbage": (write("tokenizer.json", "{}"), "tokenizer.json"),
    "tokenizer-file-missing": (remove("tokenizer.json"), "tokenizer.json"),
}
RUN_DAMAGE = {**CONFIG_DAMAGE, **WEIGHTS_DAMAGE, **TOKENIZER_DAMAGE}

RUN_READERS: dict[str, Callable[[Path, Path, dict], list[str]]] = {
    "generate": lambda run, case, shared: ["generate", str(run), "--max-new-tokens", "3"],
    "eval": lambda run, case, shared: ["eval", str(run)],
    "chat": lambda run, case, shared: ["chat", str(run)],
    "export-hf": lambda run, case, shared: ["export", str(run), "--to", "hf", str(case / "hf")],
    "export-gguf": lambda run, case, shared: ["export", str(run), "--to", "gguf", str(case / "m.gguf")],
    "finetune-base": lambda run, case, shared: [
        *("finetune", "--base", str(run), "--data", str(shared["instructions"]), "--out", str(case / "ft")),
        *("--held-out-examples", "4", "--max-length", "128", "--train.max-steps", "1", "--train.device", "cpu"),
    ],
}


def damaged_run(shared: dict[str, Path], case: Path, damage: Callable[[Path], None]) -> Path:
    run = case / "run"
    shutil.copytree(shared["run"], run)
    damage(run)
    return run


@pytest.mark.parametrize("reader", list(RUN_READERS))
@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_a_damaged_run_folder_is_named_in_one_line_by_every_command(shared, tmp_path, capsys, damage, reader):
    change, culprit = RUN_DAMAGE[damage]
    run = damaged_run(shared, tmp_path, change)
    assert_refused(capsys, tmp_path, RUN_READERS[reader](run, tmp_path, shared), culprit)


@pytest.mark.parametrize("command", ["info", "translate", "train-resume"])
@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_a_damaged_config_is_named_by_the_commands_that_read_only_it(shared, tmp_path, capsys, damage, command):
    change, culprit = CONFIG_DAMAGE[damage]
    run = damaged_run(shared, tmp_path, change)
    argv = {
        "info": ["info", str(run)],
        "translate": ["translate", str(run), "1 2 3"],
        "train-resume": ["train", "--resume", str(run)],
    }[command]
    assert_refused(capsys, tmp_path, argv, culprit)


# --- A damaged fine-tune output -------------------------------------------------------------------------------------


def edit_json(name: str, **changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))

    return damage


FINETUNE_DAMAGE = {
    "adapter-half": (truncate("adapter_model.safetensors", 0.5), "adapter_model.safetensors"),
    "adapter-empty": (truncate("adapter_model.safetensors", 0), "adapter_model.safetensors"),
    "adapter-missing": (remove("adapter_model.safetensors"), "adapter"),
    "adapter-config-garbage": (write("adapter_config.json", "{oops"), "adapter_config.json"),
    "adapter-config-missing": (remove("adapter_config.json"), "adapter_config.json"),
    "result-garbage": (write("finetune.json", "nonsense"), "finetune.json"),
    "result-a-list": (write("finetune.json", "[]"), "finetune.json"),
    "result-no-base": (write("finetune.json", "{}"), "finetune.json"),
    "base-gone": (edit_json("finetune.json", base="/nowhere/at/all"), "/nowhere/at/all"),
}


@pytest.mark.parametrize("command", ["generate", "eval", "chat"])
@pytest.mark.parametrize("damage", list(FINETUNE_DAMAGE))
def test_a_damaged_fine_tune_is_named_in_one_line(shared, tmp_path, capsys, damage, command):
    change, culprit = FINETUNE_DAMAGE[damage]
    output = tmp_path / "ft"
    shutil.copytree(shared["ft"], output)
    change(output)
    argv = {
        "generate": ["generate", str(output), "--max-new-tokens", "2"],
        "eval": ["eval", str(output), "--data", str(shared["text"])],
        "chat": ["chat", str(output)],
    }[command]
    assert_refused(capsys, tmp_path, argv, culprit)


# --- Resuming from damaged or edited state --------------------------------------------------------------------------


def every_checkpoint(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for checkpoint in sorted((run / "checkpoints").glob("step-*")):
            change(checkpoint)

    return damage


def metrics_damaged_midway(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{cut", *lines[1:]]) + "\n")


RESUME_DAMAGE = {
    "trainer-state-half": (every_checkpoint(truncate("trainer.pt", 0.5)), "trainer.pt"),
    "trainer-state-empty": (every_checkpoint(truncate("trainer.pt", 0)), "trainer.pt"),
    "trainer-state-missing": (every_checkpoint(remove("trainer.pt")), "trainer.pt"),
    "trainer-state-pickle": (every_checkpoint(write("trainer.pt", b"\x80\x04\x95cos\nsystem\n.")), "trainer.pt"),
    "state-json-garbage": (every_checkpoint(write("state.json", "{")), "state.json"),
    "state-json-a-list": (every_checkpoint(write("state.json", "[4]")), "state.json"),
    "state-json-no-step": (every_checkpoint(write("state.json", '{"best": null}')), "state.json"),
    "checkpoint-weights-half": (every_checkpoint(truncate("model.safetensors", 0.5)), "model.safetensors"),
    "checkpoint-weights-missing": (every_checkpoint(remove("model.safetensors")), "model.safetensors"),
    "no-checkpoint": (lambda run: shutil.rmtree(run / "checkpoints"), "--overwrite"),
    "dropout-edited": (edit_config("model", "dropout", 0.5), "model.dropout"),
    "val-fraction-edited": (edit_config("data", "val_fraction", 0.3), "data.val_fraction"),
    "tokenizer-edited": (edit_config("data", "tokenizer", "char"), "data.tokenizer"),
    "metrics-damaged": (metrics_damaged_midway, "metrics.jsonl"),
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_refuses_damaged_or_edited_state_and_writes_nothing(shared, tmp_path, capsys, damage):
    change, culprit = RESUME_DAMAGE[damage]
    run = damaged_run(shared, tmp_path, change)
    assert_refused(capsys, tmp_path, ["train", "--resume", str(run), "--train.max-steps", "6"], culprit)


@pytest.mark.parametrize(
    ("target", "culprit"),
    [("missing", "missing"), ("a-file", "a-file"), ("empty-folder", "empty-folder"), ("hf", "config.yaml")],
)
def test_resume_of_what_is_not_a_run(shared, tmp_path, capsys, target, culprit):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty-folder").mkdir()
    shutil.copytree(shared["hf"], tmp_path / "hf")
    assert_refused(capsys, tmp_path, ["train", "--resume", str(tmp_path / target)], culprit)


# --- Options of every command ---------------------------------------------------------------------------------------

OPTION_CASES = {
    # generate
    "generate-negative-tokens": (["generate", "{run}", "--max-new-tokens", "-1"], "max_new_tokens"),
    "generate-tokens-not-a-number": (["generate", "{run}", "--max-new-tokens", "many"], "max_new_tokens"),
    "generate-nan-temperature": (["generate", "{run}", "--temperature", "nan"], "temperature"),
    "generate-infinite-temperature": (["generate", "{run}", "--temperature", "1e999"], "temperature"),
    "generate-negative-temperature": (["generate", "{run}", "--temperature", "-1"], "temperature"),
    "generate-top-p-zero": (["generate", "{run}", "--top-p", "0"], "top_p"),
    "generate-top-k-negative": (["generate", "{run}", "--top-k", "-3"], "top_k"),
    "generate-min-p-one": (["generate", "{run}", "--min-p", "1"], "min_p"),
    "generate-penalty-zero": (["generate", "{run}", "--repetition-penalty", "0"], "repetition_penalty"),
    "generate-empty-stop": (["generate", "{run}", "--stop", '[""]'], "stop"),
    "generate-stop-not-a-list": (["generate", "{run}", "--stop", "{{"], "stop"),
    "generate-seed-text": (["generate", "{run}", "--seed", "abc"], "seed"),
    "generate-empty-prompt": (["generate", "{run}", "--prompt", ""], "prompt"),
    "generate-unknown-option": (["generate", "{run}", "--temprature", "1"], "temprature"),
    "generate-no-such-run": (["generate", "{case}/nothing-here"], "nothing-here"),
    "generate-a-file": (["generate", "{case}/file.txt"], "file.txt"),
    "generate-empty-folder": (["generate", "{case}/empty"], "empty"),
    "chat-bad-option": (["chat", "{run}", "--top-p", "2"], "top_p"),
    "chat-prompt-option": (["chat", "{run}", "--prompt", "x"], "prompt"),
    # eval
    "eval-block-size-zero": (["eval", "{run}", "--block-size", "0"], "--block-size"),
    "eval-block-size-negative": (["eval", "{run}", "--block-size", "-5"], "--block-size"),
    "eval-block-size-huge": (["eval", "{run}", "--block-size", "1000000000"], "--block-size"),
    "eval-stride-zero": (["eval", "{run}", "--stride", "0"], "--stride"),
    "eval-split-banana": (["eval", "{run}", "--split", "banana"], "train, val, test"),
    "eval-split-empty": (["eval", "{run}", "--split", "test"], "train, val"),
    "eval-no-such-data": (["eval", "{run}", "--data", "{case}/nope.txt"], "nope.txt"),
    "eval-data-not-utf8": (["eval", "{run}", "--data", "{case}/latin1.txt"], "--errors replace"),
    "eval-bad-errors": (["eval", "{run}", "--data", "{case}/latin1.txt", "--errors", "ignore"], "errors"),
    "eval-missing-field": (["eval", "{run}", "--data", "{case}/records.jsonl", "--text-field", "content"], "content"),
    # export
    "export-bad-target": (["export", "{run}", "--to", "onnx", "{case}/x"], "onnx"),
    "export-hf-onto-a-file": (["export", "{run}", "--to", "hf", "{case}/file.txt"], "file.txt"),
    "export-gguf-onto-a-folder": (["export", "{run}", "--to", "gguf", "{case}/empty"], "folder"),
    "export-into-its-run": (["export", "{run}", "--to", "hf", "{run}/hf"], "input"),
    "export-onto-its-run": (["export", "{run}", "--to", "hf", "{run}", "--overwrite"], "input"),
    "export-not-a-run": (["export", "{case}/empty", "--to", "hf", "{case}/x"], "empty"),
    "export-over-a-foreign-folder": (["export", "{run}", "--to", "hf", "{case}/foreign", "--overwrite"], "foreign"),
    # import
    "import-nothing": (["import", "{case}/none.gguf", "--out", "{case}/x"], "none.gguf"),
    "import-garbage-gguf": (["import", "{case}/garbage.gguf", "--out", "{case}/x"], "garbage.gguf"),
    "import-empty-gguf": (["import", "{case}/empty.gguf", "--out", "{case}/x"], "empty.gguf"),
    "import-a-folder-without-config": (["import", "{case}/empty", "--out", "{case}/x"], "config.json"),
    "import-onto-a-file": (["import", "{hf}", "--out", "{case}/file.txt"], "file.txt"),
    "import-onto-its-source": (["import", "{hf}", "--out", "{hf}", "--overwrite"], "input"),
    "import-onto-a-run": (["import", "{hf}", "--out", "{run}"], "--overwrite"),
    "import-hf-config-garbage": (["import", "{case}/hf-bad-config", "--out", "{case}/x"], "hf-bad-config"),
    "import-hf-unknown-family": (["import", "{case}/hf-bert", "--out", "{case}/x"], "bert"),
    "import-hf-weights-half": (["import", "{case}/hf-half", "--out", "{case}/x"], "hf-half"),
    # info
    "info-no-such-preset": (["info", "gpt5"], "gpt5"),
    "info-garbage-recipe": (["info", "{case}/recipe.yaml"], "recipe.yaml"),
    "info-bad-batch": (["info", "gpt2-124m", "--batch-size", "0"], "batch_size"),
    "info-bad-block": (["info", "gpt2-124m", "--block-size", "-1"], "block_size"),
    # translate
    "translate-a-gpt-run": (["translate", "{run}", "1 2 3"], "seq2seq"),
    "translate-nothing": (["translate", "{case}/empty", "1 2"], "empty"),
    # prepare
    "prepare-no-such-file": (["prepare", "{case}/none.txt"], "none.txt"),
    "prepare-unknown-dataset": (["prepare", "tinystoriez"], "tinystoriez"),
    "prepare-empty-file": (["prepare", "{case}/empty.txt"], "empty.txt"),
    "prepare-empty-folder": (["prepare", "{case}/empty"], "empty"),
    "prepare-unreadable-suffix": (["prepare", "{case}/data.csv"], "data.csv"),
    "prepare-not-utf8": (["prepare", "{case}/latin1.txt"], "latin1.txt"),
    "prepare-jsonl-broken-line": (["prepare", "{case}/broken.jsonl"], "broken.jsonl:2"),
    "prepare-jsonl-missing-field": (["prepare", "{case}/records.jsonl"], "'text'"),
    "prepare-json-not-a-list": (["prepare", "{case}/object.json"], "object.json"),
    "prepare-parquet-garbage": (["prepare", "{case}/garbage.parquet"], "garbage.parquet"),
    "prepare-bpe-too-small": (["prepare", "{text}", "--tokenizer", "bpe:5"], "bpe:5"),
    "prepare-unknown-tokenizer": (["prepare", "{text}", "--tokenizer", "sentencepiece"], "sentencepiece"),
    "prepare-tokenizer-file-missing": (["prepare", "{text}", "--tokenizer", "{case}/tok.json"], "tok.json"),
    "prepare-tokenizer-file-garbage": (["prepare", "{text}", "--tokenizer", "{case}/object.json"], "object.json"),
    "prepare-val-fraction-zero": (["prepare", "{text}", "--val-fraction", "0"], "val_fraction"),
    "prepare-val-fraction-above-one": (["prepare", "{text}", "--val-fraction", "1.5"], "val_fraction"),
    "prepare-shard-tokens-zero": (["prepare", "{text}", "--shard-tokens", "0"], "shard_tokens"),
    "prepare-uint16-for-gpt2": (["prepare", "{text}", "--tokenizer", "gpt2", "--token-dtype", "uint8"], "uint8"),
    "prepare-data-dir-a-file": (["prepare", "{text}", "--data-dir", "{case}/file.txt"], "file.txt"),
    "prepare-subset-of-a-file": (["prepare", "{text}", "--subset", "head10k"], "subset"),
    # train
    "train-out-a-file": (
        ["train", "--data.source", "{text}", "--out", "{case}/file.txt", "{tiny}"],
        "file.txt",
    ),
    "train-out-foreign": (
        ["train", "--data.source", "{text}", "--out", "{case}/foreign", "{tiny}"],
        "foreign",
    ),
    "train-out-a-run": (["train", "--data.source", "{text}", "--out", "{run}", "{tiny}"], "--overwrite"),
    "train-out-an-export": (["train", "--data.source", "{text}", "--out", "{hf}", "--overwrite"], "Hugging Face"),
    "train-no-recipe": (["train", "{case}/none.yaml"], "none.yaml"),
    "train-garbage-recipe": (["train", "{case}/recipe.yaml"], "recipe.yaml"),
    "train-unknown-key": (["train", "--data.source", "{text}", "--model.n_embed", "8"], "n_embed"),
    "train-batch-zero": (["train", "--data.source", "{text}", "--train.batch_size", "0"], "batch_size"),
    "train-lr-negative": (["train", "--data.source", "{text}", "--train.learning_rate", "-1"], "learning_rate"),
    "train-heads-do-not-divide": (["train", "--data.source", "{text}", "--model.n_head", "5"], "n_head"),
    "train-block-size-zero": (["train", "--data.source", "{text}", "--model.block_size", "0"], "block_size"),
    "train-shards-shorter-than-a-window": (
        ["train", "--data.source", "{text}", "--out", "{case}/new", "--data.shard_tokens", "20", "{tiny}"],
        "data.shard_tokens",
    ),
    "train-text-shorter-than-a-window": (
        ["train", "--data.source", "{case}/short.txt", "--out", "{case}/new", "{tiny}"],
        "model.block_size",
    ),
    "train-resume-changes-the-model": (["train", "--resume", "{run}", "--model.n_layer", "3"], "model.n_layer"),
    # finetune
    "finetune-no-base": (["finetune", "--base", "{case}/none", "--data", "{instructions}", "{few}"], "none"),
    "finetune-no-data": (["finetune", "--base", "{run}", "--data", "{case}/none.jsonl", "{few}"], "none.jsonl"),
    "finetune-broken-data": (["finetune", "--base", "{run}", "--data", "{case}/broken.jsonl"], "broken.jsonl"),
    "finetune-lora-and-full": (
        ["finetune", "--base", "{run}", "--data", "{instructions}", "--lora", "--full"],
        "--full",
    ),
    "finetune-out-a-file": (
        ["finetune", "--base", "{run}", "--data", "{instructions}", "--out", "{case}/file.txt", "{few}"],
        "file.txt",
    ),
    "finetune-resume-nothing": (
        ["finetune", "--base", "{run}", "--data", "{instructions}", "--out", "{case}/empty", "--resume"],
        "finetune.yaml",
    ),
    "finetune-resume-other-data": (
        ["finetune", "--base", "{base}", "--data", "{case}/other.jsonl", "--out", "{ft}", "--resume", "{few}"],
        "'data' differs",
    ),
    # pipeline
    "pipeline-no-recipe": (["pipeline", "{case}/none.yaml"], "none.yaml"),
    "pipeline-garbage-recipe": (["pipeline", "{case}/recipe.yaml"], "recipe.yaml"),
    "pipeline-key-without-value": (["pipeline", "{pipeline}", "--out"], "--out needs a value"),
    "pipeline-unknown-key": (["pipeline", "{pipeline}", "--out", "{case}/new", "--sft.lora_rr", "4"], "lora_rr"),
    "pipeline-out-a-run": (["pipeline", "{pipeline}", "--out", "{run}"], "tinylm run"),
    "pipeline-out-foreign": (["pipeline", "{pipeline}", "--out", "{case}/foreign", "--overwrite"], "foreign"),
}
TINY = (
    "--model.block_size 32 --model.n_layer 2 --model.n_head 2 --model.n_embd 32 --train.max_steps 2 --train.device cpu"
)
PIPELINE_RECIPE = REPO / "configs" / "pipeline-tinystories-cpu.yaml"
FEW = (  # the shared fine-tune's settings
    "--held-out-examples 4 --max-length 128 --train.max-steps 1 --train.batch-size 4 --train.device cpu"
)


def case_files(case: Path, shared: dict[str, Path]) -> dict[str, str]:
    """The inputs the option cases name, written into the case's folder; the placeholders of the table."""
    (case / "empty").mkdir()
    (case / "foreign").mkdir()
    (case / "foreign" / "notes.txt").write_text("mine")
    (case / "file.txt").write_text("a file")
    (case / "empty.txt").write_text("")
    (case / "short.txt").write_text("abcdefghij" * 3)
    (case / "data.csv").write_text("a,b\n")
    (case / "latin1.txt").write_bytes("Café au lait, déjà vu.\n".encode("latin-1") * 50)
    (case / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (case / "records.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    (case / "object.json").write_text('{"text": "a mapping"}')
    (case / "garbage.parquet").write_bytes(b"PAR1 not really")
    (case / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    (case / "empty.gguf").write_bytes(b"")
    (case / "recipe.yaml").write_text("model: [\n")
    (case / "other.jsonl").write_text("".join(json.dumps(e) + "\n" for e in capitals_examples(12)))
    for name in ("hf-bad-config", "hf-bert", "hf-half"):
        shutil.copytree(shared["hf"], case / name)
    (case / "hf-bad-config" / "config.json").write_text("{")
    bert = json.loads((case / "hf-bert" / "config.json").read_text())
    (case / "hf-bert" / "config.json").write_text(json.dumps({**bert, "model_type": "bert"}))
    truncate("model.safetensors", 0.5)(case / "hf-half")
    run, ft, hf = case / "run", case / "ft", case / "hf"
    shutil.copytree(shared["run"], run)
    shutil.copytree(shared["ft"], ft)
    shutil.copytree(shared["hf"], hf)
    places = {"run": run, "ft": ft, "hf": hf, "case": case, "text": shared["text"], "pipeline": PIPELINE_RECIPE}
    places |= {"instructions": shared["instructions"], "base": shared["run"]}
    return {**{k: str(v) for k, v in places.items()}, "tiny": TINY, "few": FEW}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_a_bad_option_or_input_is_refused_in_one_line(shared, tmp_path, capsys, name, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))  # inside the watched folder: prepare writes nothing
    argv, culprit = OPTION_CASES[name]
    places = case_files(tmp_path, shared)
    argv = [arg.format(**places) for arg in argv]
    argv = [part for arg in argv for part in (arg.split() if arg in (TINY, FEW) else [arg])]
    assert_refused(capsys, tmp_path, argv, culprit.format(**places))


# --- What must work, around the refusals ----------------------------------------------------------------------------


def test_resume_passes_over_a_damaged_latest_checkpoint_and_says_so(shared, tmp_path, capsys):
    run = damaged_run(shared, tmp_path, truncate("checkpoints/step-0000004/trainer.pt", 0.3))
    config_before = yaml.safe_load((run / "config.yaml").read_text())
    outcome = attempt(capsys, ["train", "--resume", str(run)])
    assert outcome.trace is None and outcome.code == 0, outcome.err
    assert "skipping a damaged checkpoint" in outcome.out and "step-0000004/trainer.pt" in outcome.out
    assert "resumed" in outcome.out and "from step-0000002" in outcome.out
    assert load_checkpoint(run / "checkpoints" / "step-0000004").info["step"] == 4  # written again, whole
    assert yaml.safe_load((run / "config.yaml").read_text()) == {**config_before, "out": str(run)}  # moved: out


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_overwrite(shared, tmp_path, capsys):
    run = damaged_run(shared, tmp_path, lambda run: shutil.rmtree(run / "checkpoints"))
    assert_refused(capsys, tmp_path, ["train", "--resume", str(run)], "start it again with --overwrite")
    config = yaml.safe_load((run / "config.yaml").read_text())
    outcome = attempt(
        capsys,
        [
            *("train", "--data.source", config["data"]["source"], "--out", str(run), "--overwrite", *TINY.split()),
            *("--data.tokenizer", "bpe:300", "--data.data_dir", config["data"]["data_dir"]),
        ],
    )
    assert outcome.trace is None and outcome.code == 0, outcome.err
    assert (run / "checkpoints" / "step-0000002").is_dir()


def test_a_damaged_shard_or_meta_is_prepared_again(shared, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shared["run"].parent / "data", data)
    folder = data / "text-bpe300"
    args = ["prepare", str(shared["text"]), "--tokenizer", "bpe:300", "--data-dir", str(data)]
    whole = tree_hashes(folder)
    for damage in (
        truncate("train_0000.bin", 0.05),
        lambda folder: (folder / "val_0000.bin").open("ab").write(b"\x00"),  # not a whole number of tokens
        write("meta.json", "{garbage"),
        edit_json("meta.json", splits={"train": {"files": ["../../x.bin"], "tokens": 5}}),
    ):
        damage(folder)
        outcome = attempt(capsys, args)
        assert outcome.trace is None and outcome.code == 0, outcome.err
        assert tree_hashes(folder) == whole


def test_chat_survives_bytes_that_are_not_utf8_and_a_huge_max_new_tokens(shared, tmp_path, capsys, monkeypatch):
    stops = json.dumps([chr(c) for c in range(32, 127)] + ["\n", "\ufffd"])
    typed = b"\xff\xfe hi\n/set max_new_tokens 99999999999\n/set stop " + stops.encode() + b"\nHello\n/settings\n"
    terminal = io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8")
    terminal._CHUNK_SIZE = (
        1  # decoded a little at a time, as a terminal delivers what is typed: a bad byte costs its line
    )
    monkeypatch.setattr(sys, "stdin", terminal)
    assert main(["chat", str(shared["run"])]) == 0
    out = capsys.readouterr().out
    assert "that line is not UTF-8 text" in out
    assert "max_new_tokens = 99999999999" in out  # /settings answered: the session outlived both


def test_eval_reads_text_that_is_not_utf8_with_errors_replace(shared, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Café au lait, déjà vu.\n".encode("latin-1") * 50)
    outcome = attempt(capsys, ["eval", str(shared["run"]), "--data", str(latin1), "--errors", "replace"])
    assert outcome.trace is None and outcome.code == 0, outcome.err
