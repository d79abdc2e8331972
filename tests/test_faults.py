"""Faults: every command killed with SIGKILL at a random moment and then run again ends whole, with no staging file
left; a full disk ends in one line and leaves nothing behind; a damaged latest checkpoint is passed over on --resume.

A "moment" is the N-th file-system event (a rename, an fsync, a folder made or removed) of the command, N drawn at
random (seeded): these are the instants between which a writer can be caught halfway.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMALL_TEXT, capitals_examples, tree_hashes

import tinylm
from tinylm.cli import main
from tinylm.data.prepare import checked_data

pytestmark = pytest.mark.slow

KILL_AT_EVENT = """
import os, shutil, signal, sys
from tinylm.cli import main

events = 0
kill_at = int(os.environ["KILL_AT_EVENT"])

def counted(function):
    def call(*args, **kwargs):
        global events
        events += 1
        if events == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return call

for module, name in [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"), (shutil, "rmtree")]:
    setattr(module, name, counted(getattr(module, name)))
sys.exit(main(sys.argv[1:]))
"""

TINY = ["--model.block_size", "128", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32"]
TINY += ["--train.max_steps", "6", "--train.eval_interval", "2", "--train.batch_size", "4", "--train.device", "cpu"]


def tinylm_command(args: list[str], kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KILL_AT_EVENT": str(kill_at),
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [sys.executable, "-c", KILL_AT_EVENT, *args], env=env, capture_output=True, text=True, timeout=300
    )


def staging_left(*folders: Path) -> list[str]:
    """Staging files and folders under `folders` (tinylm's `.NAME.PID.tmp|old`, prepare's `NAME.tmp-PID`)."""
    return [
        str(path)
        for folder in folders
        if folder.exists()
        for path in folder.rglob("*")
        if path.name.endswith((".tmp", ".old")) or ".tmp-" in path.name
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    (root / "text.txt").write_text(SMALL_TEXT * 4)
    (root / "capitals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in capitals_examples(30)))
    return {"root": root, "text": root / "text.txt", "instructions": root / "capitals.jsonl"}


def base_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["train", "--data.source", str(inputs["text"]), "--data.tokenizer", "bpe:300", "--out", str(out), *TINY]


EVENTS = {"train": 70, "prepare": 10, "finetune": 50, "import": 13, "export": 8}
"""About how many file-system events each command below makes, whole: the kills are drawn among them."""


@pytest.mark.parametrize("command", ["train", "prepare", "finetune", "import", "export"])
def test_a_command_killed_at_a_random_moment_then_run_again_ends_whole(inputs, tmp_path, monkeypatch, command):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    data_dir = ["--data.data_dir", str(tmp_path / "data")]
    run = tmp_path / "run"
    if command != "train" and command != "prepare":
        assert main([*base_args(inputs, run), *data_dir]) == 0
    if command == "import":
        assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    args = {
        "train": [*base_args(inputs, run), *data_dir],
        "prepare": ["prepare", str(inputs["text"]), "--tokenizer", "bpe:300", "--data-dir", str(tmp_path / "data")],
        "finetune": [
            *("finetune", "--base", str(run), "--data", str(inputs["instructions"]), "--out", str(tmp_path / "ft")),
            *("--held-out-examples", "4", "--max-length", "96", "--train.max-steps", "4", "--train.eval-interval"),
            *("2", "--train.batch-size", "4", "--train.device", "cpu"),
        ],
        "import": ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")],
        "export": ["export", str(run), "--to", "hf", str(tmp_path / "exported")],
    }[command]
    again = {
        "train": [["train", "--resume", str(run)], [*args, "--overwrite"]],
        "prepare": [args],
        "finetune": [[*args, "--resume"], [*args, "--overwrite"]],
        "import": [[*args, "--overwrite"]],
        "export": [[*args, "--overwrite"]],
    }[command]
    killed_args = [*args, "--force-reload" if command == "prepare" else "--overwrite"]  # a second time: anew
    kills = 0
    for moment in random.Random(f"14-{command}").sample(range(1, EVENTS[command] + 1), 2):
        killed = tinylm_command(killed_args, kill_at=moment)
        assert killed.returncode in (0, -9), killed.stderr[-2000:]
        kills += killed.returncode == -9
        for attempt in again:  # resume where there is something to resume, else start again
            done = tinylm_command(attempt)
            if done.returncode == 0:
                break
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert not staging_left(tmp_path), staging_left(tmp_path)
        if command == "prepare":
            (folder,) = (tmp_path / "data").iterdir()
            checked_data(folder, json.loads((folder / "meta.json").read_text()))
        elif command in ("train", "import", "finetune"):
            output = {"train": run, "import": tmp_path / "imported", "finetune": tmp_path / "ft"}[command]
            assert tinylm.load(output).generate("All:", max_new_tokens=3, temperature=0)
        else:
            assert (tmp_path / "exported" / "config.json").is_file()
    assert kills, "no kill landed: the moments are past the command's last event"


def test_resume_goes_on_from_the_older_checkpoint_when_the_latest_is_damaged(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main([*base_args(inputs, run), "--train.keep_checkpoints", "2"]) == 0
    weights = run / "checkpoints" / "step-0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--train.max_steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "skipping a damaged checkpoint" in out and "step-0000006/model.safetensors" in out
    assert "resumed" in out and "from step-0000004" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]
    assert (run / "config.yaml").read_bytes() != config  # rewritten once resumed: max_steps is 8 now


@pytest.mark.parametrize("command", ["prepare", "train", "export", "import", "finetune"])
def test_a_full_disk_ends_in_one_line_and_leaves_nothing_behind(inputs, tmp_path, small_disk, capsys, command):
    run = tmp_path / "run"
    assert main([*base_args(inputs, run), "--data.data_dir", str(tmp_path / "data")]) == 0
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    disk = small_disk(16 * 1024)
    (disk / "already-there.txt").write_text("kept")
    args = {
        "prepare": ["prepare", str(inputs["text"]), "--tokenizer", "char", "--data-dir", str(disk / "data")],
        "train": [*base_args(inputs, disk / "run"), "--data.data_dir", str(tmp_path / "data")],
        "export": ["export", str(run), "--to", "hf", str(disk / "hf")],
        "import": ["import", str(tmp_path / "hf"), "--out", str(disk / "imported")],
        "finetune": [
            *("finetune", "--base", str(run), "--data", str(inputs["instructions"]), "--out", str(disk / "ft")),
            *("--held-out-examples", "4", "--max-length", "96", "--train.max-steps", "2", "--train.device", "cpu"),
            *("--weights", "full"),
        ],
    }[command]
    before = tree_hashes(tmp_path / "run")
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "no space left on the device" in err
    assert not staging_left(disk), staging_left(disk)
    assert (disk / "already-there.txt").read_text() == "kept" and tree_hashes(tmp_path / "run") == before
