"""Output on stderr: messages, tables and progress, quiet when nobody is watching.

stdout carries data only (answers, --json). Everything human goes to stderr through `err`.
Colours and live progress are off when stderr is not a terminal, with -q, or when CI is set.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

_quiet = False
_err: Console | None = None


def set_quiet(quiet: bool) -> None:
    global _quiet, _err
    _quiet = quiet
    _err = None


def is_quiet() -> bool:
    return _quiet


def live() -> bool:
    """True when live progress and colours are welcome: a terminal, not -q, not CI."""
    return not _quiet and not os.environ.get("CI") and sys.stderr.isatty()


def err() -> Console:
    """The stderr console (recreated when sys.stderr changes, as under test runners)."""
    global _err
    if _err is None or _err.file is not sys.stderr:
        plain = not live()
        _err = Console(
            file=sys.stderr,
            no_color=plain,
            highlight=False,
            force_terminal=False if plain else None,
            soft_wrap=True,
            width=None if not plain else 200,
        )
    return _err


def info(message: str) -> None:
    if not _quiet:
        err().print(message, markup=False)


def note(message: str) -> None:
    """A one-line notice (dim on a terminal)."""
    if not _quiet:
        err().print(message, style="dim", markup=False)


def warn(message: str) -> None:
    err().print(f"warning: {message}", style="yellow", markup=False)


def error(message: str) -> None:
    # Errors print even with -q: a failing script must say why.
    err().print(f"error: {message}", style="bold red", markup=False)


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """A summary table on stderr (skipped with -q)."""
    if _quiet:
        return
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=live())
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    err().print(t)


class _NullProgress:
    """Stands in for rich.progress.Progress when output is not live: same calls, no output."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass

    def stop(self) -> None:
        pass


@contextmanager
def progress(*columns_extra: str) -> Iterator:
    """A rich Progress on stderr when live, else a silent stand-in.

    `columns_extra` are format strings over a task's fields, e.g. "{task.fields[cost]}".
    """
    if not live():
        yield _NullProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *[TextColumn(c) for c in columns_extra],
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=err(), transient=False) as p:
        yield p


def quiet_libraries() -> None:
    """Keep library chatter (loader progress bars, advisory warnings) off the user's screen.

    Called before any heavy import; the variables only set defaults, so a user who wants the
    libraries' own output can still ask for it (e.g. TRANSFORMERS_VERBOSITY=info).
    """
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every tqdm bar (the GGUF conversion's, transformers' shard loading): persllm shows its own
    # progress where progress is welcome and nothing where it is not.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not live():
        # Not a terminal, -q or CI: stderr carries persllm's own lines only. Library warnings
        # (transformers, peft, torch) are dropped here and, through the variable, in torchrun ranks.
        import warnings

        warnings.simplefilter("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        for name in ("transformers", "peft", "trl", "torch", "huggingface_hub", "sentence_transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # bitsandbytes warns about an optional CPU kernel package at import; it changes nothing here.
    for name in ("bitsandbytes", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
