"""iterU-Net (Chung et al.): a time-conditioned 3D U-Net with a ConvLSTM cell, applied recursively.

From the pre-contrast frame P and the frame at time point k, [P, x_k] (B, 2, X, Y, Z), the network
predicts the frame at k+1 as ``x_k + conv(...)`` (a residual at the output: it learns the change
between time points). A chain inferer (``common.inferers.iterunet``) feeds each output back in.

* :class:`ConvLSTMCell` -- Shi et al. 2015 convolutional LSTM (without the peephole terms, the
  common simplification): ``[i, f, g, o] = conv([x, h])``, ``c' = sig(f) c + sig(i) tanh(g)``,
  ``h' = sig(o) tanh(c')``. MONAI has no ConvLSTM.
* :class:`IterUNet` -- MONAI ``BasicUNet`` blocks (``TwoConv``, ``Down``, ``UpCat``: instance norm,
  LeakyReLU 0.1, four poolings), one ConvLSTM cell after the first block (before the first
  downsampling), and a sinusoidal embedding of the target time -> Linear -> GELU -> Linear added to
  the output of every encoder and decoder block.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

__all__ = ["ConvLSTMCell", "IterUNet", "PRESETS"]

#: ``network_size`` presets: the released notebooks' features (about 6M parameters) and a CPU-sized one.
PRESETS = {
    "paper": {"features": (28, 32, 64, 128, 256, 28), "time_dim": 128},
    "small": {"features": (8, 8, 16, 16, 32, 8), "time_dim": 32},
}

State = tuple[torch.Tensor, torch.Tensor]


class ConvLSTMCell(nn.Module):
    """One convolutional LSTM step (Shi et al. 2015, no peepholes).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input x (B, C_in, *spatial).
        hidden_channels: channels of the hidden and cell states (B, C_h, *spatial).
        kernel_size: odd kernel of the gate convolution (3: a 3x3x3 cell); "same" padding.

    ``forward(x, state)`` returns ``(h, (h, c))``; ``state=None`` starts from zeros (a new case).
    Gate order in the convolution's output channels: input, forget, cell candidate, output.
    """

    def __init__(self, spatial_dims: int, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.hidden_channels = hidden_channels
        self.conv = conv(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            z = x.new_zeros((x.shape[0], self.hidden_channels, *x.shape[2:]))
            state = (z, z)
        h, c = state
        i, f, g, o = torch.chunk(self.conv(torch.cat([x, h], dim=1)), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class IterUNet(nn.Module):
    """Time-conditioned residual 3D U-Net with a ConvLSTM cell (iterU-Net).

    Args:
        preset: ``"paper"`` or ``"small"`` (:data:`PRESETS`); ``features`` / ``time_dim`` override it.
        spatial_dims: 3 (2 works too).
        in_channels: 2, ``[P, x_k]`` (TI-normed pre-contrast and the frame at time point k).
        out_channels: 1, the frame at k+1.
        residual_channel: the input channel added to the output (``x_k``: 1).
        features: six feature sizes as MONAI ``BasicUNet`` (four poolings; the last one is the
            decoder's output block).
        time_dim: width of the time embedding.
        temporal: ``False`` drops the time embedding and the ConvLSTM (the paper's "no temporal
            information" ablation); then ``time`` and ``state`` are ignored.
        max_period: of the sinusoidal embedding (times are in seconds, or indices).

    ``forward(x, time, state=None)``: x (B, in_channels, *spatial), any spatial size (padded by edge
    replication to a multiple of 16 for the four poolings, at least 32 along one axis, cropped back), ``time`` (B,) target time (seconds after the
    pre-contrast frame, or the phase index), ``state`` the ConvLSTM's ``(h, c)`` from the previous
    step of the same case (``None``: a new case, zeros). Returns ``(y, state)``, y (B, out_channels,
    *spatial) = ``x[:, residual_channel] + final_conv(...)``, in TI-norm units like x.
    """

    def __init__(
        self,
        preset: str = "small",
        spatial_dims: int = 3,
        in_channels: int = 2,
        out_channels: int = 1,
        residual_channel: int = 1,
        features: Sequence[int] | None = None,
        time_dim: int | None = None,
        temporal: bool = True,
        max_period: int = 10000,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown network preset {preset!r}; choose from {sorted(PRESETS)}")
        f = tuple(features if features is not None else PRESETS[preset]["features"])
        if len(f) != 6:
            raise ValueError(f"features needs 6 sizes (BasicUNet style), got {f}")
        if not 0 <= residual_channel < in_channels:
            raise ValueError(f"residual_channel {residual_channel} outside the {in_channels} input channels")
        self.temporal = bool(temporal)
        self.residual_channel = residual_channel
        self.out_channels = out_channels
        self.max_period = max_period
        self.time_dim = int(time_dim if time_dim is not None else PRESETS[preset]["time_dim"])
        act, norm, sd = (
            ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
            ("instance", {"affine": True}),
            spatial_dims,
        )
        self.conv_0 = TwoConv(sd, in_channels, f[0], act, norm, True, dropout)
        self.down_1 = Down(sd, f[0], f[1], act, norm, True, dropout)
        self.down_2 = Down(sd, f[1], f[2], act, norm, True, dropout)
        self.down_3 = Down(sd, f[2], f[3], act, norm, True, dropout)
        self.down_4 = Down(sd, f[3], f[4], act, norm, True, dropout)
        self.upcat_4 = UpCat(sd, f[4], f[3], f[3], act, norm, True, dropout, "deconv")
        self.upcat_3 = UpCat(sd, f[3], f[2], f[2], act, norm, True, dropout, "deconv")
        self.upcat_2 = UpCat(sd, f[2], f[1], f[1], act, norm, True, dropout, "deconv")
        self.upcat_1 = UpCat(sd, f[1], f[0], f[5], act, norm, True, dropout, "deconv", halves=False)
        conv = nn.Conv3d if sd == 3 else nn.Conv2d
        self.final_conv = conv(f[5], out_channels, kernel_size=1)
        if self.temporal:
            self.lstm = ConvLSTMCell(sd, f[0], f[0], kernel_size=3)
            self.time_mlp = nn.Sequential(
                nn.Linear(self.time_dim, self.time_dim), nn.GELU(), nn.Linear(self.time_dim, self.time_dim)
            )
            # one projection per encoder (5) and decoder (4) block
            self.time_proj = nn.ModuleList(nn.Linear(self.time_dim, c) for c in (*f[:5], f[3], f[2], f[1], f[5]))

    def embed_time(self, time: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """(B, time_dim) embedding of the target time (seconds or index)."""
        t = torch.as_tensor(time, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"time has {t.numel()} values for a batch of {batch}")
        return self.time_mlp(get_timestep_embedding(t, self.time_dim, self.max_period))

    def forward(self, x: torch.Tensor, time: torch.Tensor | float | None = None, state: State | None = None):
        emb = None
        if self.temporal:
            if time is None:
                raise ValueError("IterUNet(temporal=True) needs the target time")
            emb = self.embed_time(time, x.shape[0], x.device).to(x.dtype)

        def cond(h: torch.Tensor, i: int) -> torch.Tensor:
            if emb is None:
                return h
            return h + self.time_proj[i](emb).to(h.dtype).reshape(*emb.shape[:1], -1, *([1] * (h.ndim - 2)))

        spatial = x.shape[2:]
        target = [n + (-n) % 16 for n in spatial]
        if all(n == 16 for n in target):  # instance norm needs more than one voxel at the bottom (1/16 scale)
            target[0] = 32
        pad = []
        for n, m in zip(reversed(spatial), reversed(target)):
            pad += [0, m - n]
        xp = torch.nn.functional.pad(x, pad, mode="replicate") if any(pad) else x
        if state is not None and tuple(state[0].shape[2:]) != tuple(xp.shape[2:]):
            raise ValueError(
                f"ConvLSTM state of shape {tuple(state[0].shape)} does not fit the input {tuple(xp.shape)}"
            )
        x0 = self.conv_0(xp)
        if self.temporal:
            x0, state = self.lstm(x0, state)
        else:
            state = None
        x0 = cond(x0, 0)
        x1 = cond(self.down_1(x0), 1)
        x2 = cond(self.down_2(x1), 2)
        x3 = cond(self.down_3(x2), 3)
        x4 = cond(self.down_4(x3), 4)
        u4 = cond(self.upcat_4(x4, x3), 5)
        u3 = cond(self.upcat_3(u4, x2), 6)
        u2 = cond(self.upcat_2(u3, x1), 7)
        u1 = cond(self.upcat_1(u2, x0), 8)
        out = self.final_conv(u1)[(slice(None), slice(None), *(slice(0, n) for n in spatial))]
        return x[:, self.residual_channel : self.residual_channel + 1] + out, state
