"""Character cards: `init --from-card` (V2 and V3, JSON and PNG, and the cards it refuses) and
`export --format card`, whose cards read back as the same material and name the model ids that
`persllm serve` lists. The cards are written here for the tests; their PNGs are made with Pillow,
a writer persllm's own PNG code has no part in."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from persllm_cli.core.project import load_project
from persllm_cli.data.corpus import read_paragraphs

V2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
    "name": "Maren Holt",
    "description": "{{char}} keeps the lighthouse on Skerry Point.\n[Age: 63, widowed]\n\n"
                   "She has not left the island since the winter of the great storm.",
    "personality": "Gruff, patient, quietly funny.",
    "scenario": "A gale is rising. The supply boat has just brought {{user}} to the island.",
    "first_mes": "*{{char}} looks up from the logbook.* So the boat made it. {{User}}, shut the door.",
    "mes_example": "<START>\n{{user}}: Do you ever get lonely out here?\n{{char}}: Lonely? I have the gulls.\n"
                   "And the wireless, when it works.\n<START>\n<USER>: Why do you stay?\n"
                   "Maren Holt: Somebody has to keep the light.",
    "creator_notes": "Written for persllm's tests.", "system_prompt": "Stay in character as {{char}}.",
    "post_history_instructions": "", "alternate_greetings": ["You're soaked. Sit by the stove{{// a comment}}."],
    "character_book": {"extensions": {}, "entries": [
        {"keys": ["lamp"], "content": "The lamp turns once every twelve seconds.\n{{char}} winds the clockwork at dusk.",
         "extensions": {}, "enabled": True, "insertion_order": 0},
        {"keys": ["draft"], "content": "An unfinished note nobody should read.", "extensions": {}, "enabled": False,
         "insertion_order": 1}]},
    "tags": ["coast"], "creator": "tests", "character_version": "1.2", "extensions": {"talkativeness": "0.4"}}}

V2_KNOWLEDGE = ["Maren Holt keeps the lighthouse on Skerry Point.", "[Age: 63, widowed]",
                "She has not left the island since the winter of the great storm.", "Gruff, patient, quietly funny.",
                "A gale is rising. The supply boat has just brought you to the island.",
                "The lamp turns once every twelve seconds. Maren Holt winds the clockwork at dusk."]
V2_STYLE = ["*Maren Holt looks up from the logbook.* So the boat made it. You, shut the door.",
            "Lonely? I have the gulls. And the wireless, when it works.", "Somebody has to keep the light.",
            "You're soaked. Sit by the stove."]

V3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
    "name": "Tobias Wren", "nickname": "Toby",
    "description": "<BOT> repairs clocks in a narrow shop on Vell Street.", "personality": "", "scenario": "",
    "first_mes": "The bell over the door rings. {{char}} does not look up. \"{{user}}'s watch again?\"",
    "mes_example": "", "alternate_greetings": [],
    "group_only_greetings": ["{{char}} nods to both of you and goes back to the gears."],
    "character_book": {"extensions": {}, "entries": [
        {"keys": ["shop"], "content": "@@depth 4\n@@role system\nThe shop has belonged to the Wren family for three generations.",
         "extensions": {}, "enabled": True, "insertion_order": 0, "use_regex": False}]},
    "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
    "creation_date": 1700000000, "modification_date": 1700000000, "creator_notes": "", "system_prompt": "",
    "post_history_instructions": "", "tags": [], "creator": "", "character_version": "", "extensions": {}}}
V3_KNOWLEDGE = ["Toby repairs clocks in a narrow shop on Vell Street.",
                "The shop has belonged to the Wren family for three generations."]
V3_STYLE = ["The bell over the door rings. Toby does not look up. \"Your watch again?\"",
            "Toby nods to both of you and goes back to the gears."]


def b64(card: object) -> str:
    return base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii")


def png(texts: list[tuple[str, str]], color: str = "teal") -> bytes:
    """A small picture with these tEXt chunks, written by Pillow."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in texts:
        info.add_text(key, value)
    out = io.BytesIO()
    Image.new("RGB", (40, 60), color).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def paragraphs(path: Path) -> list[str]:
    return [p.text for p in read_paragraphs(path, required=False)]


def material(project: Path) -> dict[str, tuple[list[str], list[str]]]:
    p = load_project(project)
    return {s.id: (paragraphs(p.knowledge_file(s)), paragraphs(p.style_file(s))) for s in p.stages}


def test_v2_json_card_becomes_a_project(tmp_path, cli):
    (tmp_path / "maren.json").write_text(json.dumps(V2))
    r = cli("init", str(tmp_path / "proj"), "--from-card", str(tmp_path / "maren.json"))
    assert r.exit_code == 0, r.output
    assert "6 knowledge paragraphs, 4 style lines; 1 disabled lorebook entry left out" in r.stderr
    project = load_project(tmp_path / "proj")
    assert project.name == "Maren Holt" and [(s.id, s.label) for s in project.stages] == [("main", "main")]
    assert material(tmp_path / "proj") == {"main": (V2_KNOWLEDGE, V2_STYLE)}
    # A bracket at the start of a paragraph survives the material file's speaker labels.
    assert "[card] [Age: 63, widowed]\n" in (tmp_path / "proj" / "data" / "main" / "knowledge.txt").read_text()
    # The card as read, every field (system_prompt, tags, extensions, ...) kept for reference.
    assert json.loads((tmp_path / "proj" / "data" / "main" / "card.json").read_text()) == V2
    assert not (tmp_path / "proj" / "data" / "main" / "card.png").exists()


def test_v3_wins_over_v2_in_a_png_and_its_picture_is_kept(tmp_path, cli):
    backfill = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {**V2["data"], "name": "Someone Else"}}
    (tmp_path / "toby.png").write_bytes(png([("chara", b64(backfill)), ("ccv3", b64(V3)), ("Comment", "kept")]))
    r = cli("init", str(tmp_path / "proj"), "--from-card", str(tmp_path / "toby.png"), "--stage", "young:apprentice years")
    assert r.exit_code == 0, r.output
    assert "(V3 card, ccv3 chunk)" in r.stderr
    project = load_project(tmp_path / "proj")
    assert project.name == "Tobias Wren" and [(s.id, s.label) for s in project.stages] == [("young", "apprentice years")]
    assert material(tmp_path / "proj") == {"young": (V3_KNOWLEDGE, V3_STYLE)}
    assert json.loads((tmp_path / "proj" / "data" / "young" / "card.json").read_text()) == V3
    from PIL import Image

    kept = Image.open(tmp_path / "proj" / "data" / "young" / "card.png")
    assert kept.size == (40, 60) and kept.text == {"Comment": "kept"}  # the picture, without the card chunks


def test_several_cards_are_several_stages(tmp_path, cli):
    one, two = tmp_path / "one.json", tmp_path / "two.png"
    later = {**V2, "data": {**V2["data"], "description": "{{char}} has retired to the mainland.", "character_book": None}}
    one.write_text(json.dumps(V2))
    two.write_bytes(png([("chara", b64(later))]))
    r = cli("init", str(tmp_path / "a"), "--from-card", str(one), "--from-card", str(two))
    assert r.exit_code == 0, r.output
    assert [s.id for s in load_project(tmp_path / "a").stages] == ["stage-1", "stage-2"]
    assert material(tmp_path / "a")["stage-2"][0][0] == "Maren Holt has retired to the mainland."
    r = cli("init", str(tmp_path / "b"), "--from-card", str(one), "--from-card", str(two),
            "--stage", "keeper:at the light", "--stage", "retired", "--name", "Mrs Holt")
    assert r.exit_code == 0, r.output
    project = load_project(tmp_path / "b")
    assert project.name == "Mrs Holt"
    assert [(s.id, s.label) for s in project.stages] == [("keeper", "at the light"), ("retired", "retired")]
    assert material(tmp_path / "b")["retired"][0][0] == "Mrs Holt has retired to the mainland."  # {{char}} = --name
    # Stages that do not match the cards, and cards about different characters, are one line each.
    r = cli("init", str(tmp_path / "c"), "--from-card", str(one), "--from-card", str(two), "--stage", "only")
    assert r.exit_code == 1 and "2 card(s) but 1 --stage" in r.stderr
    (tmp_path / "toby.json").write_text(json.dumps(V3))
    r = cli("init", str(tmp_path / "c"), "--from-card", str(one), "--from-card", str(tmp_path / "toby.json"))
    assert r.exit_code == 1 and "different characters (Maren Holt, Tobias Wren)" in r.stderr
    r = cli("init", str(tmp_path / "c"), "--from-card", str(one), "--example", "harry")
    assert r.exit_code == 1 and "--from-card cannot be combined with --example" in r.stderr
    assert not (tmp_path / "c").exists()


def _card(**data) -> dict:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {**V2["data"], **data}}


def _broken_crc() -> bytes:
    blob = bytearray(png([("chara", b64(V2))]))
    i = blob.index(b"tEXtchara") + 12
    blob[i] ^= 1  # one bit of the card's text
    return bytes(blob)


BAD = {
    "bad-base64.png": (lambda: png([("chara", "this is not base64!")]), "the 'chara' text chunk is not valid base64"),
    "bad-json.png": (lambda: png([("ccv3", base64.b64encode(b'{"spec": "chara_card_v3", ').decode())]),
                     "(ccv3 chunk): the card is not valid JSON"),
    "bad.json": (lambda: b'{"spec": "chara_card_v2", "data": {', "the card is not valid JSON"),
    "not-utf8.json": (lambda: b'{"name": "Maren \xff"}', "the card is not UTF-8 text"),
    "no-card.png": (lambda: png([("Comment", "just a picture")]), "a PNG without a character card"),
    "notes.txt": (lambda: b"Maren keeps the light.", "not a character card (neither a PNG nor a JSON file)"),
    "picture.gif": (lambda: b"GIF89a\x01\x00\x01\x00", "not a character card (neither a PNG nor a JSON file)"),
    "crc.png": (_broken_crc, "a text chunk's checksum is wrong"),
    "cut.png": (lambda: png([("chara", b64(V2))])[:200], "truncated"),
    "list.json": (lambda: b"[1, 2]", "the card is a list, not a JSON object"),
    "number.json": (lambda: json.dumps(_card(description=42)).encode(), "data.description must be a string, not a number"),
    "greetings.json": (lambda: json.dumps(_card(alternate_greetings="hello")).encode(),
                       "data.alternate_greetings must be a list of strings, not a string"),
    "entry.json": (lambda: json.dumps(_card(character_book={"entries": [{"content": ["x"]}]})).encode(),
                   "data.character_book.entries[0].content must be a string, not a list"),
    "data.png": (lambda: png([("chara", b64({"spec": "chara_card_v2", "data": "Maren"}))]), "data must be an object, not a string"),
    "nameless.json": (lambda: json.dumps(_card(name="  ")).encode(), "the card has no name"),
    "spec.json": (lambda: json.dumps({"spec": "chara_card_v9", "data": {}}).encode(), "unknown card spec 'chara_card_v9'"),
    "stage.json": (lambda: json.dumps(_card(extensions={"persllm": {"stage": "two words", "label": "x"}})).encode(),
                   "bad stage id 'two words'"),
    "deep.json": (lambda: b'{"name": "x", "data": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_card_is_one_line_and_leaves_nothing(tmp_path, cli, name):
    make, says = BAD[name]
    card = tmp_path / name
    card.write_bytes(make())
    good = tmp_path / "good.json"
    good.write_text(json.dumps(V2))
    target = tmp_path / "new" / "proj"
    r = cli("init", str(target), "--from-card", str(good), "--from-card", str(card))  # the bad one second
    assert r.exit_code == 1, r.output
    assert says in r.stderr and str(card) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "new").exists()  # no project, not even its parent folder


def test_size_limits(tmp_path, cli, monkeypatch):
    from persllm_cli.data import card

    monkeypatch.setattr(card, "MAX_CARD_BYTES", 3000)
    (tmp_path / "big.png").write_bytes(png([("chara", b64(_card(description="x" * 5000)))]))
    r = cli("init", str(tmp_path / "p"), "--from-card", str(tmp_path / "big.png"))
    assert r.exit_code == 1 and "is larger than the 4,004 allowed" in r.stderr, r.stderr
    (tmp_path / "big.json").write_text(json.dumps(_card(description="x" * 5000)))
    r = cli("init", str(tmp_path / "p"), "--from-card", str(tmp_path / "big.json"))
    assert r.exit_code == 1 and "bytes of JSON is larger than a card may be (3,000 bytes)" in r.stderr, r.stderr
    monkeypatch.setattr(card, "MAX_FILE_BYTES", 100)
    r = cli("init", str(tmp_path / "p"), "--from-card", str(tmp_path / "big.png"))
    assert r.exit_code == 1 and "big.png is larger than a character card may be (100 bytes)" in r.stderr, r.stderr
    for missing, says in ((tmp_path / "nowhere.png", "no such file"), (tmp_path, "is a folder, not a character card"),
                          (Path("/dev/zero"), "is not a regular file")):
        r = cli("init", str(tmp_path / "p"), "--from-card", str(missing))
        assert r.exit_code == 1 and says in r.stderr
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------- export

def fake_run(project: Path, name: str, stages: list[str]) -> Path:
    """A run folder as `train` leaves it, as far as naming goes: run.json with its stages, adapter/
    and tokenizer/ (empty: nothing here loads a model), runs/latest pointing at it."""
    from persllm_cli.model import runs

    run = project / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    runs.write_run_json(run, {"persona": "x", "base": "smollm2-135m", "complete": True,
                              "stages": [{"id": s, "label": s, "token": f"<TIME-{i}>"} for i, s in enumerate(stages)]})
    runs.update_latest(run)
    return run


def read_cards(folder: Path) -> dict[str, dict]:
    """Every card in `folder` by file name, the PNG ones read with Pillow; the JSON and the PNG of a
    stage must hold the same card."""
    from PIL import Image

    cards = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            cards[path.name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            text = Image.open(path).text
            assert set(text) == {"chara"}, text
            cards[path.name] = json.loads(base64.b64decode(text["chara"]).decode("utf-8"))
    for name in [n for n in cards if n.endswith(".json")]:
        assert cards[name] == cards[name[:-5] + ".png"]
    return cards


def test_export_cards_name_the_served_models_and_read_back_as_the_same_project(tmp_path, cli, harry, monkeypatch):
    monkeypatch.chdir(harry)
    fake_run(harry, "20990101-sft", ["early", "middle", "late"])
    r = cli("export", "--format", "card", "-o", str(tmp_path / "cards"))
    assert r.exit_code == 0, r.output
    cards = read_cards(tmp_path / "cards")
    assert sorted(cards) == [f"harry-potter-{s}.{x}" for s in ("early", "late", "middle") for x in ("json", "png")]
    early = cards["harry-potter-early.json"]
    assert early["spec"] == "chara_card_v2" and early["spec_version"] == "2.0"
    assert early["data"]["name"] == "Harry Potter" and early["data"]["scenario"] == "Now it is first year at Hogwarts."
    assert early["data"]["extensions"]["persllm"]["model"] == "20990101-sft@early"
    assert "choose the model 20990101-sft@early" in early["data"]["creator_notes"]
    # The ids are those serve lists for the run (read the way serve reads it; no model loads).
    from persllm_cli.core.project import load_project as load
    from persllm_cli.model.runs import resolve_run
    from persllm_cli.persona.speaker import RunSpeaker
    from persllm_cli.serve.state import Served, State

    served = State([Served(RunSpeaker(resolve_run(None, load(harry))))], None).models()
    for card in cards.values():
        assert card["data"]["extensions"]["persllm"]["model"] in served
    # Round trip: a project made from the three cards has the same persona, stages and material.
    r = cli("init", str(tmp_path / "again"), *[x for s in ("early", "middle", "late")
                                              for x in ("--from-card", str(tmp_path / "cards" / f"harry-potter-{s}.png"))])
    assert r.exit_code == 0, r.output
    before, after = load_project(harry), load_project(tmp_path / "again")
    assert (after.name, after.description) == (before.name, before.description)
    assert [(s.id, s.label) for s in after.stages] == [(s.id, s.label) for s in before.stages]
    assert material(tmp_path / "again") == material(harry)
    assert all(len(k) > 20 and len(s) > 10 for k, s in material(harry).values())  # there was material to compare


def test_a_card_made_project_exports_cards_that_read_back_the_same(tmp_path, cli, monkeypatch):
    (tmp_path / "toby.png").write_bytes(png([("ccv3", b64(V3))], color="navy"))
    (tmp_path / "maren.json").write_text(json.dumps(V2))
    one = tmp_path / "one"
    assert cli("init", str(one), "--from-card", str(tmp_path / "toby.png"), "--from-card", str(tmp_path / "maren.json"),
               "--name", "Tobias Wren", "--stage", "young:apprentice", "--stage", "old").exit_code == 0
    monkeypatch.chdir(one)
    r = cli("export", "runs/not-yet", "--format", "card", "-o", str(tmp_path / "cards"))  # no run trained: only named
    assert r.exit_code == 0, r.output
    assert "does not exist yet: the cards name the model not-yet@STAGE" in r.stderr
    cards = read_cards(tmp_path / "cards")
    assert cards["tobias-wren-old.json"]["data"]["extensions"]["persllm"]["model"] == "not-yet@old"
    from PIL import Image

    # The young stage's own picture (from its card) carries its new card; the old stage had none: drawn.
    assert Image.open(tmp_path / "cards" / "tobias-wren-young.png").getpixel((0, 0)) == (0, 0, 128)
    assert Image.open(tmp_path / "cards" / "tobias-wren-old.png").size == (400, 600)
    two = tmp_path / "two"
    r = cli("init", str(two), "--from-card", str(tmp_path / "cards" / "tobias-wren-young.png"),
            "--from-card", str(tmp_path / "cards" / "tobias-wren-old.json"))
    assert r.exit_code == 0, r.output
    assert material(two) == material(one)
    named = lambda texts: [t.replace("Toby", "Tobias Wren") for t in texts]  # noqa: E731  {{char}} is --name
    assert material(one)["young"] == (named(V3_KNOWLEDGE), named(V3_STYLE))
    assert [(s.id, s.label) for s in load_project(two).stages] == [("young", "apprentice"), ("old", "old")]


def test_export_card_errors_are_one_line(tmp_path, cli, harry, monkeypatch):
    def fails(*args, says):
        r = cli("export", "--format", "card", *args)
        assert r.exit_code == 1, r.output
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    monkeypatch.chdir(harry)
    fails("-o", str(tmp_path / "c"), says="the project has no runs/latest; name the run the cards are for")
    fake_run(harry, "old", ["early", "late"])
    fails("-o", str(tmp_path / "c"), says="old was trained for the stages early, late, but the project has early, middle, late")
    fake_run(harry, "new", ["early", "middle", "late"])
    fails("-o", str(tmp_path / "c"), "--stage", "teen", says="unknown stage 'teen' (stages: early, middle, late)")
    assert not (tmp_path / "c").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("mine")
    fails("-o", str(tmp_path / "c"), says="is not empty")
    r = cli("export", "--format", "card", "--stage", "middle", "-o", str(tmp_path / "c"), "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["harry-potter-middle.json", "harry-potter-middle.png"]
    monkeypatch.chdir(tmp_path)
    fails("runs/x", "-o", str(tmp_path / "d"), says="--format card is made from a project's material")


@pytest.mark.slow
def test_a_front_end_picks_the_cards_model_from_a_real_serve(tmp_path, cli, harry, _embedded_models, monkeypatch):
    """What a front-end does with an exported card: list the models of a running `persllm serve`
    with the openai client, find the card's model id there, and chat with it."""
    import openai

    from tests.run_factory import make_run
    from tests.serve_server import ServeProcess
    from tests.conftest import subprocess_env

    make_run(harry / "runs" / "r1", _embedded_models / "smollm2-135m")
    monkeypatch.chdir(harry)
    assert cli("export", "--format", "card", "-o", str(tmp_path / "cards")).exit_code == 0
    ids = [c["data"]["extensions"]["persllm"]["model"] for n, c in read_cards(tmp_path / "cards").items() if n.endswith(".json")]
    assert sorted(ids) == ["r1@early", "r1@late", "r1@middle"]
    env = subprocess_env(PERSLLM_HOME=str(_embedded_models.parent), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    server = ServeProcess(env=env, cwd=harry)
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
        listed = {m.id for m in client.models.list()}
        assert set(ids) <= listed, listed
        reply = client.chat.completions.create(model=ids[0], max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Who are you?"}])
        assert reply.model == ids[0] and reply.choices[0].message.content
    finally:
        assert server.stop() == 0, server.log()


def test_two_cards_of_one_stage_are_refused_before_anything_is_made(tmp_path, cli, harry, monkeypatch):
    monkeypatch.chdir(harry)
    fake_run(harry, "r", ["early", "middle", "late"])
    assert cli("export", "--format", "card", "-o", str(tmp_path / "cards")).exit_code == 0
    early = str(tmp_path / "cards" / "harry-potter-early.json")
    r = cli("init", str(tmp_path / "new" / "p"), "--from-card", early, "--from-card", early)
    assert r.exit_code == 1 and "stage id given twice: early" in r.stderr
    assert not (tmp_path / "new").exists()
