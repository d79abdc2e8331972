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
