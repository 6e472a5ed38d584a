"""Run directories: runs/<name>/ written by `train`, read by `chat` and `eval`.

Layout (CLI.md): adapter/ (PEFT; only the new time-token embedding rows, never whole embedding
matrices), tokenizer/ (with the time tokens), checkpoints/, metrics.jsonl, loss.png, run.json,
README.md (model card). runs/latest is a symlink to the newest run.

run.json holds at least:
  {"persona": "Harry Potter", "base": "smollm2-135m" (what the user named), "base_path": "/abs/path",
   "stages": [{"id": "early", "label": "first year at Hogwarts", "token": "<TIME-I>"}, ...],
   "method": "sft+dpo", "settings": {...}, "data": {...hashes...}, "versions": {...},
   "hardware": {...}, "tokens_per_second": ..., "peak_memory_gb": ..., "complete": true}
"complete" turns true only when training finished and the adapter was saved.

A run trained with `--adapter-per-stage` has no adapter/ or tokenizer/ of its own: its run.json adds
"stage_runs" ({stage id: "stages/<id>"}), each an ordinary run holding that stage's adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm_cli.core.project import Project, check_stage
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.store import write_text_atomic

RUN_FILE = "run.json"
LATEST = "latest"


@dataclass
class RunInfo:
    path: Path
    data: dict[str, Any]

    @property
    def stages(self) -> list[dict[str, str]]:
        return list(self.data.get("stages", []))

    @property
    def stage_runs(self) -> dict[str, Path] | None:
        """Per stage, the run holding its own adapter (`train --adapter-per-stage`); None for a run
        with one adapter for every stage."""
        staged = self.data.get("stage_runs")
        return {sid: self.path / rel for sid, rel in staged.items()} if isinstance(staged, dict) else None

    @property
    def trained_stage(self) -> str | None:
        """The one stage a stage's own run (`train --adapter-per-stage`) was trained for; None for a
        run trained for every stage."""
        stage = self.data.get("trained_stage")
        return str(stage) if stage else None

    def as_trained(self) -> RunInfo:
        """This run with the stages its model speaks for: a stage's own run has the other stages' time
        tokens too, but no training behind them."""
        if self.trained_stage is None:
            return self
        return RunInfo(self.path, {**self.data, "stages": [s for s in self.stages if s["id"] == self.trained_stage]})

    @property
    def base(self) -> str:
        return str(self.data["base"])

    def stage_token(self, stage_id: str | None) -> tuple[str, str]:
        """(stage id, time token) for `stage_id`, or the last stage when None."""
        stages = self.stages
        if not stages:
            raise PersllmError(f"{self.path / RUN_FILE} lists no stages")
        tokens = {s["id"]: s["token"] for s in stages}
        sid = check_stage(stage_id, list(tokens))
        return sid, tokens[sid]


def write_run_json(run_dir: Path, data: dict[str, Any]) -> None:
    write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def update_latest(run_dir: Path) -> None:
    """Point runs/latest at `run_dir` (atomically: a new link renamed over the old one)."""
    run_dir = Path(run_dir).resolve()
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)


def resolve_run(run: Path | None, project: Project | None) -> Path:
    """The run directory to use: the one given, else runs/latest of the project."""
    if run is None:
        if project is None:
            raise PersllmError("no run given and not inside a persllm project (pass a run directory, e.g. runs/NAME)")
        run = project.root / "runs" / LATEST
        if not run.exists():
            raise PersllmError(f"no trained run yet: {run} does not exist (train one with `persllm train`)")
    run = Path(run)
    if not run.is_dir():
        raise PersllmError(f"run directory not found: {run}")
    return run.resolve()


def is_complete(run_dir: Path) -> bool:
    """Whether run_dir's run.json says its training finished (False when there is none to read)."""
    try:
        return bool(json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def read_run(run: Path) -> RunInfo:
    """Read and check a run directory; says what is missing when it is incomplete."""
    run = Path(run)
    path = run / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PersllmError(f"{run} is not a persllm run (no {RUN_FILE})") from None
    except json.JSONDecodeError as e:
        raise PersllmError(f"{path}: not valid JSON ({e.msg})") from None
    staged = data.get("stage_runs")
    needed = list(staged.values()) if isinstance(staged, dict) else ["adapter", "tokenizer"]
    missing = [p for p in needed if not (run / p).is_dir()]
    if missing or not data.get("complete", False):
        what = ", ".join(missing) if missing else "training did not finish"
        raise PersllmError(f"run {run} is incomplete ({what}); train again or resume with `persllm train --resume --output {run}`")
    return RunInfo(path=run, data=data)
