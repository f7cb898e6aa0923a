"""Benchmark sections, one module per part of the project; each has ``rows(tmp: Path) -> list[dict]``
(keys ``what``, ``value``, ``device``, ``note``) and is collected by ``scripts/benchmark.py``."""
