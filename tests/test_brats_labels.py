"""BraTS 2023 label sets (GLI/MET/SSA/MEN and PEDs, ``auto`` by case prefix), ET-free cases, the ET
Dice of an empty truth, and case folders as BraTS / BraSyn ship them (any folder name, one
``*-<contrast>.nii.gz`` each, BraSyn's missing contrast); the d3m bundle trained and evaluated on a
phantom set with ET-free cases and a PEDs case under ``--label_set auto``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.brats import (
    LABEL_SETS,
    BratsMasksd,
    brats_case_or_datalist,
    brats_datalist,
    brats_entry,
    log_label_sets,
    resolve_label_set,
)
from common.errors import user_message
from common.metrics import EMPTY_TRUTH_CONVENTION, dice_et, mask_figures

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "d3m" / "configs"
TINY = [*h.SMALL, "--spatial_size", "[40,40]", "--batch_size", "2", "--slices_per_volume", "2"]


def _write(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _case(d: Path, prefix: str, seg: np.ndarray, keys=("t1n", "t1c", "t2w", "t2f")) -> Path:
    rng = np.random.default_rng(0)
    for k in keys:
        _write(d / f"{prefix}-{k}.nii.gz", rng.random(seg.shape) + 0.1)
    _write(d / f"{prefix}-seg.nii.gz", seg)
    return d


def _seg() -> np.ndarray:
    """Labels 1 (8 voxels), 2 (4), 3 (2), 4 (1) in a 6 x 6 x 4 grid."""
    s = np.zeros((6, 6, 4))
    s[0:2, 0:2, 0:2] = 1
    s[3, 3, 0:4] = 2
    s[5, 5, 0:2] = 3
    s[5, 0, 3] = 4
    return s


def _masks(entry: dict, **kw) -> dict:
    from monai.transforms import LoadImaged

    d = LoadImaged(["t1n", "seg"], ensure_channel_first=True, image_only=True)(entry)
    return BratsMasksd(**kw)(d)


def test_label_sets_and_auto_by_prefix():
    assert LABEL_SETS["brats_gli"].et == (3,) and LABEL_SETS["brats_gli"].tumour == (1, 2, 3)
    assert LABEL_SETS["brats_peds"].et == (1,) and LABEL_SETS["brats_peds"].tumour == (1, 2, 3, 4)
    for name, want in (
        ("BraTS-PED-00001-000", "brats_peds"),
        ("BraTS-GLI-00001-000", "brats_gli"),
        ("BraTS-MET-00001-000", "brats_gli"),
        ("BraTS-SSA-00001-000", "brats_gli"),
        ("BraTS-MEN-00001-000", "brats_gli"),
    ):
        assert resolve_label_set("auto", f"/x/patient1/{name}-seg.nii.gz")[0] == want
    assert resolve_label_set("auto", "patient1") == ("brats_gli", None)  # no prefix: the default set
    assert resolve_label_set("auto", None, "BraTS-PED-00002-000") == ("brats_peds", "BraTS-PED-")  # from the id
    assert resolve_label_set("brats_peds", "BraTS-GLI-00001-000") == ("brats_peds", None)  # explicit wins
    with pytest.raises(ValueError, match="--label_set 'brats_xyz': unknown"):
        resolve_label_set("brats_xyz")


def test_masks_follow_the_case_label_set_and_labels_outside_stop(tmp_path, caplog):
    seg = _seg()
    peds = brats_entry(_case(tmp_path / "patient1", "BraTS-PED-00001-000", seg))  # renamed folder
    assert peds["id"] == "patient1" and peds["seg"].endswith("BraTS-PED-00001-000-seg.nii.gz")
    t = BratsMasksd(label_set="auto")
    from monai.transforms import LoadImaged

    load = LoadImaged(["t1n", "seg"], ensure_channel_first=True, image_only=True)
    m = t(load(peds))
    assert m["et"].eq(1).sum() == 8 and m["et"].eq(-1).sum() == seg.size - 8  # ET = label 1
    assert m["tumour"].sum() == 15  # 1 | 2 | 3 | 4
    # the same seg read as GLI: label 4 is outside the set -> one line naming file, labels found and set
    with pytest.raises(ValueError) as e:
        t_gli = BratsMasksd(label_set="brats_gli")
        t_gli(load(peds))
    msg = str(e.value)
    assert "BraTS-PED-00001-000-seg.nii.gz" in msg and "labels [0, 1, 2, 3, 4] found, [4] outside" in msg
    assert "brats_gli (1 NETC, 2 SNFH, 3 ET)" in msg and "\n" not in msg
    # a GLI case: ET = 3, tumour 1|2|3; overrides win over the set (the released code's ET = 2)
    gli_seg = np.where(seg == 4, 0, seg)
    gli = brats_entry(_case(tmp_path / "BraTS-GLI-00002-000", "BraTS-GLI-00002-000", gli_seg))
    m = _masks(gli, label_set="auto")
    assert m["et"].eq(1).sum() == 2 and m["tumour"].sum() == 14
    m = _masks(gli, label_set="auto", et_labels=[2], tumour_labels=[2])
    assert m["et"].eq(1).sum() == 4 and m["tumour"].sum() == 4
    # ET-free (a low-grade glioma): all -1, no error
    free = brats_entry(_case(tmp_path / "BraTS-GLI-00003-000", "BraTS-GLI-00003-000", np.where(seg == 3, 1, gli_seg)))
    m = _masks(free, label_set="auto")
    assert m["et"].eq(-1).all() and m["tumour"].sum() == 14
    # the run's one log line: the label set of each case, counted per set
    with caplog.at_level(logging.INFO, logger="common.data.brats"):
        line = log_label_sets([peds, gli, free, {"id": "patient9", "seg": "/x/seg.nii.gz"}], "auto", "training")
    assert [r.getMessage() for r in caplog.records if r.name == "common.data.brats"] == [line]
    assert line == (
        "label_set auto: 4 training case(s): 1 x brats_gli (ET 3, tumour 1|2|3; no BraTS 2023 prefix), "
        "2 x brats_gli (ET 3, tumour 1|2|3; prefix BraTS-GLI-), 1 x brats_peds (ET 1, tumour 1|2|3|4; prefix BraTS-PED-)"
    )


def test_case_folders_as_shipped(tmp_path):
    seg = _seg()
    d = _case(tmp_path / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", np.where(seg == 4, 0, seg))
    # two candidates for one contrast: stop, naming both
    shutil.copy(d / "BraTS-GLI-00001-000-t2w.nii.gz", d / "old-t2w.nii.gz")
    with pytest.raises(ValueError, match="2 candidates for t2w: BraTS-GLI-00001-000-t2w.nii.gz, old-t2w.nii.gz"):
        brats_entry(d)
    (d / "old-t2w.nii.gz").unlink()
    # BraSyn test folders: T1c missing -> read (synthesised; the seg is not scored without its T1c)
    b = _case(
        tmp_path / "brasyn" / "BraTS-GLI-00007-000", "BraTS-GLI-00007-000", np.zeros((6, 6, 4)), ("t1n", "t2w", "t2f")
    )
    (entry,) = brats_case_or_datalist(b, "", "test")
    assert "t1c" not in entry and "seg" not in entry and entry["t2f"].endswith("-t2f.nii.gz")
    # another contrast missing -> one line naming it
    c = _case(
        tmp_path / "brasyn" / "BraTS-GLI-00008-000", "BraTS-GLI-00008-000", np.zeros((6, 6, 4)), ("t1n", "t1c", "t2f")
    )
    with pytest.raises(FileNotFoundError, match="case BraTS-GLI-00008-000: missing input t2w: no \\*-t2w.nii.gz"):
        brats_entry(c)
    # a scanned folder (no datalist.json): section 'all' takes every case, the split stays seeded
    (c / "BraTS-GLI-00008-000-t1c.nii.gz").rename(c / "BraTS-GLI-00008-000-t2w.nii.gz")
    items = brats_datalist(tmp_path / "brasyn", "all")
    assert [it["id"] for it in items] == ["BraTS-GLI-00007-000", "BraTS-GLI-00008-000"]


def test_et_dice_of_an_empty_truth_and_false_enhancement_volume():
    p, t = np.zeros((4, 4, 2), bool), np.zeros((4, 4, 2), bool)
    assert dice_et(p, t) == 1.0  # both empty
    p[0, 0, 0] = p[1, 1, 1] = True
    assert dice_et(p, t) == 0.0  # false enhancement in an ET-free case
    f = mask_figures(p, t, np.diag([2.0, 2.0, 2.0, 1.0]))  # 8 mm^3 = 0.008 mL per voxel
    assert f["et_free"] == 1 and f["false_ml"] == pytest.approx(0.016) and f["missed_ml"] == 0.0
    t[0, 0, 0] = t[2, 2, 0] = t[3, 3, 0] = True
    f = mask_figures(p, t, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert f["dice_et"] == pytest.approx(2 * 1 / 5) and f["et_free"] == 0
    assert f["true_ml"] == pytest.approx(0.024) and f["missed_ml"] == pytest.approx(0.016)
    assert "1 if the predicted ET is empty" in EMPTY_TRUTH_CONVENTION


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """5 tiny brain phantoms (32 x 40 x 24): case 1 with PEDs labels (BraTS-PED-00001-000), cases 2 and
    3 ET-free; all five train, the PEDs case and an ET-free one are the test section."""
    root = h.tiny_phantoms(
        tmp_path_factory.mktemp("mixed"),
        "brain",
        5,
        brain_shape=(32, 40, 24),
        brain_peds_cases=(1,),
        brain_et_free_cases=(2, 3),
    )
    dl = json.loads((root / "datalist.json").read_text())
    cases = {c["id"]: c for s in ("training", "validation", "test") for c in dl[s]}
    assert sorted(cases) == [*(f"BraTS-GLI-0000{i}-000" for i in (0, 2, 3, 4)), "BraTS-PED-00001-000"]
    dl["training"] = [cases[i] for i in sorted(cases)]
    dl["validation"] = []
    dl["test"] = [cases[i] for i in ("BraTS-GLI-00002-000", "BraTS-PED-00001-000")]
    (root / "datalist.json").write_text(json.dumps(dl))
    assert [it["id"] for it in brats_datalist(root, "all")] == sorted(cases)  # each case once
    return root


def test_d3m_trains_and_evaluates_with_et_free_and_peds_cases(mixed, tmp_path):
    def seg_of(c):
        return np.asarray(nib.load(next(mixed.glob(f"{c}/*-seg.nii.gz"))).dataobj)

    s = seg_of("BraTS-PED-00001-000")
    assert {1, 3, 4} <= set(np.unique(s).tolist()) and (s == 1).sum() != (s == 3).sum()
    assert all(not (seg_of(c) == 3).any() for c in ("BraTS-GLI-00002-000", "BraTS-GLI-00003-000"))
    models, out = tmp_path / "models", tmp_path / "eval"
    data = ("--dataset_dir", str(mixed), "--label_set", "auto")
    run = h.train(CONFIGS, models, "--val_interval", "0", *data, *TINY, runner=h.bundle_here)
    assert (
        "label_set auto: 5 training case(s): 4 x brats_gli (ET 3, tumour 1|2|3; prefix BraTS-GLI-), "
        "1 x brats_peds (ET 1, tumour 1|2|3|4; prefix BraTS-PED-)"
    ) in run.stdout + run.stderr
    state = h.final_checkpoint(models, 2)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    steps = ("--network_size", "small", "--num_inference_steps", "2", "--write_deformation", "false")
    h.evaluate(CONFIGS, models / "model.pt", out, *data, *steps, runner=h.bundle_here)
    rows = {r["case"]: r for r in h.read_csv(out / "mask_metrics.csv")}
    assert set(rows) == {"BraTS-GLI-00002-000", "BraTS-PED-00001-000"}
    img = nib.load(next(mixed.glob("BraTS-PED-00001-000/*-t1n.nii.gz")))
    ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
    ped, free = rows["BraTS-PED-00001-000"], rows["BraTS-GLI-00002-000"]
    # the PEDs case: ET = label 1, tumour region = 1|2|3|4 (never the GLI ET = 3, its cyst)
    assert float(ped["true_ml"]) == pytest.approx((s == 1).sum() * ml, rel=1e-5)
    assert float(ped["tumour_ml"]) == pytest.approx(np.isin(s, [1, 2, 3, 4]).sum() * ml, rel=1e-5)
    assert int(ped["et_free"]) == 0
    # the ET-free case: Dice by the empty-truth convention, false_ml is the whole predicted ET
    assert int(free["et_free"]) == 1 and float(free["true_ml"]) == 0.0
    assert float(free["dice_et"]) == (1.0 if float(free["pred_ml"]) == 0 else 0.0)
    assert float(free["false_ml"]) == pytest.approx(float(free["pred_ml"]))
    summary = json.loads((out / "summary.json").read_text())["mask"]
    assert summary["with_et"]["n"] == 1 and summary["et_free"]["n"] == 1
    assert summary["et_free"]["false_ml"] == pytest.approx(float(free["false_ml"]))
    assert summary["with_et"]["dice_et"] == pytest.approx(float(ped["dice_et"]))
    assert "ET-free" in (out / "summary.md").read_text()
    assert {r["region"] for r in h.read_csv(out / "metrics.csv")} == {"whole", "brain", "tumour"}

    # a renamed PEDs case folder (--case_dir), scored as GLI: one line naming the seg, labels and set
    renamed = tmp_path / "patient1"
    shutil.copytree(mixed / "BraTS-PED-00001-000", renamed)
    o2, infer = tmp_path / "renamed", ["train.json", "inference.json"]
    with pytest.raises(Exception) as e:
        h.evaluate(CONFIGS, models / "model.pt", o2, "--case_dir", str(renamed), *steps, runner=h.bundle_here)
    text = user_message(e.value)  # the one line the command prints
    assert "BraTS-PED-00001-000-seg.nii.gz: labels [0, 1, 3, 4] found, [4] outside the label set brats_gli" in text
    # BraSyn-style: T1c missing -> synthesised on the input's grid (read with auto from the files' prefix)
    (renamed / "BraTS-PED-00001-000-t1c.nii.gz").unlink()
    h.evaluate(
        CONFIGS, models / "model.pt", o2, "--case_dir", str(renamed), *data, *steps, files=infer, runner=h.bundle_here
    )
    t1c = nib.load(o2 / "patient1" / "t1c.nii.gz")
    assert np.array_equal(t1c.affine, img.affine) and t1c.shape == img.shape
    # another contrast missing -> stops naming it
    (renamed / "BraTS-PED-00001-000-t2w.nii.gz").unlink()
    with pytest.raises(Exception) as e:
        h.evaluate(
            CONFIGS, models / "model.pt", o2, "--case_dir", str(renamed), *steps, files=infer, runner=h.bundle_here
        )
    assert "case patient1: missing input t2w" in user_message(e.value)
