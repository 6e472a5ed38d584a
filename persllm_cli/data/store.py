"""The JSONL record files every stage reads and writes, and the files beside them.

One record per line (the schema: records.py). Writers either replace a file atomically (temp file +
rename, so a crash never leaves half a file) or append one record at a time, flushed, so an
interrupted run resumes where it stopped. A line torn by a crash is only ever the last one, has no
trailing newline, and is cut off on the next run instead of being read as data. Also: folders
replaced whole (replace_dir), and write errors the user can fix as one line. The `.meta.json`
beside an output is sidecars.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from persllm_cli.core import console
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.records import Record, latest_by_id


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dumps(record: Record) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def _umask() -> int:
    # Read without setting it where Linux allows: os.umask() changes it for every thread meanwhile.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes plain open() and mkdir() would:
    0o666 / 0o777 less the umask. tempfile (and safetensors) make 0600 files and 0700 folders,
    which would hide outputs from the people the user shares them with."""
    path = Path(path)
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def replace_dir(target: Path, *, prefix: str | None = None) -> Iterator[Path]:
    """Build a folder in a hidden temporary sibling of `target`; when the block ends without an
    error, it takes `target`'s place (the old folder, if any, moved aside first and then removed).
    Readers see the old folder or the new one, never half of one, and a failure leaves `target` as
    it was. Used by tokenize, train (the adapter), the embedded model's conversion and export.

        with replace_dir(out) as tmp:
            (tmp / "meta.json").write_text(...)
    """
    target = Path(target)
    make_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        plain_modes(tmp)  # mkdtemp (and safetensors) make 0700 folders and 0600 files
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            if target.exists() or target.is_symlink():
                os.replace(target, aside / "old")
            try:
                os.replace(tmp, target)
            except BaseException:
                if (aside / "old").exists():
                    os.replace(aside / "old", target)
                raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_a_directory(path: Path) -> PersllmError:
    return PersllmError(f"{path}: is a directory, expected a file")


def make_dirs(path: Path) -> None:
    """mkdir -p, with whatever stands in the way (a file, a missing permission) as one clear line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        there = next((p for p in [path, *path.parents] if p.exists()), path)
        why = e.strerror if there.is_dir() else f"{there} is a file, not a folder"
        raise PersllmError(f"cannot create the folder {path}: {why}") from None


# errno values of a write the user can fix: disk full, a file-size limit, a quota, a permission, read-only.
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def os_error(e: BaseException) -> OSError | None:
    """`e` as an OSError: itself, or what a Rust library (tokenizers, safetensors) raises for one
    ("... (os error 27)"). None for anything else."""
    if isinstance(e, OSError):
        return e
    import re

    m = re.search(r"\(os error (\d+)\)", str(e))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code))


def write_failed(path: Path, e: OSError, after: str = "") -> PersllmError:
    """A write that failed (disk full, a file-size limit, a quota, a permission) as one line naming the file."""
    why = e.strerror or str(e)
    if e.errno == errno.EFBIG:
        why += " (a file-size limit, e.g. ulimit -f)"
    return PersllmError(f"cannot write {path}: {why}" + (f"; {after}" if after else ""))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file so that readers see the old file or the new one, never a part.
    A failed write (disk full, ...) leaves the old file as it was and raises one line naming it."""
    with open_atomic(path) as f:
        f.write(text)


@contextmanager
def open_atomic(path: Path) -> Iterator[Any]:
    """A text file to write `path` through, line by line (a file too big to hold in memory as one
    string): it is a temporary sibling until the block ends without an error, then it replaces
    `path` at once. Any error leaves `path` as it was; a failed write is one line naming it.

        with open_atomic(out) as f:
            for line in lines:
                f.write(line)
    """
    path = Path(path)
    if path.is_dir():
        raise _is_a_directory(path)
    make_dirs(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 suits the temp file, not the output
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise write_failed(path, e, "the file is as it was before") from None
        raise
    _fsync_dir(path.parent)


def write_jsonl_atomic(path: Path, records: Iterable[Record]) -> int:
    """Replace `path` with these records, atomically. Returns the number written."""
    lines = [dumps(r) for r in records]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_text(path: Path, *, required: bool = True) -> str | None:
    """A UTF-8 text file's contents (a leading BOM dropped), or None when it is missing and not
    required. Missing files, folders and non-UTF-8 bytes are one clear error naming file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise PersllmError(f"{path}: file not found") from None
        return None
    except IsADirectoryError:
        raise _is_a_directory(path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PersllmError(f"{path}:{line}: not UTF-8 text (save the file as UTF-8)") from None


def read_jsonl(path: Path, *, allow_torn_tail: bool = True, required: bool = True) -> list[Record]:
    """All records of a JSONL file, in order.

    Errors name file and line. A torn last line (no newline at the end, not valid JSON) is left
    out when `allow_torn_tail`, since it is what a crash mid-append leaves behind.
    """
    path = Path(path)
    text = read_text(path, required=required)
    if text is None:
        return []
    lines = text.split("\n")
    torn = lines[-1]  # "" when the file ends with a newline
    records: list[Record] = []
    for i, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        records.append(_parse(line, path, i))
    if torn.strip():
        try:
            records.append(_parse(torn, path, len(lines)))
        except PersllmError:
            if not allow_torn_tail:
                raise
            # Said aloud: a hand-edited last line with a typo must not vanish without a word.
            console.warn(f"{path}:{len(lines)}: ignoring an incomplete last line (not valid JSON, no newline at "
                         "the end); a crash leaves one, and the next append repairs it")
    return records


def _parse(line: str, path: Path, lineno: int) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PersllmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise PersllmError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_records(path: Path, *, what: str = "records") -> list[Record]:
    """Read an input file that must exist and hold at least one record."""
    path = Path(path)
    if not path.exists():
        raise PersllmError(f"{path}: file not found")
    records = read_jsonl(path)
    if not records:
        raise PersllmError(f"{path}: no {what} in the file (it is empty)")
    return records


def repair_tail(path: Path) -> bool:
    """Cut a torn last line (crash mid-append). Returns True when something was cut.

    A last line without a newline that still parses is complete: it only gets its newline.
    """
    path = Path(path)
    if not path.exists():
        return False
    if path.is_dir():
        raise _is_a_directory(path)
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        # Find the start of the last line.
        pos, chunk = size, 65536
        start = 0
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step)
            nl = buf.rfind(b"\n")
            if nl != -1:
                start = pos + nl + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            obj = json.loads(tail.decode("utf-8"))
            complete = isinstance(obj, dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            return False
        f.seek(0)
        line = f.read(start).count(b"\n") + 1
        console.warn(f"{path}:{line}: removed an incomplete last line (not valid JSON, no newline at the end), "
                     "as a crash mid-append leaves one")
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
        return True


class Appender:
    """Appends records to a JSONL file one line at a time, flushed to the OS after each record.

    kill -9 loses nothing that `append` returned from. fsync (power cuts) runs at most every
    `fsync_every` seconds and on close, so fast runs do not wait on the disk per record.
    A write that fails (disk full, a file-size limit, a quota) cuts the part of the line that got
    out, so the file stays whole up to its last record, and raises one line naming the file (exit 1);
    a rerun resumes from there.
    """

    def __init__(self, path: Path, fsync_every: float = 0.5):
        self.path = Path(path)
        make_dirs(self.path.parent)
        try:
            repair_tail(self.path)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_failed(self.path, e) from None
        self._fsync_every = fsync_every
        self._last_sync = time.monotonic()
        self.count = 0

    def _failed(self, e: OSError) -> PersllmError:
        return write_failed(self.path, e, "the records before this one are kept; make room and rerun to resume")

    def append(self, record: Record) -> None:
        if self._fd is None:
            raise ValueError("append to a closed Appender")
        data = (dumps(record) + "\n").encode("utf-8")
        start = None
        try:
            start = os.lseek(self._fd, 0, os.SEEK_END)
            view = memoryview(data)
            while view:  # one line, written whole or cut back off
                view = view[os.write(self._fd, view):]
        except OSError as e:
            if start is not None:
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass  # left torn: the next run's repair_tail cuts it
            raise self._failed(e) from None
        self.count += 1
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_every:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise self._failed(e) from None
            self._last_sync = now

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as e:
            raise self._failed(e) from None
        finally:
            os.close(fd)

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ResumeState:
    """What an append-only output already holds: ids done (ok) and ids that failed last time."""

    ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    records: dict[str, Record] = field(default_factory=dict)


def resume_state(path: Path, *, repair: bool = True) -> ResumeState:
    """Repair a torn tail (unless `repair` is False: a dry run touches no file), then read which ids
    are done. The last record per id decides."""
    path = Path(path)
    if repair:
        repair_tail(path)
    latest = latest_by_id(read_jsonl(path, required=False))
    st = ResumeState(records=latest)
    for rid, r in latest.items():
        (st.ok if r.get("status") == "ok" else st.failed).add(rid)
    return st
