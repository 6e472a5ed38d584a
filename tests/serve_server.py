"""A real `persllm serve` in a subprocess on a free port, for the serve tests and the benchmark."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import persllm_cmd, subprocess_env


class ServeProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
        self.proc = subprocess.Popen([*persllm_cmd(), "serve", *args, "--port", "0"], cwd=cwd,
                                     env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.url = ""
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"Listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("serve did not start:\n" + "\n".join(self.lines))
        if not self.url:
            raise RuntimeError("serve exited:\n" + "\n".join(self.lines))

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
