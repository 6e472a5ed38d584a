"""What `persllm serve` serves: the personas (`Served`), the request limits and the server's state."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from persllm_cli.persona.speaker import BatchSpeaker, Speaker
from persllm_cli.serve.batcher import Scheduler


@dataclass
class Served:
    """One persona being served: a run whose model the scheduler decodes (`key` is its name there),
    or an API speaker (`key` None), which streams its own answers."""

    speaker: Speaker
    key: str | None = None

    @property
    def stage_adapters(self) -> dict[str, str]:
        """Each stage's adapter name on the loaded model, for a run with one adapter per stage; empty
        for a run with one adapter, or an API model."""
        return getattr(self.speaker, "stage_adapters", None) or {}

    @property
    def stage_models(self) -> dict[str, Any]:
        """Each stage's own model, for a run with one adapter per stage loaded on CPU (merged per
        stage); empty otherwise."""
        return getattr(self.speaker, "stage_models", None) or {}

    def key_at(self, stage_id: str) -> str:
        """The scheduler's key for an answer at `stage_id`: the run's own, or for a run with one
        adapter per stage that stage's (each decodes with its stage's model, or activates its
        stage's adapter on the shared one)."""
        assert self.key is not None
        return f"{self.key}@{stage_id}" if self.stage_adapters or self.stage_models else self.key

    @property
    def name(self) -> str:
        return self.speaker.name

    @property
    def run(self) -> BatchSpeaker:
        """The speaker as the scheduler needs it; only for a run (`key` set)."""
        assert self.key is not None and isinstance(self.speaker, BatchSpeaker)
        return self.speaker


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    default_temperature: float = 0.7
    api_concurrency: int = 8


@dataclass
class State:
    served: list[Served]
    scheduler: Scheduler | None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"         # the address bound (a keyless server answers to its names only)
    draining: bool = False          # stopping: new chat requests get 503 while those in flight end
    in_flight: int = 0              # HTTP requests being answered (the event loop's count)
    api_running: int = 0
    api_lock: threading.Lock = field(default_factory=threading.Lock)
    api_streams: set = field(default_factory=set)
    answers: set = field(default_factory=set)   # each answer being sent: its emit, to cut it at shutdown

    @contextlib.contextmanager
    def answering(self, emit: Callable[[tuple], None]) -> Iterator[None]:
        self.answers.add(emit)
        try:
            yield
        finally:
            self.answers.discard(emit)

    def cut_answers(self) -> None:
        """End every answer being sent now, as cut short (from any thread)."""
        for emit in list(self.answers):
            emit(("cut", None))

    def models(self) -> dict[str, tuple[Served, str]]:
        """Model id -> (served, stage id): NAME@STAGE for every stage, NAME for the last one."""
        out: dict[str, tuple[Served, str]] = {}
        for s in self.served:
            for sid, _ in s.speaker.stages:
                out[f"{s.name}@{sid}"] = (s, sid)
            if s.speaker.stages:
                out[s.name] = (s, s.speaker.stages[-1][0])
        return out

