"""The sidecar beside every output (`OUT.meta.json`: the command, its settings, the sha256 of its
inputs, the versions of Python and the libraries, the time it took), and the timer that measures it."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from persllm_cli.data.store import write_text_atomic


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of persllm and the libraries that shape outputs (without importing them)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": sys.platform}
    for pkg in ("persllm", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "scikit-learn",
                "openai", "sentence-transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def meta_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def write_meta(path: Path, *, command: str, settings: dict[str, Any], inputs: Iterable[Path] = (),
               counts: dict[str, Any] | None = None, seconds: float | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write `<path>.meta.json`: what made this file (settings without secrets, input hashes,
    counts, timings, versions)."""
    meta: dict[str, Any] = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "inputs": {str(p): file_sha256(p) for p in inputs if Path(p).is_file()},
        "counts": counts or {},
        "seconds": round(seconds, 3) if seconds is not None else None,
        "versions": versions(),
    }
    if extra:
        meta.update(extra)
    target = meta_path(path)
    write_text_atomic(target, json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    return target


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    t = {"start": time.perf_counter(), "seconds": 0.0}
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - t["start"]
