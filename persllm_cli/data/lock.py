"""One writer per output: an operating-system lock that dies with its process.

Every command that writes an output it appends to or builds over time (annotate's records, dpo
--mode generate's work file, eval's answers and verdicts, tokenize's folder, train's run folder,
export, converse) holds `hold(output)` while it writes. A second run on the same output names the
process that holds it and exits 1, or waits for it with the global `--wait`.

The lock is `fcntl.flock` on a hidden sibling file `.<name>.lock` (never the output itself: atomic
writes replace the output's inode). The kernel drops the lock when the holding process ends, however
it ends (kill -9 included), so a stale lock never blocks the next run. A run that ends removes the
file (a killed one leaves it, unlocked and harmless); a waiter that finds its file removed locks the
new one. Its text is the holder's pid and command, only to name it in the message.

Locks are re-entrant within one process (flock locks per open file, so a second flock of the same
file in the same process would wait for itself); torchrun ranks do not lock, their parent does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_ERROR, PersllmError

_wait = False
_held: dict[Path, list] = {}   # lock file -> [open file, depth]
_guard = threading.Lock()


def set_wait(wait: bool) -> None:
    """The global `--wait`: wait for another run to finish instead of exiting 1."""
    global _wait
    _wait = wait


def lock_path(output: Path) -> Path:
    """The lock file that guards `output` (a file or a folder): `.<name>.lock` beside it."""
    output = Path(os.path.abspath(Path(output).expanduser()))
    return output.with_name(f".{output.name}.lock")


def _holder(f) -> str:
    try:
        f.seek(0)
        text = f.read().strip()
    except OSError:
        text = ""
    pid, _, what = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" ({what})" if what else "")


@contextmanager
def hold(output: Path, wait: bool | None = None) -> Iterator[None]:
    """Hold the lock on `output` while the block runs.

    Taken: another process holds it -> PersllmError (exit 1) naming that process, unless `wait`
    (default: the global --wait), then block until it is free (Ctrl-C/SIGTERM still stop the wait).
    """
    wait = _wait if wait is None else wait
    path = lock_path(output)
    with _guard:
        entry = _held.get(path)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _guard:
                entry[1] -= 1
        return
    from persllm_cli.data.store import make_dirs

    made = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    make_dirs(path.parent)
    f = _acquire(path, output, wait)
    try:
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} persllm {' '.join(sys.argv[1:])}".strip()[:500] + "\n")
            f.flush()
        except OSError:
            pass  # the lock itself is held; the text only names us
        with _guard:
            _held[path] = [f, 1]
        try:
            yield
        finally:
            with _guard:
                _held.pop(path, None)
            # Removed while still held: a process waiting on this file sees it is gone and locks a new one.
            try:
                path.unlink()
            except OSError:
                pass
            for d in made:  # folders made only for the lock, left empty by a run that wrote nothing
                try:
                    d.rmdir()
                except OSError:
                    break
    finally:
        f.close()  # closing the file drops the lock


def _acquire(path: Path, output: Path, wait: bool):
    """Open and flock `path`; retry when the file was removed (by its last holder) meanwhile."""
    while True:
        try:
            f = open(path, "a+", encoding="utf-8")
        except OSError as e:
            raise PersllmError(f"cannot create the lock file {path}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise PersllmError(f"cannot lock {path}: {e.strerror}") from None
                who = _holder(f)
                if not wait:
                    raise PersllmError(f"{output} is being written by {who}; wait for it to finish, or rerun "
                                       f"with `persllm --wait ...` to wait for it", EXIT_ERROR) from None
                console.note(f"waiting for {who} to finish writing {output}...")
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            mine = os.fstat(f.fileno())
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            f.close()
            raise
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return f
        f.close()  # the holder removed the file as it finished: lock the one there now
