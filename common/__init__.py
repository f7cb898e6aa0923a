"""Shared package of the gadolinium-free contrast synthesis and MRI super-resolution bundles.

Sub-packages: ``phantoms`` (physics-based digital reference objects), ``ingest`` (DICOM study
ingest, registration, cropping), ``metrics``, ``transforms`` (MONAI dictionary transforms),
``schedulers`` and ``networks`` (what MONAI lacks), ``engines`` (bundle plumbing).
"""

__version__ = "0.1.0"
