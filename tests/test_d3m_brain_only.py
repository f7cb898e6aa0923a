"""D3M inference on the brain only (:class:`common.inferers.d3m.D3MVolumeInferer`): slices without
brain are background, the brain slices are cropped to the brain's box and put back on the input grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from common.inferers.d3m import D3MInferer, D3MVolumeInferer, _box
from common.networks.d3m import D3MNetwork
from common.schedulers.sigmoid import SigmoidDDIMScheduler

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "d3m" / "configs"
H, W, D = 48, 40, 6
BRAIN_SLICES = [1, 2, 4]
BACKGROUND = torch.tensor([0.0, -1.0, 0.0, 0.0]).view(4, 1, 1)


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = D3MNetwork("small").eval()
    with torch.no_grad():  # non-zero output layers: a zero-initialised head would make every slice 0
        for w in net.parameters():
            if not w.any():
                w.normal_(0, 0.05)
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ellipse = ((ii - 22) / 9.0) ** 2 + ((jj - 17) / 7.0) ** 2 <= 1  # rows 13..31, cols 10..24
    brain = torch.zeros(H, W, D, dtype=torch.bool)
    brain[..., BRAIN_SLICES] = ellipse[..., None]
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, H, W, D, generator=g) * brain  # skull-stripped: t1n > 0 is the brain
    affine = torch.tensor([[0.0, 0.0, 1.2, -5.0], [-1.0, 0.0, 0.0, 3.0], [0.0, 0.9, 0.0, 7.0], [0, 0, 0, 1.0]])
    return net, MetaTensor(image, affine=affine), brain


def run(net, image, **kw):
    kw.setdefault("slice_batch_size", 1)  # the same per-slice arithmetic in every run
    inf = D3MVolumeInferer(
        D3MInferer(SigmoidDDIMScheduler()),
        out_channels=4,
        num_inference_steps=2,
        spatial_divisor=net.spatial_divisor,
        precision="fp32",
        progress=False,
        **kw,
    )
    return inf(image, net)


def test_box_grows_to_the_multiple_inside_the_image():
    rows = torch.zeros(48, dtype=torch.bool)
    rows[13:32] = True  # 19 rows
    assert _box(rows, 48, 8) == (11, 35)  # 24 rows, centred
    assert _box(rows, 48, 16) == (7, 39)
    rows[:] = False
    rows[0:3] = True
    assert _box(rows, 48, 8) == (0, 8)  # kept inside the image
    rows[40:] = True
    assert _box(rows, 48, 32) == (0, 48)  # does not fit: the whole axis


def test_slice_skipping_keeps_the_full_result_in_the_brain_slices(case):
    net, image, brain = case
    full = run(net, image, brain_only=False)
    skip = run(net, image, brain_only=True, crop=False)
    assert skip.shape == full.shape == (1, 4, H, W, D)
    assert torch.equal(skip.affine, image.affine)
    # inside the brain slices: the full-volume result bit for bit (same seed, per-slice noise)
    assert torch.equal(skip[..., BRAIN_SLICES], full[..., BRAIN_SLICES])
    others = [z for z in range(D) if z not in BRAIN_SLICES]
    assert torch.equal(skip[0][..., others], BACKGROUND[..., None].expand(4, H, W, len(others)))
    assert not torch.equal(full[0][..., others], skip[0][..., others])  # the full run did sample them
    # all slices in one batch (the bundle's default): oneDNN picks kernels by batch size, so the sampled
    # slices agree to float32 rounding only
    batched = {k: run(net, image, brain_only=k, crop=False, slice_batch_size=0) for k in (False, True)}
    torch.testing.assert_close(batched[True][..., BRAIN_SLICES], batched[False][..., BRAIN_SLICES], rtol=0, atol=1e-5)
    # an explicit brain mask gives the same as t1n > 0
    inf = D3MVolumeInferer(
        D3MInferer(SigmoidDDIMScheduler()), 4, 2, spatial_divisor=net.spatial_divisor, slice_batch_size=1,
        precision="fp32", progress=False, crop=False,
    )  # fmt: skip
    assert torch.equal(inf(image, net, brain_mask=brain[None, None].float()), skip)


def test_cropping_puts_the_box_back_on_the_input_grid(case):
    net, image, brain = case
    full = run(net, image, brain_only=False)
    crop = run(net, image, brain_only=True, crop=True)
    assert crop.shape == full.shape and torch.equal(crop.affine, image.affine)
    k = net.spatial_divisor
    (r0, r1), (c0, c1) = _box(brain.any(-1).any(-1), H, k), _box(brain.any(-1).any(0), W, k)
    assert (r1 - r0) % k == 0 and (c1 - c0) % k == 0 and r0 <= 13 and r1 >= 32 and c0 <= 10 and c1 >= 25
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[r0:r1, c0:c1] = True
    out = crop[0]
    bg = BACKGROUND.expand(4, H, W)
    for z in range(D):
        if z not in BRAIN_SLICES:
            assert torch.equal(out[..., z], bg)
        else:
            assert torch.equal(out[:, ~inside, z], bg[:, ~inside])
    # a local network (one 3x3 convolution, no displacement): 2 steps see 2 pixels, so inside the box
    # away from a 2-pixel rim the cropped chain is the full-volume chain; the rim sees the box's border
    local = LocalNet()
    full, crop = run(local, image, brain_only=False), run(local, image, brain_only=True, crop=True)
    core = torch.zeros(H, W, dtype=torch.bool)
    core[r0 + 2 : r1 - 2, c0 + 2 : c1 - 2] = True
    for z in BRAIN_SLICES:
        torch.testing.assert_close(crop[0, :, core, z], full[0, :, core, z], rtol=0, atol=1e-5)
    rim = inside & ~core
    assert not torch.allclose(crop[0, :2, rim][..., BRAIN_SLICES[0]], full[0, :2, rim][..., BRAIN_SLICES[0]])


class LocalNet(torch.nn.Module):
    """(x (N, 5, H, W), t, abar) -> (N, 4, H, W): a random 3x3 convolution for v, zero displacement."""

    spatial_divisor = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(5, 2, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, 0, 0.3, generator=torch.Generator().manual_seed(3))

    def forward(self, x, t, abar):
        v = self.conv(x)
        return torch.cat([v, torch.zeros_like(v)], 1)


def test_the_bundle_samples_inside_the_case_brain_mask(case, tmp_path):
    """The d3m bundle's inference passes the case's ``*-brain_mask.nii.gz`` to the inferer (its
    ``prepare_batch``): slices holding T1n > 0 but outside the mask are background; the others are
    the full-volume result (same seed), on the input grid."""
    import nibabel as nib
    import numpy as np
    from helpers import parser
    from monai.data import list_data_collate

    from common.bundle import variant

    net, image, brain = case
    affine = image.affine.numpy()
    cid = "BraTS-GLI-00007-000"
    folder = tmp_path / cid
    folder.mkdir()
    t1n_support = [1, 2, 4]  # the skull-stripped T1n's brain slices (BRAIN_SLICES)
    mask = brain.clone()
    mask[..., 4] = False  # the brain mask leaves out slice 4, which holds T1n > 0
    vols = {k: image[0, i].numpy() * 100 for i, k in enumerate(("t1n", "t2w", "t2f"))}
    vols["brain_mask"] = mask.numpy().astype(np.uint8)
    for k, v in vols.items():
        nib.save(nib.Nifti1Image(v, affine), folder / f"{cid}-{k}.nii.gz")
    assert all(vols["t1n"][..., z].any() for z in t1n_support)
    p = parser(
        ROOT_CONFIGS, "train.json", "inference.json",
        case_dir=str(folder), network_size="small", device="cpu", precision="fp32", num_inference_steps=2,
        slice_batch_size=1, progress=False,
    )  # fmt: skip
    batch = list_data_collate([p.get_parsed_content("dataset")[0]])
    x, _, args, kwargs = p.get_parsed_content("prepare_batch")(batch, torch.device("cpu"))
    assert torch.equal(kwargs["brain_mask"][0, 0].bool(), mask)
    inferer = p.get_parsed_content("inferer")
    inferer.progress = False
    full = variant(inferer, brain_only=False)(x, net)
    inside = [1, 2]
    assert inferer.brain_only and not inferer.crop  # the bundle's default: the full-volume result, exact
    for crop in (False, True):  # --crop_to_brain true: faster; then only the slices' background is exact
        masked = (variant(inferer, crop=True) if crop else inferer)(x, net, *args, **kwargs)
        assert masked.shape == full.shape == (1, 4, H, W, D)
        assert np.allclose(masked.affine.numpy(), affine)
        if not crop:
            assert torch.equal(masked[..., inside], full[..., inside])
        for z in (0, 3, 4, 5):  # slice 4 holds T1n > 0 but no brain by the mask: background like the empty ones
            assert torch.equal(masked[0, ..., z], BACKGROUND.expand(4, H, W))
        assert not any(torch.equal(masked[0, ..., z], BACKGROUND.expand(4, H, W)) for z in inside)
    assert not torch.equal(full[0, ..., 4], BACKGROUND.expand(4, H, W))
    # without a mask file the bundle falls back to T1n > 0: slice 4 is sampled again
    (folder / f"{cid}-brain_mask.nii.gz").unlink()
    p["case_dir"] = str(folder)
    batch = list_data_collate([p.get_parsed_content("dataset", lazy=False)[0]])
    x, _, args, kwargs = p.get_parsed_content("prepare_batch")(batch, torch.device("cpu"))
    assert torch.equal(kwargs["brain_mask"][0, 0].bool(), image[0, 0] > 0)
    p["crop_to_brain"] = True  # --crop_to_brain true reaches the inferer
    assert p.get_parsed_content("inferer", lazy=False).crop


def test_brain_only_timing_covers_the_three_modes(monkeypatch, tmp_path):
    """``scripts.benchmarks.d3m.measure_brain_only`` times the bundle's inferer in each mode on a phantom
    (here a tiny one, 1 step) and counts its brain slices; the benchmark row reads the record."""
    import json

    import numpy as np

    from common.phantoms.brain import make_brain_phantom
    from scripts.benchmarks import d3m as B

    shape = (32, 32, 12)
    got = B.measure_brain_only(shape=shape, steps=1, spacing=None)
    brain = make_brain_phantom(0, shape=shape).images["t1n"] > 0
    assert got["brain_slices"] == int(brain.any((0, 1)).sum()) < shape[2]  # the head's ends hold no brain
    assert set(got["seconds"]) == set(B.BRAIN_ONLY_MODES) and all(s > 0 for s in got["seconds"].values())
    rec = {**got, "date": "2026-12-07", "cpu": "test CPU", "note": ""}
    rec["seconds"] = {"full volume": 100.0, "brain only (default)": 66.0, "brain only + crop": 30.0}
    record = tmp_path / "brain_only_cpu_run.json"
    record.write_text(json.dumps(rec))
    monkeypatch.setattr(B, "BRAIN_ONLY_RECORD", record)
    (row,) = B.brain_only_row()
    assert (
        row["value"] == "full volume 100 s (1.00x); brain only (default) 66 s (0.66x); brain only + crop 30 s (0.30x)"
    )
    assert f"brain in {got['brain_slices']} of 12 slices" in row["what"] and np.isfinite(got["brain_box"]).all()
