"""A one-pass "sampler" for :class:`common.inferers.DiffusionVolumeInferer`, so that a direct
image-to-image network (Pix2Pix's generator) synthesises whole volumes slice by slice with the same
padding, slice batching, precision and output metadata as the diffusion bundles."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["DirectSampler"]


class DirectSampler:
    """``sample(...)`` returns ``network(conditioning)``: one forward pass, no noise, no steps.

    It has the signature of MONAI's ``DiffusionInferer.sample`` that
    :class:`~common.inferers.DiffusionVolumeInferer` calls: ``input_noise`` (N, C_out, H, W) is
    ignored (only its shape is checked against the output), ``conditioning`` (N, C_in, H, W) is the
    network's input, the result is (N, C_out, H, W). ``scheduler`` is ``None`` (the volume inferer is
    built with ``num_inference_steps=None``)."""

    scheduler = None

    def sample(
        self, input_noise: torch.Tensor, diffusion_model: Callable, conditioning: torch.Tensor, mode: str = "concat",
        verbose: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        out = diffusion_model(conditioning)
        if out.shape[1] != input_noise.shape[1]:
            raise ValueError(f"the network gives {out.shape[1]} channels, the inferer expects {input_noise.shape[1]}")
        return out
