"""A chat front-end connected to `persllm serve` as a "custom OpenAI-compatible" source (issue 27): the
requests SillyTavern sends, replayed against a live server; each succeeds or fails with the 4xx that
docs/CLI.md documents.

The bodies follow SillyTavern's source at commit ba6f7b7a98cf (2024-09-28):
- public/scripts/openai.js, sendOpenAIRequest(): `generate_data` = messages, model, temperature,
  frequency_penalty, presence_penalty, top_p, max_tokens, stream, logit_bias ({} unless a bias preset is
  on), stop (custom stopping strings, left out when empty), n (only for multi-swipe, oai_settings.n > 1),
  seed (only when >= 0); logprobs: 5 when token probabilities are asked for. The prompt it builds has
  system messages, example dialogue as system messages named `example_user` / `example_assistant`, the
  character's first message as an assistant turn, and ends with the user's (a "continue" ends with the
  assistant's instead).
- src/endpoints/backends/chat-completions.js, the CUSTOM branch of /generate: `requestBody` = messages,
  model, temperature, max_tokens, max_completion_tokens, stream, presence_penalty, frequency_penalty,
  top_p, top_k, stop, logit_bias, seed, n, then bodyParams: logprobs turned into `logprobs: true,
  top_logprobs: N`, tools and tool_choice (only when function tools were registered), and the user's
  "include body" YAML keys; headers `Content-Type: application/json` and `Authorization: 'Bearer ' +
  apiKey`, which is "Bearer " (no secrets file) or "Bearer undefined" (no key saved) without a key;
  fetch trims a header value's white space (the Fetch standard), so "Bearer " arrives as "Bearer".
  /status lists models with `GET {custom_url}/models` and the same Authorization header.
The words of the conversation are this project's own.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

from tests.test_serve import _error
from tests.test_serve_safety import safe_run, safe_server  # noqa: F401 - the shared live server

pytestmark = pytest.mark.slow

PROMPT = [
    {"role": "system", "content": "Write Harry's next reply in a fictional chat between Harry and the visitor."},
    {"role": "system", "content": "[Harry is eleven, new at the castle, curious and a little reckless.]"},
    {"role": "system", "content": "[Example Chat]"},
    {"role": "system", "name": "example_user", "content": "Do you like flying?"},
    {"role": "system", "name": "example_assistant", "content": "More than anything. The broom just listens."},
    {"role": "system", "content": "[Start a new Chat]"},
    {"role": "assistant", "content": "Oh, hello! Are you new here too?"},
    {"role": "user", "content": "I am. What should I see first?"},
]


def st_body(**changes) -> dict:
    """`requestBody` as the CUSTOM branch builds it with SillyTavern's default settings (keys whose value
    is undefined are left out by JSON.stringify)."""
    body = {"messages": PROMPT, "model": "r1@early", "temperature": 1, "max_tokens": 4, "stream": False,
            "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1, "logit_bias": {}}
    body.update(changes)
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": ("Bearer " + key).strip()}   # as fetch sends it: trimmed


def send(server, body: dict, key: str = "") -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", content=json.dumps(body),
                      headers={"Content-Type": "application/json", **bearer(key)}, timeout=300)


def test_model_list_with_an_empty_bearer(safe_server):
    for key in ["", "undefined"]:
        r = httpx.get(safe_server.v1 + "/models", headers=bearer(key))
        assert r.status_code == 200
        assert {"r1", "r1@early", "r1@middle", "r1@late"} == {m["id"] for m in r.json()["data"]}


def test_what_sillytavern_sends_is_answered(safe_server):
    # Default settings, no key saved.
    for key in ["", "undefined"]:
        r = send(safe_server, st_body(), key)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    # Custom stopping strings (up to 4), a fixed seed, penalties, top_k and the user's extra body keys.
    r = send(safe_server, st_body(stop=["\nUser:", "\nHarry:", "<START>", "###"], seed=42, presence_penalty=0.4,
                                  frequency_penalty=0.3, top_k=40, min_p=0.05, repetition_penalty=1.1,
                                  logit_bias={"1734": -100}))
    assert r.status_code == 200, r.text
    # Token probabilities asked for: accepted, answered without them.
    r = send(safe_server, st_body(logprobs=True, top_logprobs=5))
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    # Multi-swipe while streaming: n answers, told apart by their index.
    r = send(safe_server, st_body(stream=True, n=2, seed=7))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {ch["choices"][0]["index"] for ch in chunks} == {0, 1}
    ends = [ch["choices"][0] for ch in chunks if ch["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in ends) == [0, 1]


def test_what_sillytavern_may_send_that_is_refused_as_documented(safe_server):
    # Six stopping strings: OpenAI takes four.
    err = _error(send(safe_server, st_body(stop=["a", "b", "c", "d", "e", "f"])), 400)
    assert err["param"] == "stop"
    # "Continue" ends the prompt with the assistant's own unfinished reply.
    err = _error(send(safe_server, st_body(messages=PROMPT + [{"role": "assistant", "content": "Well, the"}])), 400)
    assert err["param"] == "messages"
    # Function tools registered by an extension (non-streaming requests only).
    tool = {"type": "function", "function": {"name": "roll_dice", "parameters": {"type": "object"}}}
    err = _error(send(safe_server, st_body(tools=[tool], tool_choice="auto")), 400)
    assert err["param"] == "tools"
    # A model the server does not serve (the default before a model is picked).
    err = _error(send(safe_server, st_body(model="gpt-4-turbo")), 404)
    assert err["code"] == "model_not_found" and "r1@early" in err["message"]
