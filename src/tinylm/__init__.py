"""tinylm: build, train, evaluate and sample from small language models.

import tinylm
config = tinylm.load_config("configs/shakespeare-char.yaml", {"train.max_steps": 500})
result = tinylm.train(config)
print(tinylm.load(result.run_dir).generate("ROMEO:", max_new_tokens=200))
"""

from tinylm.config import Config, DataConfig, ModelConfig, SampleConfig, TaskConfig, TrainConfig, load_config
from tinylm.copy_task import CopyTaskRun, load_copy_task
from tinylm.errors import TinylmError
from tinylm.run import Run, load
from tinylm.training import TrainResult, train

__all__ = [
    "Config",
    "CopyTaskRun",
    "DataConfig",
    "ModelConfig",
    "Run",
    "SampleConfig",
    "TaskConfig",
    "TinylmError",
    "TrainConfig",
    "TrainResult",
    "load",
    "load_config",
    "load_copy_task",
    "train",
]
__version__ = "0.1.0"
