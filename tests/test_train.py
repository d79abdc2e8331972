from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from conftest import SMALL_TEXT, interrupt_during_step, tiny_overrides, tree_hashes

import tinylm
from tinylm.errors import TinylmError
from tinylm.training.checkpoint import latest_checkpoint
from tinylm.training.optim import build_optimizers, learning_rate_factor

VOCAB_SIZE = len(set(SMALL_TEXT)) + 1  # every character of the text, then <|endoftext|>


def train_tiny(text_file, out, **extra) -> tinylm.TrainResult:
    return tinylm.train(tinylm.load_config(None, tiny_overrides(text_file, out, **extra)))


def test_a_run_folder_has_everything_to_use_the_run_later(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run")
    run_dir = result.run_dir
    for name in ("config.yaml", "tinylm_tokenizer.json", "model.safetensors", "metrics.jsonl", "samples.txt"):
        assert (run_dir / name).is_file(), name
    assert latest_checkpoint(run_dir).name == "step-0000020"
    assert {p.name for p in latest_checkpoint(run_dir).iterdir()} == {"model.safetensors", "trainer.pt", "state.json"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in records if "val_loss" not in r)
    assert result.best_val_loss == min(r["val_loss"] for r in records if "val_loss" in r)
    assert tinylm.load(run_dir).config.model.vocab_size == VOCAB_SIZE


def test_training_lowers_the_loss(text_file, tmp_path):
    result = train_tiny(
        text_file, tmp_path / "run", **{"train.max_steps": 100, "train.eval_interval": 100, "train.learning_rate": 1e-2}
    )
    assert result.best_val_loss < 1.5 < math.log(VOCAB_SIZE)


def test_the_same_seed_trains_the_same_weights(text_file, tmp_path):
    first = train_tiny(text_file, tmp_path / "a")
    second = train_tiny(text_file, tmp_path / "b")
    a, b = tinylm.load(first.run_dir).model, tinylm.load(second.run_dir).model
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert first.sample == second.sample


def test_save_then_load_gives_identical_logits(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"train.eval_interval": 20})
    run = tinylm.load(result.run_dir)
    tokens = torch.tensor([run.tokenizer.encode("First Citizen:\nBefore we")])
    reloaded = tinylm.load(result.run_dir)
    with torch.no_grad():
        torch.testing.assert_close(run.model(tokens)[0], reloaded.model(tokens)[0], rtol=0, atol=0)
    assert reloaded.model.lm_head.weight is reloaded.model.token_embedding.weight  # still tied after loading


def test_the_same_seed_generates_the_same_text(text_file, tmp_path):
    run = tinylm.load(train_tiny(text_file, tmp_path / "run").run_dir)
    first = run.generate("All:", max_new_tokens=40, temperature=1.0, top_k=10, seed=7)
    assert run.generate("All:", max_new_tokens=40, temperature=1.0, top_k=10, seed=7) == first
    assert run.generate("All:", max_new_tokens=40, temperature=1.0, top_k=10, seed=8) != first
    assert len(first) == len("All:") + 40


def test_generation_runs_past_the_context_window(text_file, tmp_path):
    run = tinylm.load(train_tiny(text_file, tmp_path / "run").run_dir)
    text = run.generate("First", max_new_tokens=3 * run.config.model.block_size, temperature=0)
    assert len(text) == len("First") + 96


def test_evaluation_covers_the_whole_split_and_reports_bits_per_byte(text_file, tmp_path):
    run = tinylm.load(train_tiny(text_file, tmp_path / "run").run_dir)
    result = run.evaluate("val")
    val_chars = len(text_file.read_text()) - int(len(text_file.read_text()) * 0.9)
    assert result.tokens == val_chars + 1  # every character, then the end-of-text token
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    # ASCII text: one byte per character; the end-of-text token stands for no bytes.
    assert result.bytes == val_chars
    assert result.bpb == pytest.approx(result.loss * (val_chars + 1) / val_chars / math.log(2))


def test_a_dataset_shorter_than_one_context_window_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text, " * 10)
    with pytest.raises(TinylmError, match=r"the val split has \d+ tokens, fewer than one context window"):
        train_tiny(short, tmp_path / "run", **{"model.block_size": 64})


def test_an_existing_run_is_kept_unless_overwrite_is_asked(text_file, tmp_path):
    train_tiny(text_file, tmp_path / "run")
    with pytest.raises(TinylmError, match="already holds a tinylm run; choose another --out or pass --overwrite"):
        train_tiny(text_file, tmp_path / "run")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(TinylmError, match="is not empty and is not a tinylm run: tinylm will not replace it"):
        train_tiny(text_file, tmp_path / "notes")


def test_ctrl_c_finishes_the_step_then_saves_the_training_state(text_file, tmp_path, monkeypatch):
    interrupt_during_step(monkeypatch, 7)
    with pytest.raises(TinylmError, match=r"interrupted at step 7; training state saved in .*tinylm train --resume"):
        train_tiny(text_file, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-0000007"


def test_the_schedule_warms_up_then_decays_to_its_floor():
    config = tinylm.load_config(None, {"train.warmup_steps": 10, "train.max_steps": 110, "train.min_lr_ratio": 0.1})
    factors = [learning_rate_factor(step, config.train) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1)


def test_bigram_preset_trains(text_file, tmp_path):
    result = train_tiny(text_file, tmp_path / "run", **{"model.preset": "bigram", "train.learning_rate": 0.1})
    assert tinylm.load(result.run_dir).config.model.arch == "bigram"
    assert result.best_val_loss < math.log(VOCAB_SIZE)


def small_model_config(**overrides) -> tinylm.Config:
    shape = {"model.vocab_size": 10, "model.n_layer": 1, "model.n_embd": 8, "model.n_head": 2, "model.block_size": 4}
    return tinylm.load_config(None, {**shape, **overrides})


def test_adamw_decays_matrices_only():
    from tinylm.model import build_model

    config = small_model_config()
    (optimizer,) = build_optimizers(build_model(config.model), config.train, "cpu")
    decayed, plain = optimizer.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from tinylm.model import build_model

    config = small_model_config(**{"train.optimizer": "muon"})
    model = build_model(config.model)
    muon, adamw = build_optimizers(model, config.train, "cpu")
    block = model.blocks[0]
    expected = {
        id(block.attn.qkv.weight),
        id(block.attn.proj.weight),
        id(block.mlp.fc.weight),
        id(block.mlp.proj.weight),
    }
    assert {id(p) for group in muon.param_groups for p in group["params"]} == expected
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert id(model.token_embedding.weight) in in_adamw and not expected & in_adamw
    assert len(in_adamw) + len(expected) == len(list(model.parameters()))


def test_muon_training_lowers_the_loss(text_file, tmp_path):
    result = train_tiny(
        text_file,
        tmp_path / "run",
        **{"train.optimizer": "muon", "train.max_steps": 60, "train.eval_interval": 60, "train.learning_rate": 1e-2},
    )
    assert result.best_val_loss < 2.0


def test_orthogonalize_brings_every_singular_value_near_one():
    from tinylm.training.optim import orthogonalize

    matrix = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-1, 1, 16))
    assert torch.linalg.cond(matrix) > 50
    singular_values = torch.linalg.svdvals(orthogonalize(matrix))
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


@pytest.mark.parametrize("shape", [(96, 24), (24, 96), (32, 32)])
def test_orthogonalize_gram_only_form_equals_the_plain_iteration(shape):
    from tinylm.training.optim import orthogonalize

    generator = torch.Generator().manual_seed(1)
    # A gradient's spectrum falls off steeply: singular values from 1 to 1e-4.
    left, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=generator))
    matrix = (left * torch.logspace(0, -4, min(shape))) @ right.T
    plain = orthogonalize(matrix, gram_only=False)
    assert plain.shape == matrix.shape
    # fp32 rounding in the G-only form reaches 2e-4 on entries of about 0.2; one step fewer moves them by 0.1.
    torch.testing.assert_close(orthogonalize(matrix, gram_only=True), plain, atol=5e-4, rtol=0)
    assert not torch.allclose(plain, orthogonalize(matrix, steps=4, gram_only=False), atol=5e-4)


def test_a_sample_prompt_outside_the_vocabulary_stops_the_run_before_training(text_file, tmp_path):
    with pytest.raises(TinylmError, match=r"sample\.prompt: text has 1 character\(s\) outside"):
        train_tiny(text_file, tmp_path / "run", **{"sample.prompt": "Ωme"})
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_overwrite_with_a_config_that_cannot_start_keeps_the_old_run(text_file, tmp_path):
    old = train_tiny(text_file, tmp_path / "run").run_dir
    before = tree_hashes(old)
    cannot_start = tinylm.load_config(None, tiny_overrides(text_file, old, **{"model.block_size": 4096}))
    with pytest.raises(TinylmError, match="fewer than one context window"):
        tinylm.train(cannot_start, overwrite=True)
    assert tree_hashes(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", text_file.name])  # no staging left behind


def test_a_full_disk_leaves_the_previous_run_whole_and_no_empty_config(text_file, tmp_path, small_disk):
    trained = train_tiny(text_file, tmp_path / "run", **{"train.max_steps": 10}).run_dir
    pages = sum(-(-p.stat().st_size // 4096) for p in trained.rglob("*") if p.is_file())
    disk = small_disk(pages * 4096)  # exactly full once the run is copied in
    run = disk / "run"
    shutil.copytree(trained, run)
    before = tree_hashes(run)
    overrides = tiny_overrides(text_file, run, **{"train.max_steps": 10})
    for attempt in (
        lambda: tinylm.train(tinylm.load_config(None, overrides), overwrite=True),
        lambda: tinylm.train(tinylm.load_config(None, {**overrides, "train.max_steps": 20}), resume=True),
    ):
        with pytest.raises(TinylmError, match="no space left on the device") as error:
            attempt()
        assert "\n" not in str(error.value)
        assert tree_hashes(run) == before and (run / "config.yaml").stat().st_size > 0
        assert sorted(p.name for p in disk.iterdir()) == ["run"]


def test_distillation_measures_kl_from_the_teacher_and_teaches_toward_it(text_file, tmp_path):
    from tinylm.training.tasks.pretrain import distillation_nats

    logits = torch.randn(2, 5, 12)
    predicting = torch.ones(2, 5, dtype=torch.bool)
    assert distillation_nats(logits, logits, predicting, 2.0, 10).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 12)
    kl = torch.nn.functional.kl_div(other[..., :10].log_softmax(-1), logits[..., :10].log_softmax(-1),
                                    log_target=True, reduction="sum")  # fmt: skip
    assert distillation_nats(other, logits, predicting, 1.0, 10).item() == pytest.approx(kl.item(), rel=1e-5)

    teacher = train_tiny(text_file, tmp_path / "teacher", **{"train.max_steps": 60, "train.learning_rate": 3e-3})
    taught = {"train.teacher": str(teacher.run_dir), "train.distill_weight": 1.0, "train.learning_rate": 3e-3}
    student = train_tiny(text_file, tmp_path / "student", **taught)  # learns from the teacher's distributions alone
    records = [json.loads(line) for line in (student.run_dir / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert val_losses[-1] < val_losses[0] - 0.05 and val_losses[-1] < 3.0  # learned the text without its targets

    with pytest.raises(TinylmError, match=r"distill_weight and train\.distill_temperature need a train\.teacher"):
        tinylm.load_config(None, {"train.distill_weight": 0.9})
    other_text = tmp_path / "other.txt"
    other_text.write_text("zyxwvutsrq 0123456789\n" * 300)
    stranger = train_tiny(other_text, tmp_path / "stranger", **{"train.max_steps": 1})
    with pytest.raises(TinylmError, match=r"tokenizes text differently from data\.tokenizer char"):
        train_tiny(text_file, tmp_path / "refused", **{"train.teacher": str(stranger.run_dir)})
