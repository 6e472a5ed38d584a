"""`persllm chat --api-model M`: an OpenAI-compatible model speaking as the persona, grounded in
the project's material for the chosen stage (the original project's prompt-only option).

Each turn retrieves the stage's knowledge and style paragraphs most similar to the user's message
(TF-IDF, so material in any language works) and puts them into the system prompt
(templates/chat/api_system.txt). The key comes from OPENAI_API_KEY only.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from persllm_cli import corpus, resources
from persllm_cli.config import Project, Stage
from persllm_cli.errors import PersllmError
from persllm_cli.retrieval import Index

Message = dict[str, str]

KNOWLEDGE_WORDS = 600  # per turn: enough to ground an answer, small enough for any context window
STYLE_WORDS = 200
EMBEDDER = "tfidf"


class ApiTalker:
    def __init__(self, project: Project | None, model: str, base_url: str | None,
                 max_new_tokens: int, temperature: float) -> None:
        if project is None:
            raise PersllmError("--api-model needs a persllm project for its material (run inside one or pass -C DIR)")
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise PersllmError("--api-model needs an API key in the environment variable OPENAI_API_KEY")
        from openai import OpenAI

        self.project = project
        self.persona = project.name
        self.stages = [(s.id, s.label) for s in project.stages]
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.client = OpenAI(api_key=key, base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
                             max_retries=2, timeout=120)
        self._indexes: dict[tuple[str, str], Index] = {}

    def _top(self, stage: Stage, kind: str, query: str, budget_words: int) -> list[str]:
        if (stage.id, kind) not in self._indexes:
            path = self.project.knowledge_file(stage) if kind == "knowledge" else self.project.style_file(stage)
            self._indexes[(stage.id, kind)] = Index(corpus.read_paragraphs(path, required=False), EMBEDDER)
        index = self._indexes[(stage.id, kind)]
        return index.text(index.context(query, budget_words))

    def system_prompt(self, stage_id: str, query: str) -> str:
        stage = self.project.stage(stage_id)
        knowledge = self._top(stage, "knowledge", query, KNOWLEDGE_WORDS)
        style = self._top(stage, "style", query, STYLE_WORDS)
        return resources.render(
            "chat/api_system.txt", persona=self.persona, description=self.project.description,
            stage_label=stage.label,
            knowledge="\n".join(f"- {t}" for t in knowledge) or "(no material for this stage)",
            style="\n".join(f"- {t}" for t in style) or "(no samples for this stage)",
        ).strip()

    def fit(self, messages: list[Message], stage_id: str) -> tuple[list[Message], int]:
        return messages, 0  # API models' windows are far larger than a terminal conversation

    def stream(self, messages: list[Message], stage_id: str) -> Iterator[str]:
        import openai

        user_system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        query = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
        system = "\n\n".join([self.system_prompt(stage_id, query), *user_system])
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "system", "content": system}, *turns],
                max_tokens=self.max_new_tokens, temperature=self.temperature, stream=True)
            for chunk in response:
                for choice in chunk.choices or []:
                    text = getattr(choice.delta, "content", None)
                    if text:
                        yield text
        except openai.AuthenticationError:
            raise PersllmError("the server rejected the API key in OPENAI_API_KEY") from None
        except openai.NotFoundError:
            raise PersllmError(f"the server does not know the model {self.model!r}") from None
        except openai.APIConnectionError:
            raise PersllmError(f"cannot reach the API server at {self.client.base_url}") from None
        except openai.APIStatusError as e:
            raise PersllmError(f"the API server answered {e.status_code}: {_brief(e)}") from None


def _brief(e: Any) -> str:
    text = " ".join(str(getattr(e, "message", e)).split())
    return text[:200]
