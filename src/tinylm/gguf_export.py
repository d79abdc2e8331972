"""GGUF export: a tinylm run as one file that llama.cpp (and Ollama, LM Studio, transformers' gguf_file=) runs.

    export_gguf("out/run", "out/run.gguf")                  # float32: llama.cpp computes tinylm's logits
    export_gguf("out/run", "out/run-q8.gguf", quant="q8_0")  # 8-bit blocks, quantized by the gguf package

Both of llama.cpp's architectures that tinylm's GPT expresses exactly are written: `llama` (rope positions, rmsnorm,
swiglu, grouped-query attention, optional biases) and `gpt2` (learned positions, layernorm, tanh-GELU). The tokenizer
goes into the metadata in the form llama.cpp tokenizes exactly as tinylm does: a byte-level BPE (`bpe:N`, `gpt2`, a
byte-level `hf:` tokenizer) with its merges; a char vocabulary as a SentencePiece-style (`llama`) vocabulary of
single characters, which llama.cpp splits into characters and never merges, where a byte-level BPE could not hold a
non-ASCII character as one token. A run imported from a GGUF file gets its name, licence and pre-tokenizer back
(see gguf_metadata.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import torch

from tinylm.config import ExportConfig, ModelConfig
from tinylm.errors import TinylmError
from tinylm.gguf_metadata import load_gguf_metadata
from tinylm.hf import INSTALL_HINT, hf_family, hf_tokenizer, rename, special_token_ids, split_qkv, tinylm_state
from tinylm.pretrained import Pretrained, load_tinylm_run
from tinylm.runs import check_output, staged_output
from tinylm.tokenizers import CharTokenizer

# llama.cpp's tensor names for tinylm's modules, per architecture (`{i}`: the block; .weight/.bias carry over).
LLAMA_TENSORS = {
    "token_embedding": "token_embd",
    "blocks.{i}.attn_norm": "blk.{i}.attn_norm",
    "blocks.{i}.attn.q": "blk.{i}.attn_q",
    "blocks.{i}.attn.k": "blk.{i}.attn_k",
    "blocks.{i}.attn.v": "blk.{i}.attn_v",
    "blocks.{i}.attn.proj": "blk.{i}.attn_output",
    "blocks.{i}.mlp_norm": "blk.{i}.ffn_norm",
    "blocks.{i}.mlp.gate": "blk.{i}.ffn_gate",
    "blocks.{i}.mlp.up": "blk.{i}.ffn_up",
    "blocks.{i}.mlp.proj": "blk.{i}.ffn_down",
    "final_norm": "output_norm",
    "lm_head": "output",
}
GPT2_TENSORS = {
    "token_embedding": "token_embd",
    "position_embedding": "position_embd",
    "blocks.{i}.attn_norm": "blk.{i}.attn_norm",
    "blocks.{i}.attn.qkv": "blk.{i}.attn_qkv",  # fused q, k, v rows in tinylm's order, as llama.cpp views them
    "blocks.{i}.attn.proj": "blk.{i}.attn_output",
    "blocks.{i}.mlp_norm": "blk.{i}.ffn_norm",
    "blocks.{i}.mlp.fc": "blk.{i}.ffn_up",
    "blocks.{i}.mlp.proj": "blk.{i}.ffn_down",
    "final_norm": "output_norm",
    "lm_head": "output",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise TinylmError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def export_gguf(
    run_dir: str | Path, path: str | Path, quant: str = ExportConfig.quant, overwrite: bool = False
) -> Path:
    """Write the run at `run_dir` as a GGUF file at `path`, its matrices as `quant` (see ExportConfig.quant)."""
    gguf = _gguf()
    choices = get_args(get_type_hints(ExportConfig)["quant"])
    if quant not in choices:
        raise TinylmError(f"--quant {quant} is not a GGUF weight type tinylm writes; choose {', '.join(choices)}")
    check_output(Path(path).expanduser(), "gguf", overwrite, inputs=[run_dir], option="OUT")  # before loading
    run = load_tinylm_run(Path(run_dir).expanduser(), torch.device("cpu"))
    config = run.config.model
    architecture = gguf_architecture(config)
    vocabulary = gguf_vocabulary(run, config.vocab_size)
    tensors = gguf_tensors(run, architecture)
    path = Path(path).expanduser()
    with staged_output(path, "gguf", overwrite, inputs=[run.path], option="OUT") as staging:
        writer = gguf.GGUFWriter(str(staging), architecture)
        metadata = {"general.name": ("STRING", run.path.resolve().name, None)}
        for key, entry in load_gguf_metadata(run.path).items():
            metadata[key] = (entry["type"], entry["value"], entry.get("item_type"))
        vocabulary["pre"] = metadata.pop("tokenizer.ggml.pre", ("STRING", vocabulary["pre"], None))[1]
        for key, (value_type, value, item_type) in metadata.items():
            item = gguf.GGUFValueType[item_type] if item_type else None
            writer.add_key_value(key, value, gguf.GGUFValueType[value_type], sub_type=item)
        writer.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"))
        if quant not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config, architecture)
        add_vocabulary(writer, vocabulary)
        for name, tensor in tensors.items():
            qtype = tensor_type(gguf, tensor, quant)
            data = tensor.float().contiguous().numpy()
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def gguf_architecture(config: ModelConfig) -> Literal["llama", "gpt2"]:
    """llama.cpp's architecture that computes exactly what this model does, or a one-line refusal."""
    family = hf_family(config)  # the same shapes transformers' two classes express, refused the same way
    if family == "gpt2" and config.mlp != "gelu_tanh":
        raise TinylmError(
            "model.mlp is gelu: llama.cpp's gpt2 architecture computes GELU's tanh approximation; "
            "train with model.mlp gelu_tanh (as GPT-2 was) to export to GGUF, or export with --to hf"
        )
    return family


def gguf_tensors(run: Pretrained, architecture: str) -> dict[str, torch.Tensor]:
    """The run's weights under llama.cpp's names and in its layout."""
    config = run.config.model
    state = tinylm_state(run.model)
    if architecture == "gpt2":
        state = rename(state, GPT2_TENSORS, config.n_layer)
        for name, tensor in list(state.items()):  # llama.cpp's gpt2 has biases everywhere: tinylm's absent ones are 0
            bias = name.replace(".weight", ".bias")
            if bias not in state and name.split(".")[0] not in ("token_embd", "position_embd", "output"):
                state[bias] = torch.zeros(tensor.shape[0])
    else:
        state = rename(split_qkv(state, config), LLAMA_TENSORS, config.n_layer)
        for name in state:  # llama.cpp's rope turns adjacent pairs: see interleave_rotary_pairs
            if ".attn_q." in name:
                state[name] = interleave_rotary_pairs(state[name], config.n_head)
            elif ".attn_k." in name:
                state[name] = interleave_rotary_pairs(state[name], config.kv_heads)
    if config.tie_embeddings:
        del state["output.weight"]  # llama.cpp reuses token_embd when there is no output matrix
    return state


def interleave_rotary_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's q or k rows (a weight or a bias) from rotate-half pairs (i, i + d/2) to adjacent pairs
    (2i, 2i + 1).

    tinylm and Hugging Face rotate dimension i with i + d/2; llama.cpp's rope rotates 2i with 2i + 1, so its
    converter stores the rows of each head in that order (the permutation `convert_hf_to_gguf.py` applies to q and k).
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def split_rotary_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `interleave_rotary_pairs`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_type(gguf, tensor: torch.Tensor, quant: str):
    """The GGML type one tensor is written as: norms and biases stay float32 (llama.cpp adds them in float32, and
    they are a rounding error of the file's size); a matrix whose rows do not fill whole blocks stays f16."""
    if tensor.dim() == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if tensor.shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def add_hyperparameters(writer, config: ModelConfig, architecture: str) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_head_count(config.n_head)
    if architecture == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)


def add_vocabulary(writer, vocabulary: dict[str, Any]) -> None:
    writer.add_tokenizer_model(vocabulary["model"])
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    if vocabulary["merges"]:
        writer.add_token_merges(vocabulary["merges"])
    else:  # a char vocabulary merges nothing: equal scores give llama.cpp no pair to prefer
        writer.add_token_scores([0.0] * len(vocabulary["tokens"]))
    writer.add_bos_token_id(vocabulary["bos_token_id"])
    writer.add_eos_token_id(vocabulary["eos_token_id"])
    writer.add_add_bos_token(False)  # tinylm never prepends a BOS token
    writer.add_add_space_prefix(False)  # nor a space before the text
    if vocabulary["chat_template"]:
        writer.add_chat_template(vocabulary["chat_template"])


def char_vocabulary(vocabulary: dict[str, int], special: set[str]) -> tuple[dict[str, int], list[str]]:
    """A char vocabulary as a byte-level BPE that gives one token per character: each character spelled as its
    UTF-8 bytes in GPT-2's byte alphabet, and merges that join a character's bytes, left to right, and nothing else.

    A merge's left side is always an incomplete character (it starts with a lead byte and is shorter than that byte
    announces) and its right side a continuation byte, so no merge can join two characters. The partial characters
    need no ids of their own: llama.cpp merges by rank and looks up only the finished piece. A character outside
    the vocabulary has no token, and llama.cpp drops its bytes where tinylm refuses the text.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()  # GPT-2's printable stand-in character for each byte
    spelled, merges = {}, {}
    for token, i in vocabulary.items():
        if token in special:
            spelled[token] = i
            continue
        pieces = [spelling[byte] for byte in token.encode()]
        spelled["".join(pieces)] = i
        for length in range(2, len(pieces) + 1):  # by length first: every 2-byte join ranks before any 3-byte one
            merges.setdefault(("".join(pieces[: length - 1]), pieces[length - 1]), length)
    ordered = sorted(merges, key=lambda pair: (merges[pair], pair))
    return spelled, [f"{left} {right}" for left, right in ordered]


def gguf_vocabulary(run: Pretrained, vocab_size: int) -> dict[str, Any]:
    """The run's tokenizer as llama.cpp's vocabulary: tokenizer model, pre-tokenizer, tokens, types and merges."""
    from gguf import TokenType

    tokenizer = hf_tokenizer(run)
    backend = tokenizer.backend_tokenizer
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    vocabulary = backend.get_vocab(with_added_tokens=True)
    if isinstance(run.text_tokenizer, CharTokenizer):
        vocabulary, merges = char_vocabulary(vocabulary, special)
    else:
        description = json.loads(backend.to_str())
        pre_tokenizer = description.get("pre_tokenizer") or {}
        if not (
            description["model"]["type"] == "BPE"
            and pre_tokenizer.get("type") == "ByteLevel"
            and pre_tokenizer.get("use_regex", True)
        ):
            raise TinylmError(
                f"data.tokenizer {run.text_tokenizer.spec} is not a GPT-2-style byte-level BPE, which llama.cpp "
                "tokenizes as tinylm does; export with --to hf, or train with char, bpe:N or gpt2"
            )
        merges = [" ".join(m) if isinstance(m, list) else m for m in description["model"]["merges"]]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the model has beyond the tokenizer's stay unused
    types = [TokenType.UNUSED] * vocab_size
    for token, i in vocabulary.items():
        tokens[i] = token
        types[i] = TokenType.CONTROL if token in special else TokenType.NORMAL
    return {
        "model": "gpt2",  # llama.cpp's name for byte-level BPE
        "pre": "gpt-2",  # GPT-2's split of text into words
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "chat_template": getattr(tokenizer, "chat_template", None),
        **special_token_ids(tokenizer, run.text_tokenizer.end_of_text),
    }
