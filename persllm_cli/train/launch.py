"""Worker entry point for `persllm train --gpus N / --nproc N`: torchrun starts one of these per rank.

Usage (by train.py, not by people): python -m torch.distributed.run ... -m persllm_cli.train.launch SPEC.json
where SPEC holds the project root and the settings the parent already resolved and validated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_INTERRUPTED, PersllmError, stop_on_sigterm


def main(argv: list[str]) -> int:
    from persllm_cli.core.project import load_project
    from persllm_cli.train.settings import read_data, settings_from_public
    from persllm_cli.train.rank import train_rank

    stop_on_sigterm()  # the parent stops its ranks with SIGTERM: handled like Ctrl-C
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    project = load_project(Path(spec["project"]))
    settings = settings_from_public(spec["settings"])
    try:
        meta = read_data(settings.data)
        return train_rank(project, settings, meta, Path(settings.output))
    except PersllmError as e:
        console.error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
