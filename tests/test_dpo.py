"""Preference tuning (DPO): preference pairs and their labels, learning a preferred answer with LoRA, micro-batches,
one-line errors, and the same losses as TRL's DPOTrainer on the same model and pairs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import capitals_pairs, run_cli

from tinylm.config import FinetuneConfig, finetune_train_defaults
from tinylm.data.instructions import DEFAULT_CHAT_TEMPLATE, IGNORE
from tinylm.data.preferences import PreferencePair, TokenizedPairs, as_pair, load_preferences
from tinylm.errors import TinylmError
from tinylm.pretrained import HuggingFaceLM, load_pretrained
from tinylm.training import finetune
from tinylm.training.tasks.dpo import PreferenceTuning
from tinylm.training.tasks.sft import response_log_probs

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

PROMPT = "Write the word in capitals.\n\n"


def write_pairs(path, pairs: list[dict]):
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def dpo_config(base, data, out, **overrides) -> FinetuneConfig:
    train = dataclasses.replace(
        finetune_train_defaults(), device="cpu", seed=0, max_steps=10, batch_size=8, warmup_steps=2, eval_interval=10
    )
    options = {"method": "dpo", "held_out_examples": 8, "max_length": 64, "train": train, **overrides}
    return FinetuneConfig(base=str(base), data=str(data), out=str(out), **options)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_both_forms_label_the_last_answer_only_and_keep_a_pair_per_row(tiny_gpt2, tmp_path):
    tokenizer = load_pretrained(str(tiny_gpt2), torch.device("cpu")).tokenizer
    plain = as_pair({"prompt": PROMPT + "apple", "chosen": "APPLE", "rejected": "apple"}, "x")
    earlier = [{"role": "user", "content": PROMPT + "river"}, {"role": "assistant", "content": "RIVER"}]
    chat = as_pair(
        {
            "messages": [*earlier, {"role": "user", "content": PROMPT + "apple"}],
            "chosen": {"role": "assistant", "content": "APPLE"},
            "rejected": "apple",
        },
        "x",
    )
    assert plain == PreferencePair([{"role": "user", "content": PROMPT + "apple"}], "APPLE", "apple")
    pairs = TokenizedPairs([plain, chat], tokenizer.render, tokenizer.encode, 128)
    assert len(pairs) == 2
    for pair, rows in zip([plain, chat], pairs.rows):
        prompt = tokenizer.prompt_ids(pair.prompt)
        for (ids, labels), answer in zip(rows, (pair.chosen, pair.rejected)):
            response = tokenizer.encode(answer + tokenizer.tokenizer.eos_token + "\n\n")
            assert ids == prompt + response  # the earlier assistant turn is context: no labels
            assert labels == [IGNORE] * len(prompt) + response
    ids, labels = pairs.batch([0, 1])
    assert ids.shape == labels.shape == (2, 2, max(len(row[0]) for rows in pairs.rows for row in rows))
    assert labels[0, 0, -1] == IGNORE  # the plain pair's rows are padded to the chat pair's length

    path = write_pairs(tmp_path / "pairs.jsonl", capitals_pairs(20))
    data = load_preferences(str(path), held_out_examples=4, max_examples=10)
    assert len(data.train) == 6 and [p.chosen for p in data.held_out] == ["APPLE", "STONE", "LEMON", "CANDLE"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "needs 'chosen', 'rejected' and either 'prompt' or 'messages'"),
        ({"prompt": "Hi", "messages": [], "chosen": "a", "rejected": "b"}, "either 'prompt' or 'messages'"),
        ({"prompt": ["Hi"], "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
        ({"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'messages' must be a list"),
        ({"messages": [{"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"}, "must end before"),
        ({"prompt": "Hi", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "must each be a string"),
    ],
)
def test_bad_pairs_are_one_line_errors_naming_the_line(tmp_path, capsys, record, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(capitals_pairs(1)[0]) + "\n" + json.dumps(record) + "\n")
    args = ("--base", "unused", "--data", str(data), "--out", str(tmp_path / "o"), "--method", "dpo")
    code, _, err = run_cli(capsys, "finetune", *args)
    assert code == 1 and message in err and f"{data}:2" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dpo-beta", "0.5"], "--dpo-beta applies to --method dpo only"),
        (["--method", "dpo", "--dpo-beta", "0"], "--dpo-beta must be above 0"),
        (["--method", "dpo", "--pack"], "drop --pack"),
        (["--method", "dpo", "--data", "gsm8k"], "preference data not found: gsm8k"),
    ],
)
def test_settings_dpo_cannot_honour_are_one_line_errors(tmp_path, capsys, options, message):
    data = write_pairs(tmp_path / "pairs.jsonl", capitals_pairs(4))
    args = ("--base", "unused", "--data", str(data), "--out", str(tmp_path / "o"), *options)
    code, _, err = run_cli(capsys, "finetune", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_batch_tokens_count_both_answers_of_each_pair():
    train = dataclasses.replace(finetune_train_defaults(), batch_tokens=8 * 2 * 64)
    assert PreferenceTuning(dpo_config("base", "pairs.jsonl", "out", train=train)).train.batch_size == 8
    with pytest.raises(TinylmError, match=r"multiple of 2 x --max-length \(128\)"):
        PreferenceTuning(dpo_config("base", "pairs.jsonl", "out", train=dataclasses.replace(train, batch_tokens=192)))


def test_lora_dpo_learns_the_preferred_answer_on_held_out_pairs(tiny_gpt2, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", capitals_pairs(40))
    out = tmp_path / "out"
    train = ["--train.device", "cpu", "--train.max-steps", "10", "--train.learning-rate", "3e-2"]
    args = ("--base", str(tiny_gpt2), "--data", str(data), "--out", str(out), "--held-out-examples", "10")
    code, printed, _ = run_cli(capsys, "finetune", "--method", "dpo", "--max-length", "64", *args, *train)
    assert code == 0
    result = json.loads((out / "finetune.json").read_text())
    assert result["method"] == "dpo" and result["weights"] == "lora"
    # The adapter starts at zero, so the fine-tune starts as its reference: every reward 0, the loss log 2.
    assert result["held_out_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["preference_accuracy_before"] == 0.5 and result["reward_margin_before"] == 0.0
    assert result["preference_accuracy_after"] >= 0.9
    assert result["reward_margin_after"] > 0.05 and result["held_out_loss_after"] < math.log(2) - 0.03
    assert result["chosen_reward_after"] - result["rejected_reward_after"] == pytest.approx(
        result["reward_margin_after"], abs=1e-6
    )
    evaluations = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [10] and "preference_accuracy" in evaluations[0]
    assert "preference accuracy 50.0% before, " in printed and (out / "adapter_model.safetensors").is_file()


def test_micro_batches_keep_pairs_whole_and_weigh_every_pair_the_same(tiny_gpt2, tmp_path):
    # 8 pairs a step, in one micro-batch or in four: each holds whole pairs, and the step's loss is their mean.
    data = write_pairs(tmp_path / "pairs.jsonl", capitals_pairs(24))
    first_steps = []
    for micro_batch_size in (None, 2):
        train = dataclasses.replace(
            finetune_train_defaults(),
            device="cpu",
            seed=0,
            max_steps=1,
            log_interval=1,
            micro_batch_size=micro_batch_size,
        )
        out = tmp_path / str(micro_batch_size)
        finetune(dpo_config(tiny_gpt2, data, out, weights="full", train=train))
        first_steps.append(next(r for r in records(out) if "loss" in r))
    assert first_steps[1]["loss"] == pytest.approx(first_steps[0]["loss"], abs=1e-6)
    assert first_steps[1]["grad_norm"] == pytest.approx(first_steps[0]["grad_norm"], rel=1e-5)


CURVE_TOLERANCE = 1e-4
"""How far tinylm's and TRL's DPO losses may be apart at each of 8 steps of the same training (measured: 1.2e-7 on
CPU; the rest allows for other BLAS kernels and summation orders)."""


@pytest.mark.slow
def test_trl_dpo_trainer_gives_the_same_loss_and_curve(tiny_gpt2, tmp_path):
    """The same tiny GPT-2, pairs, beta, learning rate, AdamW, clipping and batch (every training pair in each step, so
    the order the two draw them in does not matter), every weight trained against a frozen copy: the step-0 loss,
    the step-0 log-probabilities and gradient norm agree tightly, and the 8-step curve within CURVE_TOLERANCE."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = write_pairs(tmp_path / "pairs.jsonl", capitals_pairs(9))
    steps, learning_rate, beta = 8, 1e-3, 0.1
    train = dataclasses.replace(
        finetune_train_defaults(),
        device="cpu",
        seed=0,
        max_steps=steps,
        batch_size=8,
        learning_rate=learning_rate,
        warmup_steps=0,
        min_lr_ratio=1.0,  # a constant learning rate
        weight_decay=0.0,
        grad_clip=1.0,
        log_interval=1,
        eval_interval=steps,
    )
    out = tmp_path / "tinylm"
    finetune(dpo_config(tiny_gpt2, data, out, weights="full", held_out_examples=1, dpo_beta=beta, train=train))
    ours = [r for r in records(out) if "loss" in r]

    pairs = load_preferences(str(data), held_out_examples=1).train
    assert len(pairs) == train.batch_size
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.chat_template, tokenizer.pad_token = DEFAULT_CHAT_TEMPLATE, tokenizer.eos_token
    conversations = [
        {
            "prompt": pair.prompt,
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        }
        for pair in pairs
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=train.batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=train.beta1,
        adam_beta2=train.beta2,
        max_grad_norm=train.grad_clip,
        beta=beta,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default; tinylm trains in fp32 on CPU
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2),
        args=args,
        train_dataset=datasets.Dataset.from_list(conversations),
        processing_class=tokenizer,
    )
    base = load_pretrained(str(tiny_gpt2), torch.device("cpu"))
    rows = TokenizedPairs(pairs, base.tokenizer.render, base.tokenizer.encode, 64).rows
    for (chosen, rejected), theirs in zip(rows, trainer.train_dataset):  # the same tokens, the same answer tokens
        prompt = theirs["prompt_ids"]
        assert chosen == (prompt + theirs["chosen_ids"], [IGNORE] * len(prompt) + theirs["chosen_ids"])
        assert rejected == (prompt + theirs["rejected_ids"], [IGNORE] * len(prompt) + theirs["rejected_ids"])
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r]

    ids, labels = TokenizedPairs(pairs, base.tokenizer.render, base.tokenizer.encode, 64).batch(list(range(8)))
    with torch.no_grad():
        log_probs = response_log_probs(HuggingFaceLM(base.model), ids.flatten(0, 1), labels.flatten(0, 1))
    chosen, rejected = log_probs.view(-1, 2).mean(dim=0).tolist()
    assert theirs[0]["logps/chosen"] == pytest.approx(chosen, rel=1e-5)
    assert theirs[0]["logps/rejected"] == pytest.approx(rejected, rel=1e-5)
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], abs=1e-6)
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"], rel=1e-5)
    assert len(ours) == len(theirs) == steps
    for step, (mine, trls) in enumerate(zip(ours, theirs), 1):
        assert mine["loss"] == pytest.approx(trls["loss"], abs=CURVE_TOLERANCE), f"step {step}"
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.1  # a curve that moves, not two flat lines
