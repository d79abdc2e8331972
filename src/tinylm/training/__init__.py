"""Training: the one engine (engine.py) and the tasks that plug into it (tasks/)."""

from tinylm.config import Config
from tinylm.training.engine import TrainResult, run_task
from tinylm.training.tasks.copy import CopyTraining
from tinylm.training.tasks.pretrain import Pretraining
from tinylm.training.tasks.sft import FinetuneResult, finetune


def train(config: Config, overwrite: bool = False, resume: bool = False) -> TrainResult:
    """Train a model as `config` says and write the run folder `config.out`: pretraining a language model, or the
    copy task for a seq2seq model. `resume` continues the run there from its latest checkpoint. Under torchrun,
    every process calls this."""
    task = CopyTraining(config) if config.model.arch == "seq2seq" else Pretraining(config, resume)
    return run_task(task, overwrite, resume)


__all__ = ["FinetuneResult", "TrainResult", "finetune", "train"]
