from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, run_cli

import tinylm
from tinylm.cli import main
from tinylm.config import ModelConfig
from tinylm.copy_task import CopyTask
from tinylm.errors import TinylmError
from tinylm.model import build_model
from tinylm.model.seq2seq import BOS, EOS, PAD, Seq2SeqTransformer
from tinylm.training import TrainResult

RECIPE = REPO / "configs" / "copy-task.yaml"
VOCAB = 13  # 10 symbols after PAD, BOS, EOS


def small_model(**changes) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    fields = dict(arch="seq2seq", vocab_size=VOCAB, block_size=12, n_layer=2, n_head=2, n_embd=32)
    return build_model(ModelConfig(**{**fields, **changes})).eval()


def random_tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(EOS + 1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def quick_overrides(out, **extra) -> dict:
    """A copy task small enough to learn in a few seconds on one thread: short sequences of 5 symbols."""
    return {
        "model.block_size": 7,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "task.symbols": 5,
        "task.max_length": 6,
        "task.val_sequences": 200,
        "task.label_smoothing": 0.0,
        "train.max_steps": 200,
        "train.batch_size": 32,
        "train.learning_rate": 1e-2,
        "train.warmup_steps": 30,
        "train.eval_interval": 100,
        "train.threads": 1,
        "out": str(out),
        **extra,
    }


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory) -> TrainResult:
    out = tmp_path_factory.mktemp("copy") / "run"
    return tinylm.train(tinylm.load_config(RECIPE, quick_overrides(out)))


def test_logits_have_one_row_per_target_position_and_the_loss_is_a_number():
    model = small_model()
    source, target = random_tokens(3, 7), random_tokens(3, 5, seed=1)
    logits, loss = model(source, target, target)
    assert logits.shape == (3, 5, VOCAB) and loss.dim() == 0 and loss.item() > 0
    assert model(source, target)[1] is None


def test_later_target_tokens_leave_earlier_outputs_unchanged():
    model = small_model()
    source, target = random_tokens(2, 6), random_tokens(2, 8, seed=1)
    changed = target.clone()
    changed[:, 5:] = (changed[:, 5:] - EOS) % (VOCAB - EOS - 1) + EOS + 1  # other ordinary tokens
    with torch.no_grad():
        before, after = model(source, target)[0], model(source, changed)[0]
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_padding_the_source_changes_no_output():
    model = small_model()
    source, target = random_tokens(1, 4), random_tokens(1, 5, seed=1)
    padded = torch.cat([source, torch.full((1, 6), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(source, target)[0], model(padded, target)[0], rtol=1e-5, atol=1e-5)
        # and the source still matters: a different source gives different outputs
        assert not torch.allclose(model(source, target)[0], model(random_tokens(1, 4, seed=2), target)[0])


def test_the_explicit_softmax_path_matches_the_fused_one_and_ignores_padding():
    model = small_model()
    source = torch.cat([random_tokens(2, 5), torch.full((2, 3), PAD)], dim=1)
    target = random_tokens(2, 4, seed=1)
    with torch.no_grad():
        memory, mask = model.encode(source)
        fused, none = model.decode(target, memory, mask)
        explicit, weights = model.decode(target, memory, mask, need_weights=True)
    assert none is None and len(weights) == 2 and weights[0].shape == (2, 2, 4, 8)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4))
        assert torch.all(w[..., 5:] == 0)  # no attention on source padding


def test_label_smoothing_matches_a_hand_computation():
    model = small_model()
    source, target_input = random_tokens(2, 5), random_tokens(2, 4, seed=1)
    target_output = random_tokens(2, 4, seed=2)
    target_output[1, 2:] = PAD  # padded positions do not count
    smoothing = 0.1
    with torch.no_grad():
        logits, loss = model(source, target_input, target_output, label_smoothing=smoothing)
    terms = []
    for row in range(2):
        for t in range(4):
            y = int(target_output[row, t])
            if y == PAD:
                continue
            log_p = [z - math.log(sum(math.exp(v) for v in logits[row, t].tolist())) for z in logits[row, t].tolist()]
            # (1 - e) of the target is on the true token, e spread evenly over all VOCAB tokens
            terms.append(-(1 - smoothing) * log_p[y] - smoothing / VOCAB * sum(log_p))
    assert len(terms) == 6
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_greedy_decoding_stops_at_eos_and_leaves_it_out():
    model = small_model()
    stop_after = {"tokens": 2}

    def fake_logits(module, inputs, output):  # token 7 everywhere, then EOS from position stop_after on
        logits = torch.zeros_like(output)
        logits[:, :, 7] = 1.0
        logits[:, stop_after["tokens"] :, EOS] = 2.0
        return logits

    model.lm_head.register_forward_hook(fake_logits)
    assert model.greedy_decode(random_tokens(3, 4), max_new_tokens=10) == [[7, 7]] * 3
    stop_after["tokens"] = 100
    assert model.greedy_decode(random_tokens(1, 4), max_new_tokens=5) == [[7] * 5]


def test_the_held_out_sequences_are_never_trained_on():
    config = tinylm.load_config(RECIPE, {"task.symbols": 3, "task.max_length": 4, "task.val_sequences": 50})
    task = CopyTask(config.task, seed=0)
    assert len(set(task.val_sequences)) == 50
    generator = torch.Generator().manual_seed(0)
    trained = {s for _ in range(20) for s in task.draw(64, generator, exclude=task.held_out)}
    assert trained and not trained & task.held_out
    source, target_input, target_output = task.batch([(0, 1, 2), (2,)])
    assert source.tolist() == [[3, 4, 5, EOS], [5, EOS, PAD, PAD]]
    assert target_input.tolist() == [[BOS, 3, 4, 5], [BOS, 5, PAD, PAD]]
    assert target_output.tolist() == [[3, 4, 5, EOS], [5, EOS, PAD, PAD]]
    reverse = CopyTask(tinylm.load_config(RECIPE, {"task.kind": "reverse"}).task, seed=0)
    assert reverse.batch([(0, 1, 2)])[2].tolist() == [[5, 4, 3, EOS]]


def test_the_copy_task_is_learned_and_the_run_folder_is_complete(copy_run):
    assert copy_run.best["val_accuracy"] >= 0.9
    run_dir = copy_run.run_dir
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "samples.txt", "cross_attention.png"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evaluations] == [100, 200]
    assert copy_run.best["val_accuracy"] == max(r["val_accuracy"] for r in evaluations)
    run = tinylm.load_copy_task(run_dir)
    assert run.translate("3 1 4 1 0") == "3 1 4 1 0"


def test_the_attention_plot_is_a_valid_png(copy_run, tmp_path):
    from matplotlib.image import imread

    image = imread(copy_run.run_dir / "cross_attention.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    run = tinylm.load_copy_task(copy_run.run_dir)
    attention = run.cross_attention("1 2 3")
    assert attention.source == ["1", "2", "3", "EOS"] and attention.output == ["1", "2", "3", "EOS"]
    assert attention.weights.shape == (1, 2, 4, 4)
    path = run.draw_attention("4 4 0 1", tmp_path / "attention.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_translate_from_the_command_line(copy_run, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "translate", str(copy_run.run_dir), "2 0 4", "--attention", str(tmp_path / "a.png"))
    assert (code, out) == (0, "2 0 4\n") and (tmp_path / "a.png").is_file()
    code, _, err = run_cli(capsys, "translate", str(copy_run.run_dir), "2 9 4")
    assert code == 1 and "symbols from 0 to 4" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "generate", str(copy_run.run_dir))
    assert code == 1 and "tinylm translate" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task.kind": "sort"}, "config key 'task.kind' expects one of"),
        ({"task.symbols": 1}, "task.symbols must be at least 2"),
        ({"task.min_length": 5, "task.max_length": 4}, "task.min_length (5) must be at least 1 and at most"),
        ({"task.max_length": 30}, "model.block_size (17) must be at least task.max_length + 1 (31)"),
        ({"task.symbols": 2, "task.max_length": 3, "task.val_sequences": 10}, "half the 14 distinct sequences"),
        ({"task.label_smoothing": 1.0}, "task.label_smoothing must be in [0, 1)"),
        ({"task.stop_accuracy": 1.5}, "task.stop_accuracy must be in (0, 1]"),
        ({"model.n_layer": 0}, "must be at least 1 for a seq2seq model"),
    ],
)
def test_bad_task_values_get_one_line(overrides, message):
    with pytest.raises(TinylmError) as error:
        tinylm.load_config(RECIPE, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_the_recipe_passes_99_percent_of_held_out_sequences(tmp_path):
    # About a minute on one thread (500 steps); the time is not asserted, as it depends on what else the CPU runs.
    config = tinylm.load_config(RECIPE, {"out": str(tmp_path / "run"), "train.threads": 1})
    result = tinylm.train(config)
    assert result.best["val_accuracy"] > 0.99


def test_the_copy_task_honours_patience_and_max_time_and_resumes(tmp_path):
    fast = {"train.eval_interval": 2, "task.val_sequences": 20}
    patient = tinylm.train(
        tinylm.load_config(
            RECIPE, quick_overrides(tmp_path / "p", **fast, **{"train.learning_rate": 1e-12, "train.patience": 2})
        )
    )
    assert patient.steps == 6  # the first evaluation stays the best: two more without a better one
    timed = tinylm.train(
        tinylm.load_config(RECIPE, quick_overrides(tmp_path / "t", **fast, **{"train.max_time": "0s"}))
    )
    assert timed.steps == 1
    short = tinylm.train(tinylm.load_config(RECIPE, quick_overrides(tmp_path / "r", **fast, **{"train.max_steps": 4})))
    assert short.steps == 4
    assert main(["train", "--resume", str(short.run_dir), "--train.max_steps", "6"]) == 0
    records = [json.loads(line) for line in (short.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4, 6]


def test_a_key_the_copy_task_cannot_honour_is_refused_in_one_line(tmp_path):
    config = tinylm.load_config(RECIPE, quick_overrides(tmp_path / "run", **{"train.eval_batches": 3}))
    with pytest.raises(TinylmError, match=r"train.eval_batches does not apply to the copy task: .*task.val_sequences"):
        tinylm.train(config)
    assert not (tmp_path / "run").exists()
