"""The saved conversation: one JSONL record per finished turn, and the same as markdown.

A record: {"turn", "speaker", "spec", "kind", "model", "persona", "stage", "stage_label", "text",
"tokens", "tokens_from", "seconds", "cost"} and, on turn 0 only, "scene" ("tokens_from": "server",
"estimate" or "tokenizer": where the line's token count comes from). A turn is written only once it is
complete, so a stopped conversation keeps every finished turn and a rerun with the same file
carries on from the next one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.data.store import read_jsonl, repair_tail, write_text_atomic

Record = dict[str, Any]


def markdown_path(path: Path) -> Path:
    return Path(path).with_suffix(".md")


def load(path: Path, *, repair: bool = True) -> list[Record]:
    """The turns saved so far (a torn last line from a kill is dropped), in order."""
    path = Path(path)
    if path.is_dir():
        raise PersllmError(f"{path} is a folder; -o wants a .jsonl file")
    if not path.exists():
        return []
    if repair:
        repair_tail(path)
    records = read_jsonl(path, required=False)
    for i, r in enumerate(records):
        if not isinstance(r, dict) or r.get("turn") != i or not isinstance(r.get("text"), str):
            raise PersllmError(f"{path}:{i + 1}: not a converse turn (expected turn {i}); pick another -o")
    return records


def check_continues(path: Path, records: list[Record], scene: str | None, specs_at: list[str]) -> str:
    """The scene of the saved conversation, after checking that this run continues it: the same
    scene and, turn by turn, the same speakers in the same order. `specs_at[i]` is who speaks turn i."""
    if not records:
        if not scene or not scene.strip():
            raise PersllmError("--scene is required to start a conversation (the opening context for every speaker)",
                               exit_code=2)
        return scene.strip()
    saved = str(records[0].get("scene") or "")
    if scene is not None and scene.strip() != saved:
        raise PersllmError(f"{path} holds a conversation with another scene; give the same --scene (or none) "
                           "to continue it, or another -o for a new one")
    for r in records:
        i = r["turn"]
        if i < len(specs_at) and r.get("spec") != specs_at[i]:
            raise PersllmError(f"{path}: turn {i + 1} was spoken by {r.get('spec')!r}, but these speakers put "
                               f"{specs_at[i]!r} there; give the same speakers in the same order (and --first) "
                               "to continue, or another -o for a new conversation")
    return saved


def render_markdown(records: list[Record], scene: str, speakers: list[dict[str, Any]],
                    summary: list[str] | None = None, verdicts: dict[int, dict[str, Any]] | None = None) -> str:
    lines = ["# Conversation", "", f"**Scene:** {scene}", "", "**Speakers:**", ""]
    for s in speakers:
        where = f"run `{s['model']}`" if s["kind"] == "run" else f"API model `{s['model']}` prompted with the material"
        lines.append(f"- **{s['name']}**: {s['persona']} at {s['stage_label']} ({where}; `{s['spec']}`)")
    lines.append("")
    for r in records:
        text = r["text"].strip() or "(says nothing)"
        body = text.replace("\n", "  \n")
        lines.append(f"**{r['speaker']}:** {body}")
        v = (verdicts or {}).get(r["turn"])
        if v and v.get("status") == "ok":
            lines.append(f"> judge: in character {v['in_character']}, in stage {v['in_stage']}")
        lines.append("")
    if summary:
        lines += ["## Summary", "", *summary, ""]
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    write_text_atomic(markdown_path(path), text)
