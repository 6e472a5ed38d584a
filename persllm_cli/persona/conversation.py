"""A conversation with a Speaker: the history, the stage, and fitting both into the model's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from persllm_cli.core import console
from persllm_cli.data.records import Message
from persllm_cli.core.project import check_stage
from persllm_cli.persona.speaker import Speaker, stage_ids, stage_label


@dataclass
class Conversation:
    speaker: Speaker
    stage_id: str
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    _said_dropped: bool = False

    @property
    def stage_label(self) -> str:
        return stage_label(self.speaker, self.stage_id)

    def set_stage(self, stage_id: str) -> None:
        self.stage_id = check_stage(stage_id, stage_ids(self.speaker))

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def ask(self, text: str, remember: bool = True) -> Iterator[str]:
        """Stream the answer to `text`; the exchange joins the history once the answer is complete."""
        history = self.history if remember else []
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = {"role": "user", "content": text}
        messages, dropped = self.speaker.fit(system + history + [user], self.stage_id)
        if dropped and remember:
            del self.history[:dropped]
            if not self._said_dropped:
                console.note("(the conversation outgrew the model's context: the oldest turns are dropped from now on)")
                self._said_dropped = True
        pieces: list[str] = []
        for piece in lstrip_stream(self.speaker.stream(messages, self.stage_id)):
            pieces.append(piece)
            yield piece
        if remember:
            self.history += [user, {"role": "assistant", "content": "".join(pieces).strip()}]


def lstrip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces with leading white space of the whole answer removed."""
    started = False
    for p in pieces:
        if not started:
            p = p.lstrip()
            if not p:
                continue
            started = True
        yield p
