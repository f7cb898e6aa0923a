#!/usr/bin/env python
"""Write the config blocks that several bundles share from their one source, ``common/bundle_blocks.json``.

Within a bundle each setting is written once (``train.json`` complete, the other files overlays);
across bundles a block that five bundles use (the trainer, the resume and checkpoint handlers, the data
loaders, the multi-GPU samplers ...) is *present* in each bundle (a bundle folder is self-contained:
the card's command, MONAI Label, MONAI Deploy and the Model Zoo read its files and nothing else), but
it is *written* once: in ``common/bundle_blocks.json``, under a name.
A bundle marks each copy with MONAI's description key, ``"_desc_": "shared:<name>"`` (MONAI ignores
``_desc_`` when it builds the object), and this script fills every marked block from the source:

    python scripts/sync_configs.py            # rewrite the marked blocks (and format the files)
    python scripts/sync_configs.py --check    # exit 1 listing every block that differs (tests run this)
    python scripts/sync_configs.py d3m        # one bundle

A new bundle is written by putting ``{"_desc_": "shared:<name>"}`` where it needs a shared block and
running the script; editing a copy in a bundle is a test failure (``tests/test_configs.py``). What a
shared block needs from its bundle, it takes by reference (``@train#state``, ``@checkpoint_record``,
``@val_interval`` ...), so each bundle defines those ids itself.

Files are written in one layout (4-space indent; an object or list that fits on its line in 120
columns stays on one line) and atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]

BLOCKS = ROOT / "common" / "bundle_blocks.json"
CONFIG_FILES = ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json")
MARK = "shared:"
WIDTH = 120

__all__ = ["load_blocks", "bundle_config_files", "sync_config", "dumps", "main"]


def load_blocks(path: Path = BLOCKS) -> dict[str, Any]:
    """``{name: block}`` from the source file (its ``_comment`` entry left out); each block carries its own mark."""
    data = json.loads(Path(path).read_text())
    blocks = {k: v for k, v in data.items() if not k.startswith("_")}
    for name, block in blocks.items():
        if not isinstance(block, dict):
            raise ValueError(f"{path}: shared block {name!r} must be an object, got {type(block).__name__}")
        block["_desc_"] = MARK + name
    return blocks


def bundle_config_files(root: Path = ROOT) -> list[Path]:
    """The config files of every bundle folder under ``bundles/``."""
    return [p for b in sorted((root / "bundles").iterdir()) for f in CONFIG_FILES if (p := b / "configs" / f).is_file()]


def _fill(config: Any, blocks: dict[str, Any], where: str, found: list[tuple[str, str, bool]], path: str = "") -> Any:
    if isinstance(config, dict):
        desc = config.get("_desc_")
        if isinstance(desc, str) and desc.startswith(MARK):
            name = desc[len(MARK) :]
            if name not in blocks:
                raise KeyError(f"{where}: {path} asks for shared block {name!r}, which {BLOCKS.name} does not define")
            found.append((path, name, config != blocks[name]))
            return json.loads(json.dumps(blocks[name]))
        return {k: _fill(v, blocks, where, found, f"{path}#{k}" if path else k) for k, v in config.items()}
    if isinstance(config, list):
        return [_fill(v, blocks, where, found, f"{path}#{i}") for i, v in enumerate(config)]
    return config


def sync_config(path: Path, blocks: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    """The text ``path`` should have, and ``(id path, block name, differed)`` for each marked block in it."""
    found: list[tuple[str, str, bool]] = []
    config = _fill(json.loads(Path(path).read_text()), blocks, str(path), found)
    return dumps(config) + "\n", found


def dumps(value: Any, indent: int = 0, column: int | None = None) -> str:
    """JSON in the configs' layout: a value that fits on its line (``column`` + its text + a comma
    within ``WIDTH``) stays on one line; larger objects and lists get one entry per line, 4 spaces deeper."""
    column = indent if column is None else column
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value or column + len(flat) + 1 <= WIDTH:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            key = json.dumps(k, ensure_ascii=False) + ": "
            items.append(pad + key + dumps(v, indent + 4, indent + 4 + len(key)))
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + dumps(v, indent + 4) for v in value) + "\n" + " " * indent + "]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", help="only these bundles (default: every folder in bundles/)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = ap.parse_args(argv)
    blocks = load_blocks()
    stale, used = [], set()
    for path in bundle_config_files():
        if args.bundles and path.parts[-3] not in args.bundles:
            continue
        text, found = sync_config(path, blocks)
        used.update(name for _, name, _ in found)
        rel = path.relative_to(ROOT)
        if text == path.read_text():
            continue
        drift = [f"{p} ({n})" for p, n, d in found if d]
        stale.append(f"{rel}: " + (f"differs from {BLOCKS.name} at {', '.join(drift)}" if drift else "layout"))
        if not args.check:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    unused = sorted(set(blocks) - used)
    for line in stale:
        print(("stale: " if args.check else "wrote: ") + line)
    if unused and not args.bundles:
        print(f"{BLOCKS.relative_to(ROOT)}: blocks no bundle uses: {', '.join(unused)}")
    return 1 if (args.check and stale) or unused else 0


if __name__ == "__main__":
    sys.exit(main())
