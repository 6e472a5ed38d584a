"""The house rules that import-linter does not check: no private name crosses a package.

A name that starts with "_" belongs to its package. Another package that needs it should get a
public name (and the owner then keeps it working), not reach in: `from persllm_cli.model.load
import _attach_adapter` or `load._attach_adapter(...)` from persllm_cli/export is what this test
refuses. Within one package (model/load.py using model/bases.py) private names are fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ROOT = "persllm_cli"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package(module: str) -> str:
    """The package a module belongs to: persllm_cli.export.hf -> export; persllm_cli.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def private_crossings(src: Path) -> list[str]:
    """Every use of another package's private name under the package folder `src`, as
    "file:line: what"."""
    found = []
    for path in sorted(src.rglob("*.py")):
        me = _module_name(path, src)
        mine = _package(me)
        here = me if path.name == "__init__.py" else me.rpartition(".")[0]
        modules: dict[str, str] = {}   # local name -> the persllm module it stands for
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] != src.name:
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    modules[alias.asname or alias.name] = target
                    if _package(target) == mine:
                        continue
                    if _private(alias.name) or any(_private(p) for p in base.split(".")):
                        found.append(f"{path.relative_to(src.parent)}:{node.lineno}: from {base} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != src.name:
                        continue
                    modules[alias.asname or alias.name] = alias.name
                    if _package(alias.name) != mine and any(_private(p) for p in alias.name.split(".")):
                        found.append(f"{path.relative_to(src.parent)}:{node.lineno}: import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                    and node.value.id in modules and _package(modules[node.value.id]) != mine):
                found.append(f"{path.relative_to(src.parent)}:{node.lineno}: "
                             f"{node.value.id}.{node.attr} ({modules[node.value.id]})")
    return found


def test_no_private_name_crosses_a_package():
    assert private_crossings(REPO / ROOT) == []


def test_the_scan_finds_each_way_of_reaching_in(tmp_path):
    src = tmp_path / ROOT
    for d in ("model", "export"):
        (src / d).mkdir(parents=True)
        (src / d / "__init__.py").write_text("")
    (src / "__init__.py").write_text("")
    (src / "model" / "load.py").write_text("def _attach(): ...\ndef load_run(): ...\n")
    (src / "model" / "bases.py").write_text(  # the same package: allowed
        "from persllm_cli.model.load import _attach\nfrom persllm_cli.model import load\nload._attach()\n")
    (src / "export" / "hf.py").write_text(
        "from persllm_cli.model import load\n"
        "from persllm_cli.model.load import _attach, load_run\n"
        "from ..model.load import _attach as again\n"
        "import persllm_cli.model.load as loader\n"
        "def f():\n    load._attach()\n    loader._attach()\n    load.load_run()\n    load.__name__\n")
    assert private_crossings(src) == [
        "persllm_cli/export/hf.py:2: from persllm_cli.model.load import _attach",
        "persllm_cli/export/hf.py:3: from persllm_cli.model.load import _attach",
        "persllm_cli/export/hf.py:6: load._attach (persllm_cli.model.load)",
        "persllm_cli/export/hf.py:7: loader._attach (persllm_cli.model.load)",
    ]
