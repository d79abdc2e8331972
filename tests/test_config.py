"""The config dataclasses and their checks, and `config_from_dict`: a run folder's config.yaml read back strictly."""

from __future__ import annotations

import pytest
import yaml

from tinylm.config import Config, ModelConfig, TrainConfig, check_config, config_from_dict, parse_duration
from tinylm.errors import TinylmError


def test_a_saved_config_reads_back_identically(tmp_path):
    config = Config(
        model=ModelConfig(vocab_size=66, positions="rope", norm="rmsnorm", n_kv_head=2),
        train=TrainConfig(batch_tokens=512, batch_size=2, max_time="1h30m", learning_rate=3e-4),
        out=str(tmp_path / "run"),
    )
    config.sample.stop = ["\n\n"]
    config.save(tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == config


def test_keys_a_saved_config_leaves_out_take_their_defaults():
    """A run saved before a field existed still loads."""
    config = config_from_dict({"model": {"n_layer": 2}, "train": {"learning_rate": 1}})
    assert config.model.n_layer == 2 and config.model.n_embd == ModelConfig().n_embd
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)  # YAML may write 1


def test_batch_tokens_decides_the_batch_size_of_a_saved_config():
    assert config_from_dict({"model": {"block_size": 64}, "train": {"batch_tokens": 2048}}).train.batch_size == 32
    with pytest.raises(TinylmError, match="set only one of batch_size and batch_tokens"):
        config_from_dict({"model": {"block_size": 64}, "train": {"batch_tokens": 2048, "batch_size": 16}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": {"n_layers": 2}}, "unknown config key 'model.n_layers' (not a field of ModelConfig)"),
        ({"trian": {}}, "unknown config key 'trian' (not a field of Config)"),
        ({"model": 3}, "config section 'model' must be a mapping of keys to values, not 3"),
        (None, "a config must be a mapping of keys to values, not None"),  # an empty config.yaml
        ({"model": {"n_layer": "six"}}, "config key 'model.n_layer' expects int, got 'six'"),
        ({"model": {"n_layer": True}}, "config key 'model.n_layer' expects int, got True"),
        ({"model": {"vocab_size": 6.5}}, "config key 'model.vocab_size' expects int or null, got 6.5"),
        ({"model": {"arch": "rnn"}}, "config key 'model.arch' expects one of 'gpt', 'bigram', 'seq2seq', got 'rnn'"),
        ({"sample": {"stop": ["a", 1]}}, "config key 'sample.stop' expects list[str], got ['a', 1]"),
        ({"out": None}, "config key 'out' expects str, got None"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "must be a multiple of model.n_head"),
    ],
)
def test_a_saved_config_that_cannot_be_a_config_gets_one_line_naming_the_key(values, message):
    with pytest.raises(TinylmError) as error:
        config_from_dict(values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (Config(model=ModelConfig(n_kv_head=4)), r"model.n_kv_head \(4\) must divide model.n_head \(6\)"),
        (Config(model=ModelConfig(positions="rope", n_embd=30, n_head=6)), "positions: rope needs an even head size"),
        (Config(train=TrainConfig(batch_size=12, micro_batch_size=5)), "must be a multiple of train.micro_batch_size"),
        (Config(train=TrainConfig(max_time="soon")), "train.max_time 'soon' is not a duration"),
        (Config(train=TrainConfig(ema_decay=1.0)), r"train.ema_decay must be in \[0, 1\) \(0: no average\), not 1.0"),
        (Config(model=ModelConfig(arch="seq2seq", block_size=8)), r"at least task.max_length \+ 1 \(17\)"),
    ],
)
def test_values_that_type_check_but_cannot_work_are_refused(config, message):
    with pytest.raises(TinylmError, match=message):
        check_config(config)


def test_durations_add_up_their_units():
    assert parse_duration("3600") == parse_duration("1h") == parse_duration("45m15m") == 3600
    assert parse_duration("1d1h30m5s") == 86400 + 3600 + 1800 + 5
