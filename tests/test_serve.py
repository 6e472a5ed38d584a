"""`persllm serve`: the OpenAI-compatible API driven by the real `openai` client against a live
server on 127.0.0.1 (a subprocess), its errors, key, queue, disconnects and SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from tests.conftest import run_persllm, subprocess_env
from tests.run_factory import make_run, make_staged_run, perturb_lora
from tests.serve_server import ServeProcess

pytestmark = pytest.mark.slow
KEY = "serve-test-key-0123456789"


@pytest.fixture(scope="module")
def serve_run(_embedded_models, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-runs") / "r1", _embedded_models / "smollm2-135m")


def _env(embedded: Path, **extra: str) -> dict[str, str]:
    env = subprocess_env(PERSLLM_HOME=str(embedded.parent), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PERSLLM_API_KEY"):
        env.pop(var, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(serve_run, _embedded_models):
    s = ServeProcess(str(serve_run), env=_env(_embedded_models))
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def other_run(serve_run) -> Path:
    """A second run on the same base whose LoRA weights are not zero, so it answers unlike r1."""
    import shutil

    r2 = serve_run.parent / "r2"
    shutil.copytree(serve_run, r2, symlinks=True)
    return perturb_lora(r2, seed=1)


@pytest.fixture(scope="module")
def strict(serve_run, other_run, _embedded_models):
    """A server with a key, one request per batch and room for one waiting request, serving r1 and r2
    on one shared base (--weights shared)."""
    s = ServeProcess(str(serve_run), str(other_run), "--max-batch", "1", "--max-queue", "1", "--weights", "shared",
                     env=_env(_embedded_models, PERSLLM_API_KEY=KEY))
    yield s
    s.stop()


def client(s: ServeProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.v1, api_key=key, max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "Who are you?"}]


# ----------------------------------------------------------------------------------- models

def test_models_one_id_per_stage_and_a_default(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["r1@early", "r1@middle", "r1@late", "r1"]
    assert {m.max_model_len for m in models} == {8192}   # the model's own context, as vLLM lists it
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["models"] == 4


# ------------------------------------------------------------------------------- completions

def test_greedy_stream_equals_whole_equals_chat(server, serve_run, cli, smollm2):
    c = client(server)
    whole = c.chat.completions.create(model="r1@early", messages=ASK, temperature=0, max_tokens=16)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 16 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 16
    assert whole.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="r1@early", messages=ASK, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].message.content
    r = cli("chat", str(serve_run), "--stage", "early", "--prompt", "Who are you?", "--temperature", "0",
            "--max-new-tokens", "16")
    assert r.exit_code == 0
    assert r.stdout == streamed + "\n"
    # NAME alone is the last stage; another stage is another time token, so another prompt.
    late = c.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=16)
    late2 = c.chat.completions.create(model="r1@late", messages=ASK, temperature=0, max_tokens=16)
    assert late.choices[0].message.content == late2.choices[0].message.content
    assert late.model == "r1"


def test_stream_without_usage_and_done_marker(server):
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=120,
                      json={"model": "r1@middle", "messages": ASK, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in ch for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_ignore_eos_runs_to_max_tokens(server):
    # vLLM's extra, sent as the openai client sends extras: the same greedy answer, past its end token.
    c = client(server)
    hi = [{"role": "user", "content": "Hi"}]
    ended = c.chat.completions.create(model="r1@early", messages=hi, temperature=0, max_tokens=120)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 120
    longer = c.chat.completions.create(model="r1@early", messages=hi, temperature=0, max_tokens=120,
                                       extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 120
    assert longer.choices[0].message.content.startswith(ended.choices[0].message.content)


def test_stop_seed_and_concurrent_requests_are_batched(server):
    c = client(server)
    base = c.chat.completions.create(model="r1@early", messages=ASK, temperature=0, max_tokens=16)
    text = base.choices[0].message.content
    word = text.split()[2]
    cut = c.chat.completions.create(model="r1@early", messages=ASK, temperature=0, max_tokens=16, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert text.startswith(cut.choices[0].message.content) and word not in cut.choices[0].message.content
    a, b = (c.chat.completions.create(model="r1@early", messages=ASK, temperature=0.9, top_p=0.9, seed=7,
                                      max_tokens=12).choices[0].message.content for _ in range(2))
    assert a == b
    # Four different questions at once: the same greedy answers as one at a time.
    questions = ["Who are you?", "Where do you live?", "What is your favourite spell, and why do you like it?",
                 "Hi"]
    alone = [c.chat.completions.create(model="r1@late", messages=[{"role": "user", "content": q}], temperature=0,
                                       max_tokens=12).choices[0].message.content for q in questions]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: c.chat.completions.create(
            model="r1@late", messages=[{"role": "user", "content": q}], temperature=0,
            max_tokens=12).choices[0].message.content, questions))
    assert together == alone
    assert httpx.get(server.url + "/health").json()["largest_batch"] > 1


def test_rows_join_and_leave_the_running_batch(serve_run, smollm2):
    """In process: a request arriving while others decode joins their batch at the next step, a row
    that ends leaves it at once (a long prompt's padding goes with it), and every greedy answer is
    the one the same request gets alone."""
    import threading

    from persllm_cli.model.chat_format import prompt_ids
    from persllm_cli.model.generate import Sampling
    from persllm_cli.model.load import load_run
    from persllm_cli.serve.batcher import Scheduler

    model, tok, info = load_run(serve_run)
    token = info.stage_token("late")[1]
    asks = {"long": (" ".join(["The castle was quiet that night."] * 30) + " Why?", 3),
            "a": ("Who are you?", 14), "b": ("Where do you live?", 10), "c": ("Hi, what is your favourite spell?", 6)}
    ids = {k: prompt_ids(tok, [{"role": "user", "content": q}], token) for k, (q, _) in asks.items()}
    sched = Scheduler({"r": (model, tok)}, max_batch=8)
    seen: list[tuple[int, int]] = []   # (rows, cache width) of every decode step
    step = sched._step

    def recording(key, batch):
        seen.append((len(batch.rows), batch.mask.shape[1] if batch.rows else 0))
        step(key, batch)

    sched._step = recording
    texts: dict[str, str] = {}
    ends: dict[str, tuple] = {}
    done: dict[str, threading.Event] = {}

    def submit(k: str, then: str | None = None) -> None:
        texts[k], done[k] = "", threading.Event()

        def emit(event: tuple) -> None:
            if event[0] == "text":
                if then and not texts[k]:
                    submit(then, {"b": "c"}.get(then))   # from the scheduler thread: joins at the next step
                texts[k] += event[1]
            else:
                ends[k] = event
                done[k].set()

        sched.submit("r", ids[k], Sampling(max_new_tokens=asks[k][1], temperature=0), emit)

    submit("long")
    submit("a", then="b")
    sched.start()
    try:
        for k in asks:
            while k not in done:
                time.sleep(0.01)
            assert done[k].wait(120)
        together = dict(texts), dict(ends)
        assert max(rows for rows, _ in seen) >= 3 and sched.largest_batch >= 3
        assert seen[-1][1] < len(ids["long"])   # the long prompt's columns left with it
        for k in asks:
            texts.pop(k), done.pop(k)
            submit(k)
            assert done[k].wait(120)
        assert (texts, ends) == together
    finally:
        sched.close()


# ---------------------------------------------------------------------------------- errors

def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
    return err


def test_errors_have_openai_shape(server):
    url = server.v1 + "/chat/completions"
    err = _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    for body, field in [({"model": "r1", "messages": ASK, "temperature": 5}, "temperature"),
                        ({"model": "r1", "messages": ASK, "max_tokens": 0}, "max_tokens"),
                        ({"model": "r1", "messages": ASK, "top_p": "x"}, "top_p"),
                        ({"model": "r1", "messages": []}, "messages"),
                        ({"model": "r1", "messages": ASK, "n": 9}, "n"),
                        ({"model": "r1", "messages": ASK, "stop": 3}, "stop")]:
        err = _error(httpx.post(url, json=body), 400)
        assert err["param"] == field and field in err["message"]
    _error(httpx.post(url, content=b"x" * (1024 * 1024 + 1), headers={"content-type": "application/json"}), 413)
    _error(httpx.get(server.url + "/nowhere"), 404)
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nobody@early", messages=ASK)
    assert e.value.code == "model_not_found" and "r1@early" in e.value.message
    # A served model at a stage it does not have: the sentence every command says about a stage.
    err = _error(httpx.post(url, json={"model": "r1@nope", "messages": ASK}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == "unknown stage 'nope' (stages: early, middle, late)"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="r1", messages=ASK, n=9)
    assert e.value.param == "n"


def test_disconnect_stops_generation(server):
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=120,
                      json={"model": "r1", "messages": ASK, "max_tokens": 2000, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    start = time.monotonic()
    # The model is free again at once: the abandoned answer is not generated to its 2000 tokens.
    out = client(server).chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    while "client-gone" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client-gone" in server.log()


def test_access_log_has_no_text(server):
    client(server).chat.completions.create(model="r1", messages=[{"role": "user", "content": "secret words"}],
                                           max_tokens=2)
    log = server.log()
    assert "secret words" not in log
    assert any(line.startswith("POST /v1/chat/completions 200 ") and "tokens=" in line for line in server.lines)


# ----------------------------------------------------------------------- key, queue, signals

def test_key_required_and_compared(strict):
    with pytest.raises(openai.AuthenticationError):
        client(strict, "wrong").models.list()
    err = _error(httpx.get(strict.v1 + "/models"), 401)
    assert err["code"] == "invalid_api_key"
    assert [m.id for m in client(strict, KEY).models.list().data][0] == "r1@early"
    assert httpx.get(strict.url + "/health").status_code == 200  # health and the page need no key
    assert httpx.get(strict.url + "/").status_code == 200
    assert KEY not in strict.log() and "wrong" not in strict.log()


def test_shared_weights_switch_adapters_and_answer_as_merged(strict, server, other_run, smollm2):
    """--weights shared: r1 and r2 run on one loaded base, each request on its own run's adapter;
    greedy answers equal the merged models' (r1 from the merged server, r2 from load_run here)."""
    assert "one copy of each base" in strict.log()
    c = client(strict, KEY)
    ask = dict(messages=ASK, temperature=0, max_tokens=8)
    merged_r1 = client(server).chat.completions.create(model="r1@early", **ask).choices[0].message.content
    r1 = c.chat.completions.create(model="r1@early", **ask).choices[0].message.content
    r2 = c.chat.completions.create(model="r2@early", **ask).choices[0].message.content
    assert r1 == merged_r1 and r2 != r1
    from persllm_cli.model.generate import Sampling, stream_reply
    from persllm_cli.model.load import load_run

    model, tok, info = load_run(other_run)
    merged_r2 = "".join(stream_reply(model, tok, ASK, info.stage_token("early")[1],
                                     Sampling(max_new_tokens=8, temperature=0)))
    assert r2 == merged_r2
    assert c.chat.completions.create(model="r1@early", **ask).choices[0].message.content == r1


def test_full_queue_is_429_with_retry_after(strict):
    def long() -> int:
        with httpx.stream("POST", strict.v1 + "/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "r1", "messages": ASK, "max_tokens": 40, "stream": True,
                                "ignore_eos": True}) as r:
            for _ in r.iter_lines():
                pass
            return r.status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(long)
        time.sleep(1.0)
        waiting = pool.submit(long)
        time.sleep(0.5)
        r = httpx.post(strict.v1 + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "r1", "messages": ASK, "max_tokens": 2})
        assert running.result() == 200 and waiting.result() == 200
    err = _error(r, 429)
    assert r.headers["Retry-After"] == "1" and err["code"] == "queue_full"


def test_sigterm_drains_with_503_cuts_streams_as_length_and_exits_within_the_grace(serve_run, _embedded_models):
    grace = 4.0
    s = ServeProcess(str(serve_run), env=_env(_embedded_models, PERSLLM_SERVE_SHUTDOWN_GRACE=str(grace)))
    try:
        with httpx.stream("POST", s.v1 + "/chat/completions", timeout=120,
                          json={"model": "r1", "messages": ASK, "max_tokens": 3000, "stream": True,
                                    "ignore_eos": True}) as r:   # still running when the grace ends
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            time.sleep(0.5)
            # Still listening while the stream drains: a new request hears why and when to retry.
            late = httpx.post(s.v1 + "/chat/completions", json={"model": "r1", "messages": ASK, "max_tokens": 2})
            rest = [line for line in lines if line.startswith("data: ")]
        err = _error(late, 503)
        assert err["code"] == "shutting_down" and late.headers["Retry-After"] == "1"
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"   # cut short, and says so
        assert s.proc.wait(timeout=60) == 0
        assert time.monotonic() - sent < grace
    finally:
        s.stop()
    assert "stopping" in s.log() and "Traceback" not in s.log()


def test_sigterm_with_nothing_in_flight_exits_at_once(serve_run, _embedded_models):
    s = ServeProcess(str(serve_run), env=_env(_embedded_models))
    sent = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 0
    assert time.monotonic() - sent < 5


def test_max_model_len_above_the_models_context_is_refused(serve_run, _embedded_models):
    r = run_persllm("serve", str(serve_run), "--max-model-len", "9000", "--port", "0", env=_env(_embedded_models),
                    timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --max-model-len 9000 is more than r1 can read: its context is 8192 tokens")


def test_public_bind_needs_a_key(serve_run, _embedded_models):
    r = run_persllm("serve", str(serve_run), "--host", "0.0.0.0", env=_env(_embedded_models), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: refusing to serve on 0.0.0.0 without an API key: set PERSLLM_API_KEY (clients send it as "
        "Authorization: Bearer KEY), or bind 127.0.0.1"]


# --------------------------------------------------------------------- one adapter per stage

def test_a_run_with_one_adapter_per_stage_answers_each_stage_with_its_own(serve_run, _embedded_models, smollm2):
    """train --adapter-per-stage: each request decoded with the adapter of the stage its model names
    (on CPU each stage's merged model), requests at several stages at once included; the answers equal each
    stage's own run loaded alone."""
    from persllm_cli.model.generate import Sampling, stream_reply
    from persllm_cli.model.load import load_run

    staged = make_staged_run(serve_run.parent / "ps", _embedded_models / "smollm2-135m")
    own = {}
    for sid in ("early", "late"):
        model, tok, info = load_run(staged / "stages" / sid)
        own[sid] = "".join(stream_reply(model, tok, ASK, info.stage_token(sid)[1],
                                        Sampling(max_new_tokens=8, temperature=0)))
    assert own["early"] != own["late"]
    s = ServeProcess(str(staged), env=_env(_embedded_models))
    try:
        c = client(s)
        assert [m.id for m in c.models.list().data] == ["ps@early", "ps@middle", "ps@late", "ps"]
        ask = dict(messages=ASK, temperature=0, max_tokens=8)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda m: c.chat.completions.create(model=m, **ask).choices[0].message.content,
                                ["ps@early", "ps@late", "ps@early", "ps"]))
        assert got == [own["early"], own["late"], own["early"], own["late"]]   # "ps": the last stage
    finally:
        assert s.stop() == 0, s.log()
