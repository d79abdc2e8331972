"""GGUF export, checked by a real llama.cpp (node-llama-cpp's prebuilt binaries, see tests/llama_cpp.py): every
architecture and tokenizer kind loads, tokenizes a Unicode corpus as tinylm does, computes tinylm's logits and
continues a prompt greedily with the same 64 tokens; every weight type loads; an imported GGUF's metadata comes back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    SMALL_TEXT,
    bpe_tokenizer,
    greedy_tokens,
    hf_logits,
    make_run,
    run_cli,
    tinylm_logits,
)
from llama_cpp import missing, run_llama_cpp

import tinylm
from tinylm.gguf_export import export_gguf, split_rotary_pairs
from tinylm.hf import import_model, tokenizers_backend
from tinylm.tokenizers import CharTokenizer, TiktokenTokenizer, pretrained_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
needs_llama_cpp = pytest.mark.skipif(missing() is not None, reason=str(missing()))

PROMPT = "All:\nSpeak, speak."
# Text that tokenizers get wrong first: emoji (4-byte and joined), CJK, tabs, CRLF, NBSP, runs of spaces, digits.
UNICODE = [
    "Emoji 🙂 and a family 👨‍👩‍👧 and a thumb 👍🏽.",
    "中文字符\uff0c日本語のかな、한국어.",  # a full-width comma too
    "tabs\there\t\tand\t\t\tmore",
    "windows\r\nline\r\nends\r\n",
    "no\u00a0break\u00a0\u00a0spaces",
    "runs    of  spaces   and\n\n\nnewlines  ",
    "  leading and trailing  ",
    "numbers 2024, 3.14159 and 1,000,000",
    "Ünïcödé àccents ßß ﬁ",
]
LLAMA_STYLE = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2}
GPT2_STYLE = {"mlp": "gelu_tanh"}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # the tests read stderr


# --- What the file holds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["bpe", "char"])
def test_gguf_export_reads_back_and_loads_in_transformers(tmp_path, capsys, tokenizer):
    tok = bpe_tokenizer() if tokenizer == "bpe" else CharTokenizer.train([SMALL_TEXT])
    run = make_run(tmp_path / "run", tok, **LLAMA_STYLE, rope_theta=500.0)
    code, _, err = run_cli(capsys, "export", str(run.path), "--to", "gguf", str(tmp_path / "model.gguf"))
    assert code == 0, err

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "run"
    assert (fields["llama.block_count"], fields["llama.attention.head_count"]) == (2, 4)
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.freq_base"] == 500.0
    assert fields["llama.context_length"] == 32 and fields["tokenizer.ggml.eos_token_id"] == tok.end_of_text
    assert len(fields["tokenizer.ggml.tokens"]) == tok.vocab_size
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    state = run.model.state_dict()
    q, k, v = state["blocks.1.attn.qkv.weight"].split([32, 16, 16])
    torch.testing.assert_close(split_rotary_pairs(tensors["blk.1.attn_q.weight"], 4), q)
    torch.testing.assert_close(split_rotary_pairs(tensors["blk.1.attn_k.weight"], 2), k)
    torch.testing.assert_close(tensors["blk.1.attn_v.weight"], v)
    torch.testing.assert_close(tensors["blk.0.ffn_down.weight"], state["blocks.0.mlp.proj.weight"])
    torch.testing.assert_close(tensors["token_embd.weight"], state["token_embedding.weight"])

    # transformers' own GGUF reader undoes the permutation and computes the same logits.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    ids = run.tokenizer.encode(PROMPT)
    assert hf_tokenizer.encode(PROMPT, add_special_tokens=False) == ids
    torch.testing.assert_close(hf_logits(hf_model, ids), tinylm_logits(run, ids), atol=1e-4, rtol=1e-4)


def test_gguf_export_round_trips_through_import(tmp_path):
    run = make_run(tmp_path / "run", bpe_tokenizer(), **LLAMA_STYLE)
    export_gguf(run.path, tmp_path / "model.gguf")
    back = tinylm.load(import_model(str(tmp_path / "model.gguf"), tmp_path / "back").run_dir, device="cpu")
    ids = run.tokenizer.encode(PROMPT)
    assert back.tokenizer.encode(PROMPT) == ids
    torch.testing.assert_close(tinylm_logits(back, ids), tinylm_logits(run, ids), atol=1e-5, rtol=1e-5)
    again = gguf.GGUFReader(str(export_gguf(back.path, tmp_path / "again.gguf")))
    assert again.fields["general.name"].contents() == "run"  # the name the file had, not the import's folder


def test_quantized_matrices_are_gguf_blocks_and_the_rest_stays_float32(tmp_path, capsys):
    # n_embd 48: rows of 48 do not fill 32-weight blocks, so those matrices stay f16; the MLP's 128-wide rows quantize.
    run = make_run(tmp_path / "run", bpe_tokenizer(), **LLAMA_STYLE, n_embd=48, mlp_hidden_size=128)
    code, _, err = run_cli(capsys, "export", str(run.path), "--to", "gguf", str(tmp_path / "q.gguf"), "--quant", "q4_0")
    assert code == 0, err
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    weights = gguf.quants.dequantize(np.array(down.data), gguf.GGMLQuantizationType.Q4_0)
    exact = run.model.state_dict()["blocks.0.mlp.proj.weight"].numpy()
    assert weights.shape == exact.shape and 0 < np.abs(weights - exact).max() < 0.15 * np.abs(exact).max()


@pytest.mark.parametrize(
    ("fields", "args", "message"),
    [
        ({}, [], "model.mlp is gelu: llama.cpp's gpt2 architecture computes GELU's tanh approximation"),
        ({**LLAMA_STYLE, "qk_norm": True}, [], "model.qk_norm is true"),
        (LLAMA_STYLE, ["--quant", "q8_0", "--to", "hf"], "--quant q8_0 is for --to gguf"),
        (LLAMA_STYLE, ["--quant", "q4_k"], "'quant' expects one of 'f32', 'f16'"),
    ],
)
def test_gguf_export_refusals_are_one_line(tmp_path, capsys, fields, args, message):
    make_run(tmp_path / "run", CharTokenizer.train([SMALL_TEXT]), **fields)
    to = [] if "--to" in args else ["--to", "gguf"]
    code, _, err = run_cli(capsys, "export", str(tmp_path / "run"), *to, str(tmp_path / "m.gguf"), *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("m.gguf*"))


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, capsys):
    """A word-level `hf:` tokenizer (here a char vocabulary's Hugging Face form) is no byte-level BPE: refused."""
    (tmp_path / "words.json").write_text(tokenizers_backend(CharTokenizer.train([SMALL_TEXT])).to_str())
    make_run(tmp_path / "run", pretrained_tokenizer(str(tmp_path / "words.json")), **LLAMA_STYLE)
    code, _, err = run_cli(capsys, "export", str(tmp_path / "run"), "--to", "gguf", str(tmp_path / "m.gguf"))
    assert code == 1 and "is not a GPT-2-style byte-level BPE" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()


# --- What llama.cpp makes of it -----------------------------------------------------------------------------------


def hf_file_tokenizer(folder):
    """An `hf:` tokenizer read from a local folder's tokenizer.json (a byte-level BPE)."""
    folder.mkdir()
    bpe_tokenizer(SMALL_TEXT + "".join(UNICODE), 400).save(folder)
    return pretrained_tokenizer(f"hf:{folder}")


CASES = {
    "llama-char-gqa": (lambda tmp: CharTokenizer.train([SMALL_TEXT, *UNICODE]), LLAMA_STYLE),
    "llama-bpe-biases-untied": (
        lambda tmp: bpe_tokenizer(SMALL_TEXT + "".join(UNICODE), 400),
        {**LLAMA_STYLE, "bias": True, "tie_embeddings": False},
    ),
    "llama-hf": (hf_file_tokenizer, {**LLAMA_STYLE, "n_kv_head": 1}),
    "gpt2-gpt2": (lambda tmp: TiktokenTokenizer(), GPT2_STYLE),
    "gpt2-char-no-biases-untied": (
        lambda tmp: CharTokenizer.train([SMALL_TEXT, *UNICODE]),
        {**GPT2_STYLE, "bias": False, "tie_embeddings": False},
    ),
}


@needs_llama_cpp
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_tokenizes_computes_and_continues_as_tinylm(tmp_path, case):
    tokenizer_of, fields = CASES[case]
    run = make_run(tmp_path / "run", tokenizer_of(tmp_path / "tokenizer"), scale=0.3, block_size=128, **fields)
    path = export_gguf(run.path, tmp_path / "model.gguf")
    ids = run.tokenizer.encode(PROMPT)
    answer = run_llama_cpp({"model": str(path), "texts": UNICODE, "ids": ids, "greedy": {"ids": ids, "tokens": 64}})

    assert answer["tokens"] == [run.tokenizer.encode(text) for text in UNICODE]
    # llama.cpp's GELU reads a float16 table of tanh-GELU: the gpt2 architecture agrees to about 1e-3, llama to 1e-5.
    tolerance = 1e-4 if case.startswith("llama") else 3e-3
    torch.testing.assert_close(torch.tensor(answer["logits"]), tinylm_logits(run, ids), atol=tolerance, rtol=0)
    ours = greedy_tokens(run.model, ids, 64)
    assert answer["greedy"] == ours and len(set(ours)) > 1


# Bounds on |logits - tinylm's| / |tinylm's| for random weights (which quantize worse than trained ones), about 1.5x
# the errors measured; llama.cpp also rounds activations to 8 bits for the block types' matrix products.
QUANT_ERRORS = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2, "q5_1": 0.3, "q5_0": 0.3, "q4_1": 0.5, "q4_0": 0.5}


@needs_llama_cpp
@pytest.mark.parametrize("fields", [LLAMA_STYLE, GPT2_STYLE], ids=["llama", "gpt2"])
def test_every_weight_type_loads_in_llama_cpp_and_stays_near_float32(tmp_path, fields):
    """Each type loads and its logits are as far from tinylm's as its bits make them: more bits, nearer."""
    run = make_run(tmp_path / "run", bpe_tokenizer(), **fields, n_embd=64, block_size=64)
    ids = run.tokenizer.encode(PROMPT)
    exact = tinylm_logits(run, ids)
    errors = {}
    for quant in QUANT_ERRORS:
        path = export_gguf(run.path, tmp_path / f"{quant}.gguf", quant)
        theirs = torch.tensor(run_llama_cpp({"model": str(path), "ids": ids})["logits"])
        errors[quant] = ((theirs - exact).norm() / exact.norm()).item()
    assert all(0 < errors[quant] < bound for quant, bound in QUANT_ERRORS.items()), errors
    order = [errors[quant] for quant in ("f16", "bf16", "q8_0", "q5_0", "q4_0")]
    assert order == sorted(order), errors  # fewer bits, farther


# --- The real model: import -> export keeps what the file said ---------------------------------------------------


@pytest.mark.slow
@needs_llama_cpp
def test_smollm2_keeps_its_metadata_and_tokenization_through_import_and_export(tmp_path):
    from tinylm.pretrained import packaged_gguf

    original = gguf.GGUFReader(str(packaged_gguf("smollm2-135m-instruct")))
    run = tinylm.load(import_model("smollm2-135m-instruct", tmp_path / "smollm2").run_dir, device="cpu")
    path = export_gguf(run.path, tmp_path / "smollm2.gguf", "q8_0")
    exported = gguf.GGUFReader(str(path))
    for key in (
        "general.name",
        "general.license",
        "general.organization",
        "general.basename",
        "general.size_label",
        "general.languages",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
    ):
        assert exported.fields[key].contents() == original.fields[key].contents(), key
    assert exported.fields["tokenizer.ggml.pre"].contents() == "smollm"
    answer = run_llama_cpp({"model": str(path), "texts": UNICODE})
    assert answer["tokens"] == [run.tokenizer.encode(text) for text in UNICODE]
