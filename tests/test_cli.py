from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_cli, tiny_overrides


def train_args(text_file, out, **extra) -> list[str]:
    overrides = tiny_overrides(text_file, out, **extra)
    return ["train", "configs/shakespeare-char.yaml", *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]]


@pytest.fixture
def run_dir(text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = run_cli(capsys, *train_args(text_file, tmp_path / "run"))
    assert code == 0 and "--- sample ---" in out
    return tmp_path / "run"


def test_help_explains_every_command_and_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "--help")
    assert exit_.value.code == 0
    assert {"train", "generate", "eval"} <= set(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        run_cli(capsys, "train", "--help")
    train_help = capsys.readouterr().out
    assert "--train.max_steps" in train_help and "Optimizer steps to run." in train_help
    with pytest.raises(SystemExit):
        run_cli(capsys, "generate", "--help")
    assert "--top-k" in capsys.readouterr().out


def test_generate_streams_a_continuation_of_the_prompt(run_dir, capsys):
    code, out, _ = run_cli(
        capsys,
        "generate",
        str(run_dir),
        "--prompt",
        "All:",
        "--max-new-tokens",
        "25",
        "--temperature",
        "0.5",
        "--top-k",
        "5",
        "--seed",
        "3",
    )
    assert code == 0 and out.startswith("All:") and len(out) == len("All:") + 25 + 1
    assert (
        run_cli(
            capsys,
            "generate",
            str(run_dir),
            "--prompt",
            "All:",
            "--max-new-tokens",
            "25",
            "--temperature",
            "0.5",
            "--top-k",
            "5",
            "--seed",
            "3",
        )[1]
        == out
    )


def test_eval_prints_loss_perplexity_and_bits_per_byte_as_json(run_dir, capsys):
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--json")
    assert code == 0
    val = json.loads(out)["val"]
    assert set(val) == {"loss", "perplexity", "bpb", "tokens", "bytes"} and val["tokens"] > 0
    code, out, _ = run_cli(capsys, "eval", str(run_dir))
    assert out.startswith("val: loss ") and "bits per byte" in out


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code != 0
    assert err.startswith("tinylm: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert expected in err, err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.n_layr", "2"], "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
        (["--train.max_steps", "many"], "config key 'train.max_steps' expects int, got 'many'"),
        (["--model.block_size", "4096"], "fewer than one context window"),
    ],
)
def test_bad_training_options_get_one_line(text_file, tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.chdir(REPO)
    code, _, err = run_cli(capsys, *train_args(text_file, tmp_path / "run"), *extra)
    assert_one_line_error(code, err, expected)


@pytest.mark.parametrize(("content", "expected"), [(None, "data file not found"), ("", "data file is empty")])
def test_a_missing_or_empty_data_file_gets_one_line(tmp_path, capsys, monkeypatch, content, expected):
    monkeypatch.chdir(REPO)
    data = tmp_path / "corpus.txt"
    if content is not None:
        data.write_text(content)
    code, _, err = run_cli(capsys, *train_args(data, tmp_path / "run"))
    assert_one_line_error(code, err, expected)


def test_offline_without_the_dataset_names_cache_and_mirror(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "no-mirror"))
    code, _, err = run_cli(capsys, "train", "configs/shakespeare-char.yaml", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "is neither in the cache (")
    assert str(tmp_path / "no-mirror") in err


def test_a_folder_that_is_not_a_run_gets_one_line(tmp_path, capsys):
    for command in (["generate", str(tmp_path)], ["eval", str(tmp_path)]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, "is not a tinylm run folder")


def test_a_prompt_outside_the_vocabulary_names_the_characters(run_dir, capsys):
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--prompt", "Ωme ☃")
    assert_one_line_error(code, err, "prompt: text has 2 character(s) outside")
    assert "'Ω' (U+03A9)" in err and "'☃' (U+2603)" in err


def test_bad_sampling_options_get_one_line(run_dir, capsys):
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--temperature", "-1")
    assert_one_line_error(code, err, "temperature must be 0 or more")
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--top-k", "lots")
    assert_one_line_error(code, err, "top_k must be a whole number or null, not 'lots'")
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--prompt", "")
    assert_one_line_error(code, err, "prompt is empty")


def test_the_demo_path_runs_end_to_end_as_a_user_runs_it(tmp_path, needs_mirror):
    """`python -m tinylm` in fresh processes, on the real Tiny Shakespeare from the mirror, with few steps."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "demo"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinylm",
            "train",
            "configs/shakespeare-char.yaml",
            "--out",
            str(out),
            "--train.max-steps",
            "30",
            "--train.eval-interval",
            "15",
            "--sample.max-new-tokens",
            "50",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr
    assert "--- sample ---" in train.stdout
    generate = subprocess.run(
        [sys.executable, "-m", "tinylm", "generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "40"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generate.returncode == 0 and generate.stdout.startswith("ROMEO:")
    evaluate = subprocess.run(
        [sys.executable, "-m", "tinylm", "eval", str(out), "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert evaluate.returncode == 0
    # Every character of the split, then its end-of-text token: each predicted once, so every byte is paid for.
    result = json.loads(evaluate.stdout)["val"]
    assert result["tokens"] == 111541 and result["bytes"] == 111540


def test_prepare_reports_the_token_files_and_reuses_them(text_file, tmp_path, capsys):
    args = ("prepare", str(text_file), "--tokenizer", "bpe:300", "--data-dir", str(tmp_path / "data"))
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "train:" in out and "val:" in out and "bytes per token" in out
    folder = tmp_path / "data" / "small-bpe300"
    stamp = (folder / "meta.json").stat().st_mtime_ns
    assert run_cli(capsys, *args)[0] == 0 and (folder / "meta.json").stat().st_mtime_ns == stamp
    assert run_cli(capsys, *args, "--force-reload")[0] == 0 and (folder / "meta.json").stat().st_mtime_ns != stamp
    code, _, err = run_cli(capsys, "prepare", str(text_file), "--tokenizer", "wordpiece")
    assert_one_line_error(code, err, "unknown tokenizer 'wordpiece'")
    code, _, err = run_cli(capsys, "prepare", str(text_file), "--val-fraction", "1.5")
    assert_one_line_error(code, err, "data.val_fraction must be between 0 and 1")


@pytest.mark.parametrize(
    ("name", "content", "options", "expected"),
    [
        ("latin1.txt", "café".encode("latin-1") * 50, [], "latin1.txt is not UTF-8 text: bad byte at offset 3"),
        ("empty.txt", b"", [], "data file is empty"),
        ("rows.jsonl", b'{"text": "a"}\n{"text": "b",}\n', [], "rows.jsonl:2: not valid JSON"),
        ("rows.jsonl", b'{"body": "a"}\n', [], "rows.jsonl:1: no 'text' field (it has: body)"),
        ("rows.jsonl", b'{"body": "a"}\n', ["--text-field", "story"], "rows.jsonl:1: no 'story' field"),
        ("ok.txt", b"some text " * 50, ["--tokenizer", "bpe:lots"], "give the vocabulary size as bpe:N"),
        ("ok.txt", b"some text " * 50, ["--tokenizer", "sentencepiece"], "unknown tokenizer 'sentencepiece'"),
        ("ok.txt", b"some text " * 50, ["--token-dtype", "uint8"], "expects one of 'auto', 'uint16', 'uint32'"),
    ],
)
def test_bad_data_gets_one_line_and_leaves_nothing(tmp_path, capsys, name, content, options, expected):
    (tmp_path / name).write_bytes(content)
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / name), "--data-dir", str(tmp_path / "data"), *options)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_errors_replace_prepares_text_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café crème ".encode("latin-1") * 50)
    code, out, _ = run_cli(capsys, "prepare", str(tmp_path / "latin1.txt"), "--errors", "replace")
    assert code == 0 and "train:" in out


def test_prepare_reports_shards_and_documents_per_split(needs_mirror, tmp_path, capsys):
    args = ("prepare", "wikitext2", "--subset", "valid", "--tokenizer", "gpt2", "--shard-tokens", "100000")
    code, out, _ = run_cli(capsys, *args, "--data-dir", str(tmp_path), "--num-proc", "2")
    assert code == 0
    assert "gpt2 tokenizer, vocabulary 50,257, uint16" in out
    assert re.search(r"train: [\d,]+ tokens in 3 shard\(s\), 54 documents", out), out
    assert re.search(r"val: [\d,]+ tokens in 1 shard\(s\), 6 documents", out), out
