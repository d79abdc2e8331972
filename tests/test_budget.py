from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from tinylm.config import ModelConfig, TrainConfig
from tinylm.model import build_model, count_parameters
from tinylm.model.budget import model_budget, parameter_counts, training_memory
from tinylm.model.presets import MODEL_PRESETS
from tinylm.recipes import resolve_config
from tinylm.training.optim import build_optimizers

SMALL = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
VARIANTS = [
    {},
    {"bias": False, "tie_embeddings": False},
    LLAMA_STYLE,
    {**LLAMA_STYLE, "n_kv_head": 1, "qk_norm": True, "mlp_hidden_size": 40},
    {"mlp": "swiglu", "n_kv_head": 2, "qk_norm": True},  # biases everywhere, LayerNorm q/k norms with biases
    {"arch": "bigram"},
]


CONFIGS = {f"small-{i}": ModelConfig(**SMALL, **v) for i, v in enumerate(VARIANTS)} | {
    name: resolve_config({"model": {"preset": name, "vocab_size": 65}}).model for name in MODEL_PRESETS
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_arithmetic_matches_the_built_model(name):
    config = CONFIGS[name]
    with torch.device("meta"):
        model = build_model(config)
    counts = parameter_counts(config)
    assert {key: counts[key] for key in ("total", "embedding", "non_embedding")} == count_parameters(model)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert counts["matmul"] == linear_weights  # N of 6N: every matrix multiply, the tied output layer included


def test_flops_follow_the_palm_formula():
    config = ModelConfig(**SMALL)
    budget = model_budget(config, batch_size=4)
    attention = 12 * 2 * 4 * 8 * 16  # 12 * layers * heads * head size * context
    assert budget.training_flops_per_token == 6 * budget.matmul_parameters + attention
    assert budget.forward_flops_per_token * 3 == budget.training_flops_per_token


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_kv_cache_bytes_are_what_the_cache_allocates(n_kv_head):
    config = ModelConfig(**SMALL, n_kv_head=n_kv_head)
    cache = build_model(config).new_kv_cache(batch_size=1, dtype=torch.bfloat16)
    allocated = cache.keys.nbytes + cache.values.nbytes
    assert model_budget(config, 1, precision="bf16").kv_cache_bytes_per_token * config.block_size == allocated


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_memory_counts_the_states_the_optimizers_keep(optimizer):
    config = ModelConfig(**SMALL, **LLAMA_STYLE)
    model = build_model(config)
    optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer), "cpu")
    _, loss = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
    loss.backward()
    for opt in optimizers:
        opt.step()
    state_bytes = sum(t.nbytes for opt in optimizers for s in opt.state.values() for t in s.values() if t.dim() > 0)
    memory = training_memory(config, 2, 16, "fp32", optimizer)
    assert memory["optimizer"] == state_bytes
    assert memory["weights"] == memory["gradients"] == 4 * count_parameters(model)["total"]


def test_a_weight_average_costs_one_more_copy_of_the_weights():
    config = ModelConfig(**SMALL, **LLAMA_STYLE)
    plain = training_memory(config, 2, 16, "fp32", "muon")
    averaged = training_memory(config, 2, 16, "fp32", "muon", weight_average=True)
    assert "weight average" not in plain and averaged["weight average"] == plain["weights"]
    assert averaged["total"] == plain["total"] + plain["weights"]


@pytest.mark.parametrize("options", [{}, {**LLAMA_STYLE, "n_kv_head": 2}], ids=["gpt2", "llama"])
def test_activation_estimate_is_close_to_what_autograd_saves(options):
    config = ModelConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=64, **options)
    model = build_model(config)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, 500, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
        model(tokens, tokens)
    estimate = training_memory(config, 2, 64, "fp32", "adamw")["activations"]
    assert 0.75 < estimate / sum(saved.values()) < 1.33


def test_info_prints_the_budget_and_its_json(capsys):
    code, out, _ = run_cli(capsys, "info", "gpt2-124m", "--batch-size", "8", "--precision", "fp32")
    assert code == 0 and "124,439,808" in out and "PaLM" in out and "fp32" in out
    code, out, _ = run_cli(capsys, "info", "gpt2-124m", "--batch-size", "8", "--block-size", "512", "--json")
    figures = json.loads(out)
    config = resolve_config({"model": {"preset": "gpt2-124m", "block_size": 512}}).model
    assert figures == model_budget(config, 8, "bf16", "adamw").to_dict()
    assert figures["parameters"] == 124_439_808 - 512 * 768  # half the learned positions


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpt2-125m"], "not a model preset, recipe or run folder; did you mean 'gpt2-124m'?"),
        (["nanogpt-shakespeare-char"], "give --vocab-size"),
        (["gpt2-124m", "--precision", "fp8"], "expects one of"),
        (["gpt2-124m", "--batch-size", "0"], "train.batch_size must be at least 1"),
        (["smollm2-135m", "--block-size", "0"], "model.block_size must be at least 1"),
    ],
)
def test_info_errors_are_one_line(capsys, args, message):
    code, _, err = run_cli(capsys, "info", *args)
    assert code == 1 and message in err and err.count("\n") == 1
