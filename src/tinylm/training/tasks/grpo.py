"""Reinforcement learning on verifiable rewards: GRPO as nanochat simplifies it (on-policy, no KL term, token-level
normalisation).

    base + instruction data whose responses end in a final answer (GSM8K's `#### 72`)
      -> held-out answer accuracy (greedy) before -> steps: sample k answers to each question, reward them, make the
         answers that beat their group's mean likelier -> the same accuracy of the best weights
      -> out/ as a fine-tune writes it (tasks/sft.py)

A step takes train.batch_size / k questions of a per-epoch shuffle and samples k answers to each with the weights being
trained (`sample_temperature`, at most `max_answer_tokens`, up to the token that ends the assistant's turn). An
answer's reward is 1.0 when its final answer equals the reference's, else 0.0 (or what `--reward` says); its advantage
is its reward minus its group's mean, so a group whose answers all score the same teaches nothing. The loss sums
-advantage * log p(token) over every answer token and the engine divides it by the step's answer tokens. The answers
come from the very weights the step trains, so there is no probability ratio to clip, and no KL term to a reference
model.

In the engine's shape: `batch` samples with the model `setup` returned (DDP and compile wrap it without changing it),
in eval mode without gradients, under the autocast training uses, seeded from the engine's batch generator, so a
resumed run samples the same answers. The engine then trains on those rows as on any batch. FSDP is refused: each
process samples answers to its own questions, for as many steps as its prompts need, while sharded weights need every
process in each forward pass.

Each evaluation reports `answer_accuracy` (greedy answers to the held-out questions), which picks the best weights
(between equals, the lower val_loss); `val_loss`, the held-out reference responses' loss per token as sft measures it
(the policy loss with advantage 1): how far the model has moved from the references; and `train_reward`, the mean
reward of the answers sampled since the last evaluation (after a resume, since the resume).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import FinetuneConfig, SampleConfig
from tinylm.data.instructions import (
    IGNORE,
    TokenizedExamples,
    final_answer,
    load_instructions,
    padded,
    shuffled_positions,
)
from tinylm.errors import TinylmError
from tinylm.training.distributed import Processes
from tinylm.training.engine import Batch, Engine, Forward, autocast_dtype
from tinylm.training.tasks.sft import AnsweredQuestion, InstructionTuning, answered_prompts

Reward = Callable[[str, str, str], float]
"""(prompt, completion, answer) -> the completion's reward."""


class GRPO(InstructionTuning):
    name = "GRPO fine-tuning"
    refused: ClassVar[dict[str, str]] = {
        **InstructionTuning.refused,
        "parallel": "each process samples answers to its own questions, which fsdp's sharded weights cannot; use ddp",
    }

    def __init__(self, config: FinetuneConfig, resume: bool = False):
        super().__init__(config, resume)
        check_grpo_config(config)
        self.reward = load_reward(config.reward)
        self.reward_sum, self.rewards_counted = 0.0, 0

    def setup(self, processes: Processes) -> nn.Module:
        k = self.config.samples_per_prompt
        per_process = self.train.batch_size // processes.world_size
        if per_process % k:
            raise TinylmError(
                f"each process's share of train.batch_size ({per_process} rows) must be a multiple of "
                f"--samples-per-prompt ({k}): the answers to a question are sampled and compared together"
            )
        data = load_instructions(self.config.data, self.config.held_out_examples, self.config.max_examples)
        lm = self.load_base(processes)
        prompt_tokens = self.max_length - self.config.max_answer_tokens
        if prompt_tokens < 1:
            raise TinylmError(
                f"--max-answer-tokens ({self.config.max_answer_tokens}) must be below --max-length ({self.max_length}, "
                "at most the model's context): a row holds the question and its answer"
            )
        tokenizer = self.base.tokenizer
        self.questions = answered_prompts(data.train, tokenizer, prompt_tokens)
        self.answered = answered_prompts(data.held_out, tokenizer, prompt_tokens)
        if not self.questions or not self.answered:
            which = "training" if not self.questions else "held-out"
            raise TinylmError(
                f"--method grpo rewards final answers, and no {which} response of {self.config.data} ends in one; "
                "end responses with a line `#### ANSWER` (as GSM8K does)"
            )
        self.answer_tokens = self.config.max_answer_tokens
        encode = (tokenizer.render, tokenizer.encode)
        self.held_out = TokenizedExamples(data.held_out, *encode, self.max_length, pad_id=tokenizer.pad_id)
        self.policy = lm
        dtype = autocast_dtype(self.train.precision, processes.device)
        self.autocast = functools.partial(torch.autocast, processes.device.type, dtype=dtype, enabled=dtype is not None)
        return lm

    def describe(self, model: nn.Module) -> str:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (
            f"GRPO on {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
            f"({self.config.weights}), {len(self.questions)} questions, {self.config.samples_per_prompt} answers "
            f"sampled to each, {len(self.answered)} held out,"
        )

    def batch(self, index: int, generator: torch.Generator, rows: slice) -> Batch:
        """(ids, labels, advantages): each of this process's questions followed by each of its k answers, the
        answers' tokens labelled."""
        k, batch_size = self.config.samples_per_prompt, self.train.batch_size
        mine = range(batch_size)[rows]
        slots = range((index * batch_size + mine.start) // k, (index * batch_size + mine.stop) // k)
        chosen = shuffled_positions(len(self.questions), slots, self.train.seed)
        questions = [self.questions[i] for i in chosen for _ in range(k)]
        prompts = [question.prompt_ids for question in questions]
        seed = int(torch.randint(2**62, (1,), generator=generator)) + mine.start
        sampling = SampleConfig(
            max_new_tokens=self.config.max_answer_tokens,
            temperature=self.config.sample_temperature,
            top_k=None,
            seed=seed,
        )
        with self.autocast():
            answers = self.responses(self.policy, prompts, sampling)
        rewards = torch.tensor([self.score(q, answer) for q, answer in zip(questions, answers)])
        self.reward_sum += float(rewards.sum())
        self.rewards_counted += len(rewards)
        ids, labels = answer_rows(prompts, answers, self.base.tokenizer.pad_id)
        return ids, labels, group_advantages(rewards, k)

    def score(self, question: AnsweredQuestion, answer: list[int]) -> float:
        """The reward of `answer` to `question`, checked to be a finite number."""
        spec = self.config.reward
        try:
            value = self.reward(question.question, self.response_text(answer), question.answer)
        except Exception as error:  # the user's own code: any failure is theirs to fix, said in one line
            raise TinylmError(f"--reward {spec} failed: {type(error).__name__}: {error}") from error
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TinylmError(f"--reward {spec} returned {value!r}; it must return a finite number (a float)")
        return float(value)

    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        return policy_gradient_nats(forward, *micro_batch)

    def held_out_batch(self, indices: list[int]) -> Batch:
        """The held-out references with advantage 1: their loss is sft's."""
        return (*self.held_out.batch(indices), torch.ones(len(indices)))

    def evaluate(self, engine: Engine) -> dict[str, float]:
        scores = super().evaluate(engine)
        counts = torch.tensor([self.reward_sum, self.rewards_counted], dtype=torch.float64, device=engine.device)
        reward_sum, counted = self.processes.sum(counts).tolist()
        if counted:
            scores["train_reward"] = reward_sum / counted
        self.reward_sum, self.rewards_counted = 0.0, 0
        return scores

    def better(self, scores: dict[str, float], best: dict[str, float] | None) -> bool:
        """A higher held-out answer accuracy; between equals, a lower held-out loss."""
        if best is None:
            return True
        return (scores["answer_accuracy"], -scores["val_loss"]) > (best["answer_accuracy"], -best["val_loss"])


def check_grpo_config(config: FinetuneConfig) -> None:
    if config.samples_per_prompt < 2:
        raise TinylmError(
            f"--samples-per-prompt must be at least 2, not {config.samples_per_prompt}: an answer is judged against "
            "the others to the same question"
        )
    if not config.sample_temperature > 0:
        raise TinylmError(
            f"--sample-temperature must be above 0, not {config.sample_temperature}: the answers to a question must "
            "differ to be compared"
        )
    if config.max_answer_tokens < 1:
        raise TinylmError(f"--max-answer-tokens must be at least 1, not {config.max_answer_tokens}")
    if config.pack:
        raise TinylmError("--pack lays sft examples end to end; --method grpo trains one sampled answer per row")


def exact_answer(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final answer (`#### ...`) has the reference's value, else 0.0."""
    return float(final_answer(completion) == answer)


def load_reward(spec: str | None) -> Reward:
    """The function `spec` names, `module:function` or `path/to/file.py:function`; exact_answer when None."""
    if spec is None:
        return exact_answer
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise TinylmError(f"--reward {spec}: name a function as module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as error:  # importing runs the user's code: whatever it raises means it cannot be used
        raise TinylmError(f"--reward {spec}: cannot import {where} ({type(error).__name__}: {error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = "nothing" if function is None else f"a {type(function).__name__}"
        raise TinylmError(f"--reward {spec}: {where} has {found} named {name}, not a function")
    return function


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward minus the mean of its group, `group_size` consecutive rewards (not divided by their spread)."""
    groups = rewards.view(-1, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).flatten()


def answer_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels): each prompt followed by its answer, the answer's tokens labelled."""
    rows = [(prompt + answer, [IGNORE] * len(prompt) + answer) for prompt, answer in zip(prompts, answers)]
    return padded(rows, pad_id)


def policy_gradient_nats(
    lm: Forward, ids: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """The sum over labelled tokens of -advantage * log p(token | the tokens before it), each row's advantage given."""
    logits, _ = lm(ids)
    logits = logits[:, :-1].flatten(0, 1).float()
    nats = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="none")
    return (nats.view(len(ids), -1) * advantages[:, None]).sum()
