"""Device choice shared by every bundle and script: CUDA when available, else CPU."""

from __future__ import annotations

import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` if given (``"cuda"``, ``"cuda:1"``, ``"cpu"``), else CUDA when available, else CPU.

    Asking for CUDA on a machine without it falls back to the CPU instead of failing, so one config
    runs on a workstation and on a laptop.
    """
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def amp_enabled(device: str | torch.device | None = None) -> bool:
    """Automatic mixed precision is used on CUDA only (CPU autocast to bf16 is slower for these nets)."""
    return get_device(device).type == "cuda"
