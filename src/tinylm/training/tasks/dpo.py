"""Preference tuning by DPO (Direct Preference Optimization, Rafailov et al. 2023): LoRA or every weight.

    base + preference pairs (prompt, chosen, rejected; see data/preferences.py)
      -> held-out DPO loss, preference accuracy and reward margin before -> training -> the same of the best weights
      -> out/: what instruction fine-tuning writes (tasks/sft.py): the adapter or model/, finetune.yaml, finetune.json

An answer's reward is beta * (its log-probability under the fine-tune - the same under the reference, the base), both
summed over the answer's tokens as the chat template renders them; a pair's loss is -log sigmoid(chosen's reward -
rejected's reward). The reference is the base itself: with LoRA, the same model with its adapters switched off (no
second copy in memory); with every weight trained, a frozen copy taken before training. Its log-probabilities are
computed without gradients and in evaluation mode (no dropout), so the reference is one fixed function.

A row of a batch is a pair (its chosen and its rejected answer side by side), so both answers of a pair always fall in
the same micro-batch and one forward pass of 2 x rows scores them; `train.batch_size` counts pairs, and every pair
weighs the same however the pairs fall into micro-batches and processes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.data.preferences import TokenizedPairs, load_preferences
from tinylm.training.distributed import Processes
from tinylm.training.engine import Batch, Engine, Forward
from tinylm.training.tasks.sft import InstructionTuning, response_log_probs

SCORES = ("val_loss", "preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
"""What each evaluation reports, as means over the held-out pairs."""


class PreferenceTuning(InstructionTuning):
    name = "preference tuning"
    sequences_per_row = 2  # a pair

    def setup(self, processes: Processes) -> nn.Module:
        config = self.config
        data = load_preferences(config.data, config.held_out_examples, config.max_examples)
        self.lm = self.load_base(processes)  # after the data: a bad pair is found before a big model loads
        tokenizer = self.base.tokenizer
        encode = (tokenizer.render, tokenizer.encode)
        self.train_set = TokenizedPairs(data.train, *encode, self.max_length, tokenizer.pad_id)
        self.held_out = TokenizedPairs(data.held_out, *encode, self.max_length, tokenizer.pad_id)
        self.frozen_reference = None
        if config.weights == "full":
            self.frozen_reference = copy.deepcopy(self.lm).requires_grad_(False).eval()
        return self.lm

    def fixed_settings(self) -> dict[str, Any]:
        return {**super().fixed_settings(), "dpo_beta": self.config.dpo_beta}

    def targets(self, micro_batch: Batch) -> int:
        return micro_batch[0].shape[0]

    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        chosen, rejected = self.rewards(forward, micro_batch)
        return -F.logsigmoid(chosen - rejected).sum()

    def rewards(self, forward: Forward, micro_batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The rewards of each pair's chosen and of its rejected answer."""
        ids, labels = (tensor.flatten(0, 1) for tensor in micro_batch)  # chosen, rejected, chosen, ...: 2 x pairs rows
        with torch.no_grad(), self.reference() as reference:
            reference_log_probs = response_log_probs(reference, ids, labels)
        log_ratios = response_log_probs(forward, ids, labels) - reference_log_probs
        chosen, rejected = (self.config.dpo_beta * log_ratios).view(-1, 2).unbind(dim=1)
        return chosen, rejected

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The base, in evaluation mode: the frozen copy, or the model with its adapters off."""
        if self.frozen_reference is not None:
            yield self.frozen_reference
            return
        training = self.lm.training
        self.lm.eval()
        try:
            with self.trainable.disable_adapter():
                yield self.lm
        finally:
            self.lm.train(training)

    def pair_scores(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        """The sums over the micro-batch's pairs of each of SCORES."""
        chosen, rejected = self.rewards(forward, micro_batch)
        margin = chosen - rejected
        agreed = (margin > 0).double() + 0.5 * (margin == 0).double()
        return torch.stack([-F.logsigmoid(margin).sum(), agreed.sum(), margin.sum(), chosen.sum(), rejected.sum()])

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """SCORES over every held-out pair (each process takes every k-th)."""
        mine = list(range(self.processes.rank, len(self.held_out), self.processes.world_size))
        size = engine.micro_batch_size
        batches = [self.held_out.batch(mine[first : first + size]) for first in range(0, len(mine), size)]
        return dict(zip(SCORES, engine.mean_scores(batches, self.pair_scores, len(SCORES))))
