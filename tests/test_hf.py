"""Hugging Face and GGUF interop: tinylm and transformers must compute the same logits from the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    SMALL_TEXT,
    bpe_tokenizer,
    greedy_tokens,
    hf_logits,
    make_run,
    perturb,
    run_cli,
    tiny_overrides,
    tinylm_logits,
    tree_hashes,
    untrained_run,
)

import tinylm
from tinylm.hf import export_hf, import_model, resolve_source, tokenizers_backend
from tinylm.pretrained import TinylmChatTokenizer
from tinylm.runs import CONFIG_FILE
from tinylm.tokenizers import CharTokenizer, TiktokenTokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

PROMPT = "All:\nSpeak, speak."  # with a dozen new tokens it stays inside the tiny models' 32 positions
TEXT = "Citizen:\nAll resolved. Speak?"  # every character occurs in SMALL_TEXT, for the char tokenizer


@pytest.fixture(autouse=True)
def quiet_and_one_thread():
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # the tests read stderr


def save_hf_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    end = tokenizer.decode([tokenizer.end_of_text])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers_backend(tokenizer), eos_token=end, bos_token=end
    ).save_pretrained(str(folder))


def assert_same_greedy(run: tinylm.Run, hf_model, ids: list[int], new_tokens: int = 12) -> None:
    """transformers stops at an end-of-sequence token, tinylm goes on: they agree up to where transformers stopped."""
    ours = greedy_tokens(run.model, ids, new_tokens)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids) :]
    theirs = theirs.tolist()
    assert theirs == ours[: len(theirs)]
    stops = hf_model.generation_config.eos_token_id
    assert len(theirs) == new_tokens or theirs[-1] in (stops if isinstance(stops, list) else [stops])


def assert_exported_matches(run: tinylm.Run, out: Path, model_class: str) -> None:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert type(hf_model).__name__ == model_class
    ids = run.tokenizer.encode(TEXT)
    assert hf_tokenizer.encode(TEXT, add_special_tokens=False) == ids
    assert hf_tokenizer.decode(ids) == TEXT
    if not isinstance(run.tokenizer, CharTokenizer):  # byte-level: any text, spaces, digits and emoji included
        tricky = "naïve café:  1234 ☕\n\n\tit's <b>done</b>  "
        assert hf_tokenizer.encode(tricky, add_special_tokens=False) == run.tokenizer.encode(tricky)
    torch.testing.assert_close(hf_logits(hf_model, ids), tinylm_logits(run, ids), atol=1e-4, rtol=1e-4)
    assert_same_greedy(run, hf_model, run.tokenizer.encode(PROMPT))


# --- Import -------------------------------------------------------------------------------------------------------


def test_import_gpt2_folder_gives_the_same_logits_and_a_working_run(tmp_path, capsys):
    tokenizer = bpe_tokenizer()
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",  # GPT-2's own tanh GELU: imported as mlp gelu_tanh, exactly
        bos_token_id=tokenizer.end_of_text,
        eos_token_id=tokenizer.end_of_text,
    )
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(config)
    perturb(hf_model)
    hf_model.save_pretrained(str(tmp_path / "gpt2"))
    save_hf_tokenizer(tokenizer, tmp_path / "gpt2")

    code, out, err = run_cli(capsys, "import", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "2 layers" in out
    run = tinylm.load(tmp_path / "run", device="cpu")
    assert run.config.model.positions == "learned" and run.config.model.block_size == 64
    ids = run.tokenizer.encode(PROMPT)
    assert ids == tokenizer.encode(PROMPT)
    torch.testing.assert_close(tinylm_logits(run, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)
    assert_same_greedy(run, hf_model, ids)

    code, out, err = run_cli(capsys, "generate", str(tmp_path / "run"), "--prompt", "All:", "--max-new-tokens", "5")
    assert code == 0, err and out.startswith("All:")
    # An existing run is never replaced unasked.
    code, _, err = run_cli(capsys, "import", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run"))
    assert code == 1 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_imported_run_evaluates_on_its_data(tmp_path, capsys, text_file):
    config = transformers.GPT2Config(
        vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=299, eos_token_id=299
    )
    tokenizer = bpe_tokenizer()
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    save_hf_tokenizer(tokenizer, tmp_path / "gpt2")
    result = import_model(str(tmp_path / "gpt2"), tmp_path / "run")
    assert result.config.mlp == "gelu_tanh"  # GPT-2's default activation, computed as transformers does
    saved = yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())
    saved["data"]["source"] = str(text_file)
    (tmp_path / "run" / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "run"))
    assert code == 0, err
    assert "bits per byte" in out


def test_import_llama_folder_with_grouped_query_attention(tmp_path):
    tokenizer = bpe_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config)
    perturb(hf_model)
    hf_model.save_pretrained(str(tmp_path / "llama"))
    save_hf_tokenizer(tokenizer, tmp_path / "llama")

    run = tinylm.load(import_model(str(tmp_path / "llama"), tmp_path / "run").run_dir, device="cpu")
    model = run.config.model
    assert (model.positions, model.norm, model.mlp, model.n_kv_head, model.rope_theta) == (
        "rope",
        "rmsnorm",
        "swiglu",
        2,
        500.0,
    )
    ids = run.tokenizer.encode(PROMPT)
    torch.testing.assert_close(tinylm_logits(run, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)
    assert_same_greedy(run, hf_model, ids)


def test_import_refuses_what_tinylm_cannot_compute(tmp_path, capsys):
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
    )
    config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "scaled"))
    code, _, err = run_cli(capsys, "import", str(tmp_path / "scaled"), "--out", str(tmp_path / "run"))
    assert code == 1 and "rope_type linear" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "run"))
    assert code == 1 and "not found" in err
    assert not (tmp_path / "run").exists()


# --- Export -------------------------------------------------------------------------------------------------------


def test_trained_char_run_exports_to_gpt2(tmp_path, capsys, text_file):

    result = tinylm.train(tinylm.load_config(overrides=tiny_overrides(text_file, tmp_path / "run")))
    code, _, err = run_cli(capsys, "export", str(result.run_dir), "--to", "hf", str(tmp_path / "hf"))
    assert code == 0, err
    assert_exported_matches(tinylm.load(result.run_dir, device="cpu"), tmp_path / "hf", "GPT2LMHeadModel")


@pytest.mark.parametrize(
    ("tokenizer", "fields"), [("bpe", {"bias": False, "tie_embeddings": False}), ("gpt2", {"bias": True})]
)
def test_classic_run_exports_to_gpt2(tmp_path, tokenizer, fields):
    run = make_run(tmp_path / "run", bpe_tokenizer() if tokenizer == "bpe" else TiktokenTokenizer(), **fields)
    assert_exported_matches(run, export_hf(run.path, tmp_path / "hf"), "GPT2LMHeadModel")


@pytest.mark.parametrize("fields", [{"bias": False, "n_kv_head": 2, "tie_embeddings": False}, {"bias": True}])
def test_llama_style_run_exports_to_llama(tmp_path, fields):
    llama = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "rope_theta": 1000.0, "norm_eps": 1e-6}
    run = make_run(tmp_path / "run", CharTokenizer.train([SMALL_TEXT]), **llama, **fields)
    assert_exported_matches(run, export_hf(run.path, tmp_path / "hf"), "LlamaForCausalLM")


def test_a_chat_models_template_goes_with_its_export(tmp_path):
    run = make_run(tmp_path / "run", bpe_tokenizer())
    TinylmChatTokenizer(run.tokenizer).save(run.path)  # as a fine-tune of a tinylm run saves its model/
    chat = tinylm.load(run.path).chat
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(export_hf(run.path, tmp_path / "hf")))
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once."}]
    for turns, prompt in ((messages[:1], True), (messages, False)):
        assert hf_tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt) == chat.render(
            turns, prompt
        )


LLAMA_STYLE = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2}

# --- transformers 4 -----------------------------------------------------------------------------------------------

TRANSFORMERS_4 = "4.57.6"
# Run inside the transformers 4 environment: each export folder's token ids and logits for TEXT, as JSON.
READ_WITH_TRANSFORMERS_4 = """
import json, sys, torch, transformers
answer = {"version": transformers.__version__}
for folder in sys.argv[2:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(folder).encode(sys.argv[1], add_special_tokens=False)
    with torch.no_grad():
        answer[folder] = {"ids": ids, "logits": model(torch.tensor([ids])).logits[0].tolist()}
print(json.dumps(answer))
"""


def transformers_4_python() -> Path:
    """A virtual environment with transformers 4 (in build/, kept between runs) that borrows this environment's
    torch through a .pth file instead of installing another; skips the test when PyPI cannot be reached."""
    import subprocess
    import sys

    venv = Path(__file__).resolve().parents[1] / "build" / f"transformers-{TRANSFORMERS_4}"
    python = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"transformers=={TRANSFORMERS_4}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        pytest.skip(f"cannot install transformers {TRANSFORMERS_4} from PyPI here: {reason}")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # After the environment's own packages on sys.path: its transformers 4 wins, torch comes from here.
    (Path(purelib) / "tinylm-borrowed-torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    (venv / ".installed").touch()
    return python


@pytest.mark.slow
def test_hf_exports_load_in_transformers_4_with_transformers_5s_tokens_and_logits(tmp_path):
    import json
    import subprocess

    runs = {
        # SmolLM2's RoPE base: transformers 4 read it as 10000 from a transformers 5 config.json.
        "llama": make_run(tmp_path / "llama", bpe_tokenizer(), **LLAMA_STYLE, rope_theta=100000.0),
        "gpt2": make_run(tmp_path / "gpt2", CharTokenizer.train([SMALL_TEXT]), mlp="gelu_tanh"),
        "gpt2-tiktoken": make_run(tmp_path / "gpt2-tiktoken", TiktokenTokenizer(), bias=False, tie_embeddings=False),
    }
    folders = {name: str(export_hf(run.path, tmp_path / f"{name}-hf")) for name, run in runs.items()}
    done = subprocess.run(
        [str(transformers_4_python()), "-c", READ_WITH_TRANSFORMERS_4, TEXT, *folders.values()],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["version"] == TRANSFORMERS_4
    for name, folder in folders.items():
        ids = runs[name].tokenizer.encode(TEXT)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert answer[folder]["ids"] == ids, name
        torch.testing.assert_close(torch.tensor(answer[folder]["logits"]), hf_logits(model, ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_logits(model, ids), tinylm_logits(runs[name], ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_kv_head": 2}, "model.n_kv_head is 2"),
        ({"positions": "rope", "norm": "layernorm", "mlp": "swiglu"}, "model.norm is layernorm"),
        ({"mlp": "swiglu"}, "model.mlp is swiglu"),
        ({**LLAMA_STYLE, "qk_norm": True}, "model.qk_norm is true"),
        ({"arch": "bigram", "n_layer": 0, "n_embd": 0, "n_head": 1, "tie_embeddings": False}, "model.arch is bigram"),
    ],
)
def test_export_refuses_models_a_class_cannot_express(tmp_path, capsys, fields, message):
    make_run(tmp_path / "run", CharTokenizer.train([SMALL_TEXT]), **fields)
    code, _, err = run_cli(capsys, "export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf"))
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("to", "out", "message"),
    [
        ("hf", ".", "is the input"),
        ("hf", "sub", "lies inside the input"),
        ("gguf", "model.safetensors", "lies inside the input"),
        ("gguf", "sub/model.gguf", "lies inside the input"),
        ("hf", "..", "holds the input"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_writes_onto_or_into_its_run(tmp_path, capsys, to, out, message, overwrite):
    run = untrained_run(tmp_path / "runs" / "run", **LLAMA_STYLE)
    before = tree_hashes(tmp_path)
    args = ["export", str(run), "--to", to, str(run / out)] + ["--overwrite"] * overwrite
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("to", ["hf", "gguf"])
def test_export_overwrite_replaces_a_previous_export_and_nothing_else(tmp_path, capsys, to):
    if to == "gguf":
        pytest.importorskip("gguf")
    run = untrained_run(tmp_path / "run", **LLAMA_STYLE)
    foreign = tmp_path / ("notes" if to == "hf" else "notes.gguf")
    if to == "hf":
        foreign.mkdir()
        (foreign / "notes.txt").write_text("a week of work")
    else:
        foreign.write_text("a week of work")
    before = tree_hashes(foreign)
    code, _, err = run_cli(capsys, "export", str(run), "--to", to, str(foreign), "--overwrite")
    assert code == 1 and "not empty and is not a" in err and len(err.strip().splitlines()) == 1
    assert tree_hashes(foreign) == before

    export = tmp_path / ("hf" if to == "hf" else "model.gguf")
    assert run_cli(capsys, "export", str(run), "--to", to, str(export))[0] == 0
    first = tree_hashes(export)
    code, _, err = run_cli(capsys, "export", str(run), "--to", to, str(export))
    assert code == 1 and "--overwrite" in err and tree_hashes(export) == first
    if to == "hf":
        (export / "stale.txt").write_text("from the previous export")
    code, _, err = run_cli(capsys, "export", str(run), "--to", to, str(export), "--overwrite")
    assert code == 0, err
    assert tree_hashes(export) == first  # the same run exported again, and nothing of the old one left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_import_overwrite_replaces_a_run_and_nothing_else(tmp_path, capsys):
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    save_hf_tokenizer(bpe_tokenizer(), tmp_path / "gpt2")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("a week of work")
    before = tree_hashes(tmp_path)
    for out, message in ((notes, "not empty and is not a tinylm run"), (tmp_path / "gpt2", "is the input")):
        code, _, err = run_cli(capsys, "import", str(tmp_path / "gpt2"), "--out", str(out), "--overwrite")
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert tree_hashes(tmp_path) == before

    run = untrained_run(tmp_path / "run")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "gpt2"), "--out", str(run), "--overwrite")
    assert code == 0, err
    assert not (run / "text.txt").exists() and tinylm.load(run, device="cpu").config.model.n_embd == 16


# --- The real pretrained model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_imports_with_the_same_logits_and_answer(tmp_path):
    folder, gguf_file = resolve_source("smollm2-135m-instruct")
    run = tinylm.load(import_model("smollm2-135m-instruct", tmp_path / "smollm2").run_dir, device="cpu")
    assert (run.config.model.n_layer, run.config.model.n_kv_head) == (30, 3)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.path))  # the imported copy, chat template too
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    torch.testing.assert_close(tinylm_logits(run, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)
    ours = greedy_tokens(run.model, ids, 12)
    assert_same_greedy(run, hf_model, ids)
    assert "Paris" in run.tokenizer.decode(ours)
