"""Training: the one engine (engine.py) and the tasks that plug into it (tasks/)."""

from tinylm.config import Config, FinetuneConfig
from tinylm.errors import TinylmError
from tinylm.training.engine import TrainResult, run_task
from tinylm.training.tasks.copy import CopyTraining
from tinylm.training.tasks.dpo import PreferenceTuning
from tinylm.training.tasks.grpo import GRPO
from tinylm.training.tasks.pretrain import Pretraining
from tinylm.training.tasks.sft import FinetuneResult, InstructionTuning

FINETUNE_TASKS = {"sft": InstructionTuning, "dpo": PreferenceTuning, "grpo": GRPO}
"""The task of each fine-tuning --method."""


def train(config: Config, overwrite: bool = False, resume: bool = False) -> TrainResult:
    """Train a model as `config` says and write the run folder `config.out`: pretraining a language model, or the
    copy task for a seq2seq model. `resume` continues the run there from its latest checkpoint. Under torchrun,
    every process calls this."""
    task = CopyTraining(config) if config.model.arch == "seq2seq" else Pretraining(config, resume)
    return run_task(task, overwrite, resume)


def finetune(config: FinetuneConfig, overwrite: bool = False, resume: bool = False) -> FinetuneResult:
    """Fine-tune `config.base` on `config.data` by `config.method` and write `config.out` (see tasks/sft.py,
    tasks/dpo.py and tasks/grpo.py)."""
    if config.method not in FINETUNE_TASKS:
        raise TinylmError(f"--method {config.method} is not available; choose one of {', '.join(FINETUNE_TASKS)}")
    result = run_task(FINETUNE_TASKS[config.method](config, resume), overwrite, resume)
    return FinetuneResult(result.run_dir, result.steps, **result.details)


__all__ = ["FinetuneResult", "TrainResult", "finetune", "train"]
