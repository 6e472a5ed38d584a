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


class Stopped(Exception):
    """The caller set `stop` (Ctrl-C, a fatal error elsewhere): generation was given up mid-way."""
