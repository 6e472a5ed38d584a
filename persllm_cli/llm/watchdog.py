"""Ending streamed replies that have gone silent: one thread watches every open stream of a backend.

A blocked read cannot be given a new timeout once it has started, so when a stream's deadline
passes the watchdog shuts its socket down, which wakes the reading thread at once (the reader then
sees `expired` and reports a timeout). The reader moves the deadline on with every chunk.

    w = Watch(time.monotonic() + first_token_limit)
    watchdog.add(w)
    w.attach(response)            # the HTTP response whose body is being read
    ... w.deadline = time.monotonic() + timeout   (per chunk)
    watchdog.remove(w)
"""

from __future__ import annotations

import threading
from typing import Any


class Watch:
    """One streaming request the watchdog looks after."""

    __slots__ = ("deadline", "sock", "response", "expired")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.sock: Any = None
        self.response: Any = None
        self.expired = False

    def attach(self, response: Any) -> None:
        """The response being read, and the socket under it when the transport exposes it
        (httpx/httpcore do): shutting a socket down wakes a blocked read, closing may not."""
        self.response = response
        try:
            ns = response.extensions.get("network_stream")
            self.sock = ns.get_extra_info("socket") if ns is not None else None
        except Exception:  # noqa: BLE001 - another transport: cut() falls back to close()
            self.sock = None

    def cut(self) -> None:
        """Stop the stream from another thread: shut the socket down (wakes a blocked recv), or close."""
        import socket

        if self.sock is not None:
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)   # the plain socket's, also under TLS
            except OSError:
                pass
        elif self.response is not None:
            try:
                self.response.close()
            except Exception:  # noqa: BLE001 - best effort from another thread
                pass


class Watchdog:
    """The thread that cuts the watched streams whose deadline has passed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = threading.Condition(self._lock)   # signalled when a first watch comes
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    def add(self, w: Watch) -> None:
        with self._lock:
            self._watches.add(w)
            if len(self._watches) == 1:
                self._busy.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="persllm-watchdog")
                self._thread.start()

    def remove(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)

    def _loop(self) -> None:
        """Ten looks a second while streams are open; asleep while none is."""
        import time

        while True:
            with self._lock:
                while not self._watches:
                    self._busy.wait()
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                late = [w for w in self._watches if now > w.deadline and not w.expired]
                for w in late:
                    w.expired = True
            for w in late:
                w.cut()
