"""Recipes: YAML and dotted overrides layered over the defaults and a preset, one-line errors, docs/config.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tinylm.config import Config, config_from_dict
from tinylm.errors import TinylmError
from tinylm.model.presets import MODEL_PRESETS
from tinylm.recipes import config_keys, config_of_model, config_reference, load_config

RECIPE = "configs/shakespeare-char.yaml"


def test_recipe_values_and_overrides_layer_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layer: 3\ntrain:\n  max_steps: 7\n")
    config = load_config(recipe, ["--train.max_steps", "9", "--model.n-embd", "96"])
    assert (config.model.n_layer, config.train.max_steps, config.model.n_embd) == (3, 9, 96)
    assert config.train.batch_size == Config().train.batch_size  # untouched keys keep their defaults


def test_overrides_as_a_dict_are_typed():
    config = load_config(RECIPE, {"train.learning_rate": 0.01, "sample.top_k": None, "model.bias": True})
    assert config.train.learning_rate == 0.01 and config.sample.top_k is None and config.model.bias is True


def test_a_preset_fills_the_model_and_explicit_keys_win():
    config = load_config(None, {"model.preset": "nanogpt-shakespeare-char", "model.dropout": 0.0})
    assert config.model.n_layer == MODEL_PRESETS["nanogpt-shakespeare-char"]["n_layer"]
    assert config.model.dropout == 0.0
    assert load_config(None, {"model.preset": "bigram"}).model.arch == "bigram"


def test_a_recipe_saved_in_a_run_folder_reads_back_identically(tmp_path):
    config = load_config(RECIPE, {"model.vocab_size": 66})
    config.save(tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == config
    assert config_of_model(str(tmp_path)) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.n_layr", "3"], "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
        (["--trian.max_steps", "3"], "did you mean 'train.max_steps'?"),
        (["--model.n_layer", "three"], "config key 'model.n_layer' expects int, got 'three'"),
        (["--train.learning_rate", "fast"], "config key 'train.learning_rate' expects float"),
        (["--model.arch", "rnn"], "config key 'model.arch' expects"),
        (["--model.preset", "gpt-5"], "unknown model preset 'gpt-5'"),
        (["--model.n_embd", "100", "--model.n_head", "3"], "must be a multiple of model.n_head"),
        (["--train.max_steps", "0"], "train.max_steps must be at least 1"),
    ],
)
def test_bad_values_get_one_line_that_names_the_key(overrides, message):
    with pytest.raises(TinylmError) as error:
        load_config(RECIPE, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_an_unknown_key_inside_a_recipe_file_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_step: 7\n")
    with pytest.raises(TinylmError, match=r"unknown config key 'train\.max_step'; did you mean 'train\.max_steps'"):
        load_config(recipe)


def test_a_section_that_is_not_a_mapping_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: 3\n")
    with pytest.raises(TinylmError, match="config section 'model' must be a mapping"):
        load_config(recipe)


def test_a_missing_recipe_is_named():
    with pytest.raises(TinylmError, match=r"recipe not found: nope\.yaml"):
        load_config("nope.yaml")


def test_every_field_is_a_documented_key():
    keys = config_keys()
    assert "train.max_steps" in keys and "model.n_layer" in keys and "out" in keys
    assert len(keys) == len(set(keys))


def test_the_config_reference_in_docs_is_current():
    reference = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert reference.read_text() == config_reference(), "docs/config.md is stale: run `make docs`"


@pytest.mark.parametrize(
    ("depth", "n_embd", "n_head", "learning_rate", "batch_size"),
    [(1, 64, 1, 0.002078, 8), (2, 128, 2, 0.00147, 16), (4, 256, 4, 0.001039, 32), (12, 768, 12, 0.0006, 96)],
)
def test_the_depth_dial_derives_sizes_learning_rate_batch_and_token_budget(depth, n_embd, n_head, learning_rate,
                                                                          batch_size):  # fmt: skip
    config = load_config(None, {"model.depth": depth})
    model, train = config.model, config.train
    assert (model.n_layer, model.n_embd, model.n_head, model.head_dim) == (depth, n_embd, n_head, n_embd // n_head)
    assert train.learning_rate == learning_rate == pytest.approx(6e-4 * (768 / n_embd) ** 0.5, abs=1e-6)
    assert train.batch_size == batch_size
    per_block = 12 * n_embd**2 + 13 * n_embd  # attention 4w² + MLP 8w², with biases and two LayerNorms
    tokens_per_step = batch_size * model.block_size
    assert train.max_steps == -(-20 * depth * per_block // tokens_per_step)  # 20 tokens per block parameter


def test_keys_set_beside_the_depth_dial_win_and_a_preset_beside_it_is_refused(capsys):
    config = load_config(None, {"model.depth": 4, "model.n_head": 2, "train.batch_size": 4, "train.max_steps": 10})
    model, train = config.model, config.train
    assert (model.n_embd, model.n_head, train.batch_size, train.max_steps) == (256, 2, 4, 10)
    smaller_batch = load_config(None, {"model.depth": 4, "train.batch_size": 4})
    default_batch = load_config(None, {"model.depth": 4}).train
    assert abs(4 * smaller_batch.train.max_steps - 32 * default_batch.max_steps) < 32  # the same tokens in all
    with pytest.raises(TinylmError, match=r"model\.preset and model\.depth both size the model; choose one"):
        load_config(None, {"model.depth": 4, "model.preset": "gpt2-124m"})
    from conftest import run_cli

    code, out, _ = run_cli(capsys, "info", "depth:4", "--vocab-size", "4096")
    assert code == 0 and "depth dial 4: n_layer 4, n_embd 256, n_head 4; train.learning_rate 0.001039" in out
    code, _, err = run_cli(capsys, "info", "depth:four")
    assert code == 1 and "depth:N with a whole number" in err
