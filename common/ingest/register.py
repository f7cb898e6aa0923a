"""Rigid registration (SimpleITK) of one modality onto the reference grid, and resampling.

Mattes mutual information, a regular-step gradient descent on an ``Euler3DTransform`` over a
multi-resolution pyramid (shrink factors ``[4, 2, 1]``), random sampling of a fraction of the fixed
voxels with a fixed seed (deterministic). The series of one study share the scanner's patient
coordinate system, so the default start is the identity in physical space with the rotation
centre at the fixed image centre (``initializer="scanner"``); ``"geometry"``/``"moments"`` use
SimpleITK's ``CenteredTransformInitializer`` instead (for images from different sessions).

A registration that raises, ends on a non-finite metric, or moves further than the bounds
(``max_translation_mm``, ``max_rotation_deg``) is an :class:`~common.ingest.errors.IngestError`
with the numbers in it. One that ends on a worse metric than its start keeps the start (logged, and
recorded as ``fallback`` in the result).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from common.geometry import bspline_ready
from common.ingest.errors import IngestError

log = logging.getLogger(__name__)


@dataclass
class RegistrationSettings:
    """Rigid registration parameters (defaults keep one registration around a second on 2 cores)."""

    shrink_factors: Sequence[int] = (4, 2, 1)
    smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0)  # voxels of the shrunk level
    sampling_percentage: float = 0.15
    min_samples: int = 20000  # small grids sample more than sampling_percentage (up to every voxel)
    histogram_bins: int = 32
    iterations: int = 100
    learning_rate: float = 1.0  # mm (scales from physical shift)
    min_step: float = 0.001
    relaxation: float = 0.6
    seed: int = 1234
    initializer: str = "scanner"  # "scanner" | "geometry" | "moments"
    max_translation_mm: float = 10.0
    max_rotation_deg: float = 10.0
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shrink_factors"] = list(self.shrink_factors)
        d["smoothing_sigmas"] = list(self.smoothing_sigmas)
        return d


@dataclass
class RigidResult:
    """Outcome of :func:`register_rigid`: ``transform`` maps fixed-space points to moving space."""

    transform: sitk.Euler3DTransform
    angles_deg: list[float]
    translation_mm: list[float]
    center_mm: list[float]
    metric_initial: float
    metric_final: float
    iterations: int
    stop_condition: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_angle_deg(self) -> float:
        return float(np.max(np.abs(self.angles_deg)))

    @property
    def rotation_angle_deg(self) -> float:
        """Total rotation angle (axis-angle magnitude) in degrees."""
        m = np.array(self.transform.GetMatrix()).reshape(3, 3)
        return float(np.degrees(np.arccos(np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0))))

    @property
    def translation_norm_mm(self) -> float:
        return float(np.linalg.norm(self.translation_mm))

    def to_dict(self) -> dict[str, Any]:
        return {
            "transform": "Euler3DTransform (fixed -> moving, LPS mm, rotation about center_mm)",
            "angles_deg": [round(a, 4) for a in self.angles_deg],
            "translation_mm": [round(t, 4) for t in self.translation_mm],
            "center_mm": [round(c, 3) for c in self.center_mm],
            "rotation_deg_max": round(self.max_angle_deg, 4),
            "rotation_angle_deg": round(self.rotation_angle_deg, 4),
            "translation_norm_mm": round(self.translation_norm_mm, 4),
            "metric": "MattesMutualInformation (lower is better)",
            "metric_initial": round(self.metric_initial, 6),
            "metric_final": round(self.metric_final, 6),
            "iterations": self.iterations,
            "stop_condition": self.stop_condition,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def _metric_method(settings: RegistrationSettings, fixed: sitk.Image) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = float(np.prod(fixed.GetSize()))
    pct = min(1.0, max(float(settings.sampling_percentage), settings.min_samples / n))
    reg.SetMetricSamplingPercentage(pct, settings.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    if settings.threads:
        reg.SetNumberOfThreads(int(settings.threads))
    return reg


def _evaluate(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: RegistrationSettings
) -> float:
    reg = _metric_method(settings, fixed)
    reg.SetInitialTransform(sitk.Transform(transform), inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def image_center(img: sitk.Image) -> tuple[float, float, float]:
    """Physical (LPS) centre of an image's voxel grid."""
    size = np.array(img.GetSize(), dtype=float)
    return img.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))


def pyramid_levels(
    size: Sequence[int],
    shrink_factors: Sequence[int],
    sigmas: Sequence[float],
    min_inplane: int = 16,
    min_slices: int = 3,
):
    """The pyramid levels a grid of ``size`` can take: a level is dropped when shrinking would leave
    fewer than ``min_inplane`` voxels in-plane or ``min_slices`` slices (small phantom grids); the
    full-resolution level is always kept."""
    if len(shrink_factors) != len(sigmas):
        raise ValueError(f"shrink_factors {list(shrink_factors)} and smoothing_sigmas {list(sigmas)} differ in length")
    keep = [
        (int(f), float(sg))
        for f, sg in zip(shrink_factors, sigmas)
        if int(f) == 1 or (min(size[:2]) / int(f) >= min_inplane and size[2] / int(f) >= min_slices)
    ]
    if not keep or keep[-1][0] != 1:
        keep.append((1, 0.0))
    return [f for f, _ in keep], [sg for _, sg in keep]


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    settings: RegistrationSettings | None = None,
    name: str = "moving",
    patient: str | None = None,
    series: str | None = None,
) -> RigidResult:
    """Rigidly register ``moving`` onto ``fixed`` (both float32 3D images).

    Raises:
        IngestError: when SimpleITK fails, the final metric is worse than the start, or the result
            moves more than ``settings.max_translation_mm`` / ``max_rotation_deg``.
    """
    s = settings or RegistrationSettings()
    t0 = time.perf_counter()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if s.initializer == "scanner":
        init = sitk.Euler3DTransform()
        init.SetCenter(image_center(fixed))
    elif s.initializer in ("geometry", "moments"):
        mode = (
            sitk.CenteredTransformInitializerFilter.GEOMETRY
            if s.initializer == "geometry"
            else sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode)
        init = sitk.Euler3DTransform(init)
    else:
        raise IngestError(
            f"unknown registration initializer {s.initializer!r} (scanner, geometry, moments)", patient, series
        )
    reg = _metric_method(s, fixed)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=s.learning_rate,
        minStep=s.min_step,
        numberOfIterations=int(s.iterations),
        relaxationFactor=s.relaxation,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink, sigmas = pyramid_levels(fixed.GetSize(), s.shrink_factors, s.smoothing_sigmas)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(sitk.Euler3DTransform(init), inPlace=False)
    iters = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: iters.__setitem__(0, iters[0] + 1))
    try:
        metric0 = _evaluate(fixed, moving, init, s)
        out = reg.Execute(fixed, moving)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise IngestError(
            f"rigid registration of {name} failed in SimpleITK: {lines[-1] if lines else e}", patient, series
        ) from e
    tx = (
        out.GetNthTransform(0)
        if isinstance(out, sitk.CompositeTransform) or out.GetName() == "CompositeTransform"
        else out
    )
    tx = sitk.Euler3DTransform(tx)
    metric1 = _evaluate(fixed, moving, tx, s)
    angles = list(np.degrees([tx.GetAngleX(), tx.GetAngleY(), tx.GetAngleZ()]))
    trans = list(tx.GetTranslation())
    # translation relative to the start (the geometric initialisers start away from zero)
    rel = list(np.subtract(trans, init.GetTranslation()))
    res = RigidResult(
        transform=tx,
        angles_deg=[float(a) for a in angles],
        translation_mm=[float(t) for t in trans],
        center_mm=[float(c) for c in tx.GetCenter()],
        metric_initial=metric0,
        metric_final=metric1,
        iterations=iters[0],
        stop_condition=reg.GetOptimizerStopConditionDescription(),
        seconds=time.perf_counter() - t0,
    )
    numbers = (
        f"rotation {np.round(angles, 2).tolist()} deg (total {res.rotation_angle_deg:.2f} deg), translation {np.round(trans, 2).tolist()} mm "
        f"(|t| {np.linalg.norm(rel):.2f} mm), Mattes MI {metric0:.4f} -> {metric1:.4f}"
    )
    if not np.isfinite(metric1):
        raise IngestError(
            f"rigid registration of {name} failed: the final metric is not finite ({numbers})", patient, series
        )
    if metric1 > metric0:
        # the optimizer ended somewhere worse than where it started: keep the start
        log.info("registration of %s did not improve the metric (%s); keeping the initial alignment", name, numbers)
        res.extra["fallback"] = f"initial alignment kept: the optimizer ended at a worse metric ({numbers})"
        res.transform = sitk.Euler3DTransform(init)
        res.angles_deg = [float(a) for a in np.degrees([init.GetAngleX(), init.GetAngleY(), init.GetAngleZ()])]
        res.translation_mm = [float(t) for t in init.GetTranslation()]
        res.metric_final = metric0
        return res
    if np.linalg.norm(rel) > s.max_translation_mm or res.rotation_angle_deg > s.max_rotation_deg:
        raise IngestError(
            f"rigid registration of {name} moved more than the bounds ({s.max_translation_mm:g} mm, "
            f"{s.max_rotation_deg:g} deg): {numbers}",
            patient,
            series,
        )
    log.info("registered %s: %s, %d iterations, %.2f s", name, numbers, iters[0], res.seconds)
    return res


def resample_to(
    moving: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform | None = None,
    interpolator: str = "linear",
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``moving`` onto ``reference``'s grid through ``transform`` (fixed -> moving; identity if None).

    ``interpolator``: ``"linear"`` for images, ``"nearest"`` for masks. Output float32.
    """
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}[interpolator]
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    if interp == sitk.sitkBSpline:
        moving = bspline_ready(moving)  # an axis of 2 voxels would read outside the image
    return sitk.Resample(moving, reference, tx, interp, float(default_value), sitk.sitkFloat32)
