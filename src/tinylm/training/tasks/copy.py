"""The copy task: an encoder-decoder (model.arch seq2seq) learns to copy or reverse random sequences.

Each step draws train.batch_size fresh sequences (never a held-out one). Each evaluation answers every held-out
sequence greedily: `val_accuracy` is the share answered exactly, and the best weights by that accuracy (then by val
loss) are kept in model.safetensors. The run folder gets config.yaml, model.safetensors, checkpoints/,
metrics.jsonl, samples.txt (held-out sequences and the model's answers) and cross_attention.png.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tinylm.config import Config, TrainConfig
from tinylm.copy_task import ATTENTION_PLOT, CopyTask, CopyTaskRun, require_matplotlib
from tinylm.errors import TinylmError
from tinylm.model import build_model, count_parameters
from tinylm.model.seq2seq import PAD
from tinylm.runs import CONFIG_FILE, write_yaml
from tinylm.training.distributed import Processes
from tinylm.training.engine import Batch, Engine, Forward, Task, TrainResult


class CopyTraining(Task):
    name = "the copy task"
    kind = "run"
    refused: ClassVar[dict[str, str]] = {
        "batch_tokens": "sequences have random lengths; set train.batch_size",
        "eval_batches": "every held-out sequence is evaluated; set task.val_sequences",
        "activation_checkpointing": "the seq2seq model is small enough without it",
        "teacher": "distillation teaches a language model; train the copy task without it",
    }

    def __init__(self, config: Config):
        self.config = config
        self.out, self.train, self.default_train = Path(config.out), config.train, TrainConfig()

    def setup(self, processes: Processes) -> nn.Module:
        require_matplotlib()  # fail before training, not after, when the attention plot cannot be drawn
        self.task = CopyTask(self.config.task, self.train.seed)
        vocab_size = self.config.model.vocab_size or self.task.vocab_size
        if vocab_size < self.task.vocab_size:
            raise TinylmError(
                f"model.vocab_size {vocab_size} is smaller than the task's {self.task.vocab_size} "
                "(task.symbols + PAD, BOS, EOS); set it to null to take the task's"
            )
        self.config = replace(self.config, model=replace(self.config.model, vocab_size=vocab_size))
        return build_model(self.config.model)

    def write_files(self, folder: Path) -> None:
        write_yaml(folder / CONFIG_FILE, self.config.to_dict())

    def fixed_settings(self) -> dict[str, Any]:
        settings = self.config.to_dict()
        return {"model": settings["model"], "task": settings["task"]}

    def describe(self, model: nn.Module) -> str:
        return (
            f"{count_parameters(model)['total']:,} parameters, {self.config.task.kind} task, "
            f"{len(self.task.val_sequences)} held-out sequences,"
        )

    @property
    def resume_command(self) -> str:
        return f"`tinylm train --resume {self.out}`"

    def batch(self, index: int, generator: torch.Generator, rows: slice) -> Batch:
        return tuple(tensor[rows] for tensor in self.task.train_batch(self.train.batch_size, generator))

    def targets(self, micro_batch: Batch) -> int:
        return int((micro_batch[2] != PAD).sum())

    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        source, target_input, target_output = micro_batch
        _, loss = forward(source, target_input, target_output, label_smoothing=self.config.task.label_smoothing)
        return loss * (target_output != PAD).sum()

    def evaluate(self, engine: Engine) -> dict[str, float]:
        return self.task.evaluate(engine.model)

    def better(self, scores: dict[str, float], best: dict[str, float] | None) -> bool:
        return best is None or (scores["val_accuracy"], -scores["val_loss"]) > (best["val_accuracy"], -best["val_loss"])

    def stop_reason(self, scores: dict[str, float]) -> str | None:
        stop = self.config.task.stop_accuracy
        if stop is not None and scores["val_accuracy"] >= stop:
            return f"held-out accuracy {scores['val_accuracy']:.1%} reached task.stop_accuracy {stop:.1%}"
        return None

    def sample(self, model: nn.Module) -> str:
        """Five held-out sequences and the model's answers."""
        run = CopyTaskRun(self.out, self.config, model)
        examples = [" ".join(map(str, sequence)) for sequence in self.task.val_sequences[:5]]
        return "\n".join(f"{text} -> {run.translate(text)}" for text in examples)

    def finish(self, model: nn.Module, result: TrainResult) -> None:
        if result.is_main:
            longest = max(self.task.val_sequences[:100], key=len)
            CopyTaskRun(self.out, self.config, model).draw_attention(
                " ".join(map(str, longest)), self.out / ATTENTION_PLOT
            )

    def config_record(self) -> dict[str, Any]:
        return self.config.to_dict()
