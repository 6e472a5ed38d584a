"""`persllm export --format card`: one character card per stage for chat front-ends (SillyTavern and
others), as JSON and as a PNG carrying the same card in its `chara` text chunk.

A card's text comes from the project: the persona's name and one-line description, the stage's
label (the scenario: "Now it is {label}."), its knowledge paragraphs (lorebook entries) and its
style lines (the first message and example messages); data/card.py says exactly where, and reads
such a card back as the same material. Its picture is data/<stage>/card.png when the project has
one (a card it was made from), else a plain one drawn here with the persona's name.

Each card names the model that speaks as that stage: `NAME@STAGE`, NAME being the run's folder as
`persllm serve` lists it (runs/latest followed to the run it points at). A front-end connected to
`persllm serve` as an OpenAI-compatible endpoint talks to that model id. The id is in the card's
`creator_notes` (which front-ends show) and in `data.extensions.persllm.model`. Nothing is loaded:
the run only names the model, and need not be trained yet.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import Project, Stage
from persllm_cli.data.card import Material, card_png, make_card
from persllm_cli.data.corpus import read_paragraphs
from persllm_cli.data.png_text import PngError
from persllm_cli.model.runs import LATEST, RUN_FILE


def model_name(project: Project, run: Path | None) -> str:
    """The name `persllm serve` gives the run the cards are for: its folder's name."""
    if run is None:
        run = project.root / "runs" / LATEST
        if not run.exists():
            raise PersllmError("a card names the model it talks to after a run, and the project has no runs/latest; "
                               "name the run the cards are for: persllm export runs/NAME --format card -o DIR")
    run = Path(run).resolve()  # runs/latest -> the run itself, as serve names it
    if not run.exists():
        console.note(f"{run} does not exist yet: the cards name the model {run.name}@STAGE, which "
                     f"`persllm serve {run}` lists once it is trained")
        return run.name
    try:
        stages = [s["id"] for s in json.loads((run / RUN_FILE).read_text(encoding="utf-8"))["stages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return run.name  # not trained yet, or not by persllm: only its name is needed
    if stages != [s.id for s in project.stages]:
        raise PersllmError(f"{run.name} was trained for the stages {', '.join(stages)}, but the project has "
                           f"{', '.join(s.id for s in project.stages)}; the cards would name models it does not serve")
    return run.name


def stage_material(project: Project, stage: Stage) -> Material:
    def texts(path: Path) -> list[str]:
        return [p.text for p in read_paragraphs(path, required=False)]

    return Material(knowledge=texts(project.knowledge_file(stage)), style=texts(project.style_file(stage)))


def notes(project: Project, stage: Stage, model: str) -> str:
    return (f"Made by persllm for {project.name} at the stage \"{stage.id}\" ({stage.label}). It speaks through "
            f"`persllm serve`: connect the front-end to its address (http://127.0.0.1:8000/v1 by default) as an "
            f"OpenAI-compatible (custom) endpoint and choose the model {model}. The stage's knowledge paragraphs "
            f"are lorebook entries without keys, so they are not sent: the model learnt them in training.")


def png(project: Project, stage: Stage, card: dict[str, Any]) -> bytes:
    """The card in the stage's own picture (data/<stage>/card.png) when it has a usable one, else
    in a plain portrait with the persona's name and the stage."""
    own = project.root / "data" / stage.id / "card.png"
    if own.is_file():
        try:
            return card_png(own.read_bytes(), card)
        except PngError as e:
            console.warn(f"{own}: {e}; drawing a plain picture instead")
    return card_png(drawn(project.name, f"{stage.id}: {stage.label}"), card)


def drawn(name: str, stage: str, size: tuple[int, int] = (400, 600)) -> bytes:
    """A plain 400x600 portrait (the shape front-ends show): the name large, the stage below, on a
    colour that depends on the name. Not the model id: the picture is kept by a project made from
    the card, and a later export may name another run."""
    from PIL import Image, ImageDraw, ImageFont

    hue = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:2], "big") / 65535
    background = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.35, 0.35))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    y = size[1] // 3
    for text, points, fill in ((name, 44, (245, 245, 245)), (stage, 24, (215, 215, 215))):
        font = ImageFont.load_default(size=points)
        for line in _wrap(draw, text, font, size[0] - 40):
            width = draw.textlength(line, font=font)
            draw.text(((size[0] - width) / 2, y), line, font=font, fill=fill)
            y += int(points * 1.3)
        y += points
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def write(project: Project, run: Path | None, only: str | None, out: Path, slug: str) -> list[str]:
    """`<slug>-<stage>.json` and `.png` in `out` for every stage (or the stage `only`), for the run
    `run` (default runs/latest); returns what was written."""
    model = model_name(project, run)
    stages = [project.stage(only)] if only else project.stages
    written = []
    for stage in stages:
        model_id = f"{model}@{stage.id}"
        card = make_card(persona=project.name, description=project.description, stage=stage.id, label=stage.label,
                         token=stage.token, model=model_id, material=stage_material(project, stage),
                         notes=notes(project, stage, model_id))
        base = f"{slug}-{stage.id}"
        (out / f"{base}.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / f"{base}.png").write_bytes(png(project, stage, card))
        written.append(f"{base}.json/.png ({model_id})")
    return written
