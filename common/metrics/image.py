"""Full-reference image metrics with an explicit ``data_range`` and an optional region mask.

Shape convention (the same for every function here):

* ``(H, W)``            one 2D image;
* ``(H, W, D)``         one volume, treated as ``D`` 2D slices along the LAST axis;
* ``(B, C, H, W)``      a batch of 2D images (MONAI channel-first);
* ``(B, C, H, W, D)``   a batch of volumes (slices along the last axis).

Unbatched inputs (``ndim`` 2 or 3) return a Python ``float``; batched inputs (``ndim`` 4 or 5) return
a ``numpy`` array of shape ``(B,)`` (channels are pooled with the spatial voxels). Inputs may be numpy
arrays or torch tensors (any device); everything is computed in float64.

``data_range`` is REQUIRED and never guessed from the data: it is the width of the intensity range the
images live in (e.g. ``2.0`` for images scaled to [-1, 1], ``1.0`` for [0, 1], ``4095`` for raw 12-bit).
Guessing it from ``target.max() - target.min()`` makes numbers incomparable between cases.

``mask`` (organ, tumour, lesion) is optional; any non-zero voxel is inside. It has the image's shape, its
spatial shape only (``(H, W)`` / ``(H, W, D)``, broadcast over batch and channels) or ``(B, 1, ...)``.
PSNR and MAE over a mask use the mask voxels only. SSIM and GMSD are neighbourhood metrics: the map
value at a mask voxel still sees the voxels within the window radius (5 px for SSIM, about 3 px for
GMSD), so only voxels farther than that from the mask are truly ignored. An empty mask gives ``nan``.

Volumes use 2D SSIM / GMSD per slice (slices along the last axis), the usual choice for anisotropic
MR acquisitions whose through-plane spacing is several times the in-plane spacing; the per-slice maps
are pooled over the whole volume (one mean / one standard deviation, not a mean of slice scores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import MAEMetric, PSNRMetric

__all__ = ["psnr", "ssim", "ssim_map", "mae", "gmsd", "gms_map"]

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
GMSD_C = 170.0


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().as_subclass(torch.Tensor)  # drop MetaTensor metadata
    return torch.as_tensor(np.asarray(x))


def _prepare(pred: Any, target: Any, data_range: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return float64 tensors of shape (B, C, H, W[, D]) and whether the input was batched."""
    if (
        data_range is None
        or not np.isscalar(data_range)
        or not np.isfinite(float(data_range))
        or float(data_range) <= 0
    ):
        raise ValueError(f"data_range must be a positive number (the width of the intensity range), got {data_range!r}")
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if p.ndim in (2, 3):
        batched = False
        p, t = p[None, None], t[None, None]
    elif p.ndim in (4, 5):
        batched = True
    else:
        raise ValueError(f"expected (H, W), (H, W, D), (B, C, H, W) or (B, C, H, W, D), got shape {tuple(p.shape)}")
    return p.to(torch.float64), t.to(device=p.device, dtype=torch.float64), batched


def _prepare_mask(mask: Any, shape: torch.Size, batched: bool, device: torch.device) -> torch.Tensor | None:
    """Return a bool mask broadcast to ``shape`` (B, C, *spatial), or None."""
    if mask is None:
        return None
    m = _as_tensor(mask).to(device) != 0
    spatial = tuple(shape[2:])
    if tuple(m.shape) == spatial:
        m = m[None, None]
    elif not batched:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match image shape {spatial}")
    elif m.ndim != len(shape):
        raise ValueError(
            f"mask shape {tuple(m.shape)} is neither the spatial shape {spatial} nor (B, C|1, ...) of {tuple(shape)}"
        )
    try:
        return torch.broadcast_to(m, shape)
    except RuntimeError as e:
        raise ValueError(f"mask shape {tuple(m.shape)} cannot be broadcast to image shape {tuple(shape)}") from e


def _finish(values: torch.Tensor, batched: bool) -> float | np.ndarray:
    v = values.detach().reshape(-1).to("cpu", torch.float64).numpy()
    return v if batched else float(v[0])


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all non-batch dims of ``values`` (B, ...), restricted to ``mask``; (B,)."""
    if mask is None:
        return values.flatten(1).mean(1)
    w = mask.to(values.dtype).flatten(1)
    n = w.sum(1)
    s = (values.flatten(1) * w).sum(1)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


def _masked_std(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Population standard deviation (ddof=0) over all non-batch dims, restricted to ``mask``; (B,)."""
    mean = _masked_mean(values, mask)
    dev2 = (values - mean.reshape(-1, *([1] * (values.ndim - 1)))) ** 2
    return _masked_mean(dev2, mask).sqrt()


def psnr(pred: Any, target: Any, data_range: float, mask: Any = None) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)``.

    Without a mask this is MONAI's :class:`~monai.metrics.PSNRMetric` (``max_val=data_range``) in float64;
    with a mask the MSE is taken over the mask voxels only. Identical images give ``inf``.

    Args:
        pred, target: images, see the module docstring for shapes.
        data_range: width of the intensity range (required, > 0).
        mask: optional region; voxels outside it are ignored.
    """
    p, t, batched = _prepare(pred, target, data_range)
    m = _prepare_mask(mask, p.shape, batched, p.device)
    if m is None:
        out = PSNRMetric(max_val=float(data_range), reduction="none")(p, t)
    else:
        mse = _masked_mean((p - t) ** 2, m)
        out = 10.0 * torch.log10(float(data_range) ** 2 / mse)
    return _finish(out, batched)


def mae(pred: Any, target: Any, data_range: float | None = None, mask: Any = None) -> float | np.ndarray:
    """Mean absolute error, in image units, over all voxels or over ``mask``.

    Args:
        pred, target: images, see the module docstring for shapes.
        data_range: if given (> 0), the MAE is divided by it (a fraction of the intensity range), so it
            is comparable across cases; ``None`` returns image units.
        mask: optional region; voxels outside it are ignored.
    """
    p, t, batched = _prepare(pred, target, 1.0 if data_range is None else data_range)
    m = _prepare_mask(mask, p.shape, batched, p.device)
    out = MAEMetric(reduction="none")(p, t) if m is None else _masked_mean((p - t).abs(), m)
    if data_range is not None:
        out = out / float(data_range)
    return _finish(out, batched)


def _to_slices(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(B, C, H, W, D) -> (B*D, C, H, W); 2D input is returned unchanged."""
    if x.ndim == 4:
        return x, ()
    b, c, h, w, d = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w), (b, d)


def _from_slices(x: torch.Tensor, info: tuple[int, ...]) -> torch.Tensor:
    if not info:
        return x
    b, d = info
    return x.reshape(b, d, *x.shape[1:]).permute(0, 2, 3, 4, 1)


def _pad_symmetric(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last two dims by ``r`` with half-sample symmetric reflection (scipy/skimage 'reflect')."""
    for dim in (-2, -1):
        idx = np.pad(np.arange(x.shape[dim]), r, mode="symmetric")
        x = x.index_select(dim, torch.as_tensor(idx, device=x.device))
    return x


def ssim_map(pred: Any, target: Any, data_range: float) -> torch.Tensor:
    """Full-size SSIM map, same shape as the input (float64 tensor; batched layout (B, C, H, W[, D])).

    2D Gaussian-window SSIM (window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances) per
    slice on images padded by 5 voxels with symmetric reflection, i.e. the same map as
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, full=True)``. The formula and kernel are those of MONAI's
    :func:`~monai.metrics.regression.compute_ssim_and_cs`, re-done here in float64 because MONAI casts to
    float32, where ``E[x^2] - E[x]^2`` loses ~1e-4 of SSIM on low-variance regions.
    """
    p, t, batched = _prepare(pred, target, data_range)
    smap = _ssim_map(p, t, float(data_range))
    return smap if batched else smap[0, 0]


def _gaussian_1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised Gaussian taps at offsets -(size-1)/2 ... (size-1)/2 (MONAI's / scipy's kernel)."""
    dist = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (dist / sigma) ** 2)
    return g / g.sum()


def _ssim_map(p: torch.Tensor, t: torch.Tensor, data_range: float) -> torch.Tensor:
    r = SSIM_KERNEL_SIZE // 2
    ps, info = _to_slices(p)
    ts, _ = _to_slices(t)
    if min(ps.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} in-plane, got {tuple(ps.shape[-2:])}"
        )
    n, c, h, w = ps.shape
    g = _gaussian_1d(SSIM_KERNEL_SIZE, SSIM_SIGMA, ps.device)
    gh, gw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable valid convolution of the padded image
        return F.conv2d(F.conv2d(x, gh), gw)

    # all five local moments in one batch: (5 * N * C, 1, H + 2r, W + 2r)
    stack = torch.stack([ps, ts, ps * ps, ts * ts, ps * ts]).reshape(5 * n * c, 1, h, w)
    mx, my, mxx, myy, mxy = blur(_pad_symmetric(stack, r)).reshape(5, n, c, h, w)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    sx, sy, sxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sx + sy + c2))
    return _from_slices(smap, info)


def ssim(pred: Any, target: Any, data_range: float, mask: Any = None) -> float | np.ndarray:
    """Structural similarity (2D, per slice for volumes; see :func:`ssim_map` for the window).

    Without a mask: the mean of the SSIM map over the voxels at least 5 px (the window radius) from the
    in-plane image border, exactly what ``skimage.metrics.structural_similarity`` and MONAI's
    ``SSIMMetric`` report. With a mask: the mean of the full-size map over the mask voxels.

    Args:
        pred, target: images, see the module docstring for shapes; at least 11x11 in-plane.
        data_range: width of the intensity range (required, > 0).
        mask: optional region.
    """
    p, t, batched = _prepare(pred, target, data_range)
    m = _prepare_mask(mask, p.shape, batched, p.device)
    smap = _ssim_map(p, t, float(data_range))
    if m is None:
        r = SSIM_KERNEL_SIZE // 2
        inner = smap[:, :, r:-r, r:-r] if smap.ndim == 4 else smap[:, :, r:-r, r:-r, :]
        out = _masked_mean(inner, None)
    else:
        out = _masked_mean(smap, m)
    return _finish(out, batched)


_PREWITT_X = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=torch.float64) / 3.0


def _gms_and_mask(p: torch.Tensor, t: torch.Tensor, data_range: float, m: torch.Tensor | None):
    scale = 255.0 / data_range
    ps, info = _to_slices(p * scale)
    ts, _ = _to_slices(t * scale)
    ms = _to_slices(m.to(torch.float64))[0] if m is not None else None
    h, w = ps.shape[-2:]
    even = (0, w % 2, 0, h % 2)
    c = ps.shape[1]
    kx = _PREWITT_X.to(ps.device).expand(c, 1, 3, 3)
    ky = kx.transpose(-1, -2)

    def grad_mag(x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.pad(x, even, mode="replicate"), 2)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return torch.sqrt(F.conv2d(x, kx, groups=c) ** 2 + F.conv2d(x, ky, groups=c) ** 2)

    gp, gt = grad_mag(ps), grad_mag(ts)
    gms = (2.0 * gp * gt + GMSD_C) / (gp**2 + gt**2 + GMSD_C)
    if ms is not None:
        ms = F.max_pool2d(F.pad(ms, even, mode="constant", value=0.0), 2) > 0
        ms = _from_slices(ms, info)
    return _from_slices(gms, info), ms


def gms_map(pred: Any, target: Any, data_range: float) -> torch.Tensor:
    """Gradient magnitude similarity map on the 2x downsampled grid, float64, (B, C, ceil(H/2), ceil(W/2)[, D])
    for batched input, ``(ceil(H/2), ceil(W/2)[, D])`` otherwise. See :func:`gmsd`."""
    p, t, batched = _prepare(pred, target, data_range)
    g, _ = _gms_and_mask(p, t, float(data_range), None)
    return g if batched else g[0, 0]


def gmsd(pred: Any, target: Any, data_range: float, mask: Any = None) -> float | np.ndarray:
    """Gradient magnitude similarity deviation (Xue et al., IEEE TIP 2014); 0 = identical, larger = worse.

    Per 2D slice: intensities are multiplied by ``255 / data_range``; the images are averaged over 2x2
    blocks and downsampled by 2; gradient magnitudes ``m`` come from the Prewitt filters
    ``[[1, 0, -1]] * 3 / 3`` and their transpose; ``GMS = (2 m_p m_t + c) / (m_p^2 + m_t^2 + c)`` with
    ``c = 170``; GMSD is the population standard deviation (ddof=0) of the GMS map, pooled over all slices.
    Borders (an odd last row/column before downsampling, and the Prewitt border) use edge replication
    where the reference MATLAB code zero-pads, so the score does not depend on an intensity offset.

    With a mask the standard deviation is taken over the downsampled mask: a downsampled pixel is
    inside when any voxel of its 2x2 block is, so a small lesion is never lost.

    Args:
        pred, target: images, see the module docstring for shapes.
        data_range: width of the intensity range (required, > 0).
        mask: optional region.
    """
    p, t, batched = _prepare(pred, target, data_range)
    m = _prepare_mask(mask, p.shape, batched, p.device)
    g, md = _gms_and_mask(p, t, float(data_range), m)
    return _finish(_masked_std(g, md), batched)
