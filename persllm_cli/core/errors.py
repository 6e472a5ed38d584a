"""The one exception type for problems a user can fix, and the exit codes of the contract."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class PersllmError(Exception):
    """A user-facing problem: the CLI prints the message as one line and exits with `exit_code`.

    The message should say what is wrong and what to do about it. Anything that is not a
    PersllmError is a bug and keeps its traceback.
    """

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code

    def __str__(self) -> str:
        # One line, always: multi-line messages from libraries are folded.
        return " ".join(str(self.args[0]).split())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: handled everywhere exactly like Ctrl-C (exit 130)."""


def _on_sigterm(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
    raise Terminated()


def stop_on_sigterm() -> None:
    """Treat SIGTERM (CI runners, systemd, containers, `timeout`) like Ctrl-C: Terminated is raised in
    the main thread, so every Ctrl-C path runs (finished work saved, sidecars, workers and torchrun
    ranks stopped) and the exit code is 130. A second SIGTERM during that is ignored; kill -9 still works.
    Also ignores SIGXFSZ, so a file-size limit (ulimit -f) fails the write with EFBIG, which the
    writers report naming the file, instead of killing the process."""
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class Stopped(Exception):
    """The caller set `stop` (Ctrl-C, a fatal error elsewhere): generation was given up mid-way."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """A library's error for a PersllmError message: folded to one line, cut at `limit` characters."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")
