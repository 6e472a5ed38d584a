"""The `persllm` command line: parse flags, resolve settings, call the stage.

base.py is the frame (the app, its global options, errors as one line, flags to settings); make.py
holds the commands that make a persona and use.py those that use a trained run. Importing them
registers their commands, in the order `persllm --help` lists them.
"""

from persllm_cli.cli import make, use  # noqa: F401  (registers the commands)
from persllm_cli.cli.base import app, main

__all__ = ["app", "main"]
