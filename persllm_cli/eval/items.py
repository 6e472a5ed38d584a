"""What `persllm eval` works on: the test items and the systems compared (its settings: settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.model.runs import RunInfo


@dataclass
class TestItem:
    id: str
    persona: str
    stage: str
    pattern: str
    question: str
    reference: str
    later_stage: str = ""         # a leak item: the stage whose material the question comes from
    no_token: bool = False        # answered with no stage token (a trained run only; `stage` is then "")


@dataclass
class System:
    """One column of the comparison: a trained run or a prompted API model."""

    name: str
    kind: str                     # "run" or "api"
    model: str
    persona: str
    labels: dict[str, str]        # stage id -> label
    dir: Path                     # holds answers.jsonl and judge.jsonl
    info: RunInfo | None = None
    description: str = ""
    fingerprint: str = ""         # what made the answers; a change means they are made again

    @property
    def answers_path(self) -> Path:
        return self.dir / "answers.jsonl"
