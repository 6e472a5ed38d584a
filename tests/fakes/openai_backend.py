"""A minimal OpenAI-compatible `llm.Backend` for tests only: it lets eval's judge and baseline talk
to tests/fakes/openai_server.py through the real `openai` client. The product's backend lives in
persllm_cli/llm.py (make_backend); this stand-in exists so eval can be tested before that lands."""

from __future__ import annotations

import os
import time

from persllm_cli.llm import Completion, FatalError, TransientError


class OpenAITestBackend:
    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, timeout: float = 30.0):
        import openai

        self.model = model
        self._client = openai.OpenAI(base_url=base_url or os.environ["OPENAI_BASE_URL"],
                                     api_key=os.environ["OPENAI_API_KEY"], timeout=timeout, max_retries=0)

    def check(self) -> None:
        import openai

        try:
            ids = {m.id for m in self._client.models.list()}
        except openai.AuthenticationError:
            raise FatalError("the server rejected the API key") from None
        if self.model not in ids:
            raise FatalError(f"unknown model {self.model!r}")

    def complete(self, messages, *, max_tokens: int, temperature: float) -> Completion:
        import openai

        t0 = time.perf_counter()
        try:
            r = self._client.chat.completions.create(model=self.model, messages=messages,
                                                     max_tokens=max_tokens, temperature=temperature)
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
            raise TransientError(str(e)) from None
        return Completion(text=r.choices[0].message.content or "", prompt_tokens=r.usage.prompt_tokens,
                          completion_tokens=r.usage.completion_tokens, seconds=time.perf_counter() - t0,
                          model=r.model)
