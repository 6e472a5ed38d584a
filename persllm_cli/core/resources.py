"""Files shipped with persllm: prompt templates and the example project.

In a wheel they live inside the package (persllm_cli/templates, persllm_cli/examples); in a source
checkout they are the top-level templates/ and examples/ folders.
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

from persllm_cli.core.errors import PersllmError

_PKG = Path(__file__).resolve().parent.parent  # persllm_cli/


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise PersllmError(f"persllm's {name}/ folder is missing from this installation (reinstall persllm)")


def templates_dir() -> Path:
    return _find("templates")


def examples_dir() -> Path:
    return _find("examples")


@lru_cache(maxsize=None)
def template_text(name: str) -> str:
    path = templates_dir() / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PersllmError(f"template {name} not found in {templates_dir()}") from None


def render(_template: str, /, **values: object) -> str:
    """Fill a template from templates/ ($name placeholders, string.Template rules; $$ is a dollar)."""
    try:
        return string.Template(template_text(_template)).substitute(**values)
    except KeyError as e:
        raise PersllmError(f"template {_template} needs a value for ${e.args[0]}") from None
