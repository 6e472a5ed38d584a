"""The base every command stands on: the CLI shell, settings, records, init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from persllm_cli.data import records

from persllm_cli.data import store

from persllm_cli.data import sidecars
from persllm_cli.core.project import load_project, roman, time_token
from persllm_cli.core.settings import resolve
from persllm_cli.core.errors import PersllmError
from tests.conftest import REPO, persllm_cmd, run_persllm, subprocess_env

# ---------------------------------------------------------------- the CLI shell


def test_help_lists_commands_and_loads_no_torch():
    code = ("import sys, time; t=time.perf_counter(); from persllm_cli.cli import app; "
            "print(time.perf_counter()-t); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split()[1:] == ["False", "False"]
    proc = run_persllm("--help")
    assert proc.returncode == 0
    for command in ("init", "annotate", "dedup", "split", "dpo", "tokenize", "train", "chat"):
        assert command in proc.stdout, f"{command} missing from --help"


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("persllm ")


def test_usage_error_exits_2(cli):
    result = cli("init")
    assert result.exit_code == 2
    result = cli("no-such-command")
    assert result.exit_code == 2


# ---------------------------------------------------------------- init


def test_init_creates_layout(tmp_path, cli):
    target = tmp_path / "proj"
    result = cli("init", str(target), "--name", "Harry Potter", "--description", "a wizard",
                 "--stage", "early:first year", "--stage", "late:after the war")
    assert result.exit_code == 0, result.output
    project = load_project(target)
    assert project.name == "Harry Potter"
    assert [(s.id, s.label, s.token) for s in project.stages] == [
        ("early", "first year", "<TIME-I>"), ("late", "after the war", "<TIME-II>")]
    for sid in ("early", "late"):
        assert (target / "data" / sid / "knowledge.txt").read_text() == ""
        assert (target / "data" / sid / "style.txt").exists()


def test_init_quotes_are_safe_in_toml(tmp_path, cli):
    target = tmp_path / "q"
    assert cli("init", str(target), "--name", 'Ron "Won-Won" Weasley', "--stage", 'a:the "early" days').exit_code == 0
    project = load_project(target)
    assert project.name == 'Ron "Won-Won" Weasley'
    assert project.stages[0].label == 'the "early" days'


def test_init_control_characters_keep_the_toml_valid(tmp_path, cli):
    """The name also goes into the header comment, where a newline would end the comment."""
    for i, name in enumerate(["Harry\nPotter", "Harry\r\n\tPotter", "Harry\x7fPotter\x01"]):
        target = tmp_path / f"p{i}"
        assert cli("init", str(target), "--name", name, "--stage", "a:first\nyear").exit_code == 0
        project = load_project(target)
        assert project.name == name and project.stages[0].label == "first\nyear"
    assert (tmp_path / "p0" / "persllm.toml").read_text().startswith("# persllm project: Harry Potter\n")


def test_init_refuses_non_empty_dir(tmp_path, cli):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = cli("init", str(target), "--name", "X", "--stage", "a")
    assert result.exit_code == 1
    assert "not empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    # --force creates the project and keeps the user's file.
    assert cli("init", str(target), "--name", "X", "--stage", "a", "--force").exit_code == 0
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "persllm.toml").exists()


def test_init_where_no_folder_can_be_made_is_one_line(tmp_path, cli):
    (tmp_path / "afile").write_text("mine")
    targets = [(tmp_path / "afile" / "sub", "afile is a file, not a folder")]
    if Path("/proc/self").is_dir():  # Linux: nothing can be created in /proc
        targets.append((Path("/proc/persllm-nope"), "cannot create the project in /proc/persllm-nope"))
    for target, says in targets:
        result = cli("init", str(target), "--name", "H")
        assert result.exit_code == 1, result.output
        assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "mine"


def test_init_force_keeps_material_and_a_copy_of_the_old_toml(tmp_path, cli, harry):
    target = tmp_path / "p"
    assert cli("init", str(target), "--name", "A", "--stage", "a").exit_code == 0
    first = (target / "persllm.toml").read_text()
    (target / "data/a/knowledge.txt").write_text("my paragraph\n")
    (target / ".gitignore").write_text("my-ignores/\n")
    result = cli("init", str(target), "--name", "B", "--stage", "a", "--force")
    assert result.exit_code == 0, result.output
    assert load_project(target).name == "B"
    assert (target / "persllm.toml.bak").read_text() == first
    assert "persllm.toml.bak" in result.stderr
    assert (target / "data/a/knowledge.txt").read_text() == "my paragraph\n"
    assert (target / ".gitignore").read_text() == "my-ignores/\n"
    # The same file again needs no copy; another one never overwrites the first copy.
    assert "bak" not in cli("init", str(target), "--name", "B", "--stage", "a", "--force").stderr
    assert cli("init", str(target), "--name", "C", "--stage", "a", "--force").exit_code == 0
    assert (target / "persllm.toml.bak").read_text() == first and load_project(target).name == "C"
    assert "name = \"B\"" in (target / "persllm.toml.bak.1").read_text()
    # --example --force does not overwrite what the user wrote either.
    (harry / "data/early/knowledge.txt").write_text("my own early years\n")
    assert cli("init", str(harry), "--example", "harry", "--force").exit_code == 0
    assert (harry / "data/early/knowledge.txt").read_text() == "my own early years\n"
    assert not (harry / "persllm.toml.bak").exists()
    assert "persllm.toml.bak" in " ".join(cli("init", "--help").stdout.split())


@pytest.mark.parametrize("spec", ["bad id:label", ":nolabel", "a/b"])
def test_init_bad_stage_spec(tmp_path, cli, spec):
    result = cli("init", str(tmp_path / "p"), "--name", "X", "--stage", spec)
    assert result.exit_code == 1
    assert "stage" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_init_duplicate_stage(tmp_path, cli):
    result = cli("init", str(tmp_path / "p"), "--name", "X", "--stage", "a", "--stage", "a:again")
    assert result.exit_code == 1
    assert not (tmp_path / "p").exists()


def test_init_needs_a_name(tmp_path, cli):
    result = cli("init", str(tmp_path / "p"))
    assert result.exit_code == 1
    assert "name" in result.stderr


def test_init_example_harry(harry):
    project = load_project(harry)
    assert project.name == "Harry Potter"
    assert [s.id for s in project.stages] == ["early", "middle", "late"]
    for s in project.stages:
        knowledge = [x for x in project.knowledge_file(s).read_text(encoding="utf-8").splitlines() if x.strip()]
        style = [x for x in project.style_file(s).read_text(encoding="utf-8").splitlines() if x.strip()]
        assert len(knowledge) >= 20 and len(style) >= 12
    sample = store.read_jsonl(harry / "annotations.sample.jsonl")
    assert len(sample) >= 60
    assert {r["pattern"] for r in sample} == {"ordinary", "error", "thought"}
    assert {r["stage"] for r in sample} == {"early", "middle", "late"}
    for r in sample:
        assert r["annotator"]["backend"] == "hand-written"
        assert r["id"] == records.record_id(r["persona"], r["stage"], r["pattern"], r["source"]["file"],
                                            r["source"]["line"], 0) or len(r["id"]) == 64
        assert records.unusable_reason(r) is None
    # The instructions answered at every stage, under the ids annotate --instructions gives them.
    lines = [x for x in (harry / "instructions.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    answered = store.read_jsonl(harry / "instructions.sample.jsonl")
    assert sorted((r["stage"], r["source"]["line"]) for r in answered) == sorted(
        (s.id, n) for s in project.stages for n in range(1, len(lines) + 1))
    for r in answered:
        assert r["id"] == records.record_id(r["persona"], r["stage"], "instruction", "instructions.txt", r["source"]["line"], 0)
        assert r["pattern"] == "instruction" and records.question(r) == lines[r["source"]["line"] - 1]
        assert records.unusable_reason(r) is None
    assert len({records.answer(r) for r in answered}) == len(answered)


def test_init_unknown_example(tmp_path, cli):
    result = cli("init", str(tmp_path / "p"), "--example", "nope")
    assert result.exit_code == 1
    assert "harry" in result.stderr


# ---------------------------------------------------------------- settings


@dataclass
class _Demo:
    concurrency: int = 8
    model: str = "gpt-4o-mini"
    output: Path = Path("build/out.jsonl")
    cot: bool = False
    pool: list[Path] = dataclasses.field(default_factory=list)


def test_roman_and_tokens():
    assert [roman(i) for i in (1, 2, 3, 4, 9, 14, 40)] == ["I", "II", "III", "IV", "IX", "XIV", "XL"]
    assert time_token(3) == "<TIME-III>"


def test_settings_precedence(tmp_path, monkeypatch, cli):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    with open(root / "persllm.toml", "a") as f:
        f.write('\n[annotate]\nconcurrency = 3\nmodel = "from-toml"\noutput = "elsewhere/o.jsonl"\n')
    project = load_project(root)
    s = resolve(_Demo, "annotate", {}, project)
    assert (s.concurrency, s.model, s.cot) == (3, "from-toml", False)
    assert s.output == root / "elsewhere" / "o.jsonl"  # toml paths: relative to the project root
    with open(root / "persllm.toml", "a") as f:
        f.write('pool = ["pools/a.jsonl", "/abs/b.jsonl"]\n')
    assert resolve(_Demo, "annotate", {}, load_project(root)).pool == [root / "pools" / "a.jsonl", Path("/abs/b.jsonl")]
    monkeypatch.setenv("PERSLLM_ANNOTATE_CONCURRENCY", "5")
    monkeypatch.setenv("PERSLLM_ANNOTATE_COT", "yes")
    s = resolve(_Demo, "annotate", {}, project)
    assert (s.concurrency, s.model, s.cot) == (5, "from-toml", True)
    s = resolve(_Demo, "annotate", {"concurrency": 9, "model": None, "output": Path("x.jsonl")}, project)
    assert (s.concurrency, s.model) == (9, "from-toml")
    assert s.output == Path.cwd() / "x.jsonl"  # flag paths: relative to where the user is
    monkeypatch.setenv("PERSLLM_ANNOTATE_CONCURRENCY", "many")
    with pytest.raises(PersllmError, match="PERSLLM_ANNOTATE_CONCURRENCY"):
        resolve(_Demo, "annotate", {}, project)


def test_settings_default_path_resolves_against_root(tmp_path, cli, monkeypatch):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")
    from persllm_cli.core.project import open_project

    project = open_project()
    assert project.root == root.resolve()
    assert resolve(_Demo, "annotate", {}, project).output == root.resolve() / "build" / "out.jsonl"


def test_unknown_toml_setting_is_an_error(tmp_path, cli):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    with open(root / "persllm.toml", "a") as f:
        f.write("\n[annotate]\nconcurency = 3\n")
    with pytest.raises(PersllmError, match="concurency"):
        resolve(_Demo, "annotate", {}, load_project(root))


@pytest.mark.parametrize("text,needle", [
    ("[persona\nname=1", "invalid TOML"),
    ("[persona]\ndescription='x'\n", "name"),
    ("[persona]\nname='X'\n", "stages"),
    ("[persona]\nname='X'\n[[stages]]\nid='a b'\n", "bad stage id"),
])
def test_broken_project_file(tmp_path, text, needle):
    (tmp_path / "persllm.toml").write_text(text)
    with pytest.raises(PersllmError, match=needle):
        load_project(tmp_path)


# ---------------------------------------------------------------- records


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": "1"}\n\n{"id": 2\n{"id": "3"}\n')
    with pytest.raises(PersllmError, match=r"a\.jsonl:3: not valid JSON"):
        store.read_jsonl(p)
    p.write_text('{"id": "1"}\n[1, 2]\n')
    with pytest.raises(PersllmError, match=r":2: expected a JSON object"):
        store.read_jsonl(p)
    p.write_bytes(b'{"id": "1"}\n{"id": "\xff"}\n')
    with pytest.raises(PersllmError, match=r":2: not UTF-8"):
        store.read_jsonl(p)
    with pytest.raises(PersllmError, match="file not found"):
        store.read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PersllmError, match="empty"):
        store.read_records(tmp_path / "empty.jsonl")


def test_torn_tail_is_repaired_not_parsed(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": "a", "status": "ok"}\n{"id": "b", "sta')
    assert [r["id"] for r in store.read_jsonl(p)] == ["a"]
    assert store.repair_tail(p) is True
    assert p.read_text() == '{"id": "a", "status": "ok"}\n'
    with store.Appender(p) as app:
        app.append({"id": "b", "status": "ok"})
    assert [r["id"] for r in store.read_jsonl(p)] == ["a", "b"]
    # A complete last line that only lost its newline is kept.
    p.write_text('{"id": "a"}\n{"id": "b"}')
    assert store.repair_tail(p) is False
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_a_malformed_last_line_is_never_dropped_silently(harry, cli, monkeypatch):
    """Without a newline it looks like a crash's torn tail and is left out, but never without a word."""
    monkeypatch.chdir(harry)
    text = (harry / "annotations.sample.jsonl").read_text(encoding="utf-8")
    n = text.count("\n")
    (harry / "edited.jsonl").write_text(text + '{"id": "typo" "x": 1}', encoding="utf-8")
    r = cli("dedup", "edited.jsonl")
    assert r.exit_code == 0, r.output
    warnings = [x for x in r.stderr.splitlines() if "incomplete last line" in x]
    assert len(warnings) == 1 and f"edited.jsonl:{n + 1}: ignoring an incomplete last line" in warnings[0]
    assert "a crash leaves one" in warnings[0]


def test_an_output_path_blocked_by_a_folder_or_file_is_one_line(harry, cli, monkeypatch):
    monkeypatch.chdir(harry)
    (harry / "out").mkdir()
    (harry / "afile").write_text("mine")
    for out, says in (("out", "out: is a directory, expected a file"),
                      ("afile/x.jsonl", "afile is a file, not a folder")):
        result = cli("dedup", "annotations.sample.jsonl", "-o", out)
        assert result.exit_code == 1, result.output
        assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any((harry / "out").iterdir()) and (harry / "afile").read_text() == "mine"


def test_resume_state_last_record_wins(tmp_path):
    p = tmp_path / "out.jsonl"
    with store.Appender(p) as app:
        app.append({"id": "x", "status": "failed", "error": "429"})
        app.append({"id": "y", "status": "ok"})
        app.append({"id": "x", "status": "ok"})
        app.append({"id": "z", "status": "failed"})
    st = store.resume_state(p)
    assert st.ok == {"x", "y"} and st.failed == {"z"}


def test_appender_survives_kill_9(tmp_path):
    """Records appended before a kill -9 are all there; the torn tail (if any) is cut on reopen."""
    p = tmp_path / "out.jsonl"
    code = (
        "import sys, time\n"
        "from persllm_cli.data.store import Appender\n"
        "a = Appender(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    a.append({'id': str(i), 'status': 'ok', 'pad': 'x' * 5000})\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(p)], env=subprocess_env())
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    st = store.resume_state(p)
    ids = sorted(int(i) for i in st.ok)
    assert ids and ids == list(range(len(ids)))
    assert p.read_text().endswith("\n")


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "o.jsonl"
    store.write_jsonl_atomic(p, [{"id": "1"}])

    def boom():
        yield {"id": "2"}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        store.write_jsonl_atomic(p, boom())
    assert store.read_jsonl(p) == [{"id": "1"}]
    assert not [x.name for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in sorted(root.rglob("*"))
            if not p.is_symlink()}


def test_outputs_get_the_modes_of_a_plain_open(harry, cli, monkeypatch, umask_022):
    """Atomic writes go through mkstemp (0600); the file a user gets must be 0644 under umask 022."""
    monkeypatch.chdir(harry)
    for args in (["dedup", "annotations.sample.jsonl"], ["split"], ["dpo"]):
        assert cli(*args).exit_code == 0, args
    got = modes(harry / "build")
    assert "train.jsonl.meta.json" in got and "dpo.jsonl" in got
    assert got == {name: "0o644" for name in got}


def test_sidecar_has_no_secrets(tmp_path, monkeypatch):
    from persllm_cli.core.settings import public_settings

    @dataclass
    class S:
        model: str = "m"
        api_key: str = "sk-secret"
        max_tokens: int = 5

    p = tmp_path / "o.jsonl"
    p.write_text("")
    meta = sidecars.write_meta(p, command="demo", settings=public_settings(S()), inputs=[p], counts={"n": 0})
    text = meta.read_text()
    assert "sk-secret" not in text
    data = json.loads(text)
    assert data["settings"] == {"model": "m", "max_tokens": 5}
    assert str(p) in data["inputs"]


def test_record_id_is_stable():
    a = records.record_id("Harry Potter", "early", "thought", "data/early/knowledge.txt", 12, 0)
    assert a == records.record_id("Harry Potter", "early", "thought", "data/early/knowledge.txt", 12, 0)
    assert a != records.record_id("Harry Potter", "early", "thought", "data/early/knowledge.txt", 12, 1)
    assert len(a) == 64


# ---------------------------------------------------------------- material files


def test_read_paragraphs(tmp_path):
    from persllm_cli.data.corpus import count_words, read_paragraphs

    p = tmp_path / "k.txt"
    p.write_text("first paragraph\n\n[Harry] I said this.\n哈利】我来了。\n  \n", encoding="utf-8")
    paras = read_paragraphs(p)
    assert [(x.line, x.text) for x in paras] == [(1, "first paragraph"), (3, "I said this."), (4, "我来了。")]
    assert count_words("hello world") == 2
    assert count_words("我来了 ok") == 4
    p.write_text("")
    with pytest.raises(PersllmError, match="empty"):
        read_paragraphs(p)
    p.write_bytes(b"fine\n\xff\xfe bad\n")
    with pytest.raises(PersllmError, match=r"k\.txt:2: not UTF-8"):
        read_paragraphs(p)


# ---------------------------------------------------------------- fake server


def test_fake_server_scripts_failures(fake_openai):
    import urllib.request
    from urllib.error import HTTPError

    from tests.fakes.openai_server import Fail, Malformed

    fake_openai.push(Fail(429, retry_after=2), Malformed())

    def post():
        req = urllib.request.Request(
            fake_openai.url + "/chat/completions",
            data=json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi [Analysis]"}]}).encode(),
            headers={"Authorization": f"Bearer {fake_openai.api_key}", "Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=5)

    with pytest.raises(HTTPError) as e:
        post()
    assert e.value.code == 429 and e.value.headers["Retry-After"] == "2"
    assert "[Response]" not in json.loads(post().read())["choices"][0]["message"]["content"]
    body = json.loads(post().read())
    assert "[Response]" in body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] == 2
    assert len(fake_openai.completions()) == 3


def test_broken_toml_found_later_is_one_line(tmp_path, cli, monkeypatch):
    """A project file that breaks after init stops every command with one line and exit 1."""
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    (root / "persllm.toml").write_text("[persona\nname = 'X'\n")
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")  # found by walking up, like git
    for args in (["dedup"], ["split"], ["annotate", "--dry-run"], ["-C", str(root), "dpo"]):
        result = cli(*args)
        assert result.exit_code == 1, args
        assert "invalid TOML" in result.stderr and "persllm.toml" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (root / "build").exists()


def test_not_in_a_project(tmp_path, cli):
    result = cli("dedup")
    assert result.exit_code == 1
    assert "persllm init" in result.stderr
    result = cli("-C", str(tmp_path), "split")
    assert result.exit_code == 1
    assert "not in a persllm project" in result.stderr
    result = cli("-C", str(tmp_path / "missing"), "split")
    assert result.exit_code == 1 and "no such folder" in result.stderr
    result = cli("eval")
    assert result.exit_code == 1 and "not inside a persllm project" in result.stderr


def test_dash_c_finds_the_project_above_dir_like_git(tmp_path, cli, monkeypatch):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("-C", str(root / "data" / "a"), "dedup")
    assert result.exit_code == 1 and str(root / "build" / "annotations.jsonl") in result.stderr


def test_unknown_toml_section_is_an_error(tmp_path, cli):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    with open(root / "persllm.toml", "a") as f:
        f.write("\n[annotat]\nconcurrency = 4\n")
    result = cli("-C", str(root), "dedup")
    assert result.exit_code == 1 and "unknown section(s) [annotat]" in result.stderr


def test_a_toml_number_of_the_wrong_kind_is_an_error_not_rounded(tmp_path, cli):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    toml = (root / "persllm.toml").read_text()
    for extra, says in (("[split]\nseed = 1.7\n", "[split] seed = 1.7 is not a valid int"),
                        ("[dedup]\nthreshold = true\n", "[dedup] threshold = True is not a valid float")):
        (root / "persllm.toml").write_text(toml + "\n" + extra)
        result = cli("-C", str(root), extra.split("]")[0][1:])
        assert result.exit_code == 1 and says in result.stderr, result.stderr


def test_misspelled_environment_setting_is_reported(tmp_path, cli, monkeypatch):
    root = tmp_path / "p"
    assert cli("init", str(root), "--name", "X", "--stage", "a").exit_code == 0
    monkeypatch.setenv("PERSLLM_DEDUP_TRESHOLD", "0.5")
    result = cli("-C", str(root), "dedup")
    assert "PERSLLM_DEDUP_TRESHOLD is not a setting of [dedup]" in result.stderr
