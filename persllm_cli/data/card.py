"""Character cards, the format chat front-ends (SillyTavern and others) share: reading one from a
PNG or JSON file without trusting it, the persona material in it, and a card made from a stage's
material that reads back as the same material. `init --from-card` and `export --format card`
both use this module (command packages do not import each other).

Checked against the specs (character-card-spec-v2: spec_v1.md, spec_v2.md; character-card-spec-v3:
SPEC_V3.md) and SillyTavern's reader (src/character-card-parser.js) and macros
(public/scripts/macros.js, openai.js):
- JSON `{"spec": "chara_card_v2" | "chara_card_v3", "data": {...}}`, or a V1 card (the same
  fields, at the top level). In a PNG: base64 UTF-8 JSON in a tEXt chunk `ccv3` (V3) or `chara`
  (V2), keywords in any case; `ccv3` wins when both are there.
- Placeholders, in any case: `{{char}}`, `<BOT>`, `<CHAR>` are the character (V3: its nickname
  when it has one); `{{user}}`, `<USER>` the user; `{{// ...}}` is a comment.
- `mes_example`: blocks after `<START>`; a line starting `{{char}}:` (or the name) begins one of
  the character's messages, `{{user}}:` one of the user's, other lines continue the message.
- V3 lorebook entries may start with `@@decorator` lines, which are instructions, not content.

Limits, since a card is untrusted: a card file (a PNG with its picture) of at most 64 MiB; the
card's JSON at most 16 MiB (a JSON file, or what a PNG's text chunk decodes to).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import check_stage_id
from persllm_cli.data import png_text

MAX_FILE_BYTES = 64 << 20
MAX_CARD_BYTES = 16 << 20
CARD_CHUNKS = ("ccv3", "chara")  # in the order they are looked for: V3 wins
EXTENSION = "persllm"            # data.extensions.persllm: what persllm wrote into a card it made

_TEXT = ("name", "description", "personality", "scenario", "first_mes", "mes_example", "nickname",
         "creator_notes", "system_prompt", "post_history_instructions", "creator", "character_version")
_TEXT_LISTS = ("alternate_greetings", "group_only_greetings", "tags")
_SPECS = {"chara_card_v2": "V2", "chara_card_v3": "V3"}


@dataclass(frozen=True)
class Card:
    path: Path
    raw: dict[str, Any]       # the card as read, every field kept
    version: str              # "V1", "V2" or "V3"
    chunk: str | None         # the PNG text chunk it came from; None for a JSON file
    picture: bytes | None     # the PNG without its card chunks; None for a JSON file

    @property
    def data(self) -> dict[str, Any]:
        return self.raw if self.version == "V1" else self.raw["data"]

    def text(self, key: str) -> str:
        return self.data.get(key) or ""

    @property
    def name(self) -> str:
        return self.text("name").strip()

    @property
    def speaker(self) -> str:
        """Who {{char}} is: a V3 card's nickname when it has one, else its name."""
        return (self.text("nickname").strip() if self.version == "V3" else "") or self.name

    @property
    def made_by_persllm(self) -> dict[str, str] | None:
        """What persllm wrote into a card it exported (stage, label, persona, model), or None."""
        return (self.data.get("extensions") or {}).get(EXTENSION)


# ------------------------------------------------------------------------------------ reading

def read_card(path: Path) -> Card:
    """A card from a PNG or JSON file (told apart by their first bytes, not by the file name).
    Anything wrong with it is one PersllmError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise PersllmError(f"{path} is a folder, not a character card")
    if path.exists() and not path.is_file():
        raise PersllmError(f"{path} is not a regular file (a device or a pipe), not a character card")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_FILE_BYTES + 1)  # never more than the limit, whatever the file says its size is
    except FileNotFoundError:
        raise PersllmError(f"{path}: no such file") from None
    except OSError as e:
        raise PersllmError(f"cannot read {path}: {e.strerror}") from None
    if len(blob) > MAX_FILE_BYTES:
        raise PersllmError(f"{path} is larger than a character card may be ({_size(MAX_FILE_BYTES)})")
    chunk = picture = None
    if blob.startswith(png_text.SIGNATURE):
        text, chunk, picture = _from_png(blob, path)
    elif blob.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        if len(blob) > MAX_CARD_BYTES:
            raise PersllmError(f"{path}: {len(blob):,} bytes of JSON is larger than a card may be ({_size(MAX_CARD_BYTES)})")
        text = blob
    else:
        raise PersllmError(f"{path}: not a character card (neither a PNG nor a JSON file)")
    where = f"{path} ({chunk} chunk)" if chunk else str(path)
    raw = _json(text, where)
    version = _check(raw, where)
    return Card(path=path, raw=raw, version=version, chunk=chunk, picture=picture)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def _from_png(blob: bytes, path: Path) -> tuple[bytes, str, bytes]:
    try:
        chunks = png_text.text_chunks(blob, max_bytes=MAX_CARD_BYTES * 4 // 3 + 4)  # base64 of the JSON
        picture = png_text.without_text(blob, CARD_CHUNKS)
    except png_text.PngError as e:
        raise PersllmError(f"{path}: {e}") from None
    found: dict[str, bytes] = {}
    for keyword, text in chunks:
        found.setdefault(keyword.lower(), text)  # the first of a name, as SillyTavern takes it
    for name in CARD_CHUNKS:
        if name in found:
            try:
                return base64.b64decode(re.sub(rb"\s+", b"", found[name]), validate=True), name, picture
            except binascii.Error:
                raise PersllmError(f"{path}: the {name!r} text chunk is not valid base64") from None
    raise PersllmError(f"{path}: a PNG without a character card (no 'chara' or 'ccv3' text chunk)")


def _json(blob: bytes, where: str) -> Any:
    try:
        return json.loads(blob.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise PersllmError(f"{where}: the card is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise PersllmError(f"{where}: the card is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise PersllmError(f"{where}: the card's JSON is nested too deeply") from None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check(raw: Any, where: str) -> str:
    """The card's version, once every field persllm reads has the type the spec gives it."""
    def wrong(field: str, value: Any, wanted: str) -> PersllmError:
        return PersllmError(f"{where}: {field} must be {wanted}, not {_kind(value)}")

    if not isinstance(raw, dict):
        raise PersllmError(f"{where}: the card is {_kind(raw)}, not a JSON object")
    spec = raw.get("spec")
    if spec is None:
        if "name" not in raw:
            raise PersllmError(f"{where}: not a character card (no spec chara_card_v2/v3 and no name)")
        data, version, prefix = raw, "V1", ""
    elif spec in _SPECS:
        data, version, prefix = raw.get("data"), _SPECS[spec], "data."
        if not isinstance(data, dict):
            raise wrong("data", data, "an object")
    else:
        raise PersllmError(f"{where}: unknown card spec {spec!r} (persllm reads chara_card_v2 and chara_card_v3)")
    for key in _TEXT:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise wrong(prefix + key, data[key], "a string")
    for key in _TEXT_LISTS:
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise wrong(prefix + key, value, "a list of strings")
    if not (data.get("name") or "").strip():
        raise PersllmError(f"{where}: the card has no name")
    book = data.get("character_book")
    if book is not None:
        if not isinstance(book, dict):
            raise wrong(prefix + "character_book", book, "an object")
        entries = book.get("entries", [])
        if not isinstance(entries, list):
            raise wrong(prefix + "character_book.entries", entries, "a list")
        for i, entry in enumerate(entries):
            at = f"{prefix}character_book.entries[{i}]"
            if not isinstance(entry, dict):
                raise wrong(at, entry, "an object")
            if entry.get("content") is not None and not isinstance(entry["content"], str):
                raise wrong(at + ".content", entry["content"], "a string")
            if entry.get("enabled") is not None and not isinstance(entry["enabled"], bool):
                raise wrong(at + ".enabled", entry["enabled"], "true or false")
    extensions = data.get("extensions")
    if extensions is not None and not isinstance(extensions, dict):
        raise wrong(prefix + "extensions", extensions, "an object")
    ours = (extensions or {}).get(EXTENSION)
    if ours is not None:
        at = f"{prefix}extensions.{EXTENSION}"
        if not isinstance(ours, dict) or not all(isinstance(ours.get(k), str) for k in ("stage", "label")):
            raise wrong(at, ours, "an object with a stage and a label (strings)")
        check_stage_id(ours["stage"], where=f"{where}: {at}.stage")
    return version


# ------------------------------------------------------------------------- the material in it

@dataclass(frozen=True)
class Material:
    knowledge: list[str]   # paragraphs
    style: list[str]       # things the persona says, one each


_CHAR = re.compile(r"\{\{char\}\}|<bot>|<char>", re.I)
_USER = re.compile(r"(?:\{\{user\}\}|<user>)('s\b)?", re.I)
_COMMENT = re.compile(r"\{\{//.*?\}\}", re.S)
_OPENERS = " \t\"'*_(“‘«"


def resolve(text: str, char: str) -> str:
    """Placeholders filled in: the character by `char`, the user by "you" ("You" where a sentence
    starts, "your" for "{{user}}'s"); comments dropped."""
    def user(m: re.Match) -> str:
        before = m.string[:m.start()].rstrip(_OPENERS)
        word = "your" if m.group(1) else "you"
        return word.capitalize() if not before or before[-1] in ".!?:\n" else word

    return _USER.sub(user, _CHAR.sub(lambda m: char, _COMMENT.sub("", text)))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _one(text: str) -> str:
    """A message or an entry, which may run over several lines, as one paragraph."""
    return " ".join(_lines(text))


def _undecorated(content: str) -> str:
    lines = content.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("@@")):
        lines.pop(0)
    return "\n".join(lines)


def example_messages(mes_example: str, names: list[str]) -> list[str]:
    """The character's messages in `mes_example`, each as written (several lines stay together)."""
    who = "|".join([r"\{\{char\}\}", "<bot>", "<char>", *(re.escape(n) for n in names if n)])
    char_line = re.compile(rf"^\s*(?:{who})\s*:", re.I)
    user_line = re.compile(r"^\s*(?:\{\{user\}\}|<user>)\s*:", re.I)
    out: list[str] = []
    for block in re.split(r"<start>", mes_example, flags=re.I):
        speaker, lines = None, []
        for line in block.splitlines() + ["{{user}}:"]:  # a last speaker line ends the last message
            m = char_line.match(line) or user_line.match(line)
            if m is None:
                lines.append(line)
                continue
            if speaker == "char" and _lines("\n".join(lines)):
                out.append("\n".join(lines))
            speaker, lines = ("char" if char_line.match(line) else "user"), [line[m.end():]]
    return out


def material(card: Card, char: str | None = None) -> Material:
    """The persona material in a card. Knowledge: description, personality and scenario (a
    paragraph per line), then the lorebook's enabled entries (a paragraph each). Style: the first
    message, the character's example messages, the alternate and group-only greetings (one line
    each). Placeholders are filled in with `char` (default: who the card says {{char}} is) and
    "you". In a card persllm exported, description and scenario hold what persllm wrote there from
    persllm.toml (the persona's one-line description, the stage), so they are not knowledge."""
    char = char or card.speaker
    described = ("personality",) if card.made_by_persllm else ("description", "personality", "scenario")
    knowledge = [p for key in described for p in _lines(resolve(card.text(key), char))]
    book = card.data.get("character_book") or {}
    for entry in book.get("entries") or []:
        if entry.get("enabled") is not False:
            knowledge.append(_one(resolve(_undecorated(entry.get("content") or ""), char)))
    said = [card.text("first_mes")]
    said += example_messages(card.text("mes_example"), [card.name, card.speaker])
    said += (card.data.get("alternate_greetings") or []) + (card.data.get("group_only_greetings") or [])
    style = [_one(resolve(s, char)) for s in said]
    return Material(knowledge=[k for k in knowledge if k], style=[s for s in style if s])


# ------------------------------------------------------------------------------- making one

def stage_line(label: str) -> str:
    """The scenario of a card persllm makes: the method's stage prefix."""
    return f"Now it is {label}."


def make_card(*, persona: str, description: str, stage: str, label: str, token: str, model: str,
              material: Material, notes: str) -> dict[str, Any]:
    """A V2 card of one stage. `material` reads it back as `material`: knowledge paragraphs are
    lorebook entries (without keys: a model trained on them needs no reminder, so front-ends do
    not send them), the first style line is the first message and the others example messages."""
    first, rest = (material.style[0], material.style[1:]) if material.style else ("", [])
    data: dict[str, Any] = {
        "name": persona, "description": description, "personality": "", "scenario": stage_line(label),
        "first_mes": first, "mes_example": "\n".join(f"<START>\n{{{{char}}}}: {s}" for s in rest),
        "creator_notes": notes, "system_prompt": "", "post_history_instructions": "",
        "alternate_greetings": [], "tags": ["persllm", stage], "creator": "persllm", "character_version": stage,
        "extensions": {EXTENSION: {"model": model, "stage": stage, "label": label, "time_token": token,
                                   "persona": persona}},
    }
    if material.knowledge:
        data["character_book"] = {
            "name": f"{persona}: {label}", "extensions": {},
            "entries": [{"keys": [], "content": k, "extensions": {}, "enabled": True, "insertion_order": i,
                         "id": i, "comment": f"knowledge paragraph {i}", "constant": False, "selective": False,
                         "secondary_keys": []} for i, k in enumerate(material.knowledge, start=1)]}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def card_png(picture: bytes, card: dict[str, Any]) -> bytes:
    """`picture` (a PNG) carrying `card` in a `chara` text chunk (any old card chunks removed)."""
    text = base64.b64encode(json.dumps(card, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return png_text.with_text(picture, "chara", text.decode("ascii"), drop=CARD_CHUNKS)
