"""`persllm init`'s settings (its flags only: there is no project yet to hold a section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class InitSettings:
    directory: Path
    name: str | None = None
    description: str = ""
    stages: list[str] = field(default_factory=list)  # "ID" or "ID:LABEL"
    example: str | None = None
    force: bool = False
    cards: list[Path] = field(default_factory=list)  # --from-card, one stage each
