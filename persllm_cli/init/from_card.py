"""`persllm init DIR --from-card FILE...`: a project made from character cards, one stage per card.

Every card is read and checked (data/card.py) before anything is written; the project is then
built aside and moved into place by init, so a bad card leaves nothing behind. Each stage keeps
its card as read in data/<stage>/card.json (the fields with no place in persllm's material:
system_prompt, post_history_instructions, creator_notes, tags, creator, character_version,
extensions, assets, ...) and a PNG card's picture in data/<stage>/card.png, which
`export --format card` puts on the card it makes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.errors import PersllmError
from persllm_cli.data.card import Card, Material, material, read_card
from persllm_cli.data.corpus import as_line

LABEL = "card"  # put before a paragraph that starts with a bracket, so reading it back keeps the bracket


@dataclass(frozen=True)
class CardStage:
    id: str
    label: str
    card: Card
    material: Material

    @property
    def disabled(self) -> int:
        """Lorebook entries the card itself switches off (enabled: false), which are left out."""
        book = self.card.data.get("character_book") or {}
        return sum(1 for e in book.get("entries") or [] if e.get("enabled") is False)


@dataclass(frozen=True)
class FromCards:
    name: str
    description: str
    stages: list[CardStage]


def plan(cards: list[Path], stages: list[tuple[str, str]], name: str | None, description: str) -> FromCards:
    """Read every card and decide the persona and its stages: `stages` (from --stage) name the
    cards' stages in order; without them a card persllm exported names its own, a single other
    card is the stage `main` and several are `stage-1`, `stage-2`, ..."""
    read = [read_card(Path(p)) for p in cards]
    if stages and len(stages) != len(read):
        raise PersllmError(f"{len(read)} card(s) but {len(stages)} --stage: give one --stage per --from-card, "
                           "in the same order, or none")
    if not stages:
        stages = [_own_stage(c, i, len(read)) for i, c in enumerate(read, start=1)]
    names = list(dict.fromkeys(c.name for c in read))
    if name is None and len(names) > 1:
        raise PersllmError(f"the cards are about different characters ({', '.join(names)}); "
                           "say who the persona is with --name")
    persona = (name or names[0]).strip()
    if not description:
        ours = next((c for c in read if c.made_by_persllm), None)
        description = " ".join(ours.text("description").split()) if ours else ""
    # {{char}} is the persona as the user named it, else whom the card itself says it is.
    return FromCards(persona, description, [CardStage(sid, label, c, material(c, char=name))
                                            for (sid, label), c in zip(stages, read)])


def _own_stage(card: Card, i: int, n: int) -> tuple[str, str]:
    ours = card.made_by_persllm
    if ours:
        return ours["stage"], ours["label"]
    sid = "main" if n == 1 else f"stage-{i}"
    return sid, sid


def write(staging: Path, cards: FromCards) -> None:
    """Each stage's material, its card as read and a PNG card's picture, into the project being built."""
    for st in cards.stages:
        d = staging / "data" / st.id
        d.mkdir(parents=True, exist_ok=True)
        (d / "knowledge.txt").write_text("".join(as_line(p, LABEL) + "\n" for p in st.material.knowledge), encoding="utf-8")
        (d / "style.txt").write_text("".join(as_line(s, LABEL) + "\n" for s in st.material.style), encoding="utf-8")
        (d / "card.json").write_text(json.dumps(st.card.raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if st.card.picture is not None:
            (d / "card.png").write_bytes(st.card.picture)


def summary(st: CardStage) -> str:
    """What a stage took from its card, for init's report."""
    where = f"{st.card.version} card" + (f", {st.card.chunk} chunk" if st.card.chunk else "")
    left_out = f"; {st.disabled} disabled lorebook entr{'y' if st.disabled == 1 else 'ies'} left out" if st.disabled else ""
    return (f"from {st.card.path.name} ({where}): {len(st.material.knowledge)} knowledge paragraphs, "
            f"{len(st.material.style)} style lines{left_out}")
