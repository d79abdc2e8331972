"""GRPO (training/tasks/grpo.py): advantages and loss against a hand-computed example, held-out answer accuracy rising
on an arithmetic task written here, exact resume, a user's reward function, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys

import pytest
import torch
from conftest import interrupt_during_step, run_cli, untrained_run
from safetensors.torch import load_file

from tinylm.config import FinetuneConfig, finetune_train_defaults
from tinylm.data.instructions import IGNORE
from tinylm.errors import TinylmError
from tinylm.training import finetune
from tinylm.training.tasks.grpo import answer_rows, group_advantages, policy_gradient_nats
from tinylm.training.tasks.sft import response_nats

QUESTIONS = ["1+4", "2+3", "3+2", "4+1"]
"""One answer (5) for every question: a 2-layer model learns it without attending to the question, so what is tested
is that rewards move the greedy answer."""
CHARACTERS = "### User:\n### Assistant:\n#### 0123456789+\n"


def arithmetic_file(path, answer) -> str:
    """100 examples of the questions, each answered by `answer(question, index)`."""
    rows = [{"instruction": q, "output": f"#### {answer(q, i)}"} for i in range(25) for q in QUESTIONS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def total(question: str) -> int:
    return sum(map(int, question.split("+")))


def right_answers(tmp_path) -> str:
    return arithmetic_file(tmp_path / "right.jsonl", lambda q, i: total(q))


@pytest.fixture(scope="module")
def answering_base(tmp_path_factory):
    """A tiny tinylm GPT taught the answer format by sft on answers that are mostly wrong: half of them 7, a quarter
    right, a quarter random. Greedy, it answers 7; sampled, it is right about a quarter of the time."""
    folder = tmp_path_factory.mktemp("grpo-base")
    base = untrained_run(folder / "untrained", text=CHARACTERS, block_size=64)
    draw = random.Random(0)
    mostly_wrong = lambda q, i: draw.choices([total(q), 7, draw.randrange(10)], [1, 2, 1])[0]  # noqa: E731
    data = arithmetic_file(folder / "format.jsonl", mostly_wrong)
    train = train_cpu(max_steps=30, learning_rate=1e-2, batch_size=16, warmup_steps=2, eval_interval=30)
    options = {"weights": "full", "merge": True, "max_length": 48, "held_out_examples": 4, "train": train}
    finetune(FinetuneConfig(base=str(base), data=data, out=str(folder / "sft"), **options))
    return folder / "sft" / "model"


def train_cpu(**overrides):
    return dataclasses.replace(finetune_train_defaults(), device="cpu", seed=0, **overrides)


def grpo_config(base, data, out, **overrides) -> FinetuneConfig:
    train = train_cpu(max_steps=8, learning_rate=2e-3, batch_size=16, warmup_steps=2, eval_interval=4, log_interval=2)
    options = {"held_out_examples": 4, "max_length": 48, "max_answer_tokens": 12, "samples_per_prompt": 8}
    options |= {"weights": "full", "merge": True, "method": "grpo", "train": train, **overrides}
    return FinetuneConfig(base=str(base), data=str(data), out=str(out), **options)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_advantages_are_rewards_minus_their_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 1.0, 0.5])
    expected = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.5, 0.0]
    assert group_advantages(rewards, 4).tolist() == expected


def test_loss_matches_a_hand_computed_example():
    """Every position predicts token 0, 1, 2, 3 with probability 1/2, 1/4, 1/8, 1/8: an answer token costs 1, 2, 3 or
    3 bits. Group one's rewards 1, 0, 0, 0 give advantages 0.75, -0.25, -0.25, -0.25; group two's all equal, 0."""

    def forward(ids):
        probabilities = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 8])
        return probabilities.log().expand(*ids.shape, 4), None

    prompts = [[3], [2, 3], [3], [1, 2, 3]] * 2
    answers = [[0, 1], [2], [3, 0], [1, 1, 1], [0], [1], [2], [3]]  # group one: 3, 3, 4 and 6 bits
    ids, labels = answer_rows(prompts, answers, pad_id=0)
    assert ids[3].tolist() == [1, 2, 3, 1, 1, 1] and ids[4].tolist() == [3, 0, 0, 0, 0, 0]
    assert labels[1].tolist() == [IGNORE, IGNORE, 2, IGNORE, IGNORE, IGNORE]
    assert int((labels != IGNORE).sum()) == 12  # the engine divides the step's loss by its 12 answer tokens
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    # -sum(advantage * log p) = (0.75 * 3 - 0.25 * 3 - 0.25 * 4 - 0.25 * 6) bits = -1 bit
    assert policy_gradient_nats(forward, ids, labels, advantages).item() == pytest.approx(-math.log(2), rel=1e-6)
    # With advantage 1 it is sft's loss: val_loss is the held-out references' loss.
    ones = torch.ones(len(ids))
    assert policy_gradient_nats(forward, ids, labels, ones).item() == pytest.approx(
        response_nats(forward, ids, labels).item(), rel=1e-6
    )


def test_grpo_raises_held_out_answer_accuracy(answering_base, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["finetune", "--method", "grpo", "--base", str(answering_base), "--data", right_answers(tmp_path)]
    args += ["--out", str(out), "--full", "--merge", "--held-out-examples", "4", "--max-length", "48"]
    args += ["--samples-per-prompt", "8", "--max-answer-tokens", "12", "--train.device", "cpu"]
    args += ["--train.max-steps", "8", "--train.batch-size", "16", "--train.learning-rate", "2e-3"]
    args += ["--train.eval-interval", "4", "--train.warmup-steps", "2"]
    code, printed, err = run_cli(capsys, *args)
    assert code == 0, err
    result = json.loads((out / "finetune.json").read_text())
    assert result["method"] == "grpo"
    assert result["answer_accuracy_before"] <= 0.25 and result["answer_accuracy_after"] >= 0.75
    assert f"answer accuracy {result['answer_accuracy_before']:.1%} before" in printed
    rewards = [r["train_reward"] for r in records(out) if "train_reward" in r]
    assert len(rewards) == 2 and rewards[-1] > rewards[0] > 0  # the sampled answers get better too


def test_resumed_grpo_matches_an_uninterrupted_one(answering_base, tmp_path, monkeypatch):
    train = train_cpu(max_steps=4, learning_rate=2e-3, batch_size=16, warmup_steps=1, eval_interval=2)
    config = grpo_config(answering_base, right_answers(tmp_path), tmp_path / "whole", train=train)
    whole = finetune(config)
    interrupted = dataclasses.replace(config, out=str(tmp_path / "resumed"))
    interrupt_during_step(monkeypatch, 3)
    with pytest.raises(TinylmError, match="interrupted at step 3"):
        finetune(interrupted)
    monkeypatch.undo()
    resumed = finetune(interrupted, resume=True)
    assert (resumed.answer_accuracy_after, resumed.held_out_loss_after) == (
        whole.answer_accuracy_after,
        whole.held_out_loss_after,
    )
    weights = [load_file(tmp_path / name / "model" / "model.safetensors") for name in ("whole", "resumed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])  # the same answers sampled


def test_a_reward_function_of_the_users_own_is_called_with_prompt_completion_and_answer(
    answering_base, tmp_path, monkeypatch
):
    (tmp_path / "my_rewards.py").write_text(
        "calls = []\n\n\ndef longer_is_better(prompt, completion, answer):\n"
        "    calls.append((prompt, completion, answer))\n    return len(completion)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    train = train_cpu(max_steps=1, batch_size=16, eval_interval=1)
    config = grpo_config(answering_base, right_answers(tmp_path), tmp_path / "o", reward="my_rewards:longer_is_better")
    finetune(dataclasses.replace(config, train=train))
    calls = sys.modules["my_rewards"].calls
    assert len(calls) == 16 and {answer for _, _, answer in calls} <= {"5"}
    assert all(prompt in QUESTIONS and completion.startswith("####") for prompt, completion, _ in calls)
    metrics = records(tmp_path / "o")
    assert metrics[-1]["train_reward"] == pytest.approx(sum(len(c) for _, c, _ in calls) / 16)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("no_such_module_here:score", "--reward no_such_module_here:score: cannot import no_such_module_here"),
        ("os:sep", "--reward os:sep: os has a str named sep, not a function"),
        ("score", "--reward score: name a function as module:function"),
        ("FILE:says_yes", r"--reward .*:says_yes returned 'yes'; it must return a finite number"),
        ("FILE:divides", r"--reward .*:divides failed: ZeroDivisionError: division by zero"),
        ("FILE:missing", r"--reward .*:missing: .* has nothing named missing, not a function"),
    ],
)
def test_a_bad_reward_is_a_one_line_error(answering_base, tmp_path, capsys, reward, message):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def says_yes(prompt, completion, answer):\n    return 'yes'\n\n\ndef divides(*_):\n    1 / 0\n")
    args = ["finetune", "--method", "grpo", "--base", str(answering_base), "--data", right_answers(tmp_path)]
    args += ["--out", str(tmp_path / "o"), "--held-out-examples", "4", "--max-length", "48", "--train.device", "cpu"]
    args += ["--max-answer-tokens", "12", "--train.max-steps", "1", "--reward", reward.replace("FILE", str(rewards))]
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "sft", "--samples-per-prompt", "2"], "--samples-per-prompt applies to --method grpo only"),
        (["--method", "sft", "--reward", "os:getcwd"], "--reward applies to --method grpo only"),
        (["--samples-per-prompt", "1"], "--samples-per-prompt must be at least 2, not 1"),
        (["--sample-temperature", "0"], "--sample-temperature must be above 0"),
        (["--samples-per-prompt", "3"], r"share of train.batch_size \(8 rows\) must be a multiple of --samples-per"),
        (["--max-answer-tokens", "48"], r"--max-answer-tokens \(48\) must be below --max-length \(48"),
        (["--pack"], "--pack lays sft examples end to end"),
        (["--train.parallel", "fsdp"], "train.parallel does not apply to GRPO fine-tuning: .* use ddp"),
    ],
)
def test_grpo_options_are_checked_in_one_line(answering_base, tmp_path, capsys, options, message):
    args = ["finetune", "--method", "grpo", "--base", str(answering_base), "--data", right_answers(tmp_path)]
    args += ["--out", str(tmp_path / "o"), "--held-out-examples", "4", "--max-length", "48", "--train.device", "cpu"]
    code, _, err = run_cli(capsys, *args, *options)
    assert code == 1 and re.search(message, err), err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_data_without_final_answers_is_refused(answering_base, tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "5"}) + "\n" for q in QUESTIONS * 5))
    with pytest.raises(TinylmError, match=r"no training response of .* ends in one; end responses with a line `####"):
        finetune(grpo_config(answering_base, data, tmp_path / "o"))
    assert not (tmp_path / "o").exists()
