"""Annotate against servers people really run: slow, local, one request at a time.

Against tests/fakes/slow_server.py (a real HTTP server on 127.0.0.1, the real openai client): a
timeout measures silence, not length; timeouts and overload answers lower the requests in flight
instead of piling retries on the server; one warning line says what is happening; every item ends
as a record."""

from __future__ import annotations

from pathlib import Path

import pytest

from persllm_cli.annotate.prompts import parse_reply
from persllm_cli.llm.openai_compat import OpenAIBackend
from persllm_cli.llm.protocol import TransientError
from persllm_cli.data.store import read_jsonl
from persllm_cli.llm.progress import Arriving
from persllm_cli.llm.runner import Item, RunnerSettings, run_items
from tests.fakes.slow_server import SlowOpenAI
from tests.test_annotate import make_project

ASK = [{"role": "user", "content": "Tell me about the train. [Analysis]"}]


@pytest.fixture
def slow(monkeypatch):
    """A factory of started slow servers, with OPENAI_API_KEY/OPENAI_BASE_URL pointing at the last."""
    started: list[SlowOpenAI] = []

    def make(**kw) -> SlowOpenAI:
        fake = SlowOpenAI(**kw).start()
        started.append(fake)
        monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        return fake

    yield make
    for fake in started:
        fake.stop()


def run(fake: SlowOpenAI, n: int, out: Path, *, timeout: float, concurrency: int, first_token: float | None = None,
        max_retries: int = 5, adaptive: bool = True):
    backend = OpenAIBackend("fake-model", base_url=fake.url, timeout=timeout, first_token_timeout=first_token)

    def record(item, reply, usage, error):
        return {"id": item.id, "status": "ok" if reply else "failed", "error": error, "annotator": usage.as_dict()}

    settings = RunnerSettings(concurrency=concurrency, max_retries=max_retries, max_tokens=64,
                              backoff_base=0.05, backoff_max=0.2, adaptive=adaptive)
    stats = run_items([Item(f"item-{i}", i) for i in range(n)], backend,
                      build_messages=lambda it: [{"role": "user", "content": f"Paragraph {it.data}. [Analysis]"}],
                      parse=lambda it, c: parse_reply(c.text, cot=True, want_question=True),
                      make_record=record, output=out, settings=settings)
    return stats, read_jsonl(out)


# ------------------------------------------------------------------------------ the backend

def test_an_answer_longer_than_the_timeout_is_kept_while_tokens_keep_coming(slow):
    fake = slow(tokens=30, rate=30)        # 1 s to answer, a token every 33 ms
    backend = OpenAIBackend("fake-model", base_url=fake.url, timeout=0.3)
    c = backend.complete(ASK, max_tokens=64, temperature=0)
    assert c.completion_tokens == 30 and c.text.startswith("[Question]")
    assert fake.started == 1 and fake.abandoned == 0
    assert backend.received == 30 and backend.streaming == 0
    # chat --api-model streams through the same path, under the same silence timeout
    assert len(list(backend.stream(ASK, max_tokens=64, temperature=0))) == 30


def test_silence_past_the_timeout_is_a_timeout(slow):
    fake = slow(tokens=10, rate=50, stall_first=1, stall_after=3, stall_seconds=3)
    backend = OpenAIBackend("fake-model", base_url=fake.url, timeout=0.3)
    with pytest.raises(TransientError, match=r"no token .* for 0.3 s") as e:
        backend.complete(ASK, max_tokens=64, temperature=0)
    assert e.value.kind == "timeout" and backend.streaming == 0


def test_the_first_token_has_its_own_limit(slow):
    fake = slow(tokens=10, rate=50, prompt_seconds=1.0)   # reads the prompt for 1 s
    quick = OpenAIBackend("fake-model", base_url=fake.url, timeout=0.3)   # default first-token limit
    assert quick.first_token_timeout >= 300
    assert quick.complete(ASK, max_tokens=64, temperature=0).completion_tokens == 10
    strict = OpenAIBackend("fake-model", base_url=fake.url, timeout=0.3, first_token_timeout=0.5)
    with pytest.raises(TransientError, match="no first token") as e:
        strict.complete(ASK, max_tokens=64, temperature=0)
    assert e.value.kind == "timeout"


def test_a_queued_request_waits_under_the_first_token_limit_not_the_silence_one(slow):
    """A server that answers a queued request at once with a role chunk (and keep-alives: comments,
    empty deltas), then nothing until its turn: the wait is the first token's, however long past
    --timeout; a reply alone counts as streaming."""
    import threading

    fake = slow(tokens=30, rate=50, announce=True, keepalive=0.05)   # 0.6 s an answer
    backend = OpenAIBackend("fake-model", base_url=fake.url, timeout=0.2)
    ahead: dict = {}
    first = threading.Thread(target=lambda: ahead.update(c=backend.complete(ASK, max_tokens=64, temperature=0)))
    first.start()
    while fake.started == 0:
        pass
    seen: list[int] = []
    watch = threading.Timer(0.3, lambda: seen.append(backend.streaming))   # the second is queued then
    watch.start()
    c = backend.complete(ASK, max_tokens=64, temperature=0)   # queued behind 0.6 s of the first
    first.join()
    assert c.completion_tokens == 30 and ahead["c"].completion_tokens == 30
    assert c.first_token_seconds > 0.4 and seen == [1]
    assert fake.started == 2 and fake.abandoned == 0 and backend.streaming == 0
    # chat --api-model and converse stream through the same path: the same wait
    assert len(list(backend.stream(ASK, max_tokens=64, temperature=0))) == 30
    # the first-token limit still holds for such a request
    strict = OpenAIBackend("fake-model", base_url=fake.url, timeout=0.2, first_token_timeout=0.3)
    first = threading.Thread(target=lambda: backend.complete(ASK, max_tokens=64, temperature=0))
    first.start()
    while fake.started < 4:
        pass
    with pytest.raises(TransientError, match="no first token .* within 0.3 s") as e:
        strict.complete(ASK, max_tokens=64, temperature=0)
    first.join()
    assert e.value.kind == "timeout" and e.value.streamed is None


def test_the_stream_is_read_as_server_sent_events(monkeypatch):
    """Events over several data: lines, comments, a usage chunk, an error event, a malformed chunk,
    a stream that ends without [DONE]: read as the SSE format says, without openai's Stream."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = {
        "split": b'data: {"model":"m","choices":[{"delta":{"content":"a"}}]}\n\n: ping\n\n'
                 b'data: {"choices":[{"delta":{"content":"b"}}],\ndata: "usage":{"prompt_tokens":3,'
                 b'"completion_tokens":2}}\n\ndata: [DONE]\n\n',
        "error": b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"error":{"message":"boom"}}\n\n',
        "malformed": b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [1,2\n\n',
        "no-done": b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n',
    }
    case = {"now": ""}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = bodies[case["now"]]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    backend = OpenAIBackend("m", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", timeout=5)
    try:
        case["now"] = "split"
        c = backend.complete(ASK, max_tokens=5, temperature=0)
        assert (c.text, c.prompt_tokens, c.completion_tokens, c.usage, c.model) == ("ab", 3, 2, "server", "m")
        case["now"] = "no-done"
        c = backend.complete(ASK, max_tokens=5, temperature=0)
        assert c.text == "x" and c.usage == "estimate"   # no usage sent: estimated, and said so
        for name, said in (("error", "failed mid-answer: boom"), ("malformed", "malformed chunk")):
            case["now"] = name
            with pytest.raises(TransientError, match=said):
                backend.complete(ASK, max_tokens=5, temperature=0)
        assert backend.streaming == 0
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ the runner

def test_one_at_a_time_server_gets_every_item_and_no_wasted_generation(slow, tmp_path):
    fake = slow(tokens=15, rate=50)   # 0.3 s an answer, longer than the timeout; queued requests wait
    stats, recs = run(fake, 6, tmp_path / "out.jsonl", timeout=0.2, concurrency=4)
    assert stats.ok == 6 and [r["status"] for r in recs] == ["ok"] * 6
    assert fake.started == 6 and fake.abandoned == 0 and stats.timeouts == 0
    assert all(r["annotator"]["attempts"] == 1 for r in recs)


def test_timeouts_lower_the_requests_in_flight_and_waste_fewer_generations(slow, tmp_path):
    # The first-token limit is shorter than the queue: a request queued behind two others times
    # out, and the server still generates it (a wasted generation).
    fake = slow(tokens=15, rate=50)   # 0.3 s an answer
    stats, recs = run(fake, 6, tmp_path / "out.jsonl", timeout=0.2, first_token=0.5, concurrency=6)
    assert stats.ok == 6 and stats.failed == 0 and stats.timeouts >= 1
    # Cut to the one reply that was streaming, grown back only while first tokens come quickly:
    # never again three in the queue.
    assert stats.concurrency < 3
    blind = slow(tokens=15, rate=50)
    blind_stats, _ = run(blind, 6, tmp_path / "blind.jsonl", timeout=0.2, first_token=0.5, concurrency=6,
                         adaptive=False)
    assert fake.started - 6 < blind.started - blind_stats.ok


def test_a_retry_is_not_sent_to_wait_behind_a_given_up_generation(slow, tmp_path):
    # One at a time, 0.5 s an answer, a first-token limit of 0.8 s: of six requests sent at once,
    # the four queued behind two answers time out, and the server still makes all four. Retries
    # sent at once would wait behind those four answers (2 s) and time out again, each leaving
    # one more; counted against the limit until the server is through them, they do not.
    # One retry goes once the four would be done within half the first-token limit: it waits
    # behind the last of them, and its first token tells that the server ran them.
    fake = slow(tokens=20, rate=40)
    stats, recs = run(fake, 6, tmp_path / "out.jsonl", timeout=0.3, first_token=0.8, concurrency=6)
    assert stats.ok == 6 and stats.failed == 0
    assert stats.timeouts == 4 and stats.ghosts == 4 and stats.ghosts_real is True
    assert fake.started == 6 + 4 and fake.abandoned == 4


def test_a_server_that_drops_given_up_requests_is_found_out_and_not_waited_for(slow, tmp_path):
    # As transformers serve: a role chunk at once, and a request whose client has gone is dropped.
    # One at a time, 1 s an answer, a first-token limit of 2.5 s: the fourth request times out in
    # the queue and is dropped; its retry goes as soon as the third answer is done (nothing else in
    # flight), comes back at once, and the ghost is cleared.
    fake = slow(tokens=20, rate=20, announce=True, cancel_gone=True)
    stats, recs = run(fake, 4, tmp_path / "out.jsonl", timeout=0.5, first_token=2.5, concurrency=4)
    assert stats.ok == 4 and stats.timeouts == 1 and fake.dropped == 1
    assert stats.ghosts == 1 and stats.ghosts_real is False and stats.ghost_seconds < 0.9   # of ~1.05 s
    assert fake.started == 4
    # the same against a server that runs it: the retry waits behind it, and it is waited for
    keeps = slow(tokens=20, rate=20, announce=True)
    stats, recs = run(keeps, 4, tmp_path / "keeps.jsonl", timeout=0.5, first_token=2.5, concurrency=4)
    assert stats.ok == 4 and stats.timeouts == 1 and stats.ghosts_real is True
    assert keeps.started == 5 and keeps.abandoned == 1


def test_ghosts_run_in_the_lanes_the_limit_leaves():
    from persllm_cli.llm.ghosts import Ghosts
    from persllm_cli.llm.protocol import Completion

    g = Ghosts()
    assert g.add(0.0, None, lanes=1) == 0 and g.holding(0.0) == 0   # no pace known yet: no ghost
    g.observe(Completion("x", 1, 10, seconds=1.5, model="m", first_token_seconds=0.5))   # 1 s streaming
    g.observe(Completion("x", 1, 10, seconds=3.0, model="m", first_token_seconds=2.0))   # queued 2 s
    assert g.left(None) == pytest.approx(1.5)   # the shortest first-token wait + the mean answer
    assert g.left(0.25) == pytest.approx(0.75) and g.left(5.0) == 0
    for _ in range(3):
        g.add(10.0, None, lanes=1)   # one lane: one after another
    assert g.next_change(10.0) == pytest.approx(11.5)
    assert [g.holding(t) for t in (10.0, 11.4, 14.4, 14.6)] == [1, 1, 1, 0]
    assert g.next_change(14.6) == float("inf")
    for _ in range(3):
        g.add(20.0, 0.5, lanes=2)    # two lanes, 0.5 s each: two at once, then the third
    assert [g.holding(t) for t in (20.0, 20.6, 21.1)] == [2, 1, 0]
    assert g.added == 6 and g.seconds == pytest.approx(3 * 1.5 + 3 * 0.5)
    # finding out: one probe, and only when the ghosts are nearly done
    g.add(30.0, None, lanes=1)   # 30.0 - 31.5
    assert not g.probe(30.0, "a", within=1.0) and g.probe(30.6, "a", within=1.0)
    assert not g.probe(30.6, "b", within=1.0)   # one at a time
    g.heard("b", 0.1)                            # not the probe: tells nothing
    g.heard("a", 0.1)                            # came at once: the server dropped the ghost
    assert g.real is False and g.holding(30.7) == 0 and g.seconds == pytest.approx(6.0 + 0.7)
    assert g.add(40.0, None, lanes=1) == 0       # and no timeout leaves one again
    real = Ghosts()
    real.observe(Completion("x", 1, 10, seconds=1.5, model="m", first_token_seconds=0.5))
    real.add(0.0, None, lanes=1)
    assert real.probe(0.2, "a", within=None)
    real.heard("a", None, timed_out=True)        # held back until it timed out: real
    assert real.real is True and not real.probe(0.3, "b", within=None)


def test_overload_answers_lower_the_requests_in_flight(slow, tmp_path):
    # A server that takes one request and refuses (503) the rest at once.
    fake = slow(tokens=5, rate=50, max_queue=0)   # 0.1 s an answer
    stats, recs = run(fake, 6, tmp_path / "out.jsonl", timeout=5, concurrency=4, max_retries=5)
    # Every refusal reached the runner as an overload; a kept-alive connection the server dropped
    # after a 503 can add one more (counted as overload too: "connection refused/reset").
    assert stats.ok == 6 and fake.refused <= stats.overloads <= fake.refused + 2
    assert fake.started == 6
    # Growth back probes with one extra request per success at most: refusals stay about one per
    # item, where four workers retrying blindly would be refused many times per item.
    assert fake.refused <= 2 * 6 + 4


def test_without_the_adaptive_limit_the_same_server_refuses_far_more(slow, tmp_path):
    fake = slow(tokens=5, rate=50, max_queue=0)
    stats, _ = run(fake, 6, tmp_path / "out.jsonl", timeout=5, concurrency=4, max_retries=30, adaptive=False)
    adaptive_fake = slow(tokens=5, rate=50, max_queue=0)
    run(adaptive_fake, 6, tmp_path / "out2.jsonl", timeout=5, concurrency=4, max_retries=30)
    assert fake.refused > adaptive_fake.refused


def test_progress_shows_tokens_arriving_and_silence():
    class Streaming:
        received = 0

    backend = Streaming()
    arriving = Arriving(backend)
    assert arriving.text(in_flight=1).endswith("tok/s arriving")
    backend.received = 40
    assert arriving.text(in_flight=1) != "0.0 tok/s arriving"
    arriving.last_change -= 5   # nothing since
    arriving.samples = [(t - 5, n) for t, n in arriving.samples]
    arriving.samples.append((arriving.samples[-1][0], 40))
    assert arriving.text(in_flight=1).startswith("no token for")
    assert arriving.text(in_flight=0) == ""
    assert Arriving(object()).text(in_flight=1) == ""   # a backend that does not stream


# ------------------------------------------------------------------------------ the command

@pytest.fixture
def proj(tmp_path, cli, monkeypatch) -> Path:
    root = make_project(cli, tmp_path / "hp", early=[f"Harry went to class number {i} with Ron." for i in range(4)])
    monkeypatch.chdir(root)
    return root


def test_annotate_against_a_one_at_a_time_server_slower_than_the_timeout(cli, proj, slow):
    # The run, scaled down: each answer takes longer than --timeout to generate in full.
    fake = slow(tokens=20, rate=40)   # 0.5 s an answer
    r = cli("annotate", "--stage", "early", "--model", "fake-model", "--limit", "4", "--concurrency", "2",
            "--timeout", "0.3")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(proj / "build/annotations.jsonl")
    assert [x["status"] for x in recs] == ["ok"] * 4
    assert fake.started == 4 and fake.abandoned == 0
    assert "keep timing out" not in r.output


def test_annotate_against_a_server_that_answers_queued_requests_with_a_role_chunk(cli, proj, slow):
    # The run, scaled down: the server says "assistant" at once to every request and then
    # nothing until its turn, which comes later than --timeout for all but the first.
    fake = slow(tokens=20, rate=40, announce=True)   # 0.5 s an answer
    r = cli("annotate", "--stage", "early", "--model", "fake-model", "--concurrency", "4", "--timeout", "0.3")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(proj / "build/annotations.jsonl")
    assert [x["status"] for x in recs] == ["ok"] * 4
    assert all(x["annotator"]["attempts"] == 1 for x in recs)
    assert fake.started == 4 and fake.abandoned == 0
    assert "keep timing out" not in r.output


def test_timeouts_are_said_once_and_every_item_ends_as_a_record(cli, proj, slow):
    # Every generation goes silent for longer than --timeout: all attempts time out.
    fake = slow(tokens=6, rate=50, stall_first=1000, stall_after=1, stall_seconds=1.0)
    r = cli("annotate", "--stage", "early", "--model", "fake-model", "--concurrency", "2", "--timeout", "0.2",
            "--max-retries", "1")
    assert r.exit_code == 3, r.output
    assert r.output.count("keep timing out") == 1
    assert "--timeout" in r.output and "--concurrency" in r.output and "--max-tokens" in r.output
    recs = read_jsonl(proj / "build/annotations.jsonl")
    assert len(recs) == 4 and {x["status"] for x in recs} == {"failed"}
    assert all("no token" in x["error"] and "(after 2 attempts)" in x["error"] for x in recs)
    # The server recovers: a rerun retries just the failed items, and they come out ok.
    fake.stall_first = 0
    before = fake.received
    r = cli("annotate", "--stage", "early", "--model", "fake-model", "--timeout", "0.2")
    assert r.exit_code == 0, r.output
    assert fake.received - before == 4
    assert [x["status"] for x in read_jsonl(proj / "build/annotations.jsonl")][-4:] == ["ok"] * 4
