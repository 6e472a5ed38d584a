"""Who takes part in a conversation: parsing speaker specs into persona speakers at a stage.

A speaker spec is one shell word:

    runs/NAME[@STAGE]                 a trained run (any run directory) at STAGE
    PROJECT_DIR[@STAGE]               that project's runs/latest
    api:MODEL[@STAGE]                 MODEL prompted as the persona of the current project (-C),
                                      with retrieval over its material (like `chat --api-model`)
    api:MODEL:PROJECT_DIR[@STAGE]     the same over another project's material

STAGE is a stage id of the run or project; without it the last stage speaks. The stage is what
follows the last `@`. For `api:` the part after the model's last `:` is a project only when it
names a folder, so a model name with a colon (llama3:8b) still works; `api:llama3:8b:.` spells the
project out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import EXIT_USAGE, PersllmError
from persllm_cli.core.project import Project, check_stage, load_project
from persllm_cli.model.generate import Sampling
from persllm_cli.persona.speaker import Speaker, stage_ids, stage_label


@dataclass
class Spec:
    text: str                   # as given
    kind: str                   # "run" or "api"
    target: str                 # run/project path, or the API model
    project: Path | None        # api: the project folder given (None: the current project)
    stage: str | None


@dataclass
class Participant:
    """One seat at the table: a speaker at a stage, under a display name."""

    spec: Spec
    speaker: Speaker
    stage_id: str
    name: str = ""

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def persona(self) -> str:
        return self.speaker.persona

    @property
    def stage_label(self) -> str:
        return stage_label(self.speaker, self.stage_id)

    @property
    def model(self) -> str:
        return self.speaker.name

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec.text, "kind": self.kind, "model": self.model, "persona": self.persona,
                "stage": self.stage_id, "stage_label": self.stage_label, "name": self.name}


def parse_spec(text: str) -> Spec:
    raw = text.strip()
    if not raw:
        raise PersllmError("a speaker is empty: give runs/NAME@STAGE, PROJECT_DIR@STAGE or api:MODEL@STAGE",
                           exit_code=EXIT_USAGE)
    body, stage = raw, None
    if "@" in raw:
        body, _, stage = raw.rpartition("@")
        if not stage or not body:
            raise PersllmError(f"speaker {text!r}: expected SPEAKER@STAGE with both parts", exit_code=EXIT_USAGE)
    if body.startswith("api:"):
        rest = body[len("api:"):]
        model, project = rest, None
        if ":" in rest:
            head, _, tail = rest.rpartition(":")
            if head and tail and Path(tail).expanduser().is_dir():
                model, project = head, Path(tail).expanduser()
        if not model:
            raise PersllmError(f"speaker {text!r}: no model after api:", exit_code=EXIT_USAGE)
        return Spec(text, "api", model, project, stage)
    return Spec(text, "run", body, None, stage)


def _run_dir(spec: Spec) -> Path:
    """A run directory, or a project folder's runs/latest."""
    from persllm_cli.model.runs import LATEST, RUN_FILE

    path = Path(spec.target).expanduser()
    if not path.is_dir():
        raise PersllmError(f"speaker {spec.text!r}: run directory not found: {path}")
    if not (path / RUN_FILE).exists() and (path / "persllm.toml").exists():
        latest = path / "runs" / LATEST
        if not latest.exists():
            raise PersllmError(f"speaker {spec.text!r}: the project {path} has no trained run yet "
                               f"({latest} does not exist)")
        return latest.resolve()
    return path.resolve()


def _check_material(spec: Spec, project: Project, stage_id: str) -> None:
    from persllm_cli.data.corpus import read_paragraphs

    stage = project.stage(stage_id)
    path = project.knowledge_file(stage)
    if not read_paragraphs(path, required=False):
        raise PersllmError(f"speaker {spec.text!r}: the project {project.root} has no material for stage "
                           f"{stage_id!r} ({path} is missing or empty); an API persona needs it")


def build(specs: list[str], current: Project | None, sampling: Sampling, base_url: str | None,
          timeout: float) -> list[Participant]:
    """Every speaker checked (runs complete, stages known, material there) before anything loads."""
    from persllm_cli.persona.api import ApiSpeaker
    from persllm_cli.persona.speaker import RunSpeaker

    runs: dict[Path, RunSpeaker] = {}       # one run at two stages loads once
    apis: dict[tuple[str, Path], ApiSpeaker] = {}
    out: list[Participant] = []
    for text in specs:
        spec = parse_spec(text)
        if spec.kind == "run":
            path = _run_dir(spec)
            if path not in runs:
                try:
                    runs[path] = RunSpeaker(path, sampling)
                except PersllmError as e:
                    raise PersllmError(f"speaker {text!r}: {e}") from None
            speaker: Any = runs[path]
        else:
            project = current
            if spec.project is not None:
                project = load_project(spec.project.resolve())
            if project is None:
                raise PersllmError(f"speaker {text!r}: an API persona needs a persllm project for its material "
                                   "(run inside one, pass -C DIR, or write api:MODEL:PROJECT_DIR)")
            key = (spec.target, project.root)
            if key not in apis:
                apis[key] = ApiSpeaker.for_project(project, spec.target, base_url, sampling, timeout=timeout)
            speaker = apis[key]
        try:
            stage_id = check_stage(spec.stage, stage_ids(speaker))
        except PersllmError as e:
            raise PersllmError(f"speaker {text!r}: {e}") from None
        if spec.kind == "api":
            _check_material(spec, speaker.material, stage_id)
        out.append(Participant(spec, speaker, stage_id))
    _name(out)
    return out


def _name(people: list[Participant]) -> None:
    """`Persona (stage)`, with the run or model added where two would read the same, then a number."""
    for p in people:
        p.name = f"{p.persona} ({p.stage_id})"
    for extra in (lambda p: f"{p.persona} ({p.stage_id}, {p.model})",
                  lambda p: f"{p.persona} ({p.stage_id}, {p.model}) #{people.index(p) + 1}"):
        names = [p.name for p in people]
        for p in people:
            if names.count(p.name) > 1:
                p.name = extra(p)
