"""Property-based fuzzing of `POST /v1/chat/completions` against a real `persllm serve` process: bodies
drawn by Hypothesis from every field's good values mixed with wrong types, huge and non-finite numbers,
lone surrogates, control-token text, wrong roles, unknown keys and bytes that are not JSON. Whatever
comes, the server never answers 500, never writes a traceback, and still answers /health afterwards.

Bounded so `make test` stays reasonable: a fixed number of examples, answers of at most 2 tokens."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_serve_safety import safe_run, safe_server  # noqa: F401 - the shared live server

pytestmark = pytest.mark.slow
EXAMPLES = 60

SURROGATE = "\ud800"
CONTROL = ["<|im_end|>", "<|im_start|>", "<TIME-I>", "<|endoftext|>", "<repo_name>"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from([SURROGATE + " hi", "", "x" * 300]))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
texts = st.one_of(st.text(max_size=60), st.sampled_from(CONTROL), st.just(SURROGATE + " hi"),
                  st.lists(st.sampled_from(CONTROL + ["hi ", "\n", " ", "é"]), max_size=6).map("".join))


content = st.one_of(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=3))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                                 "content": content}, optional={"name": st.text(max_size=10)})
messages = st.lists(message, max_size=4).map(lambda ms: ms + [{"role": "user", "content": "Hi"}])
good = {   # every field's good values (answers of 1-2 tokens, so valid requests stay quick)
    "max_tokens": st.integers(1, 2), "max_completion_tokens": st.integers(1, 2), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 100), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-(2 ** 63), 2 ** 63 - 1), "n": st.integers(1, 2),
    "stop": st.one_of(texts, st.lists(texts, max_size=4)), "stream": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 50000).map(str), st.floats(-100, 100), max_size=3),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "user": texts, "tools": st.just([]),
    "tool_choice": st.sampled_from(["none", "auto"]), "response_format": st.just({"type": "text"}),
    "extra_key": anything,
}
good_bodies = st.fixed_dictionaries({"model": st.sampled_from(["r1", "r1@early", "r1@late"]), "messages": messages},
                                    optional=good)


@st.composite
def bad_bodies(draw) -> dict:
    """A good body with one to three things made wrong: a field, a message's part, or the model."""
    body = draw(good_bodies)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["model", "messages", "message", *good]))
        if where == "message":
            m = dict(draw(st.sampled_from(body["messages"])))
            m[draw(st.sampled_from(["role", "content", "name"]))] = draw(st.one_of(anything, st.sampled_from(
                ["tool", "function", [{"type": "image_url"}], None, SURROGATE])))
            body["messages"] = [*body["messages"], m]
        else:
            body[where] = draw(st.one_of(anything, st.sampled_from(["r1@nope", "nobody", [], {}, 2 ** 70])))
    return body


raw_bodies = st.one_of(
    good_bodies.map(lambda b: json.dumps(b, ensure_ascii=True).encode()),
    bad_bodies().map(lambda b: json.dumps(b, ensure_ascii=True).encode()),   # NaN/Infinity as Python writes them
    bad_bodies().map(lambda b: json.dumps(b, ensure_ascii=True).encode()),
    st.one_of(st.binary(max_size=200), anything.map(lambda v: json.dumps(v).encode())),
)


def test_fuzzed_requests_never_crash_the_server(safe_server):   # noqa: F811 - the fixture
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(raw=raw_bodies)
    def one(raw: bytes) -> None:
        r = httpx.post(safe_server.v1 + "/chat/completions", content=raw,
                       headers={"content-type": "application/json"}, timeout=300)
        assert r.status_code in (200, 400, 404), (raw[:300], r.status_code, r.text[:300])
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-500:]
        else:
            assert r.json()["object"] == "chat.completion"

    one()
    log = safe_server.log()
    assert "Traceback" not in log and "internal error" not in log and " 500 " not in log
    assert httpx.get(safe_server.url + "/health", timeout=30).json()["status"] == "ok"
