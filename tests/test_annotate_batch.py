"""`persllm annotate --batch-file / --batch-results / --batch` through the CLI, against the fake
server's Batch API (tests/fakes/batches.py), and Ctrl-C on a real process while a batch runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from persllm_cli.data.store import read_jsonl
from persllm_cli.llm.pricing import batch_pricing, pricing
from tests.conftest import persllm_cmd, subprocess_env
from tests.fakes.batches import Expired
from tests.fakes.openai_server import Fail, FakeOpenAI, Malformed, default_responder
from tests.test_annotate import make_project, proj  # noqa: F401 - proj: the fixture

OUT = "build/annotations.jsonl"


def steady(body: dict, n: int) -> str:
    """The fake's reply, the same for the same prompt (live and batch answers can be compared)."""
    return default_responder(body, 0)


@pytest.fixture
def fake(monkeypatch):
    with FakeOpenAI(responder=steady, batch_validate_seconds=0.05, batch_run_seconds=0.3) as f:
        monkeypatch.setenv("OPENAI_API_KEY", f.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", f.url)
        monkeypatch.setenv("PERSLLM_ANNOTATE_BATCH_POLL_SECONDS", "0.05")
        yield f


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def table_value(output: str, row: str) -> str:
    return next(ln for ln in output.splitlines() if ln.strip().startswith(row)).split()[-1]


def result_line(req: dict, text: str | None = None, *, status: int = 200, usage: bool = True) -> dict:
    """A Batch API output line answering request line `req` (what the real API writes)."""
    body = req["body"]
    text = steady(body, 0) if text is None else text
    prompt = sum(len(m["content"].split()) for m in body["messages"])
    completion = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": body["model"] + "-2024-07-18",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    if usage:
        completion["usage"] = {"prompt_tokens": prompt, "completion_tokens": len(text.split()),
                               "total_tokens": prompt + len(text.split())}
    if status != 200:
        completion = {"error": {"message": "Invalid 'messages': too long.", "type": "invalid_request_error",
                                "param": "messages", "code": None}}
    return {"id": "batch_req_1", "custom_id": req["custom_id"],
            "response": {"status_code": status, "request_id": "req_1", "body": completion}, "error": None}


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ --batch-file

def test_batch_file_holds_what_dry_run_counts_with_the_live_requests(cli, proj, fake, monkeypatch):
    assert cli("annotate", "--stage", "late").exit_code == 0          # one item done live first
    live_bodies = [r.body for r in fake.completions()]
    fake.requests.clear()
    monkeypatch.delenv("OPENAI_API_KEY")                                # writing the file needs no key
    dry = cli("annotate", "--dry-run", "--questions-per-paragraph", "2")
    assert dry.exit_code == 0, dry.output
    r = cli("annotate", "--batch-file", "req.jsonl", "--questions-per-paragraph", "2")
    assert r.exit_code == 0, r.output
    assert fake.requests == []                                          # nothing sent
    reqs = lines(proj / "req.jsonl")
    assert len(reqs) == int(table_value(dry.output, "requests")) == 7   # 4 paragraphs x 2, less the one done
    assert table_value(r.output, "already done") == table_value(dry.output, "already done") == "1"
    done = read_jsonl(proj / OUT)[0]["id"]
    assert done not in {q["custom_id"] for q in reqs} and len({q["custom_id"] for q in reqs}) == 7
    assert all(q["method"] == "POST" and q["url"] == "/v1/chat/completions" for q in reqs)
    # The live request for the same item, without what streaming adds, is the batch body.
    fresh = cli("annotate", "--batch-file", "again.jsonl", "--stage", "late", "-o", "build/other.jsonl")
    assert fresh.exit_code == 0
    (again,) = lines(proj / "again.jsonl")
    assert again["custom_id"] == done
    assert again["body"] == {k: v for k, v in live_bodies[0].items() if k not in ("stream", "stream_options")}
    # At the batch price: half of what the dry run says for live requests.
    half = float(table_value(dry.output, "cost (at most)").strip("$")) / 2
    assert float(table_value(r.output, "cost (at most)").strip("$")) == pytest.approx(half, abs=1e-4)
    meta = json.loads((proj / "req.jsonl.meta.json").read_text())
    assert meta["counts"]["requests"] == 7 and meta["settings"]["questions_per_paragraph"] == 2
    assert "--batch-results results.jsonl" in r.output


def test_batch_file_limit_budget_and_nothing_left(cli, proj, fake):
    r = cli("annotate", "--batch-file", "req.jsonl", "--limit", "3")
    assert r.exit_code == 0 and len(lines(proj / "req.jsonl")) == 3
    with open(proj / "persllm.toml", "a") as f:
        f.write('max_tokens = 100\n[annotate.batch_prices]\n"gpt-4o-mini" = [100.0, 100.0]\n')
    r = cli("annotate", "--batch-file", "req.jsonl")
    each = float(table_value(r.output, "cost (at most)").strip("$")) / 4      # a request's worst case, about
    r = cli("annotate", "--batch-file", "req.jsonl", "--budget-usd", f"{2.5 * each:.4f}")
    assert r.exit_code == 0, r.output
    kept = lines(proj / "req.jsonl")
    assert 0 < len(kept) < 4 and "left out" in r.stderr
    assert cli("annotate").exit_code == 0                              # all done live
    r = cli("annotate", "--batch-file", "none.jsonl")
    assert r.exit_code == 0 and "nothing to do" in r.stderr and not (proj / "none.jsonl").exists()


def test_batch_modes_that_do_not_go_together_are_usage_errors(cli, proj, fake):
    for args, words in [(["--batch", "--batch-file", "x.jsonl"], "do not go together"),
                        (["--batch-file", "x.jsonl", "--backend", "local"], "vllm run-batch"),
                        (["--batch", "--review"], "--review"),
                        (["--batch-results", "x.jsonl", "--dry-run"], "--dry-run")]:
        r = cli("annotate", *args)
        assert r.exit_code == 2 and words in r.stderr, (args, r.output)
    assert fake.requests == [] and not (proj / "x.jsonl").exists()


def test_dry_run_with_batch_prices_the_batch_and_sends_nothing(cli, proj, fake, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    live, batch = cli("annotate", "--dry-run"), cli("annotate", "--dry-run", "--batch")
    assert live.exit_code == batch.exit_code == 0
    assert "at the batch price" in batch.output and fake.requests == [] and not (proj / "build").exists()
    assert float(table_value(batch.output, "cost (at most)").strip("$")) == pytest.approx(
        float(table_value(live.output, "cost (at most)").strip("$")) / 2, abs=1e-4)


def test_batch_prices():
    assert batch_pricing("gpt-4o-mini").price.input == pricing("gpt-4o-mini").price.input / 2
    assert batch_pricing("gpt-4o-2024-08-06").price.output == 5.0
    assert batch_pricing("gpt-4o-mini", {"gpt-4o-mini": [1, 2]}).price.output == 1.0   # an OpenAI model: half
    assert batch_pricing("mine", {"mine": [1, 2]}).price.output == 2.0                  # elsewhere: no discount
    assert batch_pricing("mine", {"mine": [1, 2]}, {"mine": [0, 0]}).price.output == 0.0
    assert not batch_pricing("Qwen/Qwen2.5-7B-Instruct").known


# ------------------------------------------------------------------------------ --batch-results

def test_results_become_the_records_a_live_run_writes(cli, proj, fake):
    assert cli("annotate", "--batch-file", "req.jsonl").exit_code == 0
    reqs = lines(proj / "req.jsonl")
    assert cli("annotate", "-o", "build/live.jsonl").exit_code == 0     # the same items, live
    live = {x["id"]: x for x in read_jsonl(proj / "build/live.jsonl")}
    write_lines(proj / "results.jsonl", [result_line(q) for q in reqs])
    r = cli("annotate", "--batch-results", "results.jsonl")
    assert r.exit_code == 0, r.output
    got = read_jsonl(proj / OUT)
    assert len(got) == len(reqs) == 4 and table_value(r.output, "records ok") == "4"
    for rec in got:
        want = live[rec["id"]]
        a, b = rec.pop("annotator"), want.pop("annotator")
        assert rec == want                                                # question, answer, context, source...
        assert a["prompt_tokens"] == b["prompt_tokens"] and a["completion_tokens"] == b["completion_tokens"]
        assert a["cost_usd"] == pytest.approx(b["cost_usd"] / 2, abs=1e-6)   # the batch price (6 decimals)
        assert a["backend"] == "openai" and a["model"] == "gpt-4o-mini" and a["attempts"] == 1
    meta = json.loads((proj / (OUT + ".meta.json")).read_text())
    assert meta["counts"]["ok"] == 4 and meta["last_run"]["batch_results"].endswith("results.jsonl")


def test_failures_unknown_repeated_and_bad_lines_then_idempotent(cli, proj, fake):
    assert cli("annotate", "--batch-file", "req.jsonl").exit_code == 0
    q = lines(proj / "req.jsonl")
    rows = [result_line(q[0]),
            result_line(q[1], "I will not follow any format."),                  # malformed reply
            result_line(q[2], status=400),                                         # refused
            {"id": "batch_req_9", "custom_id": q[3]["custom_id"], "response": None,
             "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                                                          "completion window expired."}},
            result_line(q[0]),                                                     # repeated
            {**result_line(q[0]), "custom_id": "f" * 64},                          # not one of ours
            "{not json", json.dumps(q[0]),                                         # garbage, a request line
            '{"id": "x", "custom_id": "y", "resp']                                 # torn last line
    write_lines(proj / "results.jsonl", rows)
    r = cli("annotate", "--batch-results", "results.jsonl")
    assert r.exit_code == 3, r.output
    recs = {x["id"]: x for x in read_jsonl(proj / OUT)}
    assert len(recs) == 4 and recs[q[0]["custom_id"]]["status"] == "ok"
    assert recs[q[1]["custom_id"]]["error"] == "malformed reply: no [Response] section"
    assert recs[q[1]["custom_id"]]["annotator"]["completion_tokens"] == 6          # paid for, so counted
    assert recs[q[2]["custom_id"]]["error"] == "request refused (400): Invalid 'messages': too long."
    assert recs[q[3]["custom_id"]]["error"].startswith("batch error (batch_expired): This request")
    for row, n in [("records ok", "1"), ("records failed", "3"), ("unknown custom_id", "1"),
                   ("repeated custom_id", "1"), ("not a result line", "3")]:
        assert table_value(r.output, row) == n, row
    assert "results.jsonl:8: a request line (a batch input file), not a result" in r.stderr
    size = (proj / OUT).stat().st_size
    again = cli("annotate", "--batch-results", "results.jsonl")            # the same file again: no new line
    assert again.exit_code == 3 and (proj / OUT).stat().st_size == size
    assert table_value(again.output, "already ok") == "1" and table_value(again.output, "imported before") == "3"
    # The failed ones answered in a later file: one ok record each, after the failed one.
    write_lines(proj / "retry.jsonl", [result_line(x) for x in q])
    r = cli("annotate", "--batch-results", "retry.jsonl")
    assert r.exit_code == 0, r.output
    all_recs = read_jsonl(proj / OUT)
    assert len(all_recs) == 7 and sum(x["status"] == "ok" for x in all_recs) == 4
    assert len({x["id"] for x in all_recs if x["status"] == "ok"}) == 4


def test_vllm_run_batch_output(cli, proj, fake):
    """vllm run-batch writes every line to one file: replies with usage, errors with a status,
    no body and an `error` that is a string or an error object."""
    assert cli("annotate", "--batch-file", "req.jsonl", "--stage", "early").exit_code == 0
    q = lines(proj / "req.jsonl")
    ok = result_line(q[0])
    ok.update(id="vllm-0f3c", response={**ok["response"], "request_id": "vllm-batch-77"})
    rows = [ok,
            {"id": "vllm-1", "custom_id": q[1]["custom_id"], "error": "prompt is longer than the model's context",
             "response": {"status_code": 400, "request_id": "vllm-batch-78", "body": None}},
            {"id": "vllm-2", "custom_id": q[2]["custom_id"], "response": {"status_code": 400, "request_id": "r",
             "body": None}, "error": {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                                "param": None, "code": 400}}}]
    write_lines(proj / "out.jsonl", rows)
    r = cli("annotate", "--batch-results", "out.jsonl", "--stage", "early")
    assert r.exit_code == 3, r.output
    recs = {x["id"]: x for x in read_jsonl(proj / OUT)}
    assert recs[q[0]["custom_id"]]["status"] == "ok"
    assert recs[q[1]["custom_id"]]["error"] == "request refused (400): prompt is longer than the model's context"
    assert recs[q[2]["custom_id"]]["error"] == "request refused (400): max_tokens is too large"


def test_results_without_usage_are_estimated_and_an_interrupted_import_resumes(cli, proj, fake):
    assert cli("annotate", "--batch-file", "req.jsonl").exit_code == 0
    q = lines(proj / "req.jsonl")
    rows = [result_line(x, usage=False) for x in q]
    write_lines(proj / "half.jsonl", rows[:2])
    assert cli("annotate", "--batch-results", "half.jsonl").exit_code == 0
    with open(proj / OUT, "ab") as f:
        f.write(b'{"id": "torn by a crash", "sta')                  # a crash mid-append
    write_lines(proj / "all.jsonl", rows)
    r = cli("annotate", "--batch-results", "all.jsonl")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(proj / OUT)
    assert [x["status"] for x in recs] == ["ok"] * 4 and len({x["id"] for x in recs}) == 4
    assert "removed an incomplete last line" in r.stderr
    assert all(x["annotator"]["prompt_tokens"] > 0 for x in recs)


def test_results_that_match_nothing_or_are_empty_write_nothing(cli, proj, fake):
    write_lines(proj / "other.jsonl", [{**result_line({"custom_id": "a" * 64, "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})}])
    (proj / "empty.jsonl").write_text("\n")
    for name, words in [("other.jsonl", "none of the 1 line(s)"), ("empty.jsonl", "no result lines"),
                        ("missing.jsonl", "file not found")]:
        r = cli("annotate", "--batch-results", name)
        assert r.exit_code == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (proj / OUT).exists()


# ------------------------------------------------------------------------------ --batch

def test_batch_end_to_end_with_failed_lines_then_a_new_batch_for_them(cli, proj, fake):
    fake.push(Fail(500), Malformed(), Expired())
    r = cli("annotate", "--batch")
    assert r.exit_code == 3, r.output
    assert "created batch batch-fake" in r.stderr and "in_progress" in r.stderr and "completed" in r.stderr
    recs = read_jsonl(proj / OUT)
    assert sorted(x["status"] for x in recs) == ["failed", "failed", "failed", "ok"]
    assert {x["error"].split(":")[0] for x in recs if x["error"]} == {
        "server error (500)", "malformed reply", "batch error (batch_expired)"}
    (b,) = fake.batches.batches.values()
    uploaded = [json.loads(x) for x in fake.batches.files[b.input_file_id].data.decode().splitlines()]
    assert cli("annotate", "--batch-file", "req.jsonl", "-o", "build/empty.jsonl").exit_code == 0
    assert uploaded == lines(proj / "req.jsonl")                      # what --batch-file writes, byte for byte
    assert not (proj / (OUT + ".batch.json")).exists()
    r = cli("annotate", "--batch")                                     # the three failed, in a new batch
    assert r.exit_code == 0, r.output
    assert len(fake.batches.batches) == 2 and len(fake.batches.answered) == 7
    recs = read_jsonl(proj / OUT)
    assert len(recs) == 7 and len({x["id"] for x in recs if x["status"] == "ok"}) == 4
    r = cli("annotate", "--batch")
    assert r.exit_code == 0 and "nothing to do" in r.stderr and len(fake.batches.batches) == 2
    for f in (proj / "build").iterdir():
        assert fake.api_key not in f.read_text(errors="replace")


@pytest.mark.parametrize("case,words", [("no key", "OPENAI_API_KEY"), ("401", "rejected the API key"),
                                        ("unreachable", "cannot reach")])
def test_batch_fails_fast_before_sending_anything(cli, proj, fake, monkeypatch, case, words):
    if case == "no key":
        monkeypatch.delenv("OPENAI_API_KEY")
    elif case == "401":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-abcdef")
    else:
        monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    r = cli("annotate", "--batch")
    assert r.exit_code == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not [x for x in fake.requests if "/files" in x.path or "/batches" in x.path]
    assert not (proj / "build").exists() and "sk-wrong-key-abcdef" not in r.output


def test_batch_the_server_refuses_is_one_line_and_forgotten(cli, proj, fake):
    fake.batches.max_requests = 2                                        # a server with a smaller limit
    r = cli("annotate", "--batch")
    assert r.exit_code == 1, r.output
    assert "refused batch" in r.stderr and "at most 2" in r.stderr
    assert not (proj / OUT).exists() and not (proj / (OUT + ".batch.json")).exists()


def test_a_server_without_a_batch_api(cli, proj, fake):
    fake.batch_api = False
    r = cli("annotate", "--batch")
    assert r.exit_code == 1 and "has no Batch API" in r.stderr and "--batch-file" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (proj / "build").exists()


def test_the_fake_validates_a_batch_file_as_the_api_does(fake, tmp_path):
    client = openai.OpenAI(api_key=fake.api_key, base_url=fake.url, max_retries=0)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    rows = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body},
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body},
            {"custom_id": "b", "method": "GET", "url": "/v1/embeddings", "body": {**body, "model": "gpt-4o"}},
            {"method": "POST", "url": "/v1/chat/completions", "body": body}]
    path = write_lines(tmp_path / "bad.jsonl", rows + ["not json"])
    f = client.files.create(file=path.open("rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "validating"
    time.sleep(0.1)
    b = client.batches.retrieve(b.id)
    assert b.status == "failed"
    codes = {(e.code, e.line) for e in b.errors.data}
    assert {("duplicate_custom_id", 2), ("invalid_method", 3), ("invalid_url", 3), ("mismatched_model", 3),
            ("missing_required_parameter", 4), ("invalid_json_line", 5)} <= codes
    good = write_lines(tmp_path / "good.jsonl", rows[:1])
    f = client.files.create(file=good.open("rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.5)
    b = client.batches.retrieve(b.id)
    assert b.status == "completed" and b.request_counts.completed == 1
    (line,) = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert line["custom_id"] == "a" and line["response"]["body"]["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------ Ctrl-C on a real process

def test_ctrl_c_leaves_the_batch_running_and_the_next_run_collects_it(tmp_path, cli):
    root = make_project(cli, tmp_path / "c")
    out = root / OUT
    state = root / (OUT + ".batch.json")
    with FakeOpenAI(responder=steady, batch_validate_seconds=0.05, batch_run_seconds=600) as fake:
        env = subprocess_env(OPENAI_API_KEY=fake.api_key, OPENAI_BASE_URL=fake.url,
                             PERSLLM_ANNOTATE_BATCH_POLL_SECONDS="0.1")
        proc = subprocess.Popen([*persllm_cmd(), "annotate", "--batch", "--stage", "early"], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not [r for r in fake.requests if r.path.endswith("/batches/batch-fake000002")]:
            time.sleep(0.05)                                             # it is polling the batch
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "batch batch-fake000002 keeps running" in err
        assert "persllm annotate --batch --stage early" in err and "interrupted" in err
        assert json.loads(state.read_text())["batch_id"] == "batch-fake000002"
        assert not out.exists()
        other = subprocess.run([*persllm_cmd(), "annotate", "--batch", "--stage", "early", "--cot"], cwd=root,
                               env=env, capture_output=True, text=True, timeout=120)
        assert other.returncode == 1 and "other settings (cot)" in other.stderr, other.stderr
        fake.batches.run_seconds = 0.0                                   # the batch has finished meanwhile
        again = subprocess.run([*persllm_cmd(), "annotate", "--batch", "--stage", "early"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "continuing batch batch-fake000002" in again.stderr
        assert len([r for r in fake.requests if r.path.endswith("/batches") and r.body]) == 1   # one batch in all
    assert [x["status"] for x in read_jsonl(out)] == ["ok"] * 3 and not state.exists()


def test_a_batch_holds_what_the_api_takes_and_the_next_run_sends_the_rest(cli, proj, fake, monkeypatch):
    from persllm_cli.llm import batch

    monkeypatch.setattr(batch, "MAX_REQUESTS", 3)
    r = cli("annotate", "--batch")
    assert r.exit_code == 3 and "1 request(s) left for a later batch" in r.stderr, r.output
    assert len(read_jsonl(proj / OUT)) == 3
    r = cli("annotate", "--batch")
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(proj / OUT)) == 4 and len(fake.batches.batches) == 2


def test_signals_wait_while_a_batch_is_created():
    from persllm_cli.llm.batch_api import deferred_signals

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            done.append("the batch id is written down")
    assert done == ["the batch id is written down"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_results_the_server_lost_are_still_to_do(cli, proj, fake):
    fake.push(Fail(500))                                                   # one line in the error file
    real = fake.batches.file

    def lose_errors(file_id: str, content: bool):
        if content and "error" in fake.batches.files[file_id].filename:
            return 404, {"error": {"message": f"No such File object: {file_id}", "code": "not_found"}}
        return real(file_id, content)

    fake.batches.file = lose_errors
    r = cli("annotate", "--batch")
    assert r.exit_code == 3 and "no longer has file" in r.stderr and "1 request(s) unanswered" in r.stderr, r.output
    assert len(read_jsonl(proj / OUT)) == 3 and not (proj / (OUT + ".batch.json")).exists()
    fake.batches.file = real
    assert cli("annotate", "--batch").exit_code == 0 and len(read_jsonl(proj / OUT)) == 4
