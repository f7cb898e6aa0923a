"""DICOM study ingest: TCIA-style folders -> registered, cropped prepared cases (:mod:`common.layout`).

Public API::

    from common.ingest import ingest_study, prepare_dataset, time_ingest, IngestConfig, IngestError

- :func:`ingest_study` (one patient folder -> ``<out>/<case_id>/``),
- :func:`prepare_dataset` (every patient below a folder, in parallel; ``datalist.json`` and
  ``skipped.json``), CLI: ``scripts/prepare_prostatex.py``,
- :func:`time_ingest` (seconds per stage, for ``scripts/benchmark.py``),
- :func:`ingest_breast_study` / :func:`prepare_breast_dataset` (breast DCE DICOM studies, one series per
  phase or one multi-phase series -> iterunet cases), CLI: ``scripts/prepare_breast.py``,
- lower level: :func:`scan_study`, :func:`classify_study`, :func:`load_rules`,
  :func:`register_rigid`, :func:`read_frame`;
- :class:`FitADC` / :class:`FitADCd` (:mod:`common.ingest.adc`): the ADC fitted from a multi-b DWI,
  which the ingest uses when a study has no ADC series.
"""

from common.ingest.adc import FitADC, FitADCd
from common.ingest.breast import ingest_breast_study, load_breast_rules, plan_breast_study, prepare_breast_dataset
from common.ingest.errors import IngestError
from common.ingest.pipeline import (
    IngestConfig,
    case_id,
    find_patients,
    ingest_study,
    prepare_dataset,
    time_ingest,
)
from common.ingest.register import RegistrationSettings, RigidResult, register_rigid, resample_to
from common.ingest.rules import DEFAULT_RULES_PATH, Rules, load_rules
from common.ingest.series import (
    DicomSeries,
    array_to_sitk,
    check_series,
    read_frame,
    scan_study,
    sitk_affine,
    sitk_to_array,
)
from common.ingest.study import StudySelection, classify_study, parse_tt

__all__ = [
    "case_id",
    "DEFAULT_RULES_PATH",
    "DicomSeries",
    "FitADC",
    "FitADCd",
    "IngestConfig",
    "IngestError",
    "RegistrationSettings",
    "RigidResult",
    "Rules",
    "StudySelection",
    "array_to_sitk",
    "check_series",
    "classify_study",
    "find_patients",
    "ingest_breast_study",
    "ingest_study",
    "load_breast_rules",
    "load_rules",
    "parse_tt",
    "plan_breast_study",
    "prepare_breast_dataset",
    "prepare_dataset",
    "read_frame",
    "register_rigid",
    "resample_to",
    "scan_study",
    "sitk_affine",
    "sitk_to_array",
    "time_ingest",
]
