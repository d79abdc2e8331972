from __future__ import annotations

import pytest
import torch

from tinylm.config import ModelConfig
from tinylm.model import build_model, count_parameters
from tinylm.model.gpt import GPT


def small_gpt(**changes) -> GPT:
    torch.manual_seed(0)
    fields = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True, tie_embeddings=True)
    return build_model(ModelConfig(**{**fields, **changes}))


def test_overfits_a_short_text_to_near_zero_loss():
    model = small_gpt(dropout=0.0)
    text = torch.randint(0, 50, (1, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = text[:, :-1], text[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.01


def test_future_tokens_leave_earlier_logits_unchanged():
    model = small_gpt().eval()
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    with torch.no_grad():
        before, _ = model(tokens)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_tied_weights_are_one_tensor_and_counted_once():
    tied, untied = small_gpt(tie_embeddings=True), small_gpt(tie_embeddings=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    vocab_by_width = 50 * 32
    assert count_parameters(untied)["total"] - count_parameters(tied)["total"] == vocab_by_width
    counts = count_parameters(tied)
    assert counts["embedding"] == vocab_by_width + 16 * 32
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]


def test_parameter_count_matches_the_gpt2_formula():
    model = small_gpt(bias=False, tie_embeddings=True)
    width, layers = 32, 2
    per_block = 12 * width * width + 2 * width  # attention 4w^2 + MLP 8w^2 + two LayerNorm gains
    expected = 50 * width + 16 * width + layers * per_block + width  # + the final LayerNorm
    assert count_parameters(model)["total"] == expected


def test_residual_projections_start_smaller_than_other_weights():
    model = small_gpt(n_layer=8)
    residual_std = model.blocks[0].mlp.proj.weight.std().item()
    other_std = model.blocks[0].mlp.fc.weight.std().item()
    assert residual_std == pytest.approx(0.02 / 4, rel=0.1)
    assert other_std == pytest.approx(0.02, rel=0.1)


def test_dropout_only_acts_in_training_mode():
    model = small_gpt(dropout=0.5)
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(tokens)[0], model(tokens)[0])
        model.train()
        assert not torch.equal(model(tokens)[0], model(tokens)[0])


def test_longer_input_than_the_context_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        small_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_bigram_logits_depend_on_the_current_token_only():
    model = build_model(ModelConfig(arch="bigram", vocab_size=10, block_size=8))
    with torch.no_grad():
        model.next_token_logits.weight.normal_()
        logits, _ = model(torch.tensor([[1, 2, 3], [4, 2, 5]]))
    torch.testing.assert_close(logits[0, 1], logits[1, 1])
    assert count_parameters(model)["total"] == 100


LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, qk_norm=True)


def reference_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Multi-head causal attention written out the long way, from the module's own weights."""
    batch, time, width = x.shape
    q, k, v = attn.qkv(x).view(batch, time, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / attn.head_dim**0.5
    scores = scores.masked_fill(torch.ones(time, time).triu(1).bool(), float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, time, width)
    return attn.proj(y)


def test_rope_scores_depend_on_relative_position_only():
    from tinylm.model.gpt import RotaryEmbedding, apply_rotary

    positions, head_dim = 24, 8
    cos, sin = RotaryEmbedding(head_dim, positions, theta=10000.0)(0, positions)
    q, k = torch.randn(2, head_dim, dtype=torch.float64)
    rotated_q = apply_rotary(q.expand(1, 1, positions, head_dim), cos, sin)[0, 0]
    rotated_k = apply_rotary(k.expand(1, 1, positions, head_dim), cos, sin)[0, 0]
    scores = rotated_q @ rotated_k.T  # scores[m, n]: q at position m, k at position n
    for offset in (0, 3, -5):
        diagonal = scores.diagonal(offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal))
    assert not torch.allclose(scores.diagonal(0)[0], scores.diagonal(3)[0])


def test_multi_head_attention_matches_the_textbook_formula():
    model = small_gpt(n_kv_head=2, n_head=2).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].attn(x, None, None), reference_attention(model.blocks[0].attn, x))


def repeat_kv_heads(rows: torch.Tensor, n_kv_head: int, group: int) -> torch.Tensor:
    """k or v rows of a fused qkv weight (or bias), each head's rows repeated for the `group` query heads it serves."""
    return rows.unflatten(0, (n_kv_head, -1)).repeat_interleave(group, dim=0).flatten(0, 1)


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_is_multi_head_with_shared_kv_heads(n_kv_head):
    grouped = small_gpt(n_head=4, n_kv_head=n_kv_head).blocks[0].attn.eval()
    full = small_gpt(n_head=4).blocks[0].attn.eval()
    width, kv_width, group = 32, n_kv_head * 8, 4 // n_kv_head
    with torch.no_grad():
        for name in ("weight", "bias"):
            q, k, v = getattr(grouped.qkv, name).split([width, kv_width, kv_width])
            repeated = [repeat_kv_heads(rows, n_kv_head, group) for rows in (k, v)]
            getattr(full.qkv, name).copy_(torch.cat([q, *repeated]))
        full.proj.load_state_dict(grouped.proj.state_dict())
        x = torch.randn(2, 10, width)
        torch.testing.assert_close(grouped(x, None, None), full(x, None, None))
        torch.testing.assert_close(full(x, None, None), reference_attention(full, x))


@pytest.mark.parametrize(
    "options",
    [{}, LLAMA_STYLE, {**LLAMA_STYLE, "n_kv_head": 2, "qk_norm": False}, {"tie_embeddings": False, "mlp": "swiglu"}],
    ids=["gpt2", "llama-mqa-qknorm", "llama-gqa", "untied-swiglu"],
)
def test_cached_decoding_gives_the_logits_of_a_full_forward(options):
    model = small_gpt(n_head=4, **options).eval()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        full, _ = model(tokens)
        # A prefill of 5, a chunk of 4 into the non-empty cache, then one token at a time.
        pieces = [model(tokens[:, :5], kv_cache=cache)[0], model(tokens[:, 5:9], kv_cache=cache)[0]]
        pieces += [model(tokens[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 16


def test_a_full_cache_refuses_more_and_a_reset_one_recomputes_the_same_logits():
    model = small_gpt(**LLAMA_STYLE).eval()
    tokens = torch.randint(0, 50, (1, 16))
    cache = model.new_kv_cache(batch_size=1)
    with torch.no_grad():
        full, _ = model(tokens, kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            model(tokens[:, :1], kv_cache=cache)
        cache.reset()
        assert cache.length == 0
        again, _ = model(tokens, kv_cache=cache)
    torch.testing.assert_close(again, full, atol=1e-5, rtol=1e-5)


def test_a_repeated_cache_continues_one_context_several_ways_as_each_full_forward_does():
    model = small_gpt(**LLAMA_STYLE).eval()
    context, endings = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (3, 4))
    cache = model.new_kv_cache(batch_size=1)
    with torch.no_grad():
        model(context, kv_cache=cache)
        rows = cache.repeated(3)
        continued, _ = model(endings, kv_cache=rows)
        full, _ = model(torch.cat([context.expand(3, -1), endings], dim=1))
    assert (rows.length, cache.length) == (11, 7)  # the copies grow; the one-row cache is left as it was
    torch.testing.assert_close(continued, full[:, 7:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one-row cache"):
        rows.repeated(2)
    assert cache.repeated(2, capacity=9).keys.shape[3] == 9  # room for the continuations only


def test_the_bigram_takes_a_cache_too():
    model = build_model(ModelConfig(arch="bigram", vocab_size=10, block_size=4))
    cache = model.new_kv_cache(batch_size=1)
    model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    assert cache.length == 3
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.tensor([[1, 2]]), kv_cache=cache)


def test_llama_style_blocks_have_the_agreed_parameter_names():
    model = small_gpt(**{**LLAMA_STYLE, "n_head": 4, "n_kv_head": 2})
    names = set(model.state_dict())
    assert "position_embedding.weight" not in names and not any(name.endswith(".bias") for name in names)
    for name in ("attn_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight", "mlp.gate.weight", "mlp.up.weight"):
        assert f"blocks.0.{name}" in names
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # q: 4 heads of 8; k, v: 2 heads each
    assert model.blocks[0].mlp.up.weight.shape == (128, 32)  # 8/3 * 32 rounded up to a multiple of 64


def test_llama_style_model_trains():
    model = small_gpt(**LLAMA_STYLE)
    text = torch.randint(0, 50, (1, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(text[:, :-1], text[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05


def greedy_without_cache(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """generate_tokens' policy written out with full forward passes: whenever the text would pass block_size, the
    window restarts with its last three quarters of a block."""
    block_size, tokens, start = model.config.block_size, list(prompt), 0
    for _ in range(max_new_tokens):
        if len(tokens) - start > block_size:
            start = len(tokens) - (block_size - block_size // 4)
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens[start:]]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def generate(model, prompt: list[int], max_new_tokens: int, **sampling) -> list[int]:
    from tinylm.config import SampleConfig
    from tinylm.generate import generate_tokens

    steps = generate_tokens(model, [prompt], SampleConfig(max_new_tokens=max_new_tokens, top_k=None, **sampling))
    return [token.id for (token,) in steps]


@pytest.mark.parametrize("options", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_cached_generation_follows_its_sliding_window_past_block_size(options):
    model = small_gpt(**options).eval()
    prompt = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(3)).tolist()  # longer than 16
    generated = generate(model, prompt, 40, temperature=0)
    assert generated == greedy_without_cache(model, prompt, 40)


def test_generation_is_deterministic_per_seed():
    model = small_gpt()  # freshly initialised: next-token distributions near uniform, so seeds disagree

    def sample(seed: int) -> list[int]:
        return generate(model, [1, 2, 3], 30, temperature=1.0, seed=seed)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_every_norm_gain_and_bias_escapes_weight_decay():
    from tinylm.config import TrainConfig
    from tinylm.training.optim import build_optimizers

    model = small_gpt(**{**LLAMA_STYLE, "bias": True, "norm": "layernorm"})
    (optimizer,) = build_optimizers(model, TrainConfig(), "cpu")
    decayed, plain = optimizer.param_groups
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 2 * 2 + 1  # per block: two norms and q/k norms; and the final norm
    no_decay = {id(p) for p in plain["params"]}
    assert all(id(p) in no_decay for norm in norms for p in norm.parameters())
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.dim() == 2}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model.n_head", "6", "--model.n_kv_head", "4"], "model.n_kv_head (4) must divide model.n_head (6)"),
        (["--model.positions", "rope", "--model.n_embd", "30", "--model.n_head", "2"], "rope needs an even head size"),
        (["--model.norm", "batchnorm"], "expects one of"),
        (["--model.mlp_hidden_size", "0"], "model.mlp_hidden_size must be at least 1"),
        (["--model.rope_theta", "-1"], "must be positive"),
    ],
)
def test_bad_model_options_are_one_line_errors(capsys, options, message):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "train", *options)
    assert code == 1 and message in err and err.startswith("tinylm: error:") and err.count("\n") == 1


SPEEDRUN_OPTIONS = {
    "relu2": {"mlp": "relu2"},
    "logit-softcap": {"logit_softcap": 2.0},
    "zero-init-projections": {"zero_init_projections": True},
    "value-embeddings": {"value_embeddings": True, "n_kv_head": 2},
    "sliding-window": {"attention_window": 4, "attention_pattern": "SL", **LLAMA_STYLE},
}


@pytest.mark.parametrize("options", SPEEDRUN_OPTIONS.values(), ids=SPEEDRUN_OPTIONS)
def test_each_speedrun_option_is_causal_caches_exactly_and_is_counted(options):
    from tinylm.model.budget import parameter_counts

    model = small_gpt(n_head=4, **options)
    if options.get("zero_init_projections"):  # blocks that are still the identity would pass anything: move them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.eval()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        full, _ = model(tokens)
        torch.testing.assert_close(model(changed)[0][:, :10], full[:, :10])
        pieces = [model(tokens[:, :5], kv_cache=cache)[0], model(tokens[:, 5:9], kv_cache=cache)[0]]
        pieces += [model(tokens[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    counted = count_parameters(model)
    assert {key: counted[key] for key in ("total", "embedding", "non_embedding")} == {
        key: parameter_counts(model.config)[key] for key in ("total", "embedding", "non_embedding")
    }


def test_the_speedrun_options_compute_what_they_say():
    tokens = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        capped = small_gpt(logit_softcap=2.0)
        capped.lm_head.weight.mul_(100)
        uncapped = capped.lm_head(capped.final_norm(capped.token_embedding(tokens)))
        assert uncapped.abs().max() > 10 and capped(tokens)[0].abs().max() <= 2.0

        zero = small_gpt(zero_init_projections=True)
        assert all(not block.attn.proj.weight.any() and not block.mlp.proj.weight.any() for block in zero.blocks)
        embedded = zero.token_embedding(tokens) + zero.position_embedding(torch.arange(16))
        torch.testing.assert_close(zero(tokens)[0], zero.lm_head(zero.final_norm(embedded)))  # every block the identity

        relu2 = small_gpt(mlp="relu2").blocks[0].mlp
        x = torch.randn(1, 3, 32)
        torch.testing.assert_close(relu2(x), relu2.proj(torch.relu(relu2.fc(x)) ** 2))

        valued = small_gpt(value_embeddings=True)
        before = valued(tokens)[0]
        valued.blocks[1].attn.value_embedding.weight.add_(1.0)
        assert not torch.allclose(valued(tokens)[0], before)

        # Two sliding layers of window 4: position t reads positions t - 6 .. t at most.
        sliding = small_gpt(attention_window=4, attention_pattern="S", **LLAMA_STYLE).eval()
        changed = tokens.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 50
        delta = (sliding(changed)[0] - sliding(tokens)[0]).abs().amax(dim=-1)[0]
        assert delta[:7].gt(0).all() and delta[7:].eq(0).all()


def test_sliding_layers_count_only_their_window_in_the_flops():
    from tinylm.model.budget import forward_flops_per_token, parameter_counts

    config = ModelConfig(vocab_size=50, block_size=64, n_layer=4, n_head=2, n_embd=32, attention_window=8,
                         attention_pattern="SSSL")  # fmt: skip
    matmul = 2 * parameter_counts(config)["matmul"]
    assert forward_flops_per_token(config, 64) == matmul + 4 * 2 * 16 * (3 * 8 + 64)


@pytest.mark.parametrize(
    ("options", "key"),
    [({"logit_softcap": 30.0}, "logit_softcap"), ({"value_embeddings": True}, "value_embeddings"),
     ({"attention_window": 8, "attention_pattern": "SL"}, "attention_window")],
)  # fmt: skip
def test_exports_refuse_what_transformers_and_llama_cpp_cannot_compute(options, key):
    from tinylm.errors import TinylmError
    from tinylm.hf import hf_family

    with pytest.raises(TinylmError, match=rf"model.{key} is set: .*train without model.{key} to export"):
        hf_family(ModelConfig(vocab_size=50, **options))
    assert hf_family(ModelConfig(vocab_size=50, zero_init_projections=True)) == "gpt2"  # an init, not a computation
