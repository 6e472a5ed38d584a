"""`persllm serve` against what real clients and attackers send (issue 23), on a live server with the
real `openai` client and raw HTTP: values that pass JSON but not sense are 400s naming the field,
OpenAI's extra parameters are accepted (and honoured where docs/CLI.md says so), message text stays
text, a huge history neither stalls the server nor is refused, max_tokens beyond the context is
blamed on max_tokens, and a keyless server answers only its own Host and JSON bodies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.run_factory import make_run
from tests.serve_server import ServeProcess
from tests.test_serve import ASK, KEY, _env, _error

pytestmark = pytest.mark.slow
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="session")
def safe_run(_embedded_models, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("safe-runs") / "r1", _embedded_models / "smollm2-135m")


@pytest.fixture(scope="session")
def safe_server(safe_run, _embedded_models):
    """A keyless server whose answers are 4 tokens unless asked otherwise and whose requests take at
    most 2048 tokens, a quarter of the model's context (fuzzing and long histories stay quick)."""
    s = ServeProcess(str(safe_run), "--max-tokens", "4", "--max-model-len", "2048", env=_env(_embedded_models))
    yield s
    assert s.stop() == 0, s.log()


def client(s: ServeProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.v1, api_key=key, max_retries=0, timeout=300)


def post(s: ServeProcess, raw: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(s.v1 + "/chat/completions", content=raw, headers=JSON if headers is None else headers, timeout=300)


# ------------------------------------------------------------------------------ bad values

def test_values_that_used_to_crash_are_400s_naming_the_field(safe_server):
    head = b'{"model": "r1", "messages": [{"role": "user", "content": "hi"}], '
    cases = [
        (head + b'"temperature": NaN}', "temperature"),
        (head + b'"top_p": Infinity}', "top_p"),
        (head + b'"presence_penalty": -Infinity}', "presence_penalty"),
        (head + b'"seed": ' + str(2 ** 70).encode() + b"}", "seed"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": "\\ud800 hi"}]}', "messages[0].content"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
         "messages[0].content"),
        (head + b'"max_tokens": "8"}', "max_tokens"),
        (head + b'"max_tokens": 2.5}', "max_tokens"),
        (head + b'"stream": "yes"}', "stream"),
        (head + b'"n": 0}', "n"),
        (head + b'"stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (head + b'"stop": [1]}', "stop"),
        (head + b'"logit_bias": {"12": 101}}', "logit_bias"),
        (head + b'"tools": [{"type": "function", "function": {"name": "f"}}]}', "tools"),
        (head + b'"tool_choice": "required"}', "tool_choice"),
        (head + b'"response_format": {"type": "json_object"}}', "response_format"),
        (head + b'"stream_options": {"include_usage": true}}', "stream_options"),
        (b'{"model": "r1", "messages": [{"role": "tool", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": null}]}', "messages[0].content"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
         "messages[0].content"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
         "messages"),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    ]
    for raw, field in cases:
        err = _error(post(safe_server, raw), 400)
        assert err["param"] == field, (raw, err)
        assert err["message"].startswith(field) or field == "messages", (raw, err)
    for raw in [b"[" * 100_000, b'{"model": 1' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"[]", b"{"]:
        assert _error(post(safe_server, raw), 400)["code"] == "invalid_json"
    assert "Traceback" not in safe_server.log() and "internal error" not in safe_server.log()
    assert httpx.get(safe_server.url + "/health").json()["status"] == "ok"


def test_max_tokens_beyond_the_context_is_blamed_on_max_tokens(safe_server):
    with pytest.raises(openai.BadRequestError) as e:
        client(safe_server).chat.completions.create(model="r1", messages=ASK, max_tokens=1_000_000_000)
    assert e.value.param == "max_tokens" and e.value.code == "context_length_exceeded"
    assert "2048" in e.value.message and "--" not in e.value.message   # the served limit; no CLI flag
    with pytest.raises(openai.BadRequestError) as e:   # a prompt that cannot fit even alone: the message's fault
        client(safe_server).chat.completions.create(model="r1", messages=[{"role": "user", "content": "word " * 9000}],
                                                    max_tokens=100)
    assert e.value.param == "messages" and "2048" in e.value.message and "--" not in e.value.message


# -------------------------------------------------------------------------- extra parameters

def test_openai_extras_are_accepted_and_the_sampling_ones_honoured(safe_server):
    c = client(safe_server)
    extras = dict(logit_bias={"50256": -100}, logprobs=True, top_logprobs=2, user="someone", tools=[],
                  tool_choice="none", parallel_tool_calls=False, response_format={"type": "text"})
    out = c.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=6,
                                    extra_body={"min_p": 0.1, "repetition_penalty": 1.1, "cache_prompt": True},
                                    **extras)
    greedy = c.chat.completions.create(model="r1", messages=ASK, temperature=0, max_tokens=6)
    assert out.choices[0].message.content == greedy.choices[0].message.content   # ignored ones change nothing
    assert out.choices[0].logprobs is None
    # top_k=1 leaves one token to sample from: the greedy answer, at any temperature.
    k1 = c.chat.completions.create(model="r1", messages=ASK, temperature=1.5, max_tokens=6, extra_body={"top_k": 1})
    assert k1.choices[0].message.content == greedy.choices[0].message.content
    # A strong frequency penalty changes a greedy answer that repeats itself.
    ask = [{"role": "user", "content": "Repeat after me ten times: yes yes yes yes yes yes yes yes yes yes"}]
    plain = c.chat.completions.create(model="r1", messages=ask, temperature=0, max_tokens=12).choices[0].message.content
    damped = c.chat.completions.create(model="r1", messages=ask, temperature=0, max_tokens=12,
                                       frequency_penalty=2, presence_penalty=2).choices[0].message.content
    assert damped != plain
    # n answers, each its own row; a seed makes them repeatable (choice i uses seed + i).
    two = c.chat.completions.create(model="r1", messages=ASK, temperature=1.0, max_tokens=8, n=2, seed=11)
    again = c.chat.completions.create(model="r1", messages=ASK, temperature=1.0, max_tokens=8, n=2, seed=11)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert [ch.message.content for ch in two.choices] == [ch.message.content for ch in again.choices]
    assert two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == 16
    chunks = list(c.chat.completions.create(model="r1", messages=ASK, temperature=1.0, max_tokens=8, n=2, seed=11,
                                            stream=True))
    streamed = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
                for i in (0, 1)]
    assert streamed == [ch.message.content for ch in two.choices]


# -------------------------------------------------------------------------------- text is text

def test_control_token_text_in_a_message_stays_text(safe_server):
    c = client(safe_server)
    plain = c.chat.completions.create(model="r1@early", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    for text, extra in [("hi<|im_end|>", 7), ("hi<|im_start|>", 7), ("hi<TIME-III>", 5), ("hi<|endoftext|>", 7)]:
        forged = c.chat.completions.create(model="r1@early", messages=[{"role": "user", "content": text}], max_tokens=1)
        # Each character's tokens, where it used to be one control token (32 -> 33 for hi<|im_end|>).
        assert forged.usage.prompt_tokens == plain.usage.prompt_tokens + extra, text


# --------------------------------------------------------------------------- a long history

def test_a_3000_message_history_is_fitted_without_stalling_the_server(safe_server):
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i}: what happened at the lake?"}
               for i in range(2999)] + [{"role": "user", "content": "And now?"}]
    done: dict = {}

    def send() -> None:
        done["answer"] = client(safe_server).chat.completions.create(model="r1", messages=history, max_tokens=2,
                                                                     temperature=0)

    thread = threading.Thread(target=send)
    thread.start()
    healths = []
    while thread.is_alive():
        healths.append(httpx.get(safe_server.url + "/health", timeout=60).status_code)
        time.sleep(0.05)
    thread.join()
    answer = done["answer"]
    assert answer.usage.prompt_tokens <= 2048 - 2 and answer.usage.prompt_tokens > 1800   # old turns dropped, not all
    assert {m.max_model_len for m in client(safe_server).models.list().data} == {2048}
    assert healths and set(healths) == {200}


# ------------------------------------------------------------------------ keyless and browsers

def test_keyless_server_answers_only_its_own_host_and_json_bodies(safe_server):
    port = safe_server.url.rsplit(":", 1)[1]
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]:
        assert httpx.get(safe_server.url + "/health", headers={"Host": host}).status_code == 200
    for host in [f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{int(port) + 1}", f"localhost.evil:{port}"]:
        err = _error(httpx.get(safe_server.v1 + "/models", headers={"Host": host}), 421)
        assert err["code"] == "misdirected_request"
        _error(httpx.post(safe_server.v1 + "/chat/completions", headers={"Host": host, **JSON},
                          json={"model": "r1", "messages": ASK}), 421)
    before = safe_server.log().count("tokens=")
    body = b'{"model": "r1", "messages": [{"role": "user", "content": "hi"}]}'
    for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]:
        err = _error(post(safe_server, body, headers={"content-type": kind} if kind else {}), 415)
        assert err["code"] == "unsupported_media_type"
    assert post(safe_server, body, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    deadline = time.monotonic() + 10
    while safe_server.log().count("tokens=") == before and time.monotonic() < deadline:
        time.sleep(0.1)   # the access-log line follows the answer
    assert safe_server.log().count("tokens=") == before + 1   # only the JSON one generated


def test_with_a_key_any_host_is_served_but_json_is_still_required(safe_run, _embedded_models):
    s = ServeProcess(str(safe_run), "--max-tokens", "2", env=_env(_embedded_models, PERSLLM_API_KEY=KEY))
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(s.v1 + "/models", headers={"Host": "persllm.internal", **auth}).status_code == 200
        _error(httpx.get(s.v1 + "/models", headers={"Host": "persllm.internal"}), 401)
        _error(httpx.get(s.v1 + "/models", headers={"Authorization": "Bearer"}), 401)   # a front-end without the key
        _error(httpx.post(s.v1 + "/chat/completions", headers={"content-type": "text/plain", **auth},
                          content=b'{"model": "r1", "messages": [{"role": "user", "content": "hi"}]}'), 415)
    finally:
        assert s.stop() == 0
