"""`persllm init`: create a project (persllm.toml + data/<stage>/ files), copy the example, or make
one from character cards (init/from_card.py)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from persllm_cli.core import console
from persllm_cli.core.project import PROJECT_FILE, check_stage_id, load_project, time_token
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.store import make_dirs
from persllm_cli.core.resources import examples_dir, render, template_text
from persllm_cli.init import from_card
from persllm_cli.init.settings import InitSettings

EXAMPLES = ("harry",)


def parse_stage(spec: str) -> tuple[str, str]:
    """'early:first year' -> ('early', 'first year'); 'early' -> ('early', 'early')."""
    sid, _, label = spec.partition(":")
    sid, label = sid.strip(), label.strip()
    check_stage_id(sid, where=f"--stage {spec!r}")
    return sid, label or sid


def _toml_str(s: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; JSON leaves DEL raw, TOML does not.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_comment(s: str) -> str:
    # A comment ends at a newline and may hold no control character: fold them into single spaces.
    return " ".join("".join(c if c.isprintable() else " " for c in s).split())


def project_toml(name: str, description: str, stages: list[tuple[str, str]]) -> str:
    blocks = "".join(f"[[stages]]\nid = {_toml_str(i)}\nlabel = {_toml_str(lab)}\n\n" for i, lab in stages)
    return render("scaffold/persllm.toml", name=_toml_comment(name), name_toml=_toml_str(name),
                  description_toml=_toml_str(description), stages=blocks)


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PersllmError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise PersllmError(f"{directory} is not empty (use --force to create the project there anyway)")


def _check_unique(ids: list[str]) -> None:
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PersllmError(f"stage id given twice: {', '.join(dup)}")


def _fill(staging: Path, s: InitSettings, cards: from_card.FromCards | None) -> tuple[str, list[tuple[str, str]]]:
    """Write the project into `staging`; returns (persona name, stages)."""
    if s.example:
        if s.example not in EXAMPLES:
            raise PersllmError(f"unknown example {s.example!r} (available: {', '.join(EXAMPLES)})")
        if s.stages:
            raise PersllmError("--stage cannot be combined with --example (the example has its own stages)")
        shutil.copytree(examples_dir() / s.example, staging, dirs_exist_ok=True)
        project = load_project(staging)
        name = project.name
        stages = [(st.id, st.label) for st in project.stages]
        if s.name and s.name != name:
            raise PersllmError(f"--example {s.example} is about {name}; leave out --name or drop --example")
    else:
        if cards is not None:
            name, description, stages = cards.name, cards.description, [(c.id, c.label) for c in cards.stages]
        elif not s.name or not s.name.strip():
            raise PersllmError("a persona name is needed: persllm init DIR --name \"Harry Potter\" --stage early:\"first year\"")
        else:
            name, description = s.name.strip(), s.description
            stages = [parse_stage(x) for x in s.stages] or [("main", "main")]
        _check_unique([i for i, _ in stages])
        (staging / PROJECT_FILE).write_text(project_toml(name, description, stages), encoding="utf-8")
        for sid, _ in stages:
            d = staging / "data" / sid
            d.mkdir(parents=True, exist_ok=True)
            (d / "knowledge.txt").touch()
            (d / "style.txt").touch()
        if cards is not None:
            from_card.write(staging, cards)
    (staging / ".gitignore").write_text(template_text("scaffold/gitignore"), encoding="utf-8")
    return name, stages


def _create(target: Path, s: InitSettings, cards: from_card.FromCards | None) -> tuple[str, list[tuple[str, str]]]:
    # Build the whole project in a temporary sibling, then move it into place: a failure midway
    # leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        staging = Path(tmp) / "project"
        staging.mkdir()
        name, stages = _fill(staging, s, cards)
        if not target.exists():
            staging.rename(target)
        else:
            _merge(staging, target)
    return name, stages


def _merge(staging: Path, target: Path) -> None:
    """--force: add the new project to an existing folder. Files there with content are kept, but
    persllm.toml, which must describe this project, is replaced; a different old one is first
    copied to persllm.toml.bak (or .bak.1, ... when that name is taken)."""
    for src in sorted(staging.rglob("*")):
        dst = target / src.relative_to(staging)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        if dst.is_file() and dst.stat().st_size and dst.read_bytes() != src.read_bytes():
            if dst != target / PROJECT_FILE:
                continue
            backup, n = dst.with_name(dst.name + ".bak"), 0
            while backup.exists():
                n += 1
                backup = dst.with_name(f"{dst.name}.bak.{n}")
            shutil.copy2(dst, backup)
            console.note(f"{dst} is rewritten for this project; the previous one is kept as {backup.name}")
        shutil.copy2(src, dst)


def run(s: InitSettings) -> int:
    target = s.directory.resolve()
    _check_target(target, s.force)
    cards = None
    if s.cards:  # every card is read and checked before anything is written
        if s.example:
            raise PersllmError("--from-card cannot be combined with --example")
        cards = from_card.plan(s.cards, [parse_stage(x) for x in s.stages], s.name, s.description)
        _check_unique([c.id for c in cards.stages])
    make_dirs(target.parent)
    try:
        name, stages = _create(target, s, cards)
    except OSError as e:  # no permission, a read-only or pseudo file system (/proc), a full disk
        raise PersllmError(f"cannot create the project in {target}: {e.strerror}") from None
    console.info(f"Created persllm project for {name} in {target}")
    for i, (sid, label) in enumerate(stages, start=1):
        console.info(f"  stage {sid:<10} {time_token(i):<10} {label}")
        if cards is not None:
            console.info(f"        {from_card.summary(cards.stages[i - 1])}")
    if cards is not None:
        console.info("Next: read data/<stage>/knowledge.txt and style.txt over (each card as read is kept in "
                     f"data/<stage>/card.json), then `cd {target} && persllm annotate`.")
    elif not s.example:
        console.info("Next: put one paragraph per line in data/<stage>/knowledge.txt and style.txt, "
                     f"then `cd {target} && persllm annotate`.")
    else:
        console.info(f"Next: cd {target}, then `mkdir -p build && cp annotations.sample.jsonl build/annotations.jsonl` to start "
                     "from the hand-written records, and `persllm annotate --backend local --limit 6` to add a few")
    return 0
