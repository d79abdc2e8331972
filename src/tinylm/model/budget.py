"""What a model costs, worked out from its config without building it: parameters, FLOPs per token, KV-cache bytes
per token and a training-memory estimate. `tinylm info` prints it.

FLOPs follow the PaLM paper's accounting (Chowdhery et al. 2022, appendix B): a training token costs 6N + 12·L·H·Q·T,
where N counts the weights of every matrix multiply (the output layer included, tied or not; embedding lookups, norms
and biases left out), L is layers, H heads, Q head size and T the context; forward alone is a third of it. Like PaLM,
the attention term does not halve for the causal mask.

Training memory assumes mixed precision as torch.autocast runs it: weights, gradients and optimizer state in fp32 and
activations in the chosen precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from tinylm.config import ModelConfig

Precision = Literal["fp32", "bf16", "fp16"]
BYTES_PER_ELEMENT: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4


@dataclass
class ModelBudget:
    parameters: int
    """Every parameter, tied matrices counted once."""
    embedding_parameters: int
    """Token and position embeddings (an untied output layer counts as non-embedding, as in count_parameters)."""
    non_embedding_parameters: int
    matmul_parameters: int
    """N of the FLOPs formula: the weights of every matrix multiply, the output layer included."""
    forward_flops_per_token: int
    training_flops_per_token: int
    kv_cache_bytes_per_token: int
    batch_size: int
    block_size: int
    precision: str
    optimizer: str
    memory_bytes: dict[str, int]
    """Training memory: weights, gradients, optimizer, activations, the weight average (train.ema_decay) if kept, and
    their total."""

    def to_dict(self) -> dict:
        return asdict(self)


def norm_parameters(config: ModelConfig, width: int) -> int:
    with_bias = config.norm == "layernorm" and config.bias
    return width * (2 if with_bias else 1)


def block_matrices(config: ModelConfig) -> int:
    """Weights of one block's linear layers."""
    head_dim, heads, kv_heads, hidden = config.head_dim, config.n_head, config.kv_heads, config.mlp_width
    attention = config.n_embd * (heads + 2 * kv_heads) * head_dim + heads * head_dim * config.n_embd
    mlp = (3 if config.mlp == "swiglu" else 2) * config.n_embd * hidden
    return attention + mlp


def block_vectors(config: ModelConfig) -> int:
    """One block's biases and norm gains."""
    head_dim, heads, kv_heads, hidden = config.head_dim, config.n_head, config.kv_heads, config.mlp_width
    norms = 2 * norm_parameters(config, config.n_embd)
    if config.qk_norm:
        norms += 2 * norm_parameters(config, head_dim)
    if not config.bias:
        return norms
    mlp_biases = (2 if config.mlp == "swiglu" else 1) * hidden + config.n_embd
    return norms + (heads + 2 * kv_heads) * head_dim + config.n_embd + mlp_biases


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """The same numbers as `tinylm.model.count_parameters(build_model(config))`, with `matmul` (N) besides."""
    vocab, width = config.vocab_size, config.n_embd
    if config.arch == "bigram":
        return {"total": vocab * vocab, "embedding": vocab * vocab, "non_embedding": 0, "matmul": 0}
    embedding = vocab * width + (config.block_size * width if config.positions == "learned" else 0)
    if config.value_embeddings:  # tables looked up, not multiplied: embedding parameters
        embedding += config.n_layer * vocab * config.kv_heads * config.head_dim
    output_layer = vocab * width
    non_embedding = config.n_layer * (block_matrices(config) + block_vectors(config))
    non_embedding += norm_parameters(config, width) + (0 if config.tie_embeddings else output_layer)
    matmul = config.n_layer * block_matrices(config) + output_layer
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "matmul": matmul,
    }


def forward_flops_per_token(config: ModelConfig, context: int) -> int:
    """2N for the matrix multiplies plus 4·L·H·Q·T for q·k and the weighted sum of v (PaLM, appendix B), where a
    sliding layer's T is at most its window."""
    if config.arch == "bigram":
        return 0  # a table lookup
    seen = sum(min(context, config.layer_window(layer) or context) for layer in range(config.n_layer))
    attention = 4 * config.n_head * config.head_dim * seen
    return 2 * parameter_counts(config)["matmul"] + attention


def kv_cache_bytes_per_token(config: ModelConfig, precision: Precision) -> int:
    """Keys and values of every layer for one position: what n_kv_head < n_head saves."""
    if config.arch == "bigram":
        return 0
    return 2 * config.n_layer * config.kv_heads * config.head_dim * BYTES_PER_ELEMENT[precision]


def activation_elements_per_token(config: ModelConfig) -> int:
    """Roughly the tensors autograd keeps per token: in each block the norms' inputs and outputs, q, k, v, the
    attention output (flash attention keeps no T x T scores) and the MLP's hidden tensors (gelu: before and after the
    activation; swiglu: gate, up, silu(gate) and the product); the embedding output and the final norm. Dropout masks,
    RoPE and QK-norm copies, temporary buffers and allocator slack are left out, so real peaks run higher."""
    if config.arch == "bigram":
        return 0
    width, heads, kv_heads, head_dim = config.n_embd, config.n_head, config.kv_heads, config.head_dim
    attention = (heads + 2 * kv_heads) * head_dim + heads * head_dim
    mlp = (4 if config.mlp == "swiglu" else 2) * config.mlp_width
    return config.n_layer * (4 * width + attention + mlp) + 2 * width


def training_memory(
    config: ModelConfig,
    batch_size: int,
    block_size: int,
    precision: Precision,
    optimizer: Literal["adamw", "muon"],
    weight_average: bool = False,
) -> dict[str, int]:
    """Bytes for one training step of `batch_size` sequences of `block_size` tokens (with `weight_average`, the
    moving average train.ema_decay keeps)."""
    counts = parameter_counts(config)
    parameters = counts["total"]
    if optimizer == "adamw":
        optimizer_bytes = 2 * FP32 * parameters  # first and second moments
    else:  # Muon keeps one momentum per hidden matrix; AdamW's two moments cover the rest
        hidden_matrices = config.n_layer * block_matrices(config) if config.arch == "gpt" else 0
        optimizer_bytes = FP32 * hidden_matrices + 2 * FP32 * (parameters - hidden_matrices)
    tokens = batch_size * block_size
    # The logits in the chosen precision, and cross-entropy's fp32 log-softmax of them.
    logits_bytes = config.vocab_size * (BYTES_PER_ELEMENT[precision] + FP32)
    activations = tokens * (activation_elements_per_token(config) * BYTES_PER_ELEMENT[precision] + logits_bytes)
    memory = {
        "weights": FP32 * parameters,
        "gradients": FP32 * parameters,
        "optimizer": optimizer_bytes,
        "activations": activations,
    }
    if weight_average:
        memory["weight average"] = FP32 * parameters
    return {**memory, "total": sum(memory.values())}


def model_budget(
    config: ModelConfig,
    batch_size: int,
    precision: Precision = "bf16",
    optimizer: Literal["adamw", "muon"] = "adamw",
    weight_average: bool = False,
) -> ModelBudget:
    """Everything above for one model, trained on batches of `batch_size` full contexts (model.block_size tokens)."""
    counts = parameter_counts(config)
    forward = forward_flops_per_token(config, config.block_size)
    return ModelBudget(
        parameters=counts["total"],
        embedding_parameters=counts["embedding"],
        non_embedding_parameters=counts["non_embedding"],
        matmul_parameters=counts["matmul"],
        forward_flops_per_token=forward,
        training_flops_per_token=3 * forward,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(config, precision),
        batch_size=batch_size,
        block_size=config.block_size,
        precision=precision,
        optimizer=optimizer,
        memory_bytes=training_memory(config, batch_size, config.block_size, precision, optimizer, weight_average),
    )


def format_budget(name: str, config: ModelConfig, budget: ModelBudget) -> str:
    """The budget as the lines `tinylm info` prints."""
    lines = [f"{name}: {architecture(config)}"]
    lines.append(
        f"parameters       {budget.parameters:,} ({_si(budget.parameters)}): "
        f"embedding {budget.embedding_parameters:,}, non-embedding {budget.non_embedding_parameters:,}"
        + (", tied output layer counted once" if config.arch == "gpt" and config.tie_embeddings else "")
    )
    lines.append(
        f"FLOPs per token  {_si(budget.forward_flops_per_token, 'FLOP')} forward, "
        f"{_si(budget.training_flops_per_token, 'FLOP')} training "
        f"(PaLM: 6N + 12·L·H·Q·T, N = {_si(budget.matmul_parameters)} matmul weights, T = {config.block_size})"
    )
    kv = budget.kv_cache_bytes_per_token
    lines.append(
        f"KV cache         {kv:,} bytes per token in {budget.precision}; "
        f"{_si(kv * config.block_size, 'B')} per sequence of {config.block_size} tokens"
    )
    memory = budget.memory_bytes
    parts = ", ".join(f"{key} {_si(value, 'B')}" for key, value in memory.items() if key != "total")
    lines.append(
        f"training memory  about {_si(memory['total'], 'B')} for batches of {budget.batch_size} x {budget.block_size} "
        f"tokens, {budget.precision} activations, {budget.optimizer}: {parts}"
    )
    return "\n".join(lines)


def architecture(config: ModelConfig) -> str:
    if config.arch == "bigram":
        return f"bigram table, vocabulary {config.vocab_size:,}"
    attention = f"{config.n_head} heads of {config.head_dim}"
    if config.kv_heads != config.n_head:
        attention += f" sharing {config.kv_heads} k/v head{'s' if config.kv_heads > 1 else ''}"
    return (
        f"gpt, {config.n_layer} layers x {config.n_embd}, {attention}, {config.positions} positions, {config.norm}, "
        f"{config.mlp} MLP {config.mlp_width}, context {config.block_size}, vocabulary {config.vocab_size:,}"
        + (", tied" if config.tie_embeddings else ", untied")
        + ("" if config.bias else ", no bias")
        + (", QK-norm" if config.qk_norm else "")
    )


def _si(value: float, unit: str = "") -> str:
    """1234567, "B" -> '1.23 MB': three significant digits and a decimal prefix."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()
