"""The project: finding persllm.toml, reading the persona and its stages (time tokens), PERSLLM_HOME."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from persllm_cli.core.errors import PersllmError

PROJECT_FILE = "persllm.toml"
# The tables persllm.toml may hold: the persona, its stages, and one per command's settings.
SECTIONS = ("persona", "stages", "annotate", "dedup", "split", "dpo", "tokenize", "train", "chat", "eval", "serve",
            "export", "converse")

def roman(n: int) -> str:
    """1 -> 'I', 4 -> 'IV', 14 -> 'XIV' (stage tokens are <TIME-I>, <TIME-II>, ...)."""
    if n < 1:
        raise ValueError(n)
    out = []
    for value, sym in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                       (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def time_token(index: int) -> str:
    """The time token of the stage at 1-based position `index`."""
    return f"<TIME-{roman(index)}>"


@dataclass(frozen=True)
class Stage:
    id: str
    label: str
    index: int  # 1-based, chronological (file order)

    @property
    def token(self) -> str:
        return time_token(self.index)


@dataclass
class Project:
    root: Path
    name: str
    description: str
    stages: list[Stage]
    toml: dict[str, Any] = field(default_factory=dict)

    def stage(self, stage_id: str) -> Stage:
        sid = check_stage(stage_id, [s.id for s in self.stages])
        return next(s for s in self.stages if s.id == sid)

    def select_stages(self, ids: list[str] | None) -> list[Stage]:
        """The stages named (in chronological order), or all of them when none are named."""
        if not ids:
            return list(self.stages)
        wanted = {self.stage(i).id for i in ids}
        return [s for s in self.stages if s.id in wanted]

    def knowledge_file(self, stage: Stage) -> Path:
        return self.root / "data" / stage.id / "knowledge.txt"

    def style_file(self, stage: Stage) -> Path:
        return self.root / "data" / stage.id / "style.txt"

    def section(self, name: str) -> dict[str, Any]:
        value = self.toml.get(name, {})
        if not isinstance(value, dict):
            raise PersllmError(f"{self.root / PROJECT_FILE}: [{name}] must be a table")
        return value


def find_project_root(start: Path | None = None) -> Path | None:
    """The nearest directory at or above `start` holding persllm.toml, like git finds .git."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / PROJECT_FILE).is_file():
            return d
    return None


def load_project(root: Path) -> Project:
    path = root / PROJECT_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PersllmError(f"no {PROJECT_FILE} in {root} (create a project with `persllm init DIR`)") from None
    except UnicodeDecodeError:
        raise PersllmError(f"{path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PersllmError(f"{path}: invalid TOML: {e}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise PersllmError(f"{path}: unknown section(s) {', '.join(f'[{k}]' for k in unknown)} "
                           f"(known: {', '.join(SECTIONS)})")
    persona = data.get("persona", {})
    if not isinstance(persona, dict) or not isinstance(persona.get("name"), str) or not persona["name"].strip():
        raise PersllmError(f"{path}: [persona] needs a name, e.g. name = \"Harry Potter\"")
    raw_stages = data.get("stages", [])
    if not isinstance(raw_stages, list) or not raw_stages:
        raise PersllmError(f"{path}: no [[stages]]; add at least one with an id and a label")
    stages: list[Stage] = []
    seen: set[str] = set()
    for i, s in enumerate(raw_stages, start=1):
        if not isinstance(s, dict) or not isinstance(s.get("id"), str):
            raise PersllmError(f"{path}: stage {i} needs an id (a string)")
        sid = s["id"]
        check_stage_id(sid, where=str(path))
        if sid in seen:
            raise PersllmError(f"{path}: stage id {sid!r} appears twice")
        seen.add(sid)
        label = s.get("label", sid)
        if not isinstance(label, str):
            raise PersllmError(f"{path}: stage {sid!r}: label must be a string")
        stages.append(Stage(id=sid, label=label, index=i))
    return Project(root=root, name=persona["name"].strip(), description=str(persona.get("description", "")),
                   stages=stages, toml=data)


def check_stage(stage_id: str | None, ids: Sequence[str]) -> str:
    """`stage_id` if it is one of `ids`, the last of them for None, else one line naming them.
    A stage given to chat, converse, eval, serve, export or annotate, and a training record's stage,
    is checked here, so an unknown stage reads the same everywhere."""
    if not ids:
        raise PersllmError("no stages to speak from")
    if stage_id is None:
        return ids[-1]
    if stage_id not in ids:
        raise PersllmError(f"unknown stage {stage_id!r} (stages: {', '.join(ids)})")
    return stage_id


def check_stage_id(sid: str, where: str = "stage") -> None:
    ok = sid and all(c.isalnum() or c in "-_" for c in sid)
    if not ok:
        raise PersllmError(f"{where}: bad stage id {sid!r} (use letters, digits, '-' or '_')")


def open_project(explicit: Path | None = None, required: bool = True) -> Project | None:
    """The project for this command: `-C DIR` if given, else found from the working directory."""
    if explicit is not None:
        start = Path(explicit).resolve()
        if not start.is_dir():
            raise PersllmError(f"-C {explicit}: no such folder")
        root = find_project_root(start)
        if root is None:
            raise PersllmError(f"{start} is not in a persllm project (no {PROJECT_FILE} there or above)")
        return load_project(root)
    root = find_project_root()
    if root is None:
        if required:
            raise PersllmError(
                f"not inside a persllm project (no {PROJECT_FILE} here or above); "
                "run `persllm init DIR` or pass -C DIR")
        return None
    return load_project(root)


def persllm_home() -> Path:
    """Where caches live (converted models, embedders): PERSLLM_HOME or ~/.cache/persllm."""
    home = os.environ.get("PERSLLM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "persllm"


