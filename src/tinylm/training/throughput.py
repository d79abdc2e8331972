"""How fast a run goes: tokens per second, model FLOPs utilisation (MFU) against the device's peak, and memory.

MFU counts the FLOPs the model needs per token, not what the hardware ran: 6 per weight of every matrix a token is
multiplied by (2 forward, 4 backward), plus attention's 12 * n_layer * n_embd * block_size (PaLM's appendix B; the
same count as nanoGPT). Activation recomputation is not counted, so checkpointing lowers MFU as it should.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

# Dense peak TFLOP/s per GPU from the makers' spec sheets (no sparsity): (bf16 or fp16 tensor cores, fp32 matmul).
# fp32 is TF32 on Ampere and later, which training turns on; T4 and V100 have no bf16 and no TF32.
# Matched by name, first hit wins, so specific names come before general ones.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("B200", 2250, 1100),
    ("H200", 989, 495),
    ("H100 PCIe", 756, 378),
    ("H100", 989, 495),
    ("A100", 312, 156),
    ("L40S", 362, 183),
    ("L4", 121, 60),
    ("A10G", 70, 35),
    ("A10", 125, 62.5),
    ("RTX 6000 Ada", 364, 182),
    ("A6000", 155, 77.4),
    ("RTX 4090", 165, 82.6),
    ("RTX 3090", 71, 35.6),
    ("V100", 125, 15.7),
    ("T4", 65, 8.1),
]


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token of context: forward and backward through every weight matrix, and attention."""
    matrix_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    attention = 12 * getattr(config, "n_layer", 0) * getattr(config, "n_embd", 0) * config.block_size
    return 6 * matrix_weights + attention


def peak_flops(device: torch.device, autocast_dtype: torch.dtype | None) -> float | None:
    """The device's dense peak FLOP/s at this precision, or None where it is not known (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, half, single in PEAK_TFLOPS:
        if pattern in name:
            return (half if autocast_dtype is not None else single) * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held: CUDA memory allocated on a GPU, resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak / 1e6  # bytes on macOS, kilobytes on Linux


def environment(device: torch.device, processes: int, precision: str) -> dict[str, Any]:
    """Where and with what a training session runs: the hardware and the software versions (for `tinylm report`)."""
    try:
        tinylm_version = importlib.metadata.version("tinylm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        tinylm_version = None
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = (
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
        )
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device.type,
        "hardware": hardware,
        "processes": processes,
        "precision": precision,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tinylm": tinylm_version,
        "platform": platform.platform(),
    }
