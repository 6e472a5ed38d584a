"""Writers that never collide, stop cleanly and fail cleanly, through real processes: two runs on one
output (a lock that dies with its process), SIGTERM, a write that fails (a real file-size limit),
and library noise kept off stderr."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from persllm_cli.data.store import read_jsonl
from tests.conftest import persllm_cmd, run_persllm, subprocess_env
from tests.test_annotate import make_project

PARAS = [f"Paragraph number {i} tells how Harry flew over the lake on a broom." for i in range(8)]


def _project(cli, tmp_path: Path) -> Path:
    return make_project(cli, tmp_path / "w", early=PARAS)


def _env(fake) -> dict[str, str]:
    return subprocess_env(OPENAI_API_KEY=fake.api_key, OPENAI_BASE_URL=fake.url)


def _start(root: Path, env: dict[str, str], *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*persllm_cmd(), *args], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines (process exit {proc.poll()})")


def _ids(out: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(out, allow_torn_tail=False)]


ANNOTATE = ("annotate", "--stage", "early", "--concurrency", "1")


# ------------------------------------------------------------------------------ two runs at once

def test_second_run_names_the_holder_and_exits_1_and_wait_waits(tmp_path, cli, fake_openai):
    root = _project(cli, tmp_path)
    out = root / "build/annotations.jsonl"
    fake_openai.latency = 0.2
    env = _env(fake_openai)
    first = _start(root, env, *ANNOTATE)
    waiter_err = tmp_path / "waiter.err"
    try:
        _wait_lines(out, 1, first)
        fake_openai.gate.clear()   # the first run stays mid-write until the waiter has been seen waiting
        second = run_persllm(*ANNOTATE, cwd=root, env=env, timeout=60)
        assert second.returncode == 1, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith("error: ") and str(out) in line and f"process {first.pid}" in line
        assert "persllm annotate" in line and "--wait" in line
        with open(waiter_err, "w") as err_file:
            waiter = subprocess.Popen([*persllm_cmd(), "--wait", *ANNOTATE], cwd=root, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        deadline = time.time() + 30
        while time.time() < deadline and "waiting for" not in waiter_err.read_text():
            time.sleep(0.05)
        assert f"waiting for process {first.pid}" in waiter_err.read_text()
        assert first.poll() is None                      # it waits while the first one writes
        fake_openai.gate.set()
        _, err_first = first.communicate(timeout=60)
        assert first.returncode == 0, err_first
        assert waiter.wait(timeout=60) == 0, waiter_err.read_text()
        assert "nothing to do" in waiter_err.read_text()
    finally:
        fake_openai.gate.set()
        first.kill()
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == len(PARAS)       # no record twice, nothing interleaved
    assert len(fake_openai.completions()) == len(PARAS)  # and no request paid for twice


def test_a_killed_holder_never_blocks_the_next_run(tmp_path, cli, fake_openai):
    root = _project(cli, tmp_path)
    out = root / "build/annotations.jsonl"
    fake_openai.latency = 0.3
    env = _env(fake_openai)
    first = _start(root, env, *ANNOTATE)
    _wait_lines(out, 1, first)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    assert (root / "build/.annotations.jsonl.lock").exists()   # the file stays; its lock died with the process
    fake_openai.latency = 0.0
    r = run_persllm(*ANNOTATE, cwd=root, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == len(PARAS)


def test_lock_helper_in_process_is_reentrant_and_other_process_is_refused(tmp_path):
    """What export and converse use: hold(output) around their writes."""
    from persllm_cli.core.errors import PersllmError
    from persllm_cli.data.lock import hold

    target = tmp_path / "out.jsonl"
    code = textwrap.dedent(f"""
        from persllm_cli.data.lock import hold
        from persllm_cli.core.errors import PersllmError
        try:
            with hold({str(target)!r}, wait=False):
                print("got it")
        except PersllmError as e:
            print(e)
    """)
    with hold(target):
        with hold(target):   # the same process again: no deadlock
            pass
        r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
        assert f"being written by process {os.getpid()}" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert r.stdout.strip() == "got it"
    with pytest.raises(PersllmError):   # a folder where the lock file's parent should be
        (tmp_path / "f").write_text("x")
        with hold(tmp_path / "f" / "sub" / "out"):
            pass


# ------------------------------------------------------------------------------ SIGTERM

def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path, cli, fake_openai):
    root = _project(cli, tmp_path)
    out = root / "build/annotations.jsonl"
    fake_openai.latency = 0.3
    env = _env(fake_openai)
    proc = _start(root, env, *ANNOTATE)
    _wait_lines(out, 2, proc)
    fake_openai.gate.clear()   # mid-run when the signal lands, however slow the machine
    try:
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        fake_openai.gate.set()
    assert proc.returncode == 130, err
    assert "interrupted by SIGTERM; the work done so far is saved" in err and "Traceback" not in err
    done = _ids(out)                                     # whole records only
    assert 2 <= len(done) < len(PARAS)
    side = json.loads((root / "build/annotations.jsonl.meta.json").read_text())
    assert side["counts"]["ok"] == len(done) and side["last_run"] == {"interrupted": True}
    fake_openai.latency = 0.0
    r = run_persllm(*ANNOTATE, cwd=root, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == len(PARAS)


def test_sigterm_stops_torchrun_and_every_rank(tmp_path):
    """train --nproc/--gpus runs torchrun in its own process group; SIGTERM to persllm reaches every
    rank (killing torchrun alone would leave its ranks training)."""
    pids = tmp_path / "pids"
    child = textwrap.dedent(f"""
        import subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]) for _ in range(2)]
        open({str(pids)!r}, "w").write(" ".join(str(k.pid) for k in kids))
        time.sleep(300)
    """)
    parent = textwrap.dedent(f"""
        import os, sys
        from persllm_cli.core.errors import stop_on_sigterm
        from persllm_cli.train.command import _run_group
        stop_on_sigterm()
        try:
            _run_group([sys.executable, "-c", {child!r}], dict(os.environ), grace=5)
        except KeyboardInterrupt as e:
            print(type(e).__name__)
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (pids.exists() and pids.read_text().strip()):
        time.sleep(0.05)
    ranks = [int(p) for p in pids.read_text().split()]
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out.strip() == "Terminated"
    for pid in ranks:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"rank {pid} outlived persllm")


# ------------------------------------------------------------------------------ a write that fails

def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_file_size_limit_fails_in_one_line_keeps_whole_records_and_resumes(tmp_path, cli, fake_openai):
    root = _project(cli, tmp_path)
    out = root / "build/annotations.jsonl"
    env = _env(fake_openai)
    proc = subprocess.run([*persllm_cmd(), *ANNOTATE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_file_size(4000))
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}: File too large"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.stat().st_size <= 4000 and out.read_bytes().endswith(b"\n")   # no torn line left behind
    kept = _ids(out)
    assert 1 <= len(kept) < len(PARAS)
    r = run_persllm(*ANNOTATE, cwd=root, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "incomplete" not in r.stderr
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == len(PARAS) and ids[: len(kept)] == kept


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    """write_text_atomic under a file-size limit, in a real process: one line, the old file intact."""
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "report.json"
    target.write_text("old\n")
    code = textwrap.dedent(f"""
        import signal
        from persllm_cli.core.errors import stop_on_sigterm, PersllmError
        from persllm_cli.data.store import write_text_atomic
        stop_on_sigterm()
        try:
            write_text_atomic({str(target)!r}, "x" * 100000)
        except PersllmError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                       preexec_fn=_limit_file_size(10000))
    assert r.stdout.startswith(f"cannot write {target}: File too large"), r.stdout + r.stderr
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]          # no temp file left


# ------------------------------------------------------------------------------ tokenize: noise and a failed write

LIBRARY_NOISE = ("%|", "it/s]", "de-quantizing", "Warning", "warn(", "Traceback")


@pytest.mark.slow
def test_tokenize_converts_quietly_and_a_failed_write_keeps_the_old_output(cli, tmp_path):
    """The one-time GGUF conversion (fresh PERSLLM_HOME) with stderr not a terminal: persllm's own
    lines only. Then a tokenize under a file-size limit: one line naming the file, exit 1, the
    previous output untouched."""
    from tests.test_tokenize import _project as tokenize_project

    p = tokenize_project(cli, tmp_path)
    env = subprocess_env()
    r = run_persllm("tokenize", cwd=p, env=env, timeout=400)
    assert r.returncode == 0, r.stderr
    assert "Converting the embedded model smollm2-135m" in r.stderr
    for noise in LIBRARY_NOISE:
        assert noise not in r.stderr, r.stderr
    out = p / "build" / "tokenized"
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert not (p / "build" / ".tokenized.lock").exists()          # a run that ends leaves no lock file

    r = subprocess.run([*persllm_cmd(), "tokenize", "--max-length", "64"], cwd=p, env=env, capture_output=True,
                       text=True, timeout=400, preexec_fn=_limit_file_size(200_000))
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: cannot write ") and "File too large" in line and f"{out} is unchanged" in line
    assert "Traceback" not in r.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    assert sorted(x.name for x in (p / "build").iterdir()) == ["dpo.jsonl", "tokenized", "train.jsonl"]
