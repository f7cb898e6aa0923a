"""ADC from diffusion-weighted images: the fit (:class:`FitADC`, :class:`FitADCd`) and its ingest step.

A prostate study without a scanner ADC series but with a DWI acquisition of two or more b-values
(one series holding several b-values, or one series per b-value) gets its ADC fitted per voxel
with the mono-exponential model

.. math::

    S(b) = S_0 \\, e^{-b \\, \\mathrm{ADC}} \\quad\\Longleftrightarrow\\quad \\ln S(b) = \\ln S_0 - b \\, \\mathrm{ADC},

by linear least squares on the log signal over the images with ``min_b <= b <= max_b``
(default ``b >= 50`` s/mm^2, so that perfusion at ``b = 0`` stays out, as in PROSTATEx's scanner
maps): with :math:`y_i = \\ln S_i`,

.. math::

    \\mathrm{ADC} = -\\frac{\\sum_i (b_i - \\bar b)(y_i - \\bar y)}{\\sum_i (b_i - \\bar b)^2}.

Repeated b-values (several averages or diffusion directions stored as separate images) are
separate samples of the same fit, so a set of directions gives the trace (geometric-mean) ADC.
The result is written in the scanners' unit, 1e-6 mm^2/s (about 1600 in a healthy peripheral zone).

:func:`plan_adc_fit` (headers only) groups the DWI images by b-value and checks them;
:func:`compute_adc` reads them and fits. The b-value of an image comes from ``DiffusionBValue``
(0018,9087), the vendor fields (Siemens (0019,100C), GE (0043,1039), Philips (2001,1003); see
:func:`common.ingest.series.header_b_value`) or, for a series with one image per slice position,
from its description (``..._b800``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_data_type, convert_to_dst_type

from common.geometry import sitk_to_array
from common.ingest.errors import IngestError
from common.ingest.series import (
    DicomSeries,
    Frame,
    SeriesGeometry,
    check_series,
    geometry_key,
    parse_b_value,
    read_frame,
)

log = logging.getLogger(__name__)

#: the unit of the written ADC: 1e-6 mm^2/s (the DICOM/Siemens unit).
ADC_SCALE = 1e6
B_TAGS = "DiffusionBValue (0018,9087), Siemens (0019,100C), GE (0043,1039), Philips (2001,1003)"


class FitADC(Transform):
    """Mono-exponential ADC fit per voxel (log-linear least squares; equations in the module docstring).

    Args:
        b_values: (n,) b-value of each input channel, s/mm^2 (repeats allowed; at least two distinct
            values inside ``[min_b, max_b]``).
        min_b, max_b: only channels with ``min_b <= b <= max_b`` enter the fit (``max_b=None``: no upper bound).
        scale: factor from mm^2/s to the output unit (default 1e6: 1e-6 mm^2/s, the scanners' unit).
        background: voxels whose mean signal at the lowest fitted b-value is below ``background`` x
            its 99th percentile are set to 0 (as a scanner blanks air); 0 keeps every voxel.
        max_adc: upper clip in the output unit (None: no clip). Negative ADCs (noise) are set to 0.

    Input: ``(n, *spatial)`` signals (channel first, numpy or torch, any non-negative scale).
    Output: ``(1, *spatial)`` ADC in ``1 / scale`` mm^2/s, float32, the input's type and device.
    """

    def __init__(
        self,
        b_values: Sequence[float],
        min_b: float = 50.0,
        max_b: float | None = None,
        scale: float = ADC_SCALE,
        background: float = 0.1,
        max_adc: float | None = None,
    ) -> None:
        b = np.asarray(b_values, dtype=np.float64).ravel()
        self.use = (b >= min_b) & (b <= (np.inf if max_b is None else max_b))
        if np.unique(b[self.use]).size < 2:
            raise ValueError(
                f"ADC fit needs at least two distinct b-values in [{min_b:g}, {max_b if max_b is not None else 'inf'}]"
                f" s/mm^2, got {sorted(set(b.tolist()))}"
            )
        self.b_values, self.min_b, self.max_b = b, float(min_b), max_b
        self.scale, self.background, self.max_adc = float(scale), float(background), max_adc

    def __call__(self, img: Any) -> Any:
        sig, *_ = convert_data_type(img, np.ndarray)
        sig = np.asarray(sig, dtype=np.float64)
        if sig.shape[0] != self.b_values.size:
            raise ValueError(f"{sig.shape[0]} input channels for {self.b_values.size} b-values")
        b = self.b_values[self.use]
        s = sig[self.use]
        low = s[b == b.min()].mean(axis=0)
        ref = float(np.percentile(low, 99)) if low.size else 0.0
        floor = max(ref * 1e-4, np.finfo(np.float32).tiny)
        y = np.log(np.maximum(s, floor))
        bc = (b - b.mean()).reshape((-1,) + (1,) * (y.ndim - 1))
        adc = -(bc * (y - y.mean(axis=0))).sum(axis=0) / float((bc**2).sum())
        adc = np.maximum(adc * self.scale, 0.0)
        if self.max_adc is not None:
            adc = np.minimum(adc, self.max_adc)
        if self.background > 0:
            adc[low < self.background * ref] = 0.0
        out, *_ = convert_to_dst_type(adc[None].astype(np.float32), img, dtype=np.float32)
        return out


class FitADCd(MapTransform):
    """Dictionary version of :class:`FitADC`: each ``keys`` entry ``(n, *spatial)`` of DWI signals
    becomes ``(1, *spatial)`` ADC, stored under the matching ``output_keys`` entry (default: in place).
    ``b_values`` and the other arguments as in :class:`FitADC`."""

    def __init__(
        self,
        keys: KeysCollection,
        b_values: Sequence[float],
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = self.keys if output_keys is None else tuple(np.atleast_1d(output_keys).tolist())
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"{len(self.output_keys)} output_keys for {len(self.keys)} keys")
        self.fit = FitADC(b_values, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out in self.key_iterator(d, self.output_keys):
            d[out] = self.fit(d[key])
        return d


# ------------------------------------------------------------------------------------------
# the ingest step


@dataclass
class DwiImage:
    """One 3D DWI volume of the fit: its b-value (s/mm^2), series, checked geometry and frame."""

    b: float
    series: DicomSeries
    geom: SeriesGeometry
    frame: Frame


@dataclass
class AdcPlan:
    """The DWI volumes an ADC is fitted from (:func:`plan_adc_fit`).

    Attributes:
        images: every volume whose b-value lies in ``[min_b, max_b]``, the lowest b first.
        b_found: every distinct b-value found in the DWI series (s/mm^2), ascending.
        min_b, max_b: the fitted range.
    """

    images: list[DwiImage]
    b_found: list[float]
    min_b: float
    max_b: float | None

    @property
    def b_used(self) -> list[float]:
        return sorted({im.b for im in self.images})

    @property
    def series(self) -> list[DicomSeries]:
        out: list[DicomSeries] = []
        for im in self.images:
            if not any(s is im.series for s in out):
                out.append(im.series)
        return out

    def record(self) -> dict[str, Any]:
        """The manifest's ``adc`` entry: computed, from which b-values and series, how."""
        return {
            "source": "computed from DWI",
            "method": "mono-exponential fit S = S0 exp(-b ADC), linear least squares on ln S (common.ingest.adc.FitADC)",
            "unit": "1e-6 mm^2/s",
            "b_values_s_mm2": self.b_used,
            "b_values_found_s_mm2": self.b_found,
            "min_b": self.min_b,
            "max_b": self.max_b,
            "n_images": {f"{b:g}": sum(1 for im in self.images if im.b == b) for b in self.b_used},
            "series": [
                {
                    "folder": s.label,
                    "description": s.description,
                    "series_number": s.number,
                    "b_values_s_mm2": sorted({im.b for im in self.images if im.series is s}),
                }
                for s in self.series
            ],
        }


def _file_b_values(s: DicomSeries, patient: str | None) -> list[float]:
    """The b-value of every file of a DWI series (tags, else the description for a single-image-per-slice series)."""
    bs = [h.b_value for h in s.headers]
    if all(b is not None for b in bs):
        return [float(b) for b in bs]
    missing = [h for h in s.headers if h.b_value is None]
    if len(missing) < len(bs):
        names = ", ".join(h.path.rsplit("/", 1)[-1] for h in missing[:3])
        raise IngestError(
            f"b-value missing from the tags ({B_TAGS}) in {len(missing)} of {len(bs)} DWI files (e.g. {names})",
            patient,
            s.label,
        )
    b_desc = parse_b_value(s.description)
    if b_desc is not None and len(check_series(s, patient).frames) == 1:
        return [b_desc] * len(bs)
    raise IngestError(
        f"b-values missing from the tags: no {B_TAGS} in the DWI files"
        + (
            ""
            if b_desc is None
            else f" and several images per slice position (the description's b{b_desc:g} cannot tell them apart)"
        )
        + "; cannot compute an ADC",
        patient,
        s.label,
    )


def plan_adc_fit(
    series: Sequence[DicomSeries], patient: str | None = None, min_b: float = 50.0, max_b: float | None = None
) -> AdcPlan:
    """Group the images of the DWI ``series`` by b-value and check them (headers only, no pixel data).

    Raises:
        IngestError: b-values missing from the tags, a broken b-value group (missing slice, ...), a
            single b-value (or fewer than two in ``[min_b, max_b]``), or b-value groups on different grids;
            the message names the patient, the series and the problem.
    """
    if not series:
        raise IngestError("no DWI series to compute an ADC from", patient)
    images: list[DwiImage] = []
    found: set[float] = set()
    for s in series:
        bs = _file_b_values(s, patient)
        for b in sorted(set(bs)):
            found.add(b)
            sub = dataclasses.replace(s, headers=[h for h, v in zip(s.headers, bs) if v == b])
            try:
                g = check_series(sub, patient)
            except IngestError as e:
                raise IngestError(f"DWI images at b={b:g} s/mm^2: {e.problem}", patient, s.label) from None
            images.extend(DwiImage(b, s, g, f) for f in g.frames)
    b_found = sorted(found)
    labels = ", ".join(s.label for s in series)
    one = series[0].label if len(series) == 1 else None
    if len(b_found) < 2:
        raise IngestError(
            f"the DWI holds a single b-value ({b_found[0]:g} s/mm^2"
            + ("" if one else f" in {labels}")
            + "): an ADC needs at least two",
            patient,
            one,
        )
    hi = np.inf if max_b is None else max_b
    used = [im for im in images if min_b <= im.b <= hi]
    if len({im.b for im in used}) < 2:
        rng = f"b >= {min_b:g}" + ("" if max_b is None else f" and <= {max_b:g}")
        raise IngestError(
            f"the DWI b-values {[f'{b:g}' for b in b_found]} s/mm^2 leave {sorted({f'{im.b:g}' for im in used})} in the "
            f"ADC range {rng}: at least two are needed (change adc_min_b / adc_max_b)",
            patient,
            one,
        )
    used.sort(key=lambda im: im.b)
    ref = used[0]
    for im in used[1:]:
        if geometry_key(im.geom) != geometry_key(ref.geom):
            g, r = im.geom, ref.geom
            raise IngestError(
                f"DWI images at b={im.b:g} lie on another grid than those at b={ref.b:g} ({ref.series.label}): "
                f"{g.cols}x{g.rows}x{len(g.positions)} vs {r.cols}x{r.rows}x{len(r.positions)} voxels, first slice at "
                f"{g.positions[0]:.2f} vs {r.positions[0]:.2f} mm along the normal",
                patient,
                im.series.label,
            )
    return AdcPlan(used, b_found, float(min_b), max_b)


def compute_adc(plan: AdcPlan, patient: str | None = None, background: float = 0.1) -> sitk.Image:
    """Read the planned DWI volumes and fit the ADC (:class:`FitADC`; ``background`` as there).

    Returns:
        a float32 3D image on the lowest-b DWI grid (its exact geometry), ADC in 1e-6 mm^2/s.

    Raises:
        IngestError: unreadable pixel data or NaN/Inf values in a DWI image.
    """
    imgs = [read_frame(im.frame, im.geom, patient, im.series.label) for im in plan.images]
    sig = np.stack([sitk_to_array(i) for i in imgs], axis=0)
    bad = ~np.isfinite(sig)
    if bad.any():
        k = int(np.argmax(bad.reshape(len(imgs), -1).any(axis=1)))
        raise IngestError(
            f"DWI image at b={plan.images[k].b:g}: {int(bad[k].sum())} NaN/Inf voxel value(s)",
            patient,
            plan.images[k].series.label,
        )
    adc = FitADC([im.b for im in plan.images], plan.min_b, plan.max_b, background=background)(sig)[0]
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(adc, (2, 1, 0))).astype(np.float32))
    out.CopyInformation(imgs[0])
    log.info(
        "patient %s: ADC computed from DWI b = %s s/mm^2 (%s)",
        patient,
        ", ".join(f"{b:g}" for b in plan.b_used),
        ", ".join(s.label for s in plan.series),
    )
    return out
