"""`persllm dpo --mode generate` end to end against the fake OpenAI server: the request carries the
other stage's material, the pairs carry provenance, the run resumes, retries and fails like annotate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes.openai_server import Fail, Reply
from tests.test_curation import PERSONA, make_project, read, rec, write

EARLY = "Harry sleeps in the cupboard under the stairs at Privet Drive."
LATE = "Harry works as an Auror at the Ministry and has three children."


@pytest.fixture
def project(tmp_path, cli) -> Path:
    proj = make_project(cli, tmp_path / "p", stages=("early:first year", "late:after the war"))
    (proj / "data" / "early" / "knowledge.txt").write_text(EARLY + "\n", encoding="utf-8")
    (proj / "data" / "early" / "style.txt").write_text("Blimey, said in a small voice.\n", encoding="utf-8")
    (proj / "data" / "late" / "knowledge.txt").write_text(LATE + "\n", encoding="utf-8")
    (proj / "data" / "late" / "style.txt").write_text("Calm, dry, a tired Auror's humour.\n", encoding="utf-8")
    with open(proj / "persllm.toml", "a", encoding="utf-8") as f:
        f.write('\n[annotate]\nmodel = "fake-model"\nbackoff_seconds = 0.01\nmax_retries = 2\nconcurrency = 2\n')
    write(proj / "build" / "train.jsonl", [
        rec("early", "Where do you sleep?", "In a cupboard.", line=1),
        rec("early", "Who are your friends?", "Ron and Hermione.", line=2),
        rec("late", "What is your job?", "I catch dark wizards.", line=1),
    ])
    return proj


def prompt_of(logged) -> str:
    return "\n".join(m["content"] for m in logged.body["messages"])


def test_generate_writes_pairs_from_the_other_stage(project, cli, fake_openai):
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 0, result.output
    sent = fake_openai.completions()
    assert len(sent) == 3
    assert {r.body["model"] for r in sent} == {"fake-model"}  # from [annotate]
    by_question = {q: prompt_of(r) for r in sent for q in ("Where do you sleep?", "What is your job?")
                   if q in prompt_of(r)}
    early_q = by_question["Where do you sleep?"]
    assert "Now it is after the war." in early_q and LATE in early_q and EARLY not in early_q
    late_q = by_question["What is your job?"]
    assert "Now it is first year." in late_q and EARLY in late_q and LATE not in late_q

    pairs = read(project / "build" / "dpo.jsonl")
    train = {r["id"]: r for r in read(project / "build" / "train.jsonl")}
    assert len(pairs) == 3
    work = {w["id"]: w for w in read(project / "build" / "dpo.generate.jsonl")}
    for p in pairs:
        chosen = train[p["provenance"]["chosen_id"]]
        assert set(p) == {"id", "stage", "prompt", "chosen", "rejected", "provenance"}
        assert p["stage"] == chosen["stage"]
        assert p["prompt"] == chosen["messages"][:1]
        assert p["chosen"] == chosen["messages"][1:]
        # the fake echoes a [Question] before its [Response]: only the answer is kept
        assert p["rejected"][0]["role"] == "assistant" and p["rejected"][0]["content"].startswith("Well, about")
        prov = p["provenance"]
        assert prov["mode"] == "generate" and prov["similarity"] is None and prov["rejected_persona"] == PERSONA
        assert prov["rejected_stage"] == ("late" if chosen["stage"] == "early" else "early")
        assert work[prov["rejected_id"]]["status"] == "ok"
        assert work[prov["rejected_id"]]["chosen_id"] == chosen["id"]
    meta = json.loads((project / "build" / "dpo.jsonl.meta.json").read_text())
    assert meta["counts"]["pairs"] == 3 and meta["settings"]["model"] == "fake-model"
    assert fake_openai.api_key not in (project / "build" / "dpo.jsonl.meta.json").read_text()

    # resume: a second run asks nothing and writes the same pairs
    before = len(fake_openai.completions())
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 0, result.output
    assert len(fake_openai.completions()) == before
    assert read(project / "build" / "dpo.jsonl") == pairs


def test_generate_same_answer_is_counted_not_used(project, cli, fake_openai):
    def responder(body, n):
        text = prompt_of_body(body)
        return "In a cupboard!" if "Where do you sleep?" in text else f"Something else entirely ({n})."

    fake_openai.responder = responder
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 0, result.output
    pairs = read(project / "build" / "dpo.jsonl")
    assert len(pairs) == 2
    assert all("cupboard" not in p["rejected"][0]["content"] for p in pairs)
    meta = json.loads((project / "build" / "dpo.jsonl.meta.json").read_text())
    assert meta["counts"]["no_rejected_by_reason"] == {"the generated answer equals the chosen one": 1}


def prompt_of_body(body) -> str:
    return "\n".join(m["content"] for m in body["messages"])


def test_generate_retries_a_server_error(project, cli, fake_openai):
    fake_openai.push(Fail(500))
    result = cli("-C", str(project), "dpo", "--mode", "generate", "--concurrency", "1")
    assert result.exit_code == 0, result.output
    assert [r.status for r in fake_openai.completions()] == [500, 200, 200, 200]
    assert len(read(project / "build" / "dpo.jsonl")) == 3


def test_generate_failed_items_exit_3_and_rerun_retries_them(project, cli, fake_openai):
    # concurrency 1: the first item gets three 500s (max_retries 2) and fails; the others succeed
    fake_openai.push(Fail(500), Fail(500), Fail(500))
    result = cli("-C", str(project), "dpo", "--mode", "generate", "--concurrency", "1")
    assert result.exit_code == 3, result.output
    assert len(read(project / "build" / "dpo.jsonl")) == 2
    statuses = [w["status"] for w in read(project / "build" / "dpo.generate.jsonl")]
    assert sorted(statuses) == ["failed", "ok", "ok"]

    before = len(fake_openai.completions())
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 0, result.output
    assert len(fake_openai.completions()) == before + 1  # only the failed one is asked again
    assert len(read(project / "build" / "dpo.jsonl")) == 3


def test_generate_without_a_key_writes_nothing(project, cli, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 1
    assert "OPENAI_API_KEY" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (project / "build" / "dpo.jsonl").exists()
    assert not (project / "build" / "dpo.generate.jsonl").exists()


def test_generate_bad_key_before_any_success_writes_nothing(project, cli, fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 1
    assert "rejected the API key" in result.stderr and "sk-wrong" not in result.stderr
    assert not (project / "build" / "dpo.jsonl").exists()
    assert not (project / "build" / "dpo.generate.jsonl").exists()


def test_generate_flags_override_annotate_settings(project, cli, fake_openai):
    fake_openai.push(Reply("[Response] A quiet answer."))
    result = cli("-C", str(project), "dpo", "--mode", "generate", "--model", "gpt-4o-mini",
                 "--base-url", fake_openai.url, "--concurrency", "1")
    assert result.exit_code == 0, result.output
    assert {r.body["model"] for r in fake_openai.completions()} == {"gpt-4o-mini"}
    assert read(project / "build" / "dpo.jsonl")[0]["rejected"][0]["content"] == "A quiet answer."


def test_generate_ctrl_c_keeps_answers_and_exits_130(project, cli, fake_openai, monkeypatch):
    from persllm_cli.curate import dpo_generate

    real = dpo_generate._work_record
    made = []

    def interrupt_on_second(item, text, usage, error):  # Ctrl-C lands while the second answer comes in
        made.append(item.id)
        if len(made) == 2:
            raise KeyboardInterrupt
        return real(item, text, usage, error)

    monkeypatch.setattr(dpo_generate, "_work_record", interrupt_on_second)
    result = cli("-C", str(project), "dpo", "--mode", "generate", "--concurrency", "1")
    assert result.exit_code == 130
    assert not (project / "build" / "dpo.jsonl").exists()
    assert [w["status"] for w in read(project / "build" / "dpo.generate.jsonl")] == ["ok"]

    monkeypatch.setattr(dpo_generate, "_work_record", real)
    before = len(fake_openai.completions())
    result = cli("-C", str(project), "dpo", "--mode", "generate")
    assert result.exit_code == 0, result.output
    saved_question = "Where do you sleep?"  # the first record's, answered before the Ctrl-C
    assert not any(saved_question in prompt_of(r) for r in fake_openai.completions()[before:])
    assert len(read(project / "build" / "dpo.jsonl")) == 3


def test_generate_dry_run_sends_nothing_and_needs_no_key(project, cli, fake_openai, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--dry-run", "--model", "gpt-4o-mini")
    assert r.exit_code == 0, r.output
    assert "dry run: gpt-4o-mini" in r.stderr and "requests" in r.stderr
    assert fake_openai.completions() == []
    assert not (project / "build" / "dpo.jsonl").exists()
    assert not (project / "build" / "dpo.generate.jsonl").exists()


def test_generate_budget_stops_before_passing_it(project, cli, fake_openai):
    with open(project / "persllm.toml", "a", encoding="utf-8") as f:
        f.write('max_tokens = 50\n[annotate.prices]\n"fake-model" = [1000.0, 1000.0]\n')
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--budget-usd", "0.5", "--concurrency", "1")
    assert r.exit_code == 3 and "budget of $0.5 reached" in r.stderr, r.output
    work = read(project / "build" / "dpo.generate.jsonl")
    assert 0 < len(work) < 3 and len(fake_openai.completions()) == len(work)
    assert sum(w["annotator"]["cost_usd"] for w in work) <= 0.5
    assert cli("-C", str(project), "dpo", "--mode", "generate", "--budget-usd", "-1").exit_code == 2
