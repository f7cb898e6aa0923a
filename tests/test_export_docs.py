"""``scripts/export_bundle.py``: the exported bundles' docs name paths that exist from the exported folder.

Every bundle is exported with ``--weights_url`` (no weights to copy, so no training: ~1 s in all); in each
exported Markdown file, this repository's own-bundle paths became relative ones that exist in the export,
the vendored code is named ``scripts/common`` / ``scripts.common`` and exists there, and everything else of
this repository is ``$REPO/<path>`` with ``<path>`` existing in this checkout.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.export_bundle import DOCS_NOTE, bundle_names, export, rewrite_docs, walk

ROOT = Path(__file__).resolve().parents[1]

_PATH_END = ".,;:)`'\""


def test_rewrite_docs_closed_form():
    modules, _ = walk("iterunet")
    text = (
        "B=bundles/iterunet/configs\n"
        ".venv/bin/python -m monai.bundle run training --config_file $B/train.json  # -> bundles/iterunet/models/\n"
        "`common.transforms.TINormd`, `common/networks/iterunet.py`, `common.phantoms.write_phantoms`\n"
        ".venv/bin/python scripts/make_phantoms.py --out data/phantoms; make demo; tests/test_zoo.py\n"
        "bundles/resdce/configs/train.json and bundles/iterunet/ and scripts/common/io.py stays\n"
    )
    assert rewrite_docs(text, "iterunet", modules) == (
        "B=configs\n"
        "python -m monai.bundle run training --config_file $B/train.json  # -> models/\n"
        "`scripts.common.transforms.TINormd`, `scripts/common/networks/iterunet.py`, `common.phantoms.write_phantoms`\n"
        "python $REPO/scripts/make_phantoms.py --out $REPO/data/phantoms; make -C $REPO demo; $REPO/tests/test_zoo.py\n"
        "$REPO/bundles/resdce/configs/train.json and . and scripts/common/io.py stays\n"
    )


@pytest.mark.parametrize("bundle", bundle_names())
def test_exported_docs_name_existing_paths(bundle, tmp_path):
    out = export(bundle, tmp_path / bundle, weights_url="https://example.org/model.pt", weights_hash="0" * 32)
    docs = sorted((out / "docs").rglob("*.md"))
    assert docs and (out / "docs" / "README.md") in docs
    readme = (out / "docs" / "README.md").read_text()
    assert DOCS_NOTE in readme and readme.startswith("# ")
    for doc in docs:
        text = doc.read_text()
        assert ".venv/" not in text and f"bundles/{bundle}/" not in text.replace("$REPO/bundles/", ""), doc
        for m in re.finditer(r"\$REPO/([\w./-]+)", text):
            rel = m.group(1).rstrip(_PATH_END)
            if rel.startswith(("scripts/", "tests/", "common/", "bundles/")):  # sources (data/: what commands make)
                assert (ROOT / rel).exists(), f"{doc.name}: $REPO/{rel} does not exist in the repository"
        for m in re.finditer(r"(?<![\w./$@-])((?:configs|docs|scripts/common|models)/[\w./-]*)", text):
            rel = m.group(1).rstrip(_PATH_END)
            if rel.startswith(("configs", "scripts")) and "*" not in rel:
                assert (out / rel).exists(), f"{doc.name}: {rel} does not exist in the exported bundle"
        for m in re.finditer(r"(?<![\w./$@-])scripts\.common(?:\.\w+)+", text):
            parts = m.group(0).split(".")
            assert any(
                out.joinpath(*parts[:n]).with_suffix(".py").is_file()
                or out.joinpath(*parts[:n], "__init__.py").is_file()
                for n in range(len(parts), 1, -1)
            ), f"{doc.name}: {m.group(0)} is not vendored"
        # no bare repository path is left (every one is relative to the export or prefixed with $REPO)
        bare = re.findall(r"(?<![\w./$@-])(?:tests|data|bundles|demo_output)/[\w.-]+", text)
        assert not bare, f"{doc.name}: {bare[:5]}"
