"""The training engine: batch in tokens, gradient accumulation, precision, schedules, guards, checkpoints, tracking."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

import tinylm
from tinylm.errors import TinylmError
from tinylm.recipes import resume_config
from tinylm.training import checkpoint as checkpoint_module
from tinylm.training.checkpoint import latest_checkpoint, load_checkpoint
from tinylm.training.optim import learning_rate_factor
from tinylm.training.tasks import pretrain
from tinylm.training.throughput import flops_per_token, peak_flops


def train_tiny(text_file, out, **extra) -> tinylm.TrainResult:
    return tinylm.train(tinylm.load_config(None, tiny_overrides(text_file, out, **extra)))


def records(run_dir, key: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


ONE_STEP = {"train.max_steps": 1, "train.eval_interval": 1, "train.log_interval": 1, "train.batch_size": 32}


def test_four_micro_batches_of_8_make_the_same_step_as_one_batch_of_32(text_file, tmp_path):
    whole = train_tiny(text_file, tmp_path / "whole", **ONE_STEP)
    accumulated = train_tiny(text_file, tmp_path / "accumulated", **ONE_STEP, **{"train.micro_batch_size": 8})
    (a,), (b,) = records(whole.run_dir, "loss"), records(accumulated.run_dir, "loss")
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    weights_a = load_file(latest_checkpoint(whole.run_dir) / "model.safetensors")
    weights_b = load_file(latest_checkpoint(accumulated.run_dir) / "model.safetensors")
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=0, atol=1e-6)


def test_batch_tokens_sets_the_batch_size_and_must_agree_with_it():
    config = tinylm.load_config(None, {"model.block_size": 64, "train.batch_tokens": 2048})
    assert config.train.batch_size == 32
    agreeing = {"model.block_size": 64, "train.batch_tokens": 2048, "train.batch_size": 32}
    assert tinylm.load_config(None, agreeing).train.batch_size == 32
    with pytest.raises(TinylmError, match="set only one of batch_size and batch_tokens"):
        tinylm.load_config(None, {**agreeing, "train.batch_size": 16})
    with pytest.raises(TinylmError, match=r"must be a positive multiple of model\.block_size"):
        tinylm.load_config(None, {"model.block_size": 64, "train.batch_tokens": 1000})
    with pytest.raises(TinylmError, match=r"multiple of train\.micro_batch_size"):
        tinylm.load_config(None, {"train.batch_size": 12, "train.micro_batch_size": 5})


def schedule(kind: str, steps: int = 100) -> list[float]:
    config = tinylm.load_config(
        None,
        {
            "train.schedule": kind,
            "train.warmup_steps": 10,
            "train.max_steps": steps,
            "train.min_lr_ratio": 0.1,
            "train.decay_fraction": 0.2,
        },
    )
    return [learning_rate_factor(step, config.train) for step in range(steps + 1)]


def test_every_schedule_warms_up_linearly_then_ends_at_its_floor():
    for kind in ("cosine", "linear", "wsd"):
        factors = schedule(kind)
        assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]), kind
        assert all(a >= b for a, b in itertools.pairwise(factors[9:])), kind
        assert factors[100] == pytest.approx(0.1), kind


def test_schedule_shapes_differ_as_named():
    cosine, linear, wsd = schedule("cosine"), schedule("linear"), schedule("wsd")
    assert linear[55] == pytest.approx(0.55)  # halfway down a straight line
    assert cosine[55] == pytest.approx(0.55) and cosine[30] > linear[30]  # cosine stays high longer, meets it midway
    assert wsd[10:81] == [1.0] * 71  # stable at the peak until the last 20% of the steps
    assert wsd[90] == pytest.approx(0.55)  # then straight down


def nan_at_training_forward(monkeypatch, call: int) -> None:
    """Make the model's loss NaN on its `call`-th training forward pass."""
    original = pretrain.build_model

    def build_with_nan(config):
        model = original(config)
        calls = itertools.count(1)

        def poison(module, args, output):
            if module.training and next(calls) == call:
                return output * float("nan")
            return output

        model.final_norm.register_forward_hook(poison)
        return model

    monkeypatch.setattr(pretrain, "build_model", build_with_nan)


def test_a_nan_loss_stops_the_run_with_the_step_and_a_hint(text_file, tmp_path, monkeypatch):
    nan_at_training_forward(monkeypatch, call=13)
    with pytest.raises(TinylmError, match=r"the loss became nan at step 13; lower train.learning_rate.*on-nan skip"):
        train_tiny(text_file, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-0000010"  # the last good state is kept


def test_on_nan_skip_goes_back_to_the_last_checkpoint_and_continues(text_file, tmp_path, monkeypatch):
    nan_at_training_forward(monkeypatch, call=13)
    result = train_tiny(text_file, tmp_path / "run", **{"train.on_nan": "skip"})
    assert result.steps == 20 and math.isfinite(result.best_val_loss)
    assert records(result.run_dir, "rolled_back_to") == [{"step": 10, "rolled_back_to": 10, "bad_loss": "nan"}]
    steps = [r["step"] for r in records(result.run_dir, "loss")]
    assert steps == [5, 10, 15, 20]  # the records of the abandoned steps are not kept twice
    for tensor in load_file(result.run_dir / "model.safetensors").values():
        assert torch.isfinite(tensor).all()


def test_ema_evaluates_keeps_and_checkpoints_the_moving_average_of_the_weights(text_file, tmp_path):
    decay, steps = 0.3, 6  # (1 + step) / (10 + step) is the smaller until step 4
    every_step = {"train.eval_interval": 1, "train.keep_checkpoints": steps, "train.max_steps": steps}
    result = train_tiny(text_file, tmp_path / "run", **every_step, **{"train.ema_decay": decay})
    trained = [load_file(result.run_dir / f"checkpoints/step-{n:07d}/model.safetensors") for n in range(1, steps + 1)]
    averages = [trained[0]]
    for step, weights in enumerate(trained[1:], start=1):
        d = min(decay, (1 + step) / (10 + step))
        averages.append({name: d * averages[-1][name] + (1 - d) * w for name, w in weights.items()})

    saved = load_checkpoint(latest_checkpoint(result.run_dir)).trainer_state["averaged_weights"]
    for name, tensor in averages[-1].items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6)
    with safe_open(result.run_dir / "model.safetensors", "pt") as best_file:
        best_step = json.loads(best_file.metadata()["step"])
        best = {name: best_file.get_tensor(name) for name in best_file.keys()}  # noqa: SIM118 (safe_open is no dict)
    for name, tensor in best.items():  # the best weights are the average at their step, not the trained weights
        torch.testing.assert_close(tensor, averages[best_step - 1][name], rtol=0, atol=1e-6)
    assert best_step == 1 or any(not torch.equal(best[n], trained[best_step - 1][n]) for n in best)
    evaluated = {r["step"]: r["val_loss"] for r in records(result.run_dir, "val_loss")}
    assert evaluated[best_step] == min(evaluated.values())


def test_a_crash_while_checkpointing_leaves_only_whole_checkpoints(text_file, tmp_path, monkeypatch):
    saves = itertools.count(1)
    original_save = torch.save

    def crash_on_the_second_checkpoint(obj, path, *args, **kwargs):
        if next(saves) == 2:
            raise OSError("disk full")
        original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_the_second_checkpoint)
    with pytest.raises(TinylmError, match=r"trainer\.pt: disk full"):
        train_tiny(text_file, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-0000010"]  # the half-written one is gone
    assert latest_checkpoint(tmp_path / "run").name == "step-0000010"
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # whole and readable
    assert checkpoint.info["step"] == 10 and checkpoint.trainer_state["optimizers"] and checkpoint.weights


def test_keep_checkpoints_keeps_the_newest(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"train.eval_interval": 5, "train.keep_checkpoints": 2})
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["step-0000015", "step-0000020"]


def test_tracking_writes_tensorboard_events_loss_plot_samples_and_throughput(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"train.log": "tensorboard"})
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (result.run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (result.run_dir / "samples.txt").read_text()
    assert "--- step 10 ---" in samples and "--- step 20 ---" in samples and "--- best weights" in samples
    for record in records(result.run_dir, "loss"):
        assert record["tokens_per_s"] > 0 and record["memory_gb"] > 0 and record["grad_norm"] > 0


def test_wandb_missing_is_one_clear_line(text_file, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(TinylmError, match=r"--train.log wandb needs wandb: pip install"):
        train_tiny(text_file, tmp_path / "run", **{"train.log": "wandb"})


def test_bf16_autocast_trains_on_cpu(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"train.precision": "bf16", "train.learning_rate": 1e-2})
    first, *_, last = records(result.run_dir, "loss")
    assert last["loss"] < first["loss"]


def test_activation_checkpointing_computes_the_same_step(text_file, tmp_path):
    plain = train_tiny(text_file, tmp_path / "plain", **ONE_STEP)
    recomputed = train_tiny(text_file, tmp_path / "ac", **ONE_STEP, **{"train.activation_checkpointing": True})
    assert records(recomputed.run_dir, "loss")[0]["loss"] == records(plain.run_dir, "loss")[0]["loss"]
    assert records(recomputed.run_dir, "loss")[0]["grad_norm"] == pytest.approx(
        records(plain.run_dir, "loss")[0]["grad_norm"], rel=1e-6
    )


def test_patience_stops_when_val_loss_stops_improving(text_file, tmp_path):
    # Steps too small to change fp32 weights: the first evaluation stays the best one.
    result = train_tiny(
        text_file, tmp_path / "run", **{"train.eval_interval": 2, "train.patience": 2, "train.learning_rate": 1e-12}
    )
    stopped = records(result.run_dir, "stopped")
    assert result.steps < 20 and stopped and "no better val loss in 2 evaluations" in stopped[0]["stopped"]


def test_max_time_stops_with_a_checkpoint(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"train.max_time": "0s"})
    assert result.steps == 1 and latest_checkpoint(result.run_dir).name == "step-0000001"
    with pytest.raises(TinylmError, match="is not a duration"):
        tinylm.load_config(None, {"train.max_time": "soon"})


def test_flops_per_token_counts_every_matrix_and_attention():
    config = tinylm.load_config(
        None,
        {"model.vocab_size": 100, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 16},
    )
    model = tinylm.model.build_model(config.model)
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # qkv, proj, fc, mlp proj
    assert flops_per_token(model) == 6 * (2 * per_block + 100 * 32) + 12 * 2 * 32 * 16
    assert peak_flops(torch.device("cpu"), None) is None


def test_resume_refuses_a_folder_without_checkpoint_or_a_changed_model(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"train.max_steps": 5, "train.eval_interval": 5})
    with pytest.raises(TinylmError, match=r"model\.n_layer cannot change"):
        resume_config(result.run_dir, {"model": {"n_layer": 3}})
    with pytest.raises(TinylmError, match="no checkpoint to resume from"):
        tinylm.train(tinylm.load_config(None, tiny_overrides(text_file, tmp_path / "empty")), resume=True)
