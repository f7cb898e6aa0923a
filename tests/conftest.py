"""Shared test fixtures: small phantom data sets made once per session, and the real-study path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PROSTATEX_0218 = SHARED / "data" / "prostatex" / "ProstateX-0218"

# two cores on CI: keep torch from oversubscribing them when several tests spawn processes; under
# pytest-xdist (`make test` runs one worker per core) each worker is one core's work
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests and fixtures, restored afterwards: the 2-core CI machine
    runs other tests beside them, and many threads on tiny tensors crawl (nothing is timed in tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prostatex_study() -> Path:
    if not PROSTATEX_0218.exists():
        pytest.skip(f"real PROSTATEx study not found at {PROSTATEX_0218} (../shared is not beside the repo)")
    return PROSTATEX_0218


@pytest.fixture(scope="session")
def prepared_prostatex(tmp_path_factory, prostatex_study) -> dict:
    """ProstateX-0218 through the real ingest (:func:`common.ingest.prepare_dataset`), once per session.

    ``{"out": dataset folder (with datalist.json), "case": case folder, "summary": ..., "manifest": ...}``;
    skipped with a reason when ``../shared`` is absent.
    """
    if not any(prostatex_study.rglob("*.dcm")):
        pytest.skip(f"no DICOM files below {prostatex_study}")
    from common.ingest import IngestConfig, prepare_dataset

    out = tmp_path_factory.mktemp("prostatex")
    summary = prepare_dataset(prostatex_study, out, IngestConfig(), workers=1, progress=False)
    assert summary["skipped"] == [], summary["skipped"]
    case = out / "ProstateX-0218"
    return {"out": out, "case": case, "summary": summary, "manifest": json.loads((case / "manifest.json").read_text())}
