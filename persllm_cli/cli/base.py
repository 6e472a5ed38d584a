"""The `persllm` command line's frame: the Typer app and its global options, how a command's
failure becomes one line and an exit code (`guarded`), and how a command's flags become its
settings (`settings_for`). The commands themselves are in cli/make.py and cli/use.py.

Kept thin and light: no torch/transformers here or in anything imported at module level, so
`persllm --help` answers at once. Each command imports its stage module when it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from persllm_cli import __version__
from persllm_cli.core import console
from persllm_cli.core.project import Project, open_project
from persllm_cli.core.errors import EXIT_INTERRUPTED, PersllmError, Terminated, stop_on_sigterm
from persllm_cli.core.settings import resolve


app = typer.Typer(
    name="persllm",
    help="Turn a character's written material into a model that speaks as that character at a chosen "
         "point in its life (the PersLLM method).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Globals:
    project_dir: Path | None = None

    def project(self, required: bool = True) -> Project | None:
        return open_project(self.project_dir, required=required)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"persllm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    project: Annotated[Optional[Path], typer.Option("-C", "--project", help="Use the project in DIR or the nearest folder above it with persllm.toml, instead of the one around the working directory. Paths given on the command line still resolve against the working directory.", metavar="DIR")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="When another persllm run is writing the same output, wait for it to finish instead of exiting 1.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    console.set_quiet(quiet)
    from persllm_cli.data import lock

    lock.set_wait(wait)
    ctx.obj = Globals(project_dir=project)


def guarded(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn a PersllmError into one red line and its exit code, Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except PersllmError as e:
            console.error(str(e))
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt as e:
            how = " by SIGTERM" if isinstance(e, Terminated) else ""
            console.error(f"interrupted{how}; the work done so far is saved")
            raise typer.Exit(EXIT_INTERRUPTED)
        if code:
            raise typer.Exit(code)

    return wrapper


def settings_for(ctx: typer.Context, cls: type, section: str, *, project_required: bool = True,
                 renamed: dict[str, str] | None = None) -> tuple[Project | None, Any]:
    """The project and this command's settings, resolved from its flags: `ctx.params`, the parsed
    values by parameter name, each under its field's name (`renamed` maps a flag to a differently
    named field). Click gives a list flag that was not given as `()`: not given, like None."""
    console.quiet_libraries()
    flags = {name: None if value == () else value for name, value in ctx.params.items()}
    for flag, name in (renamed or {}).items():
        flags[name] = flags.pop(flag)
    project = ctx.obj.project(required=project_required)
    return project, resolve(cls, section, flags, project)


# Each command passes its parsed flags (ctx.params; None = not given) to settings_for and so to
# core.settings.resolve, which layers them over persllm.toml and PERSLLM_* variables; then it calls
# the stage. Field names of the stage's settings dataclass match the parameter names (a rename is
# given to settings_for); each flag's help and default come from that field, through `_h`.
Opt = typer.Option


def main() -> None:
    """Console-script entry point. Typer's standalone mode turns usage errors into exit 2."""
    stop_on_sigterm()  # SIGTERM stops a run like Ctrl-C (exit 130); a file-size limit fails the write (exit 1)
    app(prog_name="persllm")

