"""tinylm: build, train, evaluate and sample from small language models.

import tinylm
config = tinylm.load_config("configs/shakespeare-char.yaml", {"train.max_steps": 200})
result = tinylm.train(config)
print(tinylm.load(result.run_dir).generate("ROMEO:", max_new_tokens=200))
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module it comes from, imported on first use: `import tinylm.model.gpt` runs this file, and
# a program that only wants the model should not load the trainer or the recipe parser (jsonargparse) with it.
_EXPORTS = {
    "Config": "tinylm.config",
    "CopyTaskRun": "tinylm.copy_task",
    "DataConfig": "tinylm.config",
    "FinetuneConfig": "tinylm.config",
    "FinetuneResult": "tinylm.training",
    "ModelConfig": "tinylm.config",
    "PipelineConfig": "tinylm.config",
    "PipelineResult": "tinylm.pipeline",
    "Run": "tinylm.run",
    "SampleConfig": "tinylm.config",
    "TaskConfig": "tinylm.config",
    "TinylmError": "tinylm.errors",
    "TrainConfig": "tinylm.config",
    "TrainResult": "tinylm.training",
    "finetune": "tinylm.training",
    "load": "tinylm.run",
    "load_config": "tinylm.recipes",
    "load_copy_task": "tinylm.copy_task",
    "load_pipeline_config": "tinylm.pipeline",
    "run_pipeline": "tinylm.pipeline",
    "train": "tinylm.training",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinylm' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
