from __future__ import annotations

import pytest
import torch

from tinylm.config import ModelConfig
from tinylm.model import build_model, count_parameters
from tinylm.model.presets import MODEL_PRESETS, PRESET_PARAMETERS
from tinylm.recipes import resolve_config

SHAKESPEARE_CHARACTERS = 65  # the vocabulary PRESET_PARAMETERS assumes where a preset leaves it to the tokenizer


def preset_config(name: str) -> ModelConfig:
    config = resolve_config({"model": {"preset": name}}).model
    return (
        config
        if config.vocab_size
        else resolve_config({"model": {"preset": name, "vocab_size": SHAKESPEARE_CHARACTERS}}).model
    )


def test_every_preset_states_its_parameter_count():
    assert set(PRESET_PARAMETERS) == set(MODEL_PRESETS)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_every_preset_has_the_parameter_count_it_states(name):
    with torch.device("meta"):  # shapes only: even the 135M models build in milliseconds
        model = build_model(preset_config(name))
    assert count_parameters(model)["total"] == PRESET_PARAMETERS[name]


def test_presets_that_fix_a_vocabulary_set_it():
    for name in ("gpt2-124m", "tinystories-33m", "slm-15m", "tinygpt-61m", "llama-42m", "smollm2-135m"):
        assert MODEL_PRESETS[name]["vocab_size"] in (50257, 32000, 49152)
    assert "vocab_size" not in MODEL_PRESETS["nanogpt-shakespeare-char"]


def test_modern_presets_are_llama_shaped():
    smollm2 = preset_config("smollm2-135m")
    assert (smollm2.positions, smollm2.norm, smollm2.mlp, smollm2.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert (smollm2.n_head, smollm2.kv_heads, smollm2.head_dim, smollm2.mlp_width) == (9, 3, 64, 1536)
    assert smollm2.rope_theta == 100000.0 and smollm2.tie_embeddings
    assert preset_config("tinygpt-61m").kv_heads == 4


def test_gpt2_and_smollm2_presets_count_like_their_transformers_twins():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    smollm2 = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        twins = {
            "gpt2-124m": transformers.GPT2LMHeadModel(gpt2),
            "smollm2-135m": transformers.LlamaForCausalLM(smollm2),
        }
    for name, twin in twins.items():
        assert sum(p.numel() for p in twin.parameters()) == PRESET_PARAMETERS[name]
