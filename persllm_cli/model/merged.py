"""A cache of runs folded into their base, so that CPU generation can skip PEFT altogether.

On CPU `load.load_run` merges the adapter into float32 weights anyway. The first load of a
run saves that merged model under PERSLLM_HOME/merged/<key>/; later loads read it with plain
transformers. They never import peft, nor bitsandbytes, which peft imports whenever it is installed
(about half of a `persllm chat --prompt` process's start-up on a 2-core machine).

The key hashes everything the merged weights depend on: the adapter's files, the size of the run's
tokenizer, and the base's config and weight files (path, size, modification time). Retraining into
the same run directory or replacing the base therefore misses the cache, never reads a stale copy.
Only small models are cached (at most MAX_BYTES of float32 weights), and only the KEEP most
recently used copies are kept; any entry may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import persllm_home
from persllm_cli.data.store import plain_modes
from persllm_cli.model.bases import load_base

MAX_BYTES = 2 * 1024**3
KEEP = 3
_FORMAT = "merged-float32-v1"


def cache_dir(run: Path, base: str, vocab_size: int) -> Path | None:
    """Where the merged copy of `run` on `base` lives (present or not); None when the base is not
    a local directory (a hub id has no cheap identity to key on)."""
    base_dir = Path(base)
    if not base_dir.is_dir():
        return None
    h = hashlib.sha256(f"{_FORMAT}\0{vocab_size}\0{base_dir.resolve()}\0".encode())
    for f in sorted(base_dir.glob("*.safetensors")) + [base_dir / "config.json"]:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for f in sorted((run / "adapter").iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return persllm_home() / "merged" / h.hexdigest()[:32]


def load(where: Path | None) -> Any | None:
    """The cached merged model in float32, or None on a miss (or an unreadable entry, removed)."""
    if where is None or not (where / "config.json").is_file():
        return None
    try:
        model = load_base(str(where), device="cpu", dtype="float32")
    except (PersllmError, RuntimeError):
        shutil.rmtree(where, ignore_errors=True)
        return None
    try:
        os.utime(where)  # most recently used: pruned last
    except OSError:
        pass
    return model


def store(model: Any, where: Path | None) -> None:
    """Save a merged model for the next load, if it is small enough; a cache that cannot be written
    (disk full, read-only home) costs only the speed-up, never the answer."""
    if where is None or where.exists():
        return
    if model.num_parameters() * 4 > MAX_BYTES:
        return
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}.", dir=where.parent))
        model.save_pretrained(tmp)
        plain_modes(tmp)
        os.replace(tmp, where)  # fails harmlessly if another process stored it first
        _prune(where.parent)
    except OSError:
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path) -> None:
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
