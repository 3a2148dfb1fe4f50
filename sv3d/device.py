"""Automatic device choice: CUDA when available, else CPU; an explicit choice is validated."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["pick_device"]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: expected auto, cpu or cuda[:N]") from exc
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta ...: the stages' kernels are CPU or CUDA only
        raise InputError(f"unsupported device {name!r}: expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device
