"""Hugging Face interop: import a GPT-2 or Llama checkpoint into a tinylm run, export a run back out.

    import_model("HuggingFaceTB/SmolLM2-135M", "out/smollm2")   # a hub name, a local folder or a .gguf file
    export_hf("out/run", "out/run-hf")       # GPT2LMHeadModel or LlamaForCausalLM + tokenizer, for transformers

tinylm's one GPT class covers both families through its config, so each direction is a renaming of weights plus
a handful of reshapes: GPT-2 stores its linear layers transposed (Conv1D), Llama keeps q, k and v apart where tinylm
fuses them. GGUF export (gguf_export.py) builds on the same mappings. A model that a target class cannot express
exactly is refused, naming the config field, instead of being converted approximately.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from tinylm.config import Config, DataConfig, ModelConfig
from tinylm.errors import TinylmError
from tinylm.gguf_metadata import read_gguf_metadata, save_gguf_metadata
from tinylm.model import build_model
from tinylm.pretrained import PACKAGED_GGUF, Pretrained, load_tinylm_run, packaged_gguf
from tinylm.runs import (
    CONFIG_FILE,
    HF_CONFIG_FILE,
    WEIGHTS_FILE,
    read_json,
    save_weights,
    staged_output,
    write_json,
    write_yaml,
)
from tinylm.tokenizers import (
    END_OF_TEXT,
    HF_TOKENIZER_FILE,
    CharTokenizer,
    HuggingFaceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
)

INSTALL_HINT = "pip install 'tinylm[hf]'"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"

# tinylm module -> Hugging Face module, per family; `{i}` is the block index and the parameter suffix (.weight,
# .bias) carries over. Llama's q, k and v are tinylm's fused `attn.qkv` cut in three (see `split_qkv`).
GPT2_MODULES = {
    "token_embedding": "transformer.wte",
    "position_embedding": "transformer.wpe",
    "blocks.{i}.attn_norm": "transformer.h.{i}.ln_1",
    "blocks.{i}.attn.qkv": "transformer.h.{i}.attn.c_attn",
    "blocks.{i}.attn.proj": "transformer.h.{i}.attn.c_proj",
    "blocks.{i}.mlp_norm": "transformer.h.{i}.ln_2",
    "blocks.{i}.mlp.fc": "transformer.h.{i}.mlp.c_fc",
    "blocks.{i}.mlp.proj": "transformer.h.{i}.mlp.c_proj",
    "final_norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
# GPT-2's Conv1D layers hold (in, out) matrices where nn.Linear holds (out, in).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LLAMA_MODULES = {
    "token_embedding": "model.embed_tokens",
    "blocks.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.q": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.k": "model.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v": "model.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.gate": "model.layers.{i}.mlp.gate_proj",
    "blocks.{i}.mlp.up": "model.layers.{i}.mlp.up_proj",
    "blocks.{i}.mlp.proj": "model.layers.{i}.mlp.down_proj",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise TinylmError(f"Hugging Face import and export need transformers: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()  # its load reports and hub notices are not the user's business here
    transformers.logging.disable_progress_bar()
    return transformers


# --- Weights: renaming and reshaping between tinylm and the other layouts -------------------------------------------


def rename(state: dict[str, torch.Tensor], modules: dict[str, str], n_layer: int) -> dict[str, torch.Tensor]:
    """Rename every tensor by its module (`blocks.3.attn.proj.weight` -> `...layers.3.self_attn.o_proj.weight`)."""
    table = {
        source.format(i=i): target.format(i=i)
        for source, target in modules.items()
        for i in (range(n_layer) if "{i}" in source else [0])
    }
    renamed = {}
    for name, tensor in state.items():
        module, _, parameter = name.rpartition(".")
        renamed[f"{table[module]}.{parameter}"] = tensor
    return renamed


def split_qkv(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """tinylm's fused `attn.qkv` (rows: q heads, then k heads, then v heads) as `attn.q`, `attn.k` and `attn.v`."""
    sizes = [config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]
    split = {}
    for name, tensor in state.items():
        prefix, found, parameter = name.partition(".attn.qkv.")
        if not found:
            split[name] = tensor
            continue
        for part, rows in zip("qkv", torch.split(tensor, sizes)):
            split[f"{prefix}.attn.{part}.{parameter}"] = rows
    return split


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `split_qkv`."""
    fused = {}
    for name, tensor in state.items():
        prefix, found, parameter = name.partition(".attn.q.")
        if found:
            parts = [state[f"{prefix}.attn.{part}.{parameter}"] for part in "qkv"]
            fused[f"{prefix}.attn.qkv.{parameter}"] = torch.cat(parts)
        elif ".attn.k." not in name and ".attn.v." not in name:
            fused[name] = tensor
    return fused


def transpose_conv1d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Between nn.Linear's (out, in) and GPT-2 Conv1D's (in, out); its own inverse."""
    return {name: tensor.t() if name.endswith(GPT2_CONV1D) else tensor for name, tensor in state.items()}


def tinylm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, a tied matrix under both of its names (each layout wants it as it names it)."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


# --- Which Hugging Face class expresses a tinylm config, and the reverse -------------------------------------------


def hf_family(config: ModelConfig) -> str:
    """`gpt2` or `llama`: the Hugging Face class that computes exactly what this model does, or a refusal."""
    if config.arch != "gpt":
        raise TinylmError(f"model.arch is {config.arch}: only gpt models export to Hugging Face or GGUF")
    if config.qk_norm:
        raise TinylmError(
            "model.qk_norm is true: neither GPT2LMHeadModel nor LlamaForCausalLM normalises q and k; "
            "train with model.qk_norm false to export"
        )
    inexpressible = {
        "logit_softcap": config.logit_softcap is not None,
        "value_embeddings": config.value_embeddings,
        "attention_window": any(config.layer_window(i) is not None for i in range(config.n_layer)),
    }
    for key, used in inexpressible.items():
        if used:
            raise TinylmError(
                f"model.{key} is set: neither GPT2LMHeadModel nor LlamaForCausalLM (nor llama.cpp's gpt2 and llama "
                f"architectures) computes it; train without model.{key} to export"
            )
    if config.positions == "learned":
        wants = {"norm": "layernorm", "mlp": "gelu" if config.mlp != "gelu_tanh" else "gelu_tanh"}
        if config.kv_heads != config.n_head:
            raise TinylmError(
                f"model.n_kv_head is {config.n_kv_head}: GPT2LMHeadModel has as many key/value heads as query heads "
                "(use positions: rope with rmsnorm and swiglu for a Llama export)"
            )
        family, target = "gpt2", "GPT2LMHeadModel (learned positions)"
    else:
        wants = {"norm": "rmsnorm", "mlp": "swiglu"}
        family, target = "llama", "LlamaForCausalLM (rope positions)"
    for key, value in wants.items():
        if getattr(config, key) != value:
            raise TinylmError(f"model.{key} is {getattr(config, key)}: {target} needs {key} {value}")
    return family


def hf_config(config: ModelConfig, special_ids: dict[str, int]):
    """The transformers config of the class `hf_family` picks, with the tokenizer's BOS and EOS ids."""
    transformers = _transformers()
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings, **special_ids}
    if hf_family(config) == "gpt2":
        return transformers.GPT2Config(
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.mlp_width,
            activation_function="gelu_new" if config.mlp == "gelu_tanh" else "gelu",
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            **common,
        )
    return transformers.LlamaConfig(
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias,  # RMSNorm has no bias, so tinylm's `bias` is exactly Llama's linear biases
        mlp_bias=config.bias,
        **common,
    )


def tinylm_model_config(config) -> ModelConfig:
    """The ModelConfig that computes exactly what a transformers GPT-2 or Llama config does."""
    model_type = config.model_type
    if model_type == "gpt2":
        if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
            raise TinylmError("this GPT-2 scales attention in a non-standard way (scale_attn_*), which tinylm lacks")
        tanh_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's own
        if not tanh_gelu and config.activation_function != "gelu":
            raise TinylmError(f"GPT-2 activation_function {config.activation_function} is not GELU; tinylm has GELU")
        return ModelConfig(
            vocab_size=config.vocab_size,
            block_size=config.n_positions,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            dropout=0.0,
            bias=True,
            tie_embeddings=config.tie_word_embeddings,
            norm_eps=config.layer_norm_epsilon,
            mlp="gelu_tanh" if tanh_gelu else "gelu",
            mlp_hidden_size=config.n_inner,
        )
    if model_type == "llama":
        rope = config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise TinylmError(f"rope_type {rope['rope_type']} (scaled RoPE) is not supported; tinylm has plain RoPE")
        if config.hidden_act != "silu":
            raise TinylmError(f"Llama hidden_act {config.hidden_act} is not silu; tinylm's swiglu uses silu")
        if config.attention_bias != config.mlp_bias:
            raise TinylmError("attention_bias and mlp_bias differ; tinylm's model.bias sets both at once")
        if (config.head_dim or config.hidden_size // config.num_attention_heads) * config.num_attention_heads != (
            config.hidden_size
        ):
            raise TinylmError(f"head_dim {config.head_dim} x heads is not hidden_size; tinylm needs n_embd / n_head")
        kv = config.num_key_value_heads
        return ModelConfig(
            vocab_size=config.vocab_size,
            block_size=config.max_position_embeddings,
            n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads,
            n_embd=config.hidden_size,
            dropout=0.0,
            bias=config.attention_bias,
            tie_embeddings=config.tie_word_embeddings,
            positions="rope",
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm="rmsnorm",
            norm_eps=config.rms_norm_eps,
            mlp="swiglu",
            mlp_hidden_size=config.intermediate_size,
            n_kv_head=None if kv in (None, config.num_attention_heads) else kv,
        )
    raise TinylmError(f"cannot import a {model_type!r} model; tinylm imports the gpt2 and llama families")


def to_hf_state(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    config: ModelConfig = model.config
    state = tinylm_state(model)
    if family == "gpt2":
        return transpose_conv1d(rename(state, GPT2_MODULES, config.n_layer))
    return rename(split_qkv(state, config), LLAMA_MODULES, config.n_layer)


def from_hf_state(hf_model: nn.Module, family: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {name: p.detach() for name, p in hf_model.named_parameters(remove_duplicate=False)}
    if family == "gpt2":
        return rename(transpose_conv1d(state), {v: k for k, v in GPT2_MODULES.items()}, config.n_layer)
    return fuse_qkv(rename(state, {v: k for k, v in LLAMA_MODULES.items()}, config.n_layer))


# --- Tokenizers in Hugging Face form -------------------------------------------------------------------------------


def tokenizers_backend(tokenizer: Tokenizer) -> HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer that gives the same ids as `tokenizer` on ordinary text."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return HFTokenizer.from_str(tokenizer.backend.to_str())  # a copy: export must not change the run's tokenizer
    if isinstance(tokenizer, CharTokenizer):
        vocabulary = {char: i for i, char in enumerate(tokenizer.chars)} | {END_OF_TEXT: tokenizer.end_of_text}
        backend = HFTokenizer(models.WordLevel(vocabulary, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point
        backend.decoder = decoders.Fuse()  # join the characters back without spaces
    elif isinstance(tokenizer, TiktokenTokenizer):
        # GPT-2's own two files, read as a byte-level BPE: the same merges tiktoken applies.
        from tinylm.data.sources import GPT2_VOCABULARY, GPT2_VOCABULARY_FOLDER, fetch

        vocab_bpe, encoder_json = (fetch(GPT2_VOCABULARY_FOLDER, remote) for remote in GPT2_VOCABULARY)
        backend = HFTokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        raise TinylmError(f"the {tokenizer.spec} tokenizer has no Hugging Face form")
    backend.add_special_tokens([END_OF_TEXT])  # in the vocabulary already: this marks it special
    return backend


def hf_tokenizer(run: Pretrained):
    """The run's tokenizer as a transformers tokenizer; one imported from Hugging Face keeps its own settings."""
    transformers = _transformers()
    if (run.path / HF_TOKENIZER_CONFIG).is_file():  # chat template, BOS handling, special tokens as published
        return transformers.AutoTokenizer.from_pretrained(str(run.path))
    backend = tokenizers_backend(run.text_tokenizer)
    end = backend.id_to_token(run.text_tokenizer.end_of_text)
    # A fine-tune's chat template goes with it: transformers and llama.cpp then render a conversation as it learned.
    template = run.tokenizer.template_text if run.has_chat_template else None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=end,
        eos_token=end,
        clean_up_tokenization_spaces=False,
        chat_template=template,
    )


def special_token_ids(tokenizer, end_of_text: int) -> dict[str, int]:
    """BOS and EOS ids as the tokenizer names them (an imported chat model ends a turn with its own token), else
    tinylm's end-of-text."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos_token_id": end_of_text if bos is None else bos, "eos_token_id": end_of_text if eos is None else eos}


# --- Import -------------------------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    run_dir: Path
    config: ModelConfig


def resolve_source(source: str) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None) for a named model, a .gguf path, a folder or a hub name."""
    if source in PACKAGED_GGUF:
        gguf = packaged_gguf(source)
        return str(gguf.parent), gguf.name
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise TinylmError(f"GGUF file not found: {path}")
        return str(path.resolve().parent), path.name
    if path.exists() and not (path / "config.json").is_file():
        raise TinylmError(f"{path} is not a Hugging Face model folder (no config.json); give a folder, .gguf or name")
    return (str(path) if path.exists() else source), None


def import_model(source: str, out: str | Path, overwrite: bool = False) -> ImportResult:
    """Write a tinylm run folder holding the model `source` names, ready for `tinylm.load`, generate and eval."""
    transformers = _transformers()
    location, gguf_file = resolve_source(source)
    out = Path(out).expanduser().resolve()
    read = Path(location) / gguf_file if gguf_file else Path(location)
    with staged_output(out, "run", overwrite, inputs=[read] if read.exists() else []) as staging:
        try:
            config = transformers.AutoConfig.from_pretrained(location, gguf_file=gguf_file)
            model_config = tinylm_model_config(config)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                location, gguf_file=gguf_file, dtype=torch.float32
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
        except TinylmError:
            raise
        except Exception as error:  # the hub client and transformers raise many kinds: offline, unknown repo, bad file
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TinylmError(
                f"cannot load {source!r} with transformers ({reason}); give a local model folder, a .gguf file, "
                "or a hub name while online"
            ) from None
        family = "gpt2" if config.model_type == "gpt2" else "llama"
        model = build_model(model_config)
        model.load_state_dict(from_hf_state(hf_model, family, model_config))
        tokenizer.save_pretrained(str(staging))
        if gguf_file:  # name, licence, pre-tokenizer: what a GGUF export of this run writes back
            save_gguf_metadata(staging, read_gguf_metadata(Path(location) / gguf_file))
        # The run's tokenizer is this folder's tokenizer.json, so `tinylm eval` re-tokenizes data with exactly it.
        spec = f"hf:{out}"
        HuggingFaceTokenizer(HFTokenizer.from_file(str(staging / HF_TOKENIZER_FILE)), spec).save(staging)
        run_config = Config(data=DataConfig(tokenizer=spec), model=model_config, out=str(out))
        write_yaml(staging / CONFIG_FILE, run_config.to_dict())
        save_weights(model, staging / WEIGHTS_FILE, {"source": source})
    return ImportResult(out, model_config)


# --- Export -------------------------------------------------------------------------------------------------------


def export_hf(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write `out` as a Hugging Face model folder that AutoModelForCausalLM and AutoTokenizer load."""
    transformers = _transformers()
    run = load_tinylm_run(Path(run_dir).expanduser(), torch.device("cpu"))
    family = hf_family(run.config.model)
    out = Path(out).expanduser()
    with staged_output(out, "hf", overwrite, inputs=[run.path], option="OUT") as staging:
        tokenizer = hf_tokenizer(run)
        special_ids = special_token_ids(tokenizer, run.text_tokenizer.end_of_text)
        config = hf_config(run.config.model, special_ids)
        model_class = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
        hf_model = model_class(config)
        state = to_hf_state(run.model, family)
        for name, tensor in hf_model.state_dict().items():
            if name.endswith(".bias") and not run.config.model.bias:
                state.setdefault(name, torch.zeros_like(tensor))  # GPT-2 always has biases: tinylm's are zero
        hf_model.load_state_dict(state, strict=True)
        end = run.text_tokenizer.end_of_text
        hf_model.generation_config = transformers.GenerationConfig(**special_ids, pad_token_id=end)
        hf_model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        readable_by_transformers_4(staging)
    return out


def readable_by_transformers_4(folder: Path) -> None:
    """Make a folder transformers 5 saved load the same in transformers 4.4x, which many users still run: 4.x reads
    RoPE's base from a top-level `rope_theta` (without it, silently 10000) and knows the fast tokenizer as
    PreTrainedTokenizerFast, not TokenizersBackend. transformers 5 reads both forms."""
    config = read_json(folder / HF_CONFIG_FILE)
    if "rope_parameters" in config:
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config["torch_dtype"] = config.get("dtype", "float32")  # 4.x's name for the weights' dtype
    write_json(folder / HF_CONFIG_FILE, config)
    tokenizer_config = read_json(folder / HF_TOKENIZER_CONFIG)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(folder / HF_TOKENIZER_CONFIG, tokenizer_config)
