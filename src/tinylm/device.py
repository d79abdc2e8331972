"""Which torch device a run uses."""

from __future__ import annotations

import torch

from tinylm.errors import TinylmError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name must be a device torch has here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinylmError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinylmError(f"device '{name}' asked for, but torch sees no CUDA GPU here; use --train.device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TinylmError(f"device '{name}' asked for, but MPS is not available here; use --train.device cpu or auto")
    return device
