"""Pretraining: a language model learns to predict the next token of the prepared text.

A batch is train.batch_size windows of model.block_size + 1 tokens drawn at random from the train split's shards,
or, with data.packing bos, train.batch_size rows of documents packed from their starts (data/loader.py PackedRows),
attention kept inside each document; the loss is the cross-entropy of every next token. Each evaluation measures the
mean loss on fixed batches of the train and val splits (the same batches every time, so two evaluations differ only
by the weights) and continues the recipe's sample prompt. The run folder gets config.yaml, the tokenizer, data.json
(the prepared data's token counts), model.safetensors (best by val loss), checkpoints/, metrics.jsonl, loss.png and
samples.txt.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import Config, TrainConfig
from tinylm.data.loader import PackedRows, TokenShards
from tinylm.data.prepare import prepare
from tinylm.errors import TinylmError
from tinylm.generate import encode_prompt, stream_text
from tinylm.model import build_model, count_parameters
from tinylm.pretrained import HuggingFaceLM, load_pretrained
from tinylm.runs import CONFIG_FILE, DATA_FILE, write_json, write_yaml
from tinylm.tokenizers import Tokenizer, load_tokenizer
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
        self.data_folder, self.tokenizer, self.data_meta = data.folder, data.tokenizer, data.meta
        vocab_size = config.model.vocab_size or self.tokenizer.vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise TinylmError(
                f"model.vocab_size {vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}; "
                "set it to null to take the tokenizer's"
            )
        self.config = config = replace(config, model=replace(config.model, vocab_size=vocab_size))
        self.splits: dict[str, TokenShards] = {name: data.split(name) for name in ("train", "val")}
        window = config.model.block_size + 1
        block_size, seed, end = config.model.block_size, self.train.seed, self.tokenizer.end_of_text
        self.packed = None
        if config.data.packing == "bos":  # the val rows packed with their own seed, like the random eval batches
            self.packed = {
                name: PackedRows(split, end, block_size, seed + (name == "val")) for name, split in self.splits.items()
            }
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
        model = build_model(config.model)  # before the teacher, whose loading must not change the student's init
        self.teacher = None
        if self.train.teacher:
            self.teacher = load_teacher(self.train.teacher, processes.device, self.tokenizer)
        return model

    def write_files(self, folder: Path) -> None:
        write_yaml(folder / CONFIG_FILE, self.config.to_dict())
        write_json(folder / DATA_FILE, {key: value for key, value in self.data_meta.items() if key != "inputs"})
        self.tokenizer.save(folder)

    def describe(self, model: nn.Module) -> str:
        taught = f", taught by {self.train.teacher}" if self.teacher is not None else ""
        return f"{count_parameters(model)['total']:,} parameters{taught}, data in {self.data_folder},"

    @property
    def resume_command(self) -> str:
        return f"`tinylm train --resume {self.out}`"

    def batch(self, index: int, generator: torch.Generator, rows: slice) -> Batch:
        size = self.train.batch_size
        if self.packed:
            return self.packed["train"].batch(index * size, size, rows)
        return self.splits["train"].sample_batch(size, self.config.model.block_size, generator, rows)

    def targets(self, micro_batch: Batch) -> int:
        return int((micro_batch[1] != -1).sum())

    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        inputs, targets, *documents = micro_batch
        logits, loss = forward(inputs, targets, documents=documents[0]) if documents else forward(inputs, targets)
        nats = loss * (targets != -1).sum()
        if self.teacher is None or not torch.is_grad_enabled():  # evaluation measures the student's own loss
            return nats
        with torch.no_grad():  # the teacher's distributions are targets, not something to train
            teacher_logits, _ = self.teacher(inputs)
        t = self.train
        kl = distillation_nats(logits, teacher_logits, targets != -1, t.distill_temperature, self.tokenizer.vocab_size)
        return (1 - t.distill_weight) * nats + t.distill_weight * kl

    def evaluate(self, engine: Engine) -> dict[str, float]:
        if self.eval_batches is None:
            fixed = torch.Generator().manual_seed(self.train.seed + 1)
            size, block_size, count = self.train.batch_size, self.config.model.block_size, self.train.eval_batches
            if self.packed:
                self.eval_batches = {
                    name: [packed.batch(i * size, size, engine.rows) for i in range(count)]
                    for name, packed in self.packed.items()
                }
            else:
                self.eval_batches = {
                    name: [split.sample_batch(size, block_size, fixed, engine.rows) for _ in range(count)]
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


# Texts a student and its teacher must split into the same ids: plain words, spacing, digits, Unicode.
TOKENIZER_PROBES = ("Once upon a time, there was a little girl named Lily.", "  x = 42;\n\tok", "café, 東京 and 🙂")


def load_teacher(spec: str, device: torch.device, tokenizer: Tokenizer) -> nn.Module:
    """The teacher (anything pretrained.load_pretrained takes) behind the model interface, frozen, after checking
    that it reads text as the student's tokenizer does."""
    base = load_pretrained(spec, device)
    teacher = HuggingFaceLM(base.model) if base.kind == "hf" else base.model
    theirs = base.text_tokenizer
    if theirs.fingerprint() != tokenizer.fingerprint():  # other files may still hold the same vocabulary
        pairs = [(_ids(theirs, probe), _ids(tokenizer, probe)) for probe in TOKENIZER_PROBES]
        if any(a != b for a, b in pairs) or all(a is None for a, _ in pairs):
            raise TinylmError(
                f"train.teacher {spec} tokenizes text differently from data.tokenizer {tokenizer.spec}; a teacher "
                "must share the student's tokenizer"
            )
    if teacher.config.vocab_size < tokenizer.vocab_size:
        raise TinylmError(f"train.teacher {spec} scores {teacher.config.vocab_size} tokens, fewer than the tokenizer's")
    return teacher.eval().requires_grad_(False)


def _ids(tokenizer: Tokenizer, text: str) -> list[int] | None:
    try:
        return tokenizer.encode(text)
    except TinylmError:  # a character vocabulary without some of the probe's characters
        return None


def distillation_nats(
    student: torch.Tensor, teacher: torch.Tensor, predicting: torch.Tensor, temperature: float, vocab_size: int
) -> torch.Tensor:
    """T^2 * KL(teacher || student), summed over the positions that predict something, on the tokenizer's ids (the
    logits beyond them belong to no text) at temperature T."""
    log_student = F.log_softmax(student[..., :vocab_size].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[..., :vocab_size].float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return temperature**2 * kl[predicting].sum()
