"""Training forwards in reduced precision on a CPU: MONAI's trainers autocast on CUDA only
(``torch.autocast("cuda", **amp_kwargs)`` when ``amp``), so a bundle's training inferer is wrapped in
:class:`AutocastInferer`, which autocasts on the input's device when given a dtype (the bundle passes
:func:`common.device.cpu_training_autocast`: a dtype on a CPU only, ``None`` elsewhere, where the trainer's
own ``amp`` does it)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.inferers import Inferer

from common.device import cast_float32, log_precision_once, precision_name

logger = logging.getLogger(__name__)


class AutocastInferer(Inferer):
    """``inferer(inputs, network, *args, **kwargs)`` under ``torch.autocast(inputs.device.type, dtype)``,
    its floating outputs cast back to float32 (the loss is computed in float32, as with MONAI's CUDA
    AMP, whose loss functions autocast to float32); ``dtype=None`` calls ``inferer`` unchanged.

    The whole training forward runs under autocast, as MONAI's ``amp`` does on CUDA: every matmul and
    convolution in bfloat16 / float16, their gradients too; the parameters and the optimiser stay float32.
    Attributes not set here are the wrapped inferer's (``scheduler``, ``start`` ...). The precision a
    training forward runs at (this autocast, the trainer's CUDA ``amp``, or float32) is logged once.

    Args:
        inferer: the bundle's training inferer.
        dtype: ``torch.bfloat16``, ``torch.float16`` or ``None``.
    """

    def __init__(self, inferer, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.inferer, self.dtype = inferer, dtype

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        device = inputs.device.type
        outer = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        log_precision_once(logger, precision_name(self.dtype or outer), inputs.device, "training")
        if self.dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(device, dtype=self.dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return cast_float32(out)

    def __getattr__(self, name: str):
        if name in ("inferer", "dtype"):
            raise AttributeError(name)
        return getattr(self.inferer, name)
