"""Every ``monai.bundle run`` command the README and the bundles' docs give, read as bash would read it
when pasted in the repository root: its config files exist and stack (``--config_file`` a path or a
list of paths), and every ``--<id>`` it overrides is a setting of those configs (a renamed or dropped
id, or a path written with stray quotes, fails here instead of on a user's machine)."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "bundles").glob("*/docs/README.md"))]
#: options of ``monai.bundle run`` / torchrun itself, not config ids
RUNNER_OPTIONS = {"config_file", "meta_file", "logging_file", "args_file", "nproc_per_node", "tracking"}
_BLOCK = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
_ASSIGN = re.compile(r"^(\w+)=(.*)$")


def _commands(doc: Path) -> list[tuple[str, list[str]]]:
    """(doc:first line, argv) of each ``monai.bundle run`` command in the doc's code blocks, with the
    doc's ``NAME=value`` assignments substituted and continuation lines joined."""
    out = []
    env: dict[str, str] = {}  # a shell variable set in one block holds in the next (pasted in one shell)
    for block in _BLOCK.findall(doc.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            m = _ASSIGN.match(line)
            if m:
                env[m.group(1)] = " ".join(shlex.split(m.group(2))) if m.group(2) else ""
                continue
            if "monai.bundle run" not in line:
                continue
            for name in sorted(env, key=len, reverse=True):
                line = line.replace("${" + name + "}", env[name]).replace("$" + name, env[name])
            try:
                argv = shlex.split(line)
            except ValueError as e:  # unbalanced quotes
                raise AssertionError(f"{doc.relative_to(ROOT)}: cannot be pasted into bash ({e}): {line}") from None
            out.append((f"{doc.relative_to(ROOT)}: {line[:100]}", argv))
    return out


COMMANDS = [c for doc in DOCS for c in _commands(doc)]


def test_the_docs_give_bundle_commands():
    assert len(COMMANDS) >= 20
    assert {Path(p).name for p in DOCS} == {"README.md"} and len(DOCS) >= 6


def _options(argv: list[str]) -> dict[str, str]:
    opts, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and len(a) > 2:
            key, _, value = a[2:].partition("=")
            if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            opts[key] = value
        i += 1
    return opts


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[c[0][:80] for c in COMMANDS])
def test_documented_command_resolves(where, argv):
    from monai.bundle import ConfigParser

    opts = _options(argv[argv.index("run") + 1 :])
    assert "config_file" in opts, where
    value = opts["config_file"]
    files = ast.literal_eval(value) if value.startswith("[") else [value]
    if any(f.startswith(("dist/", "configs/", "<")) or "/tmp/" in f for f in files):
        pytest.skip("a command for an exported bundle or a user's own folder")
    paths = [ROOT / f for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"{where}: no such config file {missing}"
    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    unknown = [
        k
        for k in opts
        if k not in RUNNER_OPTIONS and k.split("#")[0] not in parser.get("", {}) and not k.startswith("ingest_")
    ]
    assert not unknown, f"{where}: overrides ids the configs do not have: {unknown}"
