"""The run-folder contract: what counts as which output, what may be replaced, and that every write is whole or
absent, a full disk included."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tree_hashes, untrained_run

from tinylm.errors import TinylmError
from tinylm.runs import (
    CONFIG_FILE,
    FINETUNE_CONFIG_FILE,
    HF_CONFIG_FILE,
    check_output,
    output_kind,
    read_json,
    read_yaml,
    remove_stale_staging,
    save_weights,
    staged_output,
    write_atomically,
    write_json,
    write_weights,
    write_yaml,
)

LLAMA_STYLE = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}


def make_output(path: Path, kind: str) -> Path:
    """A minimal output of each kind, as its writer would leave it (with a marker file, to see it survive)."""
    if kind == "gguf":
        path.write_bytes(b"GGUF\x03\x00\x00\x00 and the rest")
        return path
    path.mkdir(parents=True)
    if kind == "run":
        write_yaml(path / CONFIG_FILE, {"model": {"n_layer": 2}})
    elif kind == "finetune":
        write_yaml(path / FINETUNE_CONFIG_FILE, {"base": "out/run", "data": "gsm8k"})
    elif kind == "hf":
        write_json(path / HF_CONFIG_FILE, {"model_type": "llama"})
    elif kind == "notes":
        (path / "notes.txt").write_text("a week of work")
    (path / "marker.txt").write_text(kind)
    return path


@pytest.mark.parametrize("kind", ["run", "finetune", "hf", "gguf"])
def test_output_kind_recognises_each_output_by_its_content(tmp_path, kind):
    assert output_kind(make_output(tmp_path / "out", kind)) == kind


def test_output_kind_of_nothing_and_of_foreign_things(tmp_path):
    assert output_kind(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert output_kind(tmp_path / "empty") is None
    foreign = [make_output(tmp_path / "notes", "notes"), tmp_path / "file.txt", tmp_path / "project"]
    (tmp_path / "file.txt").write_text("not GGUF")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / CONFIG_FILE).write_text("name: my project\n")  # a config.yaml that is not a run's
    for path in foreign:
        with pytest.raises(TinylmError, match="is not tinylm output"):
            output_kind(path)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("run", "is the input"),
        ("run/sub", "lies inside the input"),
        ("run/model.safetensors", "lies inside the input"),
        (".", "holds the input"),
    ],
)
def test_an_output_is_never_its_input_nor_inside_it(tmp_path, out, message):
    run = make_output(tmp_path / "run", "run")
    with pytest.raises(TinylmError, match=message) as refused:
        check_output(tmp_path / out, "run", overwrite=True, inputs=[run])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("existing", "kind", "overwrite", "message"),
    [
        ("notes", "hf", True, "is not empty and is not a Hugging Face model folder"),
        ("run", "hf", True, "holds a tinylm run, not a Hugging Face model folder"),
        ("hf", "run", True, "holds a Hugging Face model folder, not a tinylm run"),
        ("hf", "gguf", True, "is a folder"),
        ("gguf", "run", True, "holds a GGUF file, not a tinylm run"),
        ("run", "run", False, "already holds a tinylm run; choose another --out or pass --overwrite"),
        ("run", "run", True, None),
        ("finetune", "finetune", True, None),
        ("gguf", "gguf", True, None),
        (None, "run", False, None),
    ],
)
def test_check_output_replaces_only_the_same_kind_when_asked(tmp_path, existing, kind, overwrite, message):
    out = tmp_path / "out"
    if existing:
        make_output(out, existing)
    if message is None:
        check_output(out, kind, overwrite)
        return
    with pytest.raises(TinylmError, match=message) as refused:
        check_output(out, kind, overwrite)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("error", [RuntimeError("the conversion failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_staged_output_leaves_out_as_it_was_when_the_block_fails(tmp_path, kind, error):
    out = make_output(tmp_path / "out", kind)
    before = tree_hashes(tmp_path)
    with pytest.raises(type(error)), staged_output(out, kind, overwrite=True) as staging:
        (staging / "half.bin" if kind == "hf" else staging).write_bytes(b"half")
        raise error
    assert tree_hashes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_staged_output_swaps_the_new_output_in_whole(tmp_path, kind):
    out = make_output(tmp_path / "out", kind)
    with staged_output(out, kind, overwrite=True) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".")
        if kind == "hf":
            write_json(staging / HF_CONFIG_FILE, {"model_type": "gpt2"})
        else:
            staging.write_bytes(b"GGUF new")
    assert output_kind(out) == kind and not (out / "marker.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither the staging path nor the old one


def test_write_atomically_replaces_whole_files(tmp_path):
    path = tmp_path / "a.txt"
    write_atomically(path, "first")
    write_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    write_yaml(tmp_path / "c.yaml", {"model": {"n_embd": 32}, "name": "é"})
    write_json(tmp_path / "c.json", {"step": 3})
    assert read_yaml(tmp_path / "c.yaml") == {"model": {"n_embd": 32}, "name": "é"}
    assert read_json(tmp_path / "c.json") == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.json", "c.yaml"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "is missing"),
        ("broken.yaml", "model: [1, 2", "cannot read"),
        ("tagged.yaml", "!!python/object/apply:os.system ['true']", "cannot read"),
        ("list.yaml", "- 1\n- 2\n", "does not hold a mapping"),
        ("broken.json", '{"step": ', "cannot read"),
    ],
)
def test_readers_name_the_damaged_file_in_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(TinylmError, match=message) as refused:
        (read_json if name.endswith(".json") else read_yaml)(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_tied_weights_are_stored_once_and_load_back(tmp_path):
    from tinylm.config import ModelConfig
    from tinylm.model import build_model
    from tinylm.runs import load_weights, tied_names

    config = ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=True)
    model, copy = build_model(config), build_model(config)
    assert tied_names(model) == {"lm_head.weight"}
    save_weights(model, tmp_path / "w.safetensors", {"step": 7})
    load_weights(copy, tmp_path / "w.safetensors")
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), name
    assert copy.lm_head.weight is copy.token_embedding.weight


# --- A full disk ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        lambda path: write_atomically(path, b"x" * 200_000),
        lambda path: write_yaml(path, {"model": {"names": ["x" * 1000] * 200}}),
        lambda path: write_weights({"w": torch.zeros(50_000)}, path, skip=set()),
    ],
    ids=["bytes", "yaml", "weights"],
)
def test_a_full_disk_leaves_the_old_file_and_no_temporary_one(small_disk, write):
    disk = small_disk(64 * 1024)
    path = disk / CONFIG_FILE
    write_yaml(path, {"model": {"n_layer": 2}})
    before = path.read_bytes()
    with pytest.raises(TinylmError, match="no space left on the device holding") as refused:
        write(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    assert path.read_bytes() == before
    assert os.listdir(disk) == [CONFIG_FILE]


def test_an_export_onto_its_previous_export_on_a_full_disk_keeps_it(tmp_path, small_disk, capsys):
    pytest.importorskip("transformers")
    run = untrained_run(tmp_path / "run", **LLAMA_STYLE)
    code, _, err = run_cli(capsys, "export", str(run), "--to", "hf", str(tmp_path / "first"))
    assert code == 0, err
    pages = sum(-(-p.stat().st_size // 4096) * 4096 for p in (tmp_path / "first").iterdir())
    disk = small_disk(pages * 3 // 2)  # room for one export, not for a second one beside it
    code, _, err = run_cli(capsys, "export", str(run), "--to", "hf", str(disk / "hf"))
    assert code == 0, err
    before = tree_hashes(disk)
    code, _, err = run_cli(capsys, "export", str(run), "--to", "hf", str(disk / "hf"), "--overwrite")
    assert code == 1 and "no space left" in err and len(err.strip().splitlines()) == 1
    assert tree_hashes(disk) == before
    assert os.listdir(disk) == ["hf"]


def a_dead_process_id() -> int:
    """The id of a process that has ended (a child that was waited for)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_staging_of_dead_processes_is_cleaned_and_an_old_output_put_back(tmp_path):
    dead, alive = a_dead_process_id(), os.getpid()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("new")
    (tmp_path / f".run.{dead}.old").mkdir()  # replaced whole: the old one goes
    (tmp_path / f".export.{dead}.old").mkdir()  # killed between the two renames: the old one comes back
    (tmp_path / f".export.{dead}.old" / "config.json").write_text("old export")
    (tmp_path / f".export.{dead}.tmp").mkdir()  # the half-built replacement
    (tmp_path / f".model.safetensors.{dead}.tmp").write_text("half")
    (tmp_path / f".mine.{alive}.tmp").write_text("being written")  # a live writer's
    (tmp_path / ".notes.txt").write_text("not tinylm's")
    (tmp_path / f".other.{dead}.tmp").write_text("another output's, when only `run` is cleaned")
    remove_stale_staging(tmp_path, "run")
    assert (tmp_path / f".other.{dead}.tmp").exists() and not (tmp_path / f".run.{dead}.old").exists()
    remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".mine.{alive}.tmp", ".notes.txt", "export", "run"]
    assert (tmp_path / "export" / "config.json").read_text() == "old export"
