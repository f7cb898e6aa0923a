"""Numeric tests of common.metrics: skimage cross-checks, hand-computed arrays, known values."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.metrics import (
    LPIPS,
    FIDScore,
    LPIPSLoss,
    curve_spearman,
    dtw_distance,
    enhancement_error,
    enhancement_errors,
    format_table,
    gms_map,
    gmsd,
    kinetic_curve,
    lpips_state_dict_keys,
    mae,
    mean_in_mask,
    metric_names,
    paired_wilcoxon,
    psnr,
    read_case_csv,
    ssim,
    ssim_map,
    summarize,
    write_case_csv,
    write_summary,
)
from common.metrics.perceptual import VGG16_CONV_INDICES, _vgg16_features

SK = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    x = ndi.gaussian_filter(rng.random((48, 40)), 2) * 3 + 0.2 * rng.random((48, 40))
    y = x + 0.05 * rng.standard_normal(x.shape)
    return x, y


# ----------------------------------------------------------------------------------------------- image


def test_psnr_matches_skimage(pair):
    x, y = pair
    for dr in (1.0, 3.5):
        assert psnr(y, x, dr) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=dr), abs=1e-9)
    assert psnr(torch.as_tensor(y), torch.as_tensor(x), 2.0) == pytest.approx(
        peak_signal_noise_ratio(x, y, data_range=2.0), abs=1e-9
    )
    assert psnr(x, x, 1.0) == math.inf


def test_psnr_masked_hand_and_ignores_outside():
    t = np.array([[0.0, 1.0], [2.0, 3.0]])
    p = np.array([[1.0, 1.0], [0.0, 3.5]])
    m = np.array([[1, 0], [1, 1]])
    mse = (1.0 + 4.0 + 0.25) / 3
    assert psnr(p, t, 4.0, mask=m) == pytest.approx(10 * np.log10(16.0 / mse), abs=1e-12)
    p2 = p.copy()
    p2[0, 1] = 100.0  # outside the mask
    assert psnr(p2, t, 4.0, mask=m) == psnr(p, t, 4.0, mask=m)
    assert psnr(p, t, 4.0, mask=np.ones((2, 2))) == pytest.approx(psnr(p, t, 4.0), abs=1e-12)


def test_data_range_is_required():
    x = np.zeros((12, 12))
    with pytest.raises(TypeError):
        psnr(x, x)  # type: ignore[call-arg]
    for bad in (None, 0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="data_range"):
            ssim(x, x, bad)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:5], 1.0)


def test_mae_hand():
    t = np.array([[0.0, 1.0], [2.0, 3.0]])
    p = np.array([[1.0, 1.0], [0.0, 3.0]])
    assert mae(p, t) == pytest.approx(0.75)
    assert mae(p, t, data_range=3.0) == pytest.approx(0.25)
    assert mae(p, t, mask=[[0, 0], [1, 1]]) == pytest.approx(1.0)
    p2 = p.copy()
    p2[0, 0] = -50
    assert mae(p2, t, mask=[[0, 0], [1, 1]]) == pytest.approx(1.0)


def test_ssim_matches_skimage(pair):
    x, y = pair
    for dr in (1.0, 4.0):
        ref = structural_similarity(x, y, data_range=dr, **SK)
        assert ssim(y, x, dr) == pytest.approx(ref, abs=1e-9)
    # raw MR-like intensities stay accurate (float64 moments)
    ref = structural_similarity(1000 * x, 1000 * y, data_range=4000.0, **SK)
    assert ssim(1000 * y, 1000 * x, 4000.0) == pytest.approx(ref, abs=1e-9)
    assert ssim(x, x, 1.0) == pytest.approx(1.0, abs=1e-12)
    # and MONAI's SSIMMetric (float32) agrees
    monai_ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5)
    assert float(monai_ssim(torch.as_tensor(y)[None, None], torch.as_tensor(x)[None, None])) == pytest.approx(
        ssim(y, x, 1.0), abs=1e-4
    )


def test_ssim_map_and_masked_ssim_match_skimage_full_map(pair):
    x, y = pair
    _, smap = structural_similarity(x, y, data_range=2.0, full=True, **SK)
    ours = ssim_map(y, x, 2.0).numpy()
    assert ours.shape == x.shape
    np.testing.assert_allclose(ours, smap, atol=1e-10)
    m = np.zeros_like(x)
    m[0:9, 25:40] = 1  # touches the border: uses the symmetric-padded map there
    m[20:30, 10:20] = 1
    assert ssim(y, x, 2.0, mask=m) == pytest.approx(smap[m > 0].mean(), abs=1e-10)


def test_masked_ssim_gmsd_ignore_pixels_beyond_window(pair):
    x, y = pair
    m = np.zeros_like(x)
    m[15:30, 12:26] = 1
    y2 = y.copy()
    y2[:5, :] = 7.0  # > 5 px (SSIM radius) and > 4 px (GMSD reach) from the mask
    y2[40:, :] = -3.0
    y2[:, 34:] = 0.0
    assert ssim(y2, x, 2.0, mask=m) == pytest.approx(ssim(y, x, 2.0, mask=m), abs=1e-9)
    assert gmsd(y2, x, 2.0, mask=m) == pytest.approx(gmsd(y, x, 2.0, mask=m), abs=1e-12)
    assert ssim(y2, x, 2.0) != pytest.approx(ssim(y, x, 2.0), abs=1e-3)


def test_volume_is_per_slice_2d_pooled(pair):
    x, y = pair
    xv = np.stack([x, x[::-1], 2 * x], axis=-1)
    yv = np.stack([y, y[::-1], 2 * y], axis=-1)
    maps = [structural_similarity(xv[..., k], yv[..., k], data_range=2.0, full=True, **SK)[1] for k in range(3)]
    assert ssim(yv, xv, 2.0) == pytest.approx(np.mean([mp[5:-5, 5:-5].mean() for mp in maps]), abs=1e-10)
    m = np.zeros(xv.shape)
    m[10:20, 10:30, 0] = 1
    m[5:9, 5:9, 2] = 1
    full = np.stack(maps, -1)
    assert ssim(yv, xv, 2.0, mask=m) == pytest.approx(full[m > 0].mean(), abs=1e-10)
    # PSNR over the volume = MSE over all voxels
    assert psnr(yv, xv, 2.0) == pytest.approx(peak_signal_noise_ratio(xv, yv, data_range=2.0), abs=1e-9)


def test_batched_shapes_and_mask_broadcast(pair):
    x, y = pair
    xb = torch.as_tensor(np.stack([x, 0.5 * x])[:, None])  # (2, 1, H, W)
    yb = torch.as_tensor(np.stack([y, 0.5 * y])[:, None])
    out = psnr(yb, xb, 2.0)
    assert out.shape == (2,)
    assert out[0] == pytest.approx(psnr(y, x, 2.0))
    assert out[1] == pytest.approx(psnr(0.5 * y, 0.5 * x, 2.0))
    s = ssim(yb, xb, 2.0)
    assert s[1] == pytest.approx(ssim(0.5 * y, 0.5 * x, 2.0), abs=1e-7)
    m = np.zeros_like(x)
    m[10:20, 10:20] = 1
    np.testing.assert_allclose(mae(yb, xb, mask=m), [mae(y, x, mask=m), mae(0.5 * y, 0.5 * x, mask=m)])
    np.testing.assert_allclose(
        gmsd(yb, xb, 2.0, mask=m[None, None]), [gmsd(y, x, 2.0, mask=m), gmsd(0.5 * y, 0.5 * x, 2.0, mask=m)]
    )
    assert np.isnan(psnr(y, x, 2.0, mask=np.zeros_like(x)))


def test_gmsd_hand_computed():
    a = np.zeros((4, 8))
    a[:, 4:] = 255.0
    # downsampled rows [0, 0, 255, 255]; Prewitt magnitudes [0, 255, 255, 0] vs 0 everywhere:
    # GMS is 1 on half the map and c / (255^2 + c) on the other half -> std = (1 - g) / 2
    g = 170.0 / (255.0**2 + 170.0)
    assert gmsd(a, np.zeros_like(a), 255.0) == pytest.approx((1 - g) / 2, abs=1e-12)
    np.testing.assert_allclose(gms_map(a, np.zeros_like(a), 255.0), [[1, g, g, 1]] * 2, atol=1e-12)
    assert gmsd(a, a, 255.0) == 0.0
    # offset-invariant (edge replication instead of zero padding)
    assert gmsd(a + 40, np.zeros_like(a) + 40, 255.0) == pytest.approx((1 - g) / 2, abs=1e-12)


def test_gmsd_independent_scipy(pair):
    x, y = pair
    dr = 3.0

    def gm(img):
        img = img * 255.0 / dr
        ds = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2).mean(axis=(1, 3))
        return np.hypot(ndi.prewitt(ds, axis=0, mode="nearest"), ndi.prewitt(ds, axis=1, mode="nearest")) / 3.0

    gx, gy = gm(x), gm(y)
    gms = (2 * gx * gy + 170.0) / (gx**2 + gy**2 + 170.0)
    assert gmsd(y, x, dr) == pytest.approx(gms.std(), abs=1e-12)
    assert gmsd(x, x, dr) == 0.0
    m = np.zeros_like(x)
    m[9:20, 5:16] = 1  # odd edges: any voxel of a 2x2 block puts the block inside
    md = m.reshape(24, 2, 20, 2).max(axis=(1, 3)) > 0
    assert gmsd(y, x, dr, mask=m) == pytest.approx(gms[md].std(), abs=1e-12)


# --------------------------------------------------------------------------------------------- kinetic


def test_enhancement_error_hand():
    t = np.array([[1.0, 2.0], [3.0, 10.0]])
    p = np.array([[2.0, 2.0], [5.0, 0.0]])
    m = np.array([[1, 1], [1, 0]])
    assert mean_in_mask(t, m) == pytest.approx(2.0)
    assert enhancement_error(p, t, m) == pytest.approx((3.0 - 2.0) ** 2)
    labels = np.array([[1, 1], [2, 0]])
    assert enhancement_errors(p, t, labels) == pytest.approx({1: 0.5**2, 2: 2.0**2})
    assert enhancement_errors(p, t, [labels == 2]) == pytest.approx({1: 4.0})


def test_kinetic_curve_spearman_dtw():
    series = np.stack([np.full((3, 3), v) for v in (1.0, 5.0, 4.0)])
    series[1, 0, 0] = 100.0  # outside the mask
    m = np.zeros((3, 3))
    m[1:, 1:] = 1
    np.testing.assert_allclose(kinetic_curve(series, m), [1.0, 5.0, 4.0])
    np.testing.assert_allclose(kinetic_curve(np.moveaxis(series, 0, -1), m, time_axis=-1), [1.0, 5.0, 4.0])
    # ranks of b: 1, 2, 3.5, 5, 3.5 -> rho = 8 / sqrt(10 * 9.5)
    assert curve_spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert curve_spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(curve_spearman([1, 1, 1], [1, 2, 3]))
    assert dtw_distance([0, 1, 2], [0, 2]) == 1.0
    assert dtw_distance([1, 3], [2]) == 2.0
    assert dtw_distance([0, 0, 1], [0, 1, 1]) == 0.0
    x = np.array([0.3, 2.0, 1.5, 0.2])
    assert dtw_distance(x, x) == 0.0
    assert dtw_distance(x, x[::-1]) == dtw_distance(x[::-1], x)


# ----------------------------------------------------------------------------------------------- stats


def test_case_csv_union_header_and_roundtrip(tmp_path):
    rows = [
        {"case": "0001", "psnr": 30.5, "ssim": np.float32(0.5)},
        {"case": "0002", "psnr": 28.0, "note": "x", "gmsd": 0.1},
    ]
    p = write_case_csv(rows, tmp_path / "cases.csv")
    with open(p) as f:
        table = list(csv.reader(f))
    assert table[0] == ["case", "psnr", "ssim", "note", "gmsd"]
    assert table[1] == ["0001", "30.5", "0.5", "", ""]
    assert table[2] == ["0002", "28.0", "", "x", "0.1"]
    back = read_case_csv(p)
    assert back[0] == {"case": "0001", "psnr": 30.5, "ssim": 0.5}
    assert metric_names(back) == ["psnr", "ssim", "gmsd"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_summarize_and_write(tmp_path):
    rows = [{"case": i, "a": v, "b": 1.0} for i, v in enumerate([1.0, 2.0, 3.0, 4.0])] + [
        {"case": 9, "a": float("nan")}
    ]
    s = summarize(rows)
    assert s["a"]["mean"] == pytest.approx(2.5)
    assert s["a"]["std"] == pytest.approx(math.sqrt(5 / 3))
    assert s["a"]["n"] == 4
    assert s["b"] == {"mean": 1.0, "std": 0.0, "n": 4}
    write_summary(s, tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "metric,mean,std,n"
    assert lines[1] == f"a,2.5,{math.sqrt(5 / 3)!r},4"
    write_summary(s, tmp_path / "s.md")
    md = (tmp_path / "s.md").read_text().splitlines()
    assert md[0] == "| metric | mean ± std | n |"
    assert md[2] == "| a | 2.5 ± 1.291 | 4 |"


def test_paired_wilcoxon_known_values():
    b = [{"case": f"c{i}", "psnr": 20.0, "ssim": 0.5} for i in range(5)]
    a = [
        {"case": f"c{i}", "psnr": 20.0 + d, "ssim": 0.5 + e}
        for i, (d, e) in enumerate(zip([1, 2, 3, 4, 5], [0.1, -0.2, 0.3, 0.4, 0.5]))
    ]
    a = a[::-1]  # pairing is by case, not by order
    r = paired_wilcoxon(a, b)
    assert r["psnr"]["statistic"] == 0.0
    assert r["psnr"]["pvalue"] == pytest.approx(2 / 32)  # exact: all 5 differences positive
    assert r["ssim"]["statistic"] == 2.0
    assert r["ssim"]["pvalue"] == pytest.approx(6 / 32)  # rank sums <= 2: {}, {1}, {2}, both tails
    assert r["psnr"]["n"] == 5 and r["psnr"]["median_diff"] == pytest.approx(3.0)
    same = paired_wilcoxon(b, b)
    assert math.isnan(same["psnr"]["pvalue"])


def test_format_table():
    t = format_table([{"method": "model", "psnr": 31.23456, "n": 3}, {"method": "baseline", "psnr": 25.0}])
    assert t.splitlines() == [
        "| method | psnr | n |",
        "|---|---|---|",
        "| model | 31.23 | 3 |",
        "| baseline | 25 |  |",
    ]


# ------------------------------------------------------------------------------------------ perceptual


def _random_lpips_state_dict(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    sd = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    for k, c in enumerate((64, 128, 256, 512, 512)):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1) / c
    return sd


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.pth"
    torch.save(_random_lpips_state_dict(), path)
    return path


def _reference_lpips(sd: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent functional LPIPS from the raw state dict."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h = [(t.repeat(1, 3, 1, 1) - shift) / scale for t in (x, y)]
    blocks = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]
    total = torch.zeros(x.shape[0])
    for k, convs in enumerate(blocks):
        for j in range(2):
            if k > 0:
                h[j] = F.max_pool2d(h[j], 2)
            for i in convs:
                h[j] = F.relu(F.conv2d(h[j], sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        f = [t / (t.norm(dim=1, keepdim=True) + 1e-10) for t in h]
        total += ((f[0] - f[1]) ** 2 * sd[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "lpips_vgg16.pth"
    with pytest.raises(FileNotFoundError, match="lpips_vgg16.pth") as e:
        LPIPS(missing)
    assert "torchvision" in str(e.value)
    with pytest.raises(FileNotFoundError, match="extractor.pt"):
        FIDScore(tmp_path / "extractor.pt")


def test_lpips_values(lpips_file):
    torch.manual_seed(1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    net = LPIPS(lpips_file)
    d = net(x, y)
    assert d.shape == (2,)
    assert torch.all(d > 0)
    assert torch.all(net(x, x) == 0)
    ref = _reference_lpips(torch.load(lpips_file, weights_only=True), x, y)
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-7)
    # data_range (0, 10): same distance after mapping to [-1, 1]
    net.data_range = (0.0, 10.0)
    torch.testing.assert_close(net((x + 1) * 5, (y + 1) * 5), d, rtol=1e-4, atol=1e-6)
    net.data_range = 10.0  # [0, 10]
    torch.testing.assert_close(net((x + 1) * 5, (y + 1) * 5), d, rtol=1e-4, atol=1e-6)
    net.train()
    assert not net.training  # dropout stays off


def test_lpips_bad_keys(tmp_path, lpips_file):
    sd = torch.load(lpips_file, weights_only=True)
    del sd["lin3.model.1.weight"]
    sd["net.slice1.0.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(
        ValueError, match=r"missing keys \['lin3.model.1.weight'\].*unexpected keys \['net.slice1.0.weight'\]"
    ):
        LPIPS(bad)
    sd = torch.load(lpips_file, weights_only=True)
    sd["lin0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="wrong shapes"):
        LPIPS(bad)
    assert len(lpips_state_dict_keys()) == 2 * len(VGG16_CONV_INDICES) + 5 == 31


def _random_alex_lpips_state_dict(seed: int = 0) -> dict:
    """torchvision AlexNet ``features`` shapes (conv i: out, in, k) + LPIPS heads, random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (co, ci, k) in zip(
        (0, 3, 6, 8, 10), ((64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3), (256, 256, 3))
    ):
        sd[f"features.{i}.weight"] = torch.randn(co, ci, k, k, generator=g) * (2.0 / (ci * k * k)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.01
    for k, c in enumerate((64, 192, 384, 256, 256)):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g) / c
    return sd


def _reference_alex_lpips(sd: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent functional LPIPS-AlexNet: conv(11, stride 4, pad 2) relu | pool conv(5, pad 2) relu |
    pool conv(3) relu | conv(3) relu | conv(3) relu, a tap after each relu."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    total = torch.zeros(x.shape[0])
    hs = [(t.repeat(1, 3, 1, 1) - shift) / scale for t in (x, y)]
    steps = [(0, 4, 2, False), (3, 1, 2, True), (6, 1, 1, True), (8, 1, 1, False), (10, 1, 1, False)]
    for k, (i, stride, pad, pool) in enumerate(steps):
        for j in range(2):
            h = F.max_pool2d(hs[j], 3, 2) if pool else hs[j]
            hs[j] = F.relu(
                F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], stride=stride, padding=pad)
            )
        f = [t / (t.norm(dim=1, keepdim=True) + 1e-10) for t in hs]
        total += ((f[0] - f[1]) ** 2 * sd[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_alexnet_trunk_read_off_the_file(tmp_path, lpips_file):
    """Res-SRDiff's released code scores LPIPS with AlexNet: a file holding torchvision's AlexNet
    features is recognised (15 tensors) and gives the closed-form distance."""
    sd = _random_alex_lpips_state_dict()
    assert sorted(sd) == sorted(lpips_state_dict_keys("alex")) and len(sd) == 15
    path = tmp_path / "lpips_alex.pth"
    torch.save(sd, path)
    torch.manual_seed(4)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    net = LPIPS(path)
    assert net.trunk == "alex" and LPIPS(lpips_file).trunk == "vgg"
    d = net(x, y)
    assert torch.all(d > 0) and torch.all(net(x, x) == 0)
    torch.testing.assert_close(d, _reference_alex_lpips(sd, x, y), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="alex trunk, but net='vgg'"):
        LPIPS(path, net="vgg")
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS(path, net="squeeze")
    del sd["features.8.bias"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"not an LPIPS alex state dict; missing keys \['features.8.bias'\]"):
        LPIPS(path)


def test_lpips_loss(lpips_file):
    torch.manual_seed(2)
    x = (torch.rand(2, 1, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 1, 32, 32) * 2 - 1
    loss_fn = LPIPSLoss(lpips_file, l2_weight=0.5)
    loss = loss_fn(x, y)
    expected = 0.5 * F.mse_loss(x, y) + loss_fn.lpips(x, y).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss_fn.parameters())


def test_fid_equals_monai_on_features(tmp_path):
    from monai.metrics import FIDMetric

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4))
    path = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    a = torch.rand(64, 1, 8, 8)
    b = torch.rand(48, 1, 8, 8) ** 2
    fid = FIDScore(path, batch_size=20)
    with torch.no_grad():
        fa, fb = net(a.repeat(1, 3, 1, 1)).double(), net(b.repeat(1, 3, 1, 1)).double()
    torch.testing.assert_close(fid.features(a), fa)
    expected = float(FIDMetric()(fa, fb))
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)
    assert expected > 1e-4
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_mean_of_draws_and_first_draw_scored_apart(tmp_path):
    """With num_samples > 1 the model row scores the mean of the draws and a ``_first_draw`` row the
    first draw alone (``pred_first``), next to the baselines."""
    from types import SimpleNamespace

    from common.handlers import SynthesisMetrics, score_case

    rng = np.random.default_rng(1)
    target = rng.random((2, 12, 12, 2)).astype(np.float32)
    mean, first = target + 0.01, target + 0.2 * rng.standard_normal(target.shape).astype(np.float32)
    copy = np.repeat(target[:1] * 0.5, 2, axis=0)
    engine = SimpleNamespace(
        state=SimpleNamespace(
            batch=[{"id": "c0", "baseline_copy_pre": torch.as_tensor(copy)}],
            output=[
                {"pred": torch.as_tensor(mean), "pred_first": torch.as_tensor(first), "label": torch.as_tensor(target)}
            ],
        )
    )
    h = SynthesisMetrics(tmp_path, ["early", "late"], baselines=["copy_pre"], mask_keys=[], method="m")
    h.on_iteration(engine)
    by = {(r["method"], r["phase"]): r["psnr"] for r in h.rows if r["region"] == "whole"}
    names = ["early", "late"]
    expect = {
        name: {r["phase"]: r["psnr"] for r in score_case(x, target, {}, names) if r["region"] == "whole"}
        for name, x in (("m", mean), ("m_first_draw", first), ("copy_pre", copy))
    }
    assert by == {(m, p): expect[m][p] for m in expect for p in names}
    assert by[("m", "early")] > by[("m_first_draw", "early")] > by[("copy_pre", "early")]


def test_lpips_in_evaluation(tmp_path, lpips_file):
    """``--metrics [..., lpips] --lpips_weights FILE``: the whole-image LPIPS of each phase is the
    mean over axial slices of the LPIPS distance of the normalised images; without weights, one
    clear error."""
    from types import SimpleNamespace

    from common.handlers import SynthesisMetrics
    from common.handlers.metrics import target_range
    from common.metrics.perceptual import LPIPS

    rng = np.random.default_rng(2)
    target = rng.random((1, 16, 16, 3)).astype(np.float32) * 100
    pred = target + 5 * rng.standard_normal(target.shape).astype(np.float32)
    engine = SimpleNamespace(
        state=SimpleNamespace(
            batch=[{"id": "c0"}], output=[{"pred": torch.as_tensor(pred), "label": torch.as_tensor(target)}]
        )
    )
    h = SynthesisMetrics(
        tmp_path, ["hr"], mask_keys=[], method="m", metrics=["psnr", "lpips"], lpips_weights=lpips_file
    )
    h.on_iteration(engine)
    lo, scale = target_range(target)
    net = LPIPS(lpips_file, data_range=1.0)
    slices = [
        float(
            net(
                torch.as_tensor((pred[0, ..., k] - lo) / scale)[None, None],
                torch.as_tensor((target[0, ..., k] - lo) / scale)[None, None],
            )
        )
        for k in range(3)
    ]
    (row,) = h.rows
    assert row["region"] == "whole" and abs(row["lpips"] - np.mean(slices)) < 1e-6 and row["lpips"] > 0
    h.on_completed(engine)
    assert "lpips" in (tmp_path / "summary.md").read_text()
    with pytest.raises(
        ValueError, match=r"--metrics lists lpips, which needs pretrained weights: pass --lpips_weights"
    ):
        SynthesisMetrics(tmp_path, ["hr"], metrics=["lpips"])
