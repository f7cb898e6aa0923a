"""Device choice shared by every bundle and script: CUDA when available, else CPU."""

from __future__ import annotations

import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: CUDA when available and ``device`` is not given (``None``, ``""`` or
    ``"auto"``), else CPU; a given ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``)
    is checked and returned.

    Raises:
        ValueError: naming ``--device`` when the string is not a device, or asks for CUDA on a
        machine without it (or for a GPU index the machine does not have), instead of torch's
        ``AssertionError: Torch not compiled with CUDA enabled`` at the first ``.to(device)``.
    """
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: not a device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use --device cpu, or leave --device out to choose automatically"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


def amp_enabled(device: str | torch.device | None = None) -> bool:
    """Automatic mixed precision is used on CUDA only (CPU autocast to bf16 is slower for these nets)."""
    return get_device(device).type == "cuda"
