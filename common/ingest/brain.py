"""Raw brain MRI study -> one BraTS-layout case on the T1 grid (for the D3M bundle).

T2, FLAIR and T1c are rigidly registered onto T1 (:func:`common.ingest.register.register_rigid`,
Mattes MI, SimpleITK) and resampled onto the T1 grid (linear); T1 is copied with its own affine,
so every written file carries exactly the T1 affine. Optional label files (``seg``: BraTS labels,
``brain_mask``) are resampled with nearest neighbour (they must already be in the scanner space
of T1). Skull stripping needs model weights and is out of scope: pass a brain mask when you have
one (``<case>-brain_mask.nii.gz`` is then used for the "brain" region and the slice sampling).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from common.ingest.errors import IngestError
from common.ingest.register import RegistrationSettings, register_rigid, resample_to
from common.io import save_json, save_nifti

log = logging.getLogger(__name__)

__all__ = ["MOVING", "brain_settings", "check_same_grid", "prepare_brain_case"]

MOVING = {"t2w": "t2", "t2f": "flair", "t1c": "t1c"}  # BraTS key -> argument name


def brain_settings(max_translation_mm: float = 25.0, max_rotation_deg: float = 20.0) -> RegistrationSettings:
    """The ingest's rigid settings with wider bounds: series of one brain study can be minutes apart
    with head motion (TCGA-FG-6692: T2 and FLAIR 15-18 mm / 3-15 deg from T1, checked visually)."""
    return RegistrationSettings(max_translation_mm=max_translation_mm, max_rotation_deg=max_rotation_deg)


def _sitk_to_nib_array(img: sitk.Image) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # (z, y, x) -> (x, y, z)


def prepare_brain_case(
    t1: str | Path,
    t2: str | Path,
    flair: str | Path,
    out: str | Path,
    case: str,
    t1c: str | Path | None = None,
    seg: str | Path | None = None,
    brain_mask: str | Path | None = None,
    settings: RegistrationSettings | None = None,
    register: bool = True,
) -> dict:
    """Write ``<out>/<case>/<case>-{t1n,t2w,t2f[,t1c][,seg][,brain_mask]}.nii.gz`` + ``registration.json``.

    Args:
        t1, t2, flair, t1c: NIfTI files of one study, each on its own grid (t1c optional: without it
            the case can only be used for inference).
        out: root of the BraTS-layout folder (never the folder of the inputs).
        case: case folder name.
        seg, brain_mask: optional label files on (or in the scanner space of) the T1.
        settings: rigid registration settings (default :func:`brain_settings`).
        register: ``False`` only resamples through the scanner geometry (identity transform).
    Returns: ``{"case", "files": {key: path}, "registration": {key: result dict}}``.
    Raises: ``FileNotFoundError`` naming a missing input; :class:`IngestError` when a registration fails.
    """
    inputs = {"t1": t1, "t2": t2, "flair": flair, "t1c": t1c, "seg": seg, "brain_mask": brain_mask}
    for name, f in inputs.items():
        if f is not None and not Path(f).exists():
            raise FileNotFoundError(f"{case}: {name} file {f} does not exist")
    d = Path(out) / case
    src_dirs = {Path(f).resolve().parent for f in inputs.values() if f is not None}
    if d.resolve() in src_dirs:
        raise FileExistsError(f"{case}: output folder {d} holds the inputs; choose another --out")
    settings = settings or brain_settings()
    ref_nib = nib.load(str(t1))
    affine = ref_nib.affine
    fixed = sitk.ReadImage(str(t1), sitk.sitkFloat32)
    files = {"t1n": save_nifti(np.asarray(ref_nib.get_fdata(), np.float32), affine, d / f"{case}-t1n.nii.gz")}
    report: dict[str, Mapping] = {}
    for key, arg in MOVING.items():
        if inputs[arg] is None:
            continue
        moving = sitk.ReadImage(str(inputs[arg]), sitk.sitkFloat32)
        tx = None
        if register:
            res = register_rigid(fixed, moving, settings, name=f"{case} {arg}", patient=case, series=arg)
            tx, report[key] = res.transform, res.to_dict()
        arr = _sitk_to_nib_array(resample_to(moving, fixed, tx, "linear"))
        files[key] = save_nifti(arr.astype(np.float32), affine, d / f"{case}-{key}.nii.gz")
    for key in ("seg", "brain_mask"):
        if inputs[key] is not None:
            arr = _sitk_to_nib_array(
                resample_to(sitk.ReadImage(str(inputs[key]), sitk.sitkFloat32), fixed, None, "nearest")
            )
            files[key] = save_nifti(np.rint(arr).astype(np.uint8), affine, d / f"{case}-{key}.nii.gz", dtype=np.uint8)
    save_json(
        {
            "case": case,
            "inputs": {k: str(v) for k, v in inputs.items() if v is not None},
            "registration": report,
            "note": "not skull-stripped unless a brain_mask was given",
        },
        d / "registration.json",
    )
    return {"case": case, "files": {k: str(v) for k, v in files.items()}, "registration": report}


def check_same_grid(files: Mapping[str, str | Path]) -> None:
    """Raise ``IngestError`` naming the file when a written file's affine or shape differs from the t1n's."""
    ref = nib.load(str(files["t1n"]))
    for k, f in files.items():
        img = nib.load(str(f))
        if img.shape[:3] != ref.shape[:3] or not np.array_equal(img.affine, ref.affine):
            raise IngestError(f"{f} ({k}) is not on the T1 grid of {files['t1n']}")
