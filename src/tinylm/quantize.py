"""int8 inference on CPU: `tinylm.load(path, quantize="int8")`, `--quantize int8` on generate, chat, serve and eval.

Every `nn.Linear` becomes torch's dynamically quantized linear layer: int8 weights (one scale per matrix), each
input quantized to int8 as it arrives, the product computed by the CPU's int8 kernels (fbgemm / onednn) and returned
in float32. Embeddings and norms stay float32; a tied output layer gets its own int8 copy of the embedding. It works
on any model `load` returns (a tinylm GPT or a Hugging Face model) and needs no extra package.

Why torch's own dynamic quantization and not torchao's weight-only int8 (`Int8WeightOnlyConfig`, which installs
against torch 2.13 without replacing it): in eager mode it ran faster here (a 6-layer, 384-wide model, one thread,
one token per forward, quick measurements on a shared machine: 1.6x and 3.1x float32's speed in two runs, torchao's
1.1x), and it needs no extra package. bench/int8_cpu.py measures both on a trained model, with bits per byte.
"""

from __future__ import annotations

import warnings
from typing import get_args, get_type_hints

import torch
from torch import nn

from tinylm.config import LoadConfig
from tinylm.errors import TinylmError

QUANTIZE_CHOICES = tuple(
    choice for part in get_args(get_type_hints(LoadConfig)["quantize"]) for choice in get_args(part)
)  # LoadConfig.quantize's Literal, without its None


def check_quantize(quantize: str | None, device: torch.device) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise TinylmError(f"quantize {quantize!r} is not known; choose {', '.join(QUANTIZE_CHOICES)} or null")
    if quantize is not None and device.type != "cpu":
        raise TinylmError(
            f"--quantize {quantize} runs on CPU and the model is on {device.type}; use --device cpu, or drop --quantize"
        )


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` with its linear layers replaced, in place, by int8 ones (see the module docstring)."""
    if not any(isinstance(module, nn.Linear) for module in model.modules()):
        raise TinylmError("--quantize int8 quantizes linear layers and this model has none; drop --quantize")
    with warnings.catch_warnings():  # torch points eager quantization's users to torchao; see the module docstring
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
