"""`persllm dpo --mode generate --batch-file / --batch-results / --batch` through the CLI: the
live run's requests, its work records and pairs, with the fake server's Batch API."""

from __future__ import annotations

import json

from tests.fakes.openai_server import Fail
from tests.test_annotate_batch import lines, result_line, write_lines
from tests.test_curation import read
from tests.test_dpo_generate import project  # noqa: F401 - the fixture


def test_batch_file_then_results_make_the_live_runs_pairs(project, cli, fake_openai, monkeypatch):  # noqa: F811
    monkeypatch.delenv("OPENAI_API_KEY")
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--batch-file", str(project / "req.jsonl"))
    assert r.exit_code == 0, r.output
    reqs = lines(project / "req.jsonl")
    assert len(reqs) == 3 and fake_openai.requests == []
    assert all(q["body"]["model"] == "fake-model" and "Now it is" in q["body"]["messages"][0]["content"]
               for q in reqs)
    write_lines(project / "res.jsonl", [result_line(q, f"[Response] Another time's answer {i}.")
                                        for i, q in enumerate(reqs)])
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--batch-results", str(project / "res.jsonl"))
    assert r.exit_code == 0, r.output
    pairs = read(project / "build" / "dpo.jsonl")
    assert sorted(p["rejected"][0]["content"] for p in pairs) == [f"Another time's answer {i}." for i in range(3)]
    work = read(project / "build" / "dpo.generate.jsonl")
    assert {w["id"] for w in work} == {q["custom_id"] for q in reqs} and all(w["status"] == "ok" for w in work)
    assert {p["provenance"]["rejected_id"] for p in pairs} == {w["id"] for w in work}
    meta = json.loads((project / "build" / "dpo.jsonl.meta.json").read_text())
    assert meta["last_run"]["batch_results"].endswith("res.jsonl") and meta["counts"]["pairs"] == 3
    # The live run finds every answer there and asks nothing.
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.api_key)
    assert cli("-C", str(project), "dpo", "--mode", "generate").exit_code == 0
    assert fake_openai.completions() == []


def test_batch_through_the_api_with_a_failed_line_then_a_rerun(project, cli, fake_openai, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PERSLLM_ANNOTATE_BATCH_POLL_SECONDS", "0.05")
    fake_openai.batches.run_seconds = 0.2
    fake_openai.push(Fail(500))
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--batch")
    assert r.exit_code == 3, r.output
    assert len(read(project / "build" / "dpo.jsonl")) == 2
    assert sorted(w["status"] for w in read(project / "build" / "dpo.generate.jsonl")) == ["failed", "ok", "ok"]
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--batch")
    assert r.exit_code == 0, r.output
    assert len(fake_openai.batches.batches) == 2 and len(fake_openai.batches.answered) == 4
    assert len(read(project / "build" / "dpo.jsonl")) == 3


def test_batch_flags_belong_to_generate(project, cli, fake_openai):  # noqa: F811
    r = cli("-C", str(project), "dpo", "--batch")
    assert r.exit_code == 2 and "apply to --mode generate" in r.stderr
    r = cli("-C", str(project), "dpo", "--mode", "generate", "--batch", "--backend", "local")
    assert r.exit_code == 2 and "vllm run-batch" in r.stderr
