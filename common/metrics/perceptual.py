"""Perceptual metrics that run from LOCAL weight files only: LPIPS (AlexNet or VGG16 trunk) and FID.

Nothing here downloads anything. A missing weights file raises ``FileNotFoundError`` naming the file
and how to make it on a machine with internet access.

LPIPS weights file
------------------
ONE ``.pth`` state dict (``torch.load(path, weights_only=True)``) holding a torchvision feature trunk
with a ``features.`` prefix and the LPIPS v0.1 linear heads (``lpips`` package naming,
``lin{k}.model.1.weight``, k = 0..4). The trunk is read off the file (the shape of
``features.0.weight``), so one class serves both:

* ``alex`` (what Res-SRDiff's released code and the ``lpips`` package use by default): the 5
  convolutions of ``torchvision.models.alexnet().features``, ``features.{i}.weight/bias`` for
  ``i in (0, 3, 6, 8, 10)``; heads of 64, 192, 384, 256, 256 channels (taps relu1 ... relu5). 15 tensors.
* ``vgg``: the 13 convolutions of ``torchvision.models.vgg16().features``, ``i in (0, 2, 5, 7, 10, 12,
  14, 17, 19, 21, 24, 26, 28)``; heads of 64, 128, 256, 512, 512 channels (taps relu1_2 ... relu5_3).
  31 tensors.

Build it once where torchvision, the ``lpips`` package and internet are available (``alex`` shown;
``vgg16`` / ``vgg.pth`` for the other)::

    import os, torch, torchvision, lpips
    sd = {f"features.{k}": v for k, v in
          torchvision.models.alexnet(weights="IMAGENET1K_V1").features.state_dict().items()}
    sd.update(torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth"),
                         map_location="cpu"))           # lin0.model.1.weight ... lin4.model.1.weight
    torch.save(sd, "lpips_alex.pth")

FID feature extractor
---------------------
A TorchScript file (``torch.jit.save``) mapping a float32 batch (N, C, H, W) to features (N, F) (a
spatial feature map (N, F, h, w) is global-average pooled). Any resizing / normalisation the network
needs must be baked into the scripted module. Examples: InceptionV3 pool3 (F = 2048), or a RadImageNet
ResNet50 with global average pooling (F = 2048)::

    import torch, torchvision
    net = torchvision.models.inception_v3(weights="IMAGENET1K_V1", aux_logits=True).eval()
    net.fc = torch.nn.Identity()                                  # -> pool3 features (N, 2048)
    class Extractor(torch.nn.Module):
        def __init__(self, net):
            super().__init__(); self.net = net
        def forward(self, x):                                    # x: (N, 3, H, W) in [0, 1]
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            return self.net(x)
    torch.jit.save(torch.jit.trace(Extractor(net), torch.rand(2, 3, 299, 299)), "fid_inception_pool3.pt")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.metrics import FIDMetric

__all__ = [
    "LPIPS",
    "LPIPSLoss",
    "FIDScore",
    "LPIPS_TRUNKS",
    "VGG16_CONV_INDICES",
    "LPIPS_CHANNELS",
    "lpips_state_dict_keys",
    "lpips_trunk_of",
]

#: indices of the convolutions in ``torchvision.models.vgg16().features``
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
#: channels of the five VGG16 taps
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: torchvision ``alexnet().features``: (out channels, kernel, stride, padding) per convolution, "M" = max-pool 3/2
_ALEX_CFG = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))

#: per trunk: convolution indices in ``features``, the index after which each of the 5 taps is taken
#: (a ReLU), the taps' channels, and the kernel size of ``features.0`` (how a file is recognised)
LPIPS_TRUNKS = {
    "alex": {"convs": (0, 3, 6, 8, 10), "taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256), "k0": 11},
    "vgg": {"convs": VGG16_CONV_INDICES, "taps": (3, 8, 15, 22, 29), "channels": LPIPS_CHANNELS, "k0": 3},
}

_LPIPS_HOWTO = (
    "Build it offline from torchvision's AlexNet (or VGG16) features and the lpips package's v0.1 linear heads: "
    "sd = {f'features.{k}': v for k, v in torchvision.models.alexnet(weights='IMAGENET1K_V1').features.state_dict().items()}; "
    "sd.update(torch.load('<lpips package>/weights/v0.1/alex.pth')); torch.save(sd, PATH). "
    "See common/metrics/perceptual.py for the exact keys."
)


def lpips_state_dict_keys(trunk: str = "vgg") -> list[str]:
    """The exact keys an LPIPS weights file with the ``trunk`` (``alex`` | ``vgg``) must contain."""
    keys = [f"features.{i}.{p}" for i in LPIPS_TRUNKS[trunk]["convs"] for p in ("weight", "bias")]
    return keys + [f"lin{k}.model.1.weight" for k in range(5)]


def lpips_trunk_of(sd: dict) -> str | None:
    """``"alex"`` or ``"vgg"`` from the kernel size of ``features.0.weight`` (11 or 3), else None."""
    w = sd.get("features.0.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 4:
        return None
    return next((name for name, t in LPIPS_TRUNKS.items() if w.shape[-1] == t["k0"]), None)


def _trunk(cfg: Sequence, pool: int) -> nn.Sequential:
    """A torchvision ``features`` stack with the same indices: ``(out channels, kernel, stride, padding)``
    per convolution (each followed by a ReLU), ``"M"`` a max-pool of kernel ``pool``, stride 2."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=pool, stride=2))
        else:
            c, k, st, pad = v
            layers += [nn.Conv2d(c_in, c, kernel_size=k, stride=st, padding=pad), nn.ReLU(inplace=False)]
            c_in = c
    return nn.Sequential(*layers)


def _alex_features() -> nn.Sequential:
    """AlexNet ``features`` up to relu5 (indices 0..11), same indices as torchvision."""
    return _trunk(_ALEX_CFG, pool=3)


def _vgg16_features() -> nn.Sequential:
    """VGG16 ``features`` up to relu5_3 (indices 0..29), same indices as torchvision."""
    return _trunk([v if v == "M" else (v, 3, 1, 1) for v in _VGG16_CFG], pool=2)


class _NetLinLayer(nn.Module):
    """LPIPS linear head: dropout + 1x1 convolution to one channel, no bias (``lin{k}.model.1.weight``)."""

    def __init__(self, chn_in: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, kernel_size=1, stride=1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _check_file(path: str | os.PathLike | None, what: str, howto: str) -> Path:
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path}. Nothing is downloaded at run time. {howto}")
    return Path(path)


def _to_unit_range(x: torch.Tensor, data_range: float | Sequence[float] | None) -> torch.Tensor:
    """Map intensities to [-1, 1]: ``None`` -> already there; a float d -> [0, d]; (lo, hi) -> [lo, hi]."""
    if data_range is None:
        return x
    lo, hi = (
        (0.0, float(data_range))
        if not isinstance(data_range, (tuple, list))
        else (float(data_range[0]), float(data_range[1]))
    )
    if not hi > lo:
        raise ValueError(f"data_range must be positive / (lo, hi) with hi > lo, got {data_range!r}")
    return (x - lo) * (2.0 / (hi - lo)) - 1.0


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al., CVPR 2018) with an AlexNet or VGG16 trunk, written in plain torch,
    frozen, eval mode. The trunk is the one the weights file holds (``self.trunk``); ``net`` checks it.

    ``forward(x, y)`` takes two batches (N, 1 or 3, H, W) (single-channel MR slices are repeated to 3
    channels) and returns the distance per image, shape (N,), >= 0 (0 for identical images).

    Per tap (AlexNet relu1 ... relu5; VGG16 relu1_2 ... relu5_3): features are unit-normalised over channels, the squared difference
    is weighted by the linear head, averaged over space; the five values are summed. Inputs first go
    through LPIPS's scaling layer ``(x - shift) / scale`` (shift = (-.030, -.088, -.188), scale = (.458,
    .448, .450)), which expects images in [-1, 1].

    Args:
        weights_path: local ``.pth`` state dict, keys in the module docstring / :func:`lpips_state_dict_keys`.
        data_range: ``None`` if images are in [-1, 1]; a float ``d`` for images in [0, d]; ``(lo, hi)``
            for images in [lo, hi]. Values are not clipped.
        net: ``None`` (take the file's trunk), ``"alex"`` or ``"vgg"`` (then a file with the other
            trunk is refused, naming both).

    Raises:
        FileNotFoundError: the weights file does not exist (the message says how to make it).
        ValueError: the file lacks keys, has unexpected keys or wrong shapes, or another trunk than ``net``.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        data_range: float | Sequence[float] | None = None,
        net: str | None = None,
    ) -> None:
        super().__init__()
        if net not in (None, *LPIPS_TRUNKS):
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_TRUNKS)} (or None: the file's), got {net!r}")
        path = _check_file(weights_path, "LPIPS (AlexNet or VGG16 + linear heads)", _LPIPS_HOWTO)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot read LPIPS weights as a torch state dict ({e})") from e
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict (dict of tensors), got {type(sd).__name__}")
        found = lpips_trunk_of(sd)
        if net is not None and found is not None and found != net:
            raise ValueError(f"{path}: holds LPIPS weights with the {found} trunk, but net={net!r} was asked for")
        self.trunk = net or found or "vgg"  # an unrecognisable file is named against the VGG16 keys below
        self.data_range = data_range
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        spec = LPIPS_TRUNKS[self.trunk]
        self._taps = spec["taps"]
        with torch.device("meta"):  # no random init: every parameter comes from the file
            self.features = _alex_features() if self.trunk == "alex" else _vgg16_features()
            for k, c in enumerate(spec["channels"]):
                setattr(self, f"lin{k}", _NetLinLayer(c))
        self._load(path, sd)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path, sd: dict) -> None:
        expected = set(lpips_state_dict_keys(self.trunk))
        missing = sorted(expected - set(sd))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not an LPIPS {self.trunk} state dict; missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. {_LPIPS_HOWTO}"
            )
        try:
            self.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: LPIPS weights have the wrong shapes: {e}") from e

    def train(self, mode: bool = True) -> "LPIPS":
        """Always stays in eval mode (dropout in the linear heads must be off)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        dtype = self.shift.dtype
        h = torch.cat(
            [
                _as_rgb(_to_unit_range(x.to(dtype), self.data_range)),
                _as_rgb(_to_unit_range(y.to(dtype), self.data_range)),
            ]
        )
        h = (h - self.shift) / self.scale
        n = x.shape[0]
        total = torch.zeros(n, dtype=h.dtype, device=h.device)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self._taps[k]:
                f = h / (torch.sqrt((h**2).sum(dim=1, keepdim=True)) + 1e-10)
                d = (f[:n] - f[n:]) ** 2
                total = total + getattr(self, f"lin{k}")(d).mean(dim=(1, 2, 3))
                k += 1
                if k == len(self._taps):
                    break
        return total


class LPIPSLoss(nn.Module):
    """``l2_weight * MSE(pred, target) + lpips_weight * mean LPIPS(pred, target)`` (Res-SRDiff's loss).

    Gradients flow to the inputs; the LPIPS network is frozen.

    Args:
        weights_path: LPIPS weights file, see :class:`LPIPS`.
        l2_weight: weight (lambda) of the mean squared error, in the inputs' units squared.
        lpips_weight: weight of the LPIPS term.
        data_range: see :class:`LPIPS`.

    Shapes: ``pred``, ``target`` (N, 1 or 3, H, W); returns a scalar tensor.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        l2_weight: float = 1.0,
        lpips_weight: float = 1.0,
        data_range: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.lpips = LPIPS(weights_path, data_range=data_range)
        self.l2_weight = float(l2_weight)
        self.lpips_weight = float(lpips_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.lpips_weight * self.lpips(pred, target).mean()
        if self.l2_weight:
            loss = loss + self.l2_weight * F.mse_loss(pred, target)
        return loss


class FIDScore:
    """Fréchet distance between the feature distributions of two image sets, MONAI's :class:`FIDMetric`
    on features from a local TorchScript extractor (see the module docstring).

    Args:
        extractor_path: TorchScript file (``torch.jit.save``) mapping (N, C, H, W) float32 to (N, F) or
            (N, F, h, w); a ``.pt2`` file is read with ``torch.export.load`` instead.
        device: device the extractor runs on.
        batch_size: images per forward pass.
        in_channels: channels the extractor expects; single-channel images are repeated to it.

    Usage: ``FIDScore(path)(generated, real)`` with tensors (N, C, H, W); returns a float. Both sets need
    more images than feature dimensions for a well-conditioned covariance (thousands for 2048-d
    InceptionV3 features); FID on a handful of slices is noise.

    Raises:
        FileNotFoundError: the extractor file does not exist.
    """

    def __init__(
        self,
        extractor_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        path = _check_file(
            extractor_path,
            "FID feature extractor (TorchScript)",
            "Export one with torch.jit.save on a machine with the pretrained network, e.g. an InceptionV3 "
            "pool3 or a RadImageNet ResNet50 returning (N, F) features; see common/metrics/perceptual.py.",
        )
        self.device = torch.device(device)
        try:
            if path.suffix == ".pt2":  # torch.export program (torch.jit is deprecated in recent torch)
                self.extractor = torch.export.load(str(path)).module().to(self.device)
            else:
                self.extractor = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:
            raise ValueError(f"{path}: cannot load as a TorchScript (or .pt2 torch.export) module ({e})") from e
        self.batch_size = int(batch_size)
        self.in_channels = int(in_channels)
        self.metric = FIDMetric()

    @torch.no_grad()
    def features(self, images: Any) -> torch.Tensor:
        """Features (N, F), float64 on the CPU, of images (N, C, H, W)."""
        x = torch.as_tensor(images).float()
        if x.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1 and self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            f = self.extractor(x[i : i + self.batch_size].to(self.device))
            if f.ndim > 2:
                f = f.flatten(2).mean(-1)
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out)

    def from_features(self, feats_pred: torch.Tensor, feats_real: torch.Tensor) -> float:
        """FID of two feature sets (N, F) and (M, F)."""
        return float(self.metric(torch.as_tensor(feats_pred), torch.as_tensor(feats_real)))

    def __call__(self, pred_images: Any, real_images: Any) -> float:
        return self.from_features(self.features(pred_images), self.features(real_images))
