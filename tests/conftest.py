"""Shared test fixtures: small phantom data sets made once per session, and the real-study path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PROSTATEX_0218 = SHARED / "data" / "prostatex" / "ProstateX-0218"

# two cores on CI: keep torch from oversubscribing them when several tests spawn processes
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def prostatex_study() -> Path:
    if not PROSTATEX_0218.exists():
        pytest.skip(f"real PROSTATEx study not found at {PROSTATEX_0218} (../shared is not beside the repo)")
    return PROSTATEX_0218
