"""Pretraining: a language model learns to predict the next token of the prepared text.

A batch is train.batch_size windows of model.block_size + 1 tokens drawn at random from the train split's shards;
the loss is the cross-entropy of every next token. Each evaluation measures the mean loss on fixed batches of the
train and val splits (the same batches every time, so two evaluations differ only by the weights) and continues the
recipe's sample prompt. The run folder gets config.yaml, the tokenizer, model.safetensors (best by val loss),
checkpoints/, metrics.jsonl, loss.png and samples.txt.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinylm.config import Config, TrainConfig
from tinylm.data.loader import TokenShards
from tinylm.data.prepare import prepare
from tinylm.errors import TinylmError
from tinylm.generate import encode_prompt, stream_text
from tinylm.model import build_model, count_parameters
from tinylm.runs import CONFIG_FILE, write_yaml
from tinylm.tokenizers import load_tokenizer
from tinylm.training.distributed import Processes
from tinylm.training.engine import Batch, Engine, Forward, Task


class Pretraining(Task):
    name = "pretraining"
    kind = "run"

    def __init__(self, config: Config, resume: bool = False):
        self.config, self.resume = config, resume
        self.out, self.train, self.default_train = Path(config.out), config.train, TrainConfig()
        self.eval_batches: dict[str, list[Batch]] | None = None

    def setup(self, processes: Processes) -> nn.Module:
        config = self.config
        # Rank 0 tokenizes; the other processes then find the token files ready.
        data = processes.run_on_main(lambda: prepare(config.data)) or prepare(config.data)
        if self.resume:  # text changed since: data prepared again may hold other ids than the model learned
            data.check_tokenizer(load_tokenizer(self.out))
        self.data_folder, self.tokenizer = data.folder, data.tokenizer
        vocab_size = config.model.vocab_size or self.tokenizer.vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise TinylmError(
                f"model.vocab_size {vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}; "
                "set it to null to take the tokenizer's"
            )
        self.config = config = replace(config, model=replace(config.model, vocab_size=vocab_size))
        self.splits: dict[str, TokenShards] = {name: data.split(name) for name in ("train", "val")}
        window = config.model.block_size + 1
        for name, split in self.splits.items():
            if len(split) < window:
                raise TinylmError(
                    f"the {name} split has {len(split)} tokens, fewer than one context window "
                    f"(model.block_size + 1 = {window}); give more text or lower model.block_size"
                )
            if split.longest_file < window:  # a window never crosses the end of a shard
                raise TinylmError(
                    f"the {name} split's shards hold at most {split.longest_file} tokens each, fewer than one context "
                    f"window (model.block_size + 1 = {window}); raise data.shard_tokens or lower model.block_size"
                )
        self.prompt = encode_prompt(self.tokenizer, config.sample.prompt, "sample.prompt")  # fail before training
        return build_model(config.model)

    def write_files(self, folder: Path) -> None:
        write_yaml(folder / CONFIG_FILE, self.config.to_dict())
        self.tokenizer.save(folder)

    def describe(self, model: nn.Module) -> str:
        return f"{count_parameters(model)['total']:,} parameters, data in {self.data_folder},"

    @property
    def resume_command(self) -> str:
        return f"`tinylm train --resume {self.out}`"

    def batch(self, step: int, generator: torch.Generator, rows: slice) -> Batch:
        return self.splits["train"].sample_batch(self.train.batch_size, self.config.model.block_size, generator, rows)

    def targets(self, micro_batch: Batch) -> int:
        return micro_batch[1].numel()

    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        inputs, targets = micro_batch
        _, loss = forward(inputs, targets)
        return loss * targets.numel()

    def evaluate(self, engine: Engine) -> dict[str, float]:
        if self.eval_batches is None:
            fixed = torch.Generator().manual_seed(self.train.seed + 1)
            size, block_size = self.train.batch_size, self.config.model.block_size
            self.eval_batches = {
                name: [split.sample_batch(size, block_size, fixed, engine.rows) for _ in range(self.train.eval_batches)]
                for name, split in self.splits.items()
            }
        return {f"{name}_loss": engine.mean_loss(batches) for name, batches in self.eval_batches.items()}

    def sample(self, model: nn.Module) -> str:
        """The recipe's prompt continued by the current weights (every process computes it: FSDP needs all)."""
        s = self.config.sample
        pieces = stream_text(model, self.tokenizer, [self.prompt], s, [self.tokenizer.end_of_text])
        return s.prompt + "".join(piece.text for piece in pieces)

    def config_record(self) -> dict[str, Any]:
        return self.config.to_dict()

    def fixed_settings(self) -> dict[str, Any]:
        settings = self.config.to_dict()
        return {"model": settings["model"], "data": settings["data"]}
