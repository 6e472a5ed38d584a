"""What a live annotate run and a batch share: the work items (Job), the Annotator (each item's
prompt, the backend's hints, the reply parsed, the record) and the output's sidecar. Which items
are still to do is llm.runner.pending, which dpo --mode generate uses too. command.py runs them
live; batch.py writes, sends and imports them as a batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm_cli.annotate.prompts import build_messages, parse_reply, time_line
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.core.project import Project, Stage
from persllm_cli.core.settings import public_settings
from persllm_cli.data.records import Record
from persllm_cli.data.store import resume_state
from persllm_cli.data.sidecars import write_meta
from persllm_cli.llm.pricing import Price
from persllm_cli.llm.runner import Item


@dataclass
class Job:
    """What one item needs to become a request and a record."""

    stage: Stage
    pattern: str
    k: int
    source: dict[str, Any]
    knowledge_lines: list[int]
    style_lines: list[int]
    knowledge: list[str]
    style: list[str]
    instruction: list[dict[str, str]] | None = None


class Annotator:
    """The callbacks the runner needs, bound to one project and settings (standards can grow)."""

    def __init__(self, project: Project, s: AnnotateSettings, standards: list[str]):
        self.project, self.s, self.standards = project, s, standards
        self.guided = s.backend == "local"   # LocalBackend writes the labels (see guided.py)

    def messages(self, item: Item) -> list[dict[str, str]]:
        j: Job = item.data
        return build_messages(persona=self.project.name, description=self.project.description,
                              stage_label=j.stage.label, pattern=j.pattern, cot=self.s.cot,
                              time_prefix=self.s.time_prefix, knowledge=j.knowledge, style=j.style,
                              standards=list(self.standards), instruction=j.instruction, variant=j.k,
                              guided=self.guided)

    def options(self, item: Item) -> dict[str, Any]:
        """Hints for the backend: the sections the reply must have, and the stage's time token."""
        j: Job = item.data
        sections = (["question"] if j.instruction is None else []) + (["analysis"] if self.s.cot else []) + ["response"]
        return {"sections": sections, "stage_token": j.stage.token}

    def parse(self, item: Item, completion: Any):
        j: Job = item.data
        prefix = time_line(j.stage.label) if self.s.time_prefix else None
        return parse_reply(completion.text, cot=self.s.cot, want_question=j.instruction is None, strip_prefix=prefix)

    def record(self, item: Item, reply: Any, usage: Any, error: str | None) -> Record:
        j: Job = item.data
        if j.instruction is not None:
            messages = [dict(m) for m in j.instruction]
        else:
            messages = [{"role": "user", "content": reply.question}] if reply else []
        if reply:
            messages.append({"role": "assistant", "content": reply.response})
        return {
            "id": item.id, "persona": self.project.name, "stage": j.stage.id, "pattern": j.pattern,
            "source": j.source, "messages": messages, "analysis": reply.analysis if reply else None,
            "context": {"knowledge": j.knowledge_lines, "style": j.style_lines},
            "annotator": usage.as_dict(), "status": "ok" if reply else "failed", "error": error,
        }


def public(s: AnnotateSettings, model: str) -> dict[str, Any]:
    """The settings for a sidecar: the model in use, the server's URL without credentials."""
    settings = public_settings(s)
    settings["model"] = model
    if settings.get("base_url"):
        from persllm_cli.llm.protocol import redact_url

        settings["base_url"] = redact_url(settings["base_url"])
    return settings


def sidecar(project: Project, s: AnnotateSettings, output: Path, model: str, n_items: int, standards: list[str],
            price: Price, seconds: float, last_run: dict[str, Any]) -> None:
    """The output's sidecar after a run (live or batch): counts of what the file now holds."""
    final = resume_state(output, repair=False) if output.exists() else None
    if final is None:
        return
    write_meta(output, command="annotate", settings=public(s, model), inputs=_inputs(project, s),
               counts={"ok": len(final.ok), "failed": len(final.failed), "items": n_items}, seconds=seconds,
               extra={"standards": standards, "price_per_million": [price.input, price.output], "last_run": last_run})


def _inputs(project: Project, s: AnnotateSettings) -> list[Path]:
    paths = [s.instructions] if s.instructions else []
    for st in project.select_stages(s.stages):
        paths += [project.knowledge_file(st), project.style_file(st)]
    return paths
