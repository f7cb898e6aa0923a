"""Numeric tests of common.transforms: hand-computed arrays, exact inverses, affine bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Compose, Invertd

from common.transforms import (
    CropAroundMaskd,
    InverseScalePercentilesd,
    InverseTINormd,
    ScalePercentilesd,
    TINormd,
    box_start,
    crop_or_pad,
    invert_scaling,
    invert_tinorm,
    mask_centroid,
)

OBLIQUE = np.array([[0.0, -0.8, 0.1, 10.0], [0.9, 0.0, 0.05, -20.0], [0.0, 0.2, 3.0, 5.0], [0, 0, 0, 1]])


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ------------------------------------------------------------------------------------------ percentiles


def test_scale_percentiles_hand():
    x = np.arange(101, dtype=np.float32)[None]  # (1, 101): p10 = 10, p90 = 90
    out = ScalePercentilesd("img", lower=10, upper=90)({"img": x})
    np.testing.assert_allclose(_np(out["img"]), (x - 10) / 80 * 2 - 1, atol=1e-6)
    s = out["img_scaling"]
    assert s["a_min"].tolist() == [10.0] and s["a_max"].tolist() == [90.0]
    assert s["b_min"].tolist() == [-1.0] and s["b_max"].tolist() == [1.0]
    clipped = ScalePercentilesd("img", lower=10, upper=90, b_min=0, b_max=1, clip=True)({"img": x})["img"]
    assert float(clipped.min()) == 0.0 and float(clipped.max()) == 1.0
    assert float(clipped[0, 50]) == pytest.approx(0.5)


def test_scale_percentiles_joint_vs_separate():
    a = np.arange(0, 51, dtype=np.float32)[None]
    b = np.arange(51, 101, dtype=np.float32)[None]  # together: arange(101)
    joint = ScalePercentilesd(["a", "b"], lower=10, upper=90, joint=True)({"a": a, "b": b})
    for k, x in (("a", a), ("b", b)):
        assert joint[f"{k}_scaling"]["a_min"].tolist() == [10.0]
        assert joint[f"{k}_scaling"]["a_max"].tolist() == [90.0]
        np.testing.assert_allclose(_np(joint[k]), (x - 10) / 40 - 1, atol=1e-6)
    sep = ScalePercentilesd(["a", "b"], lower=10, upper=90)({"a": a, "b": b})
    assert sep["a_scaling"]["a_min"].tolist() == [5.0] and sep["a_scaling"]["a_max"].tolist() == [45.0]
    assert sep["b_scaling"]["a_min"].tolist() == [pytest.approx(55.9)]
    with pytest.raises(ValueError, match="joint"):
        ScalePercentilesd(["a"], joint=True, channel_wise=True)


def test_scale_percentiles_mask_and_channel_wise():
    x = np.zeros((2, 4, 4), dtype=np.float32)
    x[0] = np.arange(16).reshape(4, 4)
    x[1] = 10 * np.arange(16).reshape(4, 4)
    m = np.zeros((1, 4, 4))
    m[0, 1:3, 1:3] = 1  # values 5, 6, 9, 10 (channel 0)
    out = ScalePercentilesd("x", lower=0, upper=100, b_min=0, b_max=1, mask_key="m", channel_wise=True)(
        {"x": x, "m": m}
    )
    assert out["x_scaling"]["a_min"].tolist() == [5.0, 50.0]
    assert out["x_scaling"]["a_max"].tolist() == [10.0, 100.0]
    np.testing.assert_allclose(_np(out["x"])[0], (x[0] - 5) / 5, atol=1e-6)
    np.testing.assert_allclose(_np(out["x"])[1], (x[1] - 50) / 50, atol=1e-6)
    # voxels outside the mask do not move the percentiles
    x2 = x.copy()
    x2[:, 0, 0] = 1e6
    out2 = ScalePercentilesd("x", lower=0, upper=100, mask_key="m", channel_wise=True)({"x": x2, "m": m})
    assert out2["x_scaling"]["a_max"].tolist() == [10.0, 100.0]
    with pytest.raises(ValueError, match="empty"):
        ScalePercentilesd("x", mask_key="m")({"x": x, "m": np.zeros_like(m)})


def test_invert_scaling_function():
    assert invert_scaling(0.0, 10.0, 90.0, -1.0, 1.0) == pytest.approx(50.0)
    np.testing.assert_allclose(invert_scaling(np.array([-1.0, 1.0]), 10.0, 90.0, -1.0, 1.0), [10.0, 90.0])
    t = invert_scaling(torch.tensor([0.5], dtype=torch.float32), 2.0, 2.0, -1.0, 1.0)  # degenerate: x - b_min + a_min
    assert t.dtype == torch.float32 and float(t) == pytest.approx(3.5)


def test_scale_percentiles_inverse_trace_key_and_invertd():
    rng = np.random.default_rng(0)
    a = (rng.random((1, 8, 8, 4)) * 300).astype(np.float32)
    b = (rng.random((1, 8, 8, 4)) * 900).astype(np.float32)
    t = ScalePercentilesd(["a", "b"], joint=True)
    out = t({"a": MetaTensor(a), "b": MetaTensor(b)})
    inv = t.inverse(out)  # from the MetaTensor trace
    np.testing.assert_allclose(_np(inv["a"]), a, rtol=1e-6, atol=1e-4)
    assert inv["a"].applied_operations == []
    # plain tensors (no trace): from the stored scaling entry
    plain = {k: (v.as_tensor() if isinstance(v, MetaTensor) else v) for k, v in t({"a": a, "b": b}).items()}
    np.testing.assert_allclose(_np(t.inverse(plain)["b"]), b, rtol=1e-6, atol=1e-4)
    # Invertd on a "prediction" key that copied the trace of "a"
    out = Compose([t])({"a": MetaTensor(a), "b": MetaTensor(b)})
    out["pred"] = out["a"].clone()
    res = Invertd(keys="pred", transform=Compose([t]), orig_keys="a")(out)
    np.testing.assert_allclose(_np(res["pred"]), a, rtol=1e-6, atol=1e-4)


def test_inverse_scale_on_collated_batch_and_decollated():
    x1 = np.arange(101, dtype=np.float32).reshape(1, 101)
    x2 = 3 * x1 + 7
    t = ScalePercentilesd("img", lower=10, upper=90)
    batch = list_data_collate([t({"img": x1}), t({"img": x2})])
    assert tuple(batch["img_scaling"]["a_min"].shape) == (2, 1)
    pred = torch.zeros(2, 1, 3)  # b-range centre -> each sample's (a_min + a_max) / 2
    res = InverseScalePercentilesd("pred", "img_scaling")({"pred": pred, "img_scaling": batch["img_scaling"]})
    np.testing.assert_allclose(_np(res["pred"])[:, 0, 0], [50.0, 157.0], atol=1e-5)
    items = decollate_batch({"pred": pred, "img_scaling": batch["img_scaling"]})
    one = InverseScalePercentilesd("pred", "img_scaling")(items[1])
    np.testing.assert_allclose(_np(one["pred"]), np.full((1, 3), 157.0), atol=1e-5)
    with pytest.raises(KeyError, match="nope"):
        InverseScalePercentilesd("pred", "nope")({"pred": pred})


# ---------------------------------------------------------------------------------------------- TI-norm


def test_tinorm_hand_and_inverse():
    s = np.stack([np.full((2, 2), 1.0), np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[2.0, 4.0], [6.0, 8.0]])]).astype(
        np.float32
    )
    mean, std = 2.5, np.sqrt(1.25)
    t = TINormd("s")
    out = t({"s": MetaTensor(s)})
    np.testing.assert_allclose(_np(out["s"]), (s - mean) / std, atol=1e-6)
    assert out["s_tinorm"]["mean"].tolist() == [2.5]
    assert out["s_tinorm"]["std"].tolist() == [pytest.approx(std)]
    np.testing.assert_allclose(_np(t.inverse(out)["s"]), s, atol=1e-6)
    # masked: reference statistics over the mask voxels 2 and 4 -> mean 3, std 1
    m = np.array([[0, 1], [0, 1]])
    outm = TINormd("s", mask_key="m")({"s": s, "m": m})
    np.testing.assert_allclose(_np(outm["s"]), s - 3.0, atol=1e-6)
    # batch of predictions, no trace
    batch = list_data_collate([t({"s": s}), t({"s": 2 * s})])
    pred = torch.zeros(2, 1, 2, 2)
    inv = InverseTINormd("pred", "s_tinorm")({"pred": pred, "s_tinorm": batch["s_tinorm"]})
    np.testing.assert_allclose(_np(inv["pred"])[:, 0, 0, 0], [2.5, 5.0], atol=1e-6)
    assert invert_tinorm(np.array([1.0]), 2.0, 3.0)[0] == 5.0
    with pytest.raises(ValueError, match="zero standard deviation"):
        TINormd("s", ref_index=0)({"s": s})


# ------------------------------------------------------------------------------------------------- crop


def test_box_start_and_centroid():
    assert box_start([4.5], [4]).tolist() == [3]  # n = 10, centre voxel 5, box 3..6
    assert box_start([4.0, 2.0], [5, 4]).tolist() == [2, 0]
    m = np.zeros((3, 5, 7))
    m[0, 0, 0] = m[2, 4, 6] = 1
    np.testing.assert_array_equal(mask_centroid(m), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        mask_centroid(np.zeros((2, 2)))


def test_crop_or_pad_hand_and_world_coordinates():
    a = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    aff = np.array([[0.5, 0, 0, -10.0], [0, 0.25, 0, 4.0], [0, 0, 2.0, 1.5], [0, 0, 0, 1]])
    out, new = crop_or_pad(a, aff, (3, 3, 3))  # centre (1.5, 2, 1) -> voxel (2, 2, 1) -> start (1, 1, 0)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, a[1:4, 1:4, 0:3])
    # padding: centre at the corner
    out, new = crop_or_pad(a, aff, (3, 3, 2), center_vox=(0, 0, 0), pad_value=-1)
    exp = np.full((3, 3, 2), -1, dtype=np.int16)
    exp[1:, 1:, 1:] = a[0:2, 0:2, 0:1]
    np.testing.assert_array_equal(out, exp)
    start = np.array([-1, -1, -1])
    for ijk in np.ndindex(*out.shape):  # dyadic affine: world coordinates equal exactly
        np.testing.assert_array_equal(new @ [*ijk, 1], aff @ [*(np.array(ijk) + start), 1])
    # oblique affine, extra (time) axis, box larger than the image
    rng = np.random.default_rng(0)
    v = rng.random((6, 7, 5, 2)).astype(np.float32)
    out, new = crop_or_pad(v, OBLIQUE, (8, 4, 9), center_vox=(4.2, 3.7, 2.0))
    start = box_start((4.2, 3.7, 2.0), (8, 4, 9))
    assert start.tolist() == [0, 2, -2] and out.shape == (8, 4, 9, 2)
    np.testing.assert_array_equal(out[:6, :, 2:7], v[0:6, 2:6, 0:5])
    assert np.all(out[6:] == 0) and np.all(out[:, :, :2] == 0)
    ijk = np.array([[0, 0, 0], [7, 3, 8], [2, 1, 5]])
    np.testing.assert_allclose(
        (new @ np.c_[ijk, np.ones(3)].T).T, (OBLIQUE @ np.c_[ijk + start, np.ones(3)].T).T, atol=1e-12
    )


def _world(aff, ijk):
    return (np.asarray(aff, dtype=np.float64) @ np.array([*ijk, 1.0]))[:3]


def test_crop_around_mask_metatensor_affine_and_values():
    x = np.arange(6 * 7 * 5, dtype=np.float32).reshape(1, 6, 7, 5)
    m = np.zeros((1, 6, 7, 5), dtype=np.float32)
    m[0, 0, 1, 4] = 1  # centroid (0, 1, 4) -> box start (-2, 0, 2) for roi (4, 3, 4)
    t = CropAroundMaskd(["img", "m"], roi_size=(4, 3, 4), mask_key="m")
    out = t(
        {
            "img": MetaTensor(torch.as_tensor(x), affine=torch.as_tensor(OBLIQUE)),
            "m": MetaTensor(torch.as_tensor(m), affine=torch.as_tensor(OBLIQUE)),
        }
    )
    img = out["img"]
    assert tuple(img.shape) == (1, 4, 3, 4)
    np.testing.assert_allclose(_world(img.affine, (0, 0, 0)), _world(OBLIQUE, (-2, 0, 2)), atol=1e-12)
    np.testing.assert_allclose(_world(img.affine, (3, 2, 3)), _world(OBLIQUE, (1, 2, 5)), atol=1e-12)
    exp = np.zeros((1, 4, 3, 4), dtype=np.float32)
    exp[:, 2:, :, :3] = x[:, 0:2, 0:3, 2:5]
    np.testing.assert_array_equal(_np(img), exp)
    assert float(out["m"].sum()) == 1.0 and float(out["m"][0, 2, 1, 2]) == 1.0
    # same box as the plain function
    ref, ref_aff = crop_or_pad(x[0], OBLIQUE, (4, 3, 4), center_vox=mask_centroid(m[0]))
    np.testing.assert_array_equal(_np(img)[0], ref)
    np.testing.assert_allclose(np.asarray(img.affine), ref_aff, atol=1e-12)
    # inverse: back on the original grid, outside the box -> 0
    inv = t.inverse(out)["img"]
    assert tuple(inv.shape) == (1, 6, 7, 5)
    np.testing.assert_allclose(np.asarray(inv.affine), OBLIQUE, atol=1e-12)
    back = np.zeros_like(x)
    back[:, 0:2, 0:3, 2:5] = x[:, 0:2, 0:3, 2:5]
    np.testing.assert_array_equal(_np(inv), back)
    assert inv.applied_operations == []


def test_crop_around_mask_centre_and_full_dims():
    x = np.arange(1 * 10 * 9 * 4, dtype=np.float32).reshape(1, 10, 9, 4)
    out = CropAroundMaskd("img", roi_size=(4, 5, -1))({"img": x})["img"]  # centre voxel (5, 4, 2)
    np.testing.assert_array_equal(_np(out), x[:, 3:7, 2:7, :])
    with pytest.raises(ValueError, match="roi_size"):
        CropAroundMaskd("img", roi_size=(4, 5))({"img": x})


def test_rand_crop_samples_near_label():
    """Without a label the crops are MONAI's RandSpatialCropSamplesd's (same seed, same crops); with
    ``pos=1, neg=0`` every crop's centre voxel lies in the label; the label is not in the outputs."""
    from monai.transforms import RandSpatialCropSamplesd

    from common.transforms import RandCropSamplesNearLabeld

    img = torch.arange(2 * 40 * 36 * 8, dtype=torch.float32).reshape(2, 40, 36, 8)
    lab = -img
    mask = torch.zeros(1, 40, 36, 8)
    mask[0, 30:33, 4:7, 5] = 1  # 9 voxels on slice 5, near a corner
    data = {"image": img, "label": lab, "lesion_mask": mask, "id": "a"}
    ref = RandSpatialCropSamplesd(["image", "label"], [16, 16, 1], num_samples=6, random_size=False)
    ref.set_random_state(3)
    no_mask = {k: v for k, v in data.items() if k != "lesion_mask"}
    for label_key, d in ((None, no_mask), ("lesion_mask", {**data, "lesion_mask": 0 * mask}), ("organ_mask", no_mask)):
        t = RandCropSamplesNearLabeld(["image", "label"], [16, 16, 1], 6, label_key).set_random_state(3)
        ref.set_random_state(3)
        got, want = t(dict(d)), ref({k: v for k, v in d.items() if k != "lesion_mask"})
        assert len(got) == 6 and all("lesion_mask" not in g for g in got)
        for g, w in zip(got, want):
            assert torch.equal(g["image"], w["image"]) and torch.equal(g["label"], w["label"])
    near = RandCropSamplesNearLabeld(["image", "label"], [16, 16, 1], 6, "lesion_mask", pos=1.0, neg=0.0)
    out = near.set_random_state(0)(dict(data))
    for o in out:
        assert o["image"].shape == (2, 16, 16, 1) and torch.equal(o["label"], -o["image"])
        # the crop is the box [x0, x0 + 16) x [y0, y0 + 16) of slice 5, clipped to the image: voxel
        # (x, y) of the crop is image voxel (x0 + x, y0 + y), so its value tells x0, y0 and the slice
        v = int(o["image"][0, 0, 0, 0])
        x0, y0, z = v // (36 * 8), (v // 8) % 36, v % 8
        # centre (x0 + 8, y0 + 8) on a label voxel (x 30-32, y 4-6); y moved to 8, the nearest
        # centre whose box fits the image
        assert z == 5 and x0 in (22, 23, 24) and y0 == 0
    assert len({int(o["image"][0, 0, 0, 0]) // (36 * 8) for o in out}) > 1
    # indices found once beforehand (FgBgToIndicesd, the cached part of a pipeline): the same crops
    from monai.transforms import FgBgToIndicesd

    pre = FgBgToIndicesd("lesion_mask")(dict(data))
    near3 = RandCropSamplesNearLabeld(["image", "label"], [16, 16, 1], 6, "lesion_mask", pos=3.0, neg=1.0)
    a, b = near3.set_random_state(5)(dict(data)), near3.set_random_state(5)(pre)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b)) and all(
        sorted(y) == ["id", "image", "label"] for y in b
    )
    with pytest.raises(ValueError, match="crop_pos/crop_neg"):
        RandCropSamplesNearLabeld(["image"], [8, 8, 1], 2, "lesion_mask", pos=0.0, neg=0.0)
