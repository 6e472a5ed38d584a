"""`ApiSpeaker`: an OpenAI-compatible model speaking as the persona (the original project's
prompt-only agent), for `chat --api-model`, eval's prompted baseline, serve and converse.

With the project's material, each turn retrieves the stage's knowledge and style paragraphs most
similar to the user's message (TF-IDF, so material in any language works) into the system prompt
(templates/chat/api_system.txt). Without material (eval's baseline) the model is only told who it is
and when (templates/eval/baseline_system.txt). The key comes from OPENAI_API_KEY only.
"""

from __future__ import annotations

from typing import Any, Iterator

from persllm_cli.core import resources
from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import Project, Stage
from persllm_cli.data import corpus
from persllm_cli.data.retrieval import Index
from persllm_cli.llm.protocol import Backend, RequestError, TransientError
from persllm_cli.llm.registry import API, make_backend
from persllm_cli.data.records import Message
from persllm_cli.model.generate import Sampling

KNOWLEDGE_WORDS = 600  # per turn: enough to ground an answer, small enough for any context window
STYLE_WORDS = 200
EMBEDDER = "tfidf"
GROUNDED = "chat/api_system.txt"
PROMPTED = "eval/baseline_system.txt"


class ApiSpeaker:
    def __init__(self, backend: Backend, persona: str, description: str, stages: list[tuple[str, str]],
                 sampling: Sampling | None = None, *, material: Project | None = None) -> None:
        self.backend = backend
        self.name = backend.model
        self.persona, self.description, self.stages = persona, description, stages
        self.sampling = sampling or Sampling()
        self.material = material
        self._indexes: dict[tuple[str, str], Index] = {}

    @classmethod
    def for_project(cls, project: Project | None, model: str, base_url: str | None,
                    sampling: Sampling | None = None, *, timeout: float = 120.0) -> "ApiSpeaker":
        """The persona of `project`, grounded in its material, through the server at `base_url`."""
        if project is None:
            raise PersllmError("--api-model needs a persllm project for its material (run inside one or pass -C DIR)")
        # The key, the base URL and key-free error messages, as for annotate.
        backend = make_backend(API, model, base_url, timeout)
        return cls(backend, project.name, project.description, [(s.id, s.label) for s in project.stages],
                   sampling, material=project)

    def _top(self, stage: Stage, kind: str, query: str, budget_words: int) -> list[str]:
        assert self.material is not None
        if (stage.id, kind) not in self._indexes:
            path = self.material.knowledge_file(stage) if kind == "knowledge" else self.material.style_file(stage)
            self._indexes[(stage.id, kind)] = Index(corpus.read_paragraphs(path, required=False), EMBEDDER)
        index = self._indexes[(stage.id, kind)]
        return index.text(index.context(query, budget_words))

    def system_prompt(self, stage_id: str, query: str) -> str:
        label = dict(self.stages).get(stage_id, stage_id)
        if self.material is None:
            return resources.render(PROMPTED, persona=self.persona, description=self.description,
                                    stage_label=label).strip()
        stage = self.material.stage(stage_id)
        knowledge = self._top(stage, "knowledge", query, KNOWLEDGE_WORDS)
        style = self._top(stage, "style", query, STYLE_WORDS)
        return resources.render(
            GROUNDED, persona=self.persona, description=self.description, stage_label=stage.label,
            knowledge="\n".join(f"- {t}" for t in knowledge) or "(no material for this stage)",
            style="\n".join(f"- {t}" for t in style) or "(no samples for this stage)",
        ).strip()

    def messages(self, conversation: list[Message], stage_id: str) -> list[Message]:
        """What the server is sent: our system prompt (the caller's system messages after it), then the turns."""
        user_system = [m["content"] for m in conversation if m["role"] == "system"]
        turns = [m for m in conversation if m["role"] != "system"]
        query = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
        system = "\n\n".join([self.system_prompt(stage_id, query), *user_system])
        return [{"role": "system", "content": system}, *turns]

    def ready(self) -> None:
        """Nothing to load: the server is asked on the first message."""

    def fit(self, messages: list[Message], stage_id: str, sampling: Sampling | None = None) -> tuple[list[Message], int]:
        return messages, 0  # API models' windows are far larger than a terminal conversation

    def stream(self, messages: list[Message], stage_id: str, sampling: Sampling | None = None) -> Iterator[str]:
        s = sampling or self.sampling
        try:
            yield from self.backend.stream(self.messages(messages, stage_id), max_tokens=s.max_new_tokens,
                                           temperature=s.temperature)
        except (TransientError, RequestError) as e:
            raise PersllmError(str(e)) from None

    def answer_batch(self, conversations: list[list[Message]], stage_id: str,
                     sampling: Sampling | None = None) -> list[str | None]:
        s = sampling or self.sampling
        out: list[str | None] = []
        for conv in conversations:
            try:
                c = self.backend.complete(self.messages(conv, stage_id), max_tokens=s.max_new_tokens,
                                          temperature=s.temperature)
            except (TransientError, RequestError):
                out.append(None)
                continue
            out.append(c.text.strip() or None)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "api", "model": self.name, "where": getattr(self.backend, "where", None)}
