"""Shared fixtures: a private PERSLLM_HOME per test, the CLI runner, projects, the fake API server,
and the embedded model converted once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fakes.openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test: PERSLLM_HOME in a temp dir, no real API settings, a clean working directory."""
    home = tmp_path / "persllm-home"
    home.mkdir()
    monkeypatch.setenv("PERSLLM_HOME", str(home))
    for var in list(os.environ):
        if var.startswith("PERSLLM_") and var != "PERSLLM_HOME":
            monkeypatch.delenv(var)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    from persllm_cli.core import console

    console.set_quiet(False)
    yield home


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, input: str | None = None):
    """Run `persllm ARGS` in-process; bugs propagate with their traceback."""
    from persllm_cli.cli import app

    return runner.invoke(app, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def cli(runner):
    """cli("init", "x", ...) -> click Result (exit_code, stdout, stderr)."""
    return lambda *args, input=None: invoke(runner, *args, input=input)


def persllm_cmd() -> list[str]:
    return [sys.executable, "-m", "persllm_cli"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_persllm(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `persllm` in a subprocess (for kill/resume and process-level tests)."""
    return subprocess.run([*persllm_cmd(), *args], cwd=cwd, env=env or subprocess_env(), input=input,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def harry(tmp_path, cli) -> Path:
    """A fresh copy of the Harry Potter example project."""
    result = cli("init", str(tmp_path / "harry"), "--example", "harry")
    assert result.exit_code == 0, result.output
    return tmp_path / "harry"


@pytest.fixture
def fake_openai(monkeypatch):
    """A running fake OpenAI-compatible server; OPENAI_API_KEY/OPENAI_BASE_URL point at it."""
    with FakeOpenAI() as fake:
        monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        yield fake


@pytest.fixture(scope="session")
def _embedded_models(tmp_path_factory) -> Path:
    """The embedded smollm2-135m converted once for the whole session (20-40 s). Under pytest-xdist
    (`make test` runs two or more workers) every worker uses the run's shared folder: the first converts,
    the others wait on the conversion's own lock and take its result."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    home = root / "shared-persllm-home"
    home.mkdir(exist_ok=True)
    old = os.environ.get("PERSLLM_HOME")
    os.environ["PERSLLM_HOME"] = str(home)
    try:
        from persllm_cli.model.bases import ensure_embedded

        ensure_embedded("smollm2-135m")
    finally:
        if old is None:
            os.environ.pop("PERSLLM_HOME", None)
        else:
            os.environ["PERSLLM_HOME"] = old
    return home / "models"


@pytest.fixture
def smollm2(_embedded_models, _isolated) -> Path:
    """The converted embedded model, linked into this test's PERSLLM_HOME. Returns its directory."""
    models = _isolated / "models"
    models.mkdir(exist_ok=True)
    link = models / "smollm2-135m"
    if not link.exists():
        link.symlink_to(_embedded_models / "smollm2-135m", target_is_directory=True)
    return link


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        # The marker itself: item.keywords also holds the names of parent folders (a checkout in .../gpu/).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def project(cli, tmp_path, monkeypatch) -> Path:
    """A project with two stages of short material (retrieval for chat --api-model and converse), as
    the working directory. Test files with their own `project` fixture use theirs."""
    root = tmp_path / "harry"
    assert cli("init", str(root), "--name", "Harry Potter", "--stage", "early:first year at Hogwarts",
               "--stage", "late:after the war").exit_code == 0
    (root / "data/early/knowledge.txt").write_text(
        "I caught the golden snitch in my mouth during my first Quidditch match.\n"
        "Hagrid told me I was a wizard on my eleventh birthday.\n", encoding="utf-8")
    (root / "data/early/style.txt").write_text("Blimey, that was brilliant!\n", encoding="utf-8")
    (root / "data/late/knowledge.txt").write_text(
        "After the war I trained as an Auror and later led the Auror office.\n"
        "I married Ginny and we named our son James Sirius.\n", encoding="utf-8")
    (root / "data/late/style.txt").write_text("I try to keep my temper these days.\n", encoding="utf-8")
    monkeypatch.chdir(root)
    return root
