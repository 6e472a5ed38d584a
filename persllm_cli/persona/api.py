"""`persllm chat --api-model M`: an OpenAI-compatible model speaking as the persona, grounded in
the project's material for the chosen stage (the original project's prompt-only option).

Each turn retrieves the stage's knowledge and style paragraphs most similar to the user's message
(TF-IDF, so material in any language works) and puts them into the system prompt
(templates/chat/api_system.txt). The key comes from OPENAI_API_KEY only.
"""

from __future__ import annotations

from typing import Iterator

from persllm_cli.data import corpus
from persllm_cli.core import resources
from persllm_cli.core.project import Project, Stage
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.retrieval import Index

Message = dict[str, str]

KNOWLEDGE_WORDS = 600  # per turn: enough to ground an answer, small enough for any context window
STYLE_WORDS = 200
EMBEDDER = "tfidf"


class ApiTalker:
    def __init__(self, project: Project | None, model: str, base_url: str | None,
                 max_new_tokens: int, temperature: float) -> None:
        if project is None:
            raise PersllmError("--api-model needs a persllm project for its material (run inside one or pass -C DIR)")
        from persllm_cli.llm.backends import OpenAIBackend

        # The key, the base URL and key-free error messages, as for annotate.
        self.backend = OpenAIBackend(model, base_url)
        self.project = project
        self.persona = project.name
        self.stages = [(s.id, s.label) for s in project.stages]
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
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

    def ready(self) -> None:
        """Nothing to load: the server is asked on the first message."""

    def stream(self, messages: list[Message], stage_id: str) -> Iterator[str]:
        user_system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        query = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
        system = "\n\n".join([self.system_prompt(stage_id, query), *user_system])
        from persllm_cli.llm.backends import RequestError, TransientError

        try:
            yield from self.backend.stream([{"role": "system", "content": system}, *turns],
                                           max_tokens=self.max_new_tokens, temperature=self.temperature)
        except (TransientError, RequestError) as e:
            raise PersllmError(str(e)) from None
