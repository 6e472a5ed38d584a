"""The export formats, one entry each in `FORMATS`: what `--format NAME` writes, how it stores the
weights (and so whether `--dtype` or `--quant` chooses them), how its check loads it back, and what
the model card tells a user. A new format is one more entry; a new way to store weights is one more
`Weights` class.

Every format with weights starts from the same merged transformers model (export/hf.py), written
into the hidden folder that becomes `-o`; a format's weights either are that folder (safetensors) or
are written from it into one file, the folder then removed (GGUF). A format without weights
(`card`) writes its files from the project alone and loads no model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from persllm_cli.core import console
from persllm_cli.core.project import Project
from persllm_cli.model.runs import RunInfo

# export.command.ExportSettings; its module imports this one for --format's choices and help.
ExportSettings = Any


def file_slug(persona: str) -> str:
    """The persona as a file name: `harry-potter`."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in persona).strip("-").lower() or "persona"


@dataclass(frozen=True)
class Export:
    """One export under way: the run, the settings, the default stage and the hidden folder that
    becomes `-o`."""

    info: RunInfo
    settings: ExportSettings
    tmp: Path
    default_stage: str

    @property
    def slug(self) -> str:
        return file_slug(str(self.info.data.get("persona", "persona")))

    @property
    def gguf_name(self) -> str:
        return f"{self.slug}-{self.settings.quant}.gguf"

    @property
    def every_stage(self) -> bool:
        """A run with one adapter per stage exported whole: a base GGUF and a LoRA GGUF per stage."""
        return bool(self.info.stage_runs)

    def lora_name(self, stage_id: str) -> str:
        """A stage's LoRA GGUF beside the base (export/stages.py)."""
        return f"{self.slug}-{stage_id}-lora.gguf"


class Weights(Protocol):
    """How a format stores the merged model's weights."""

    def check_base(self, model_type: str | None, base: str) -> None:
        """Refuse, before anything is written, a base these weights cannot hold."""

    def merged_dir(self, job: Export) -> Path:
        """Where the merged transformers model is written."""

    def write(self, job: Export, merged: Path, tokenizer: Any) -> None:
        """The weights' own files, from the merged model and the export's tokenizer."""

    def finish(self, merged: Path) -> None:
        """After the check: remove what the export does not keep."""

    def label(self, s: ExportSettings) -> str:
        """How the check and the model card name them: `hf`, `gguf q8_0`."""

    def load(self, job: Export, merged: Path) -> tuple[Any, Any]:
        """(model, tokenizer) loaded as a consumer loads them, for the check."""

    def rounded(self, s: ExportSettings) -> tuple[str, bool] | None:
        """The torch dtype their matrices are rounded to, and whether vectors too; None when they
        are stored in float32 or quantised (nothing to round the run alike to)."""

    def exact(self, s: ExportSettings) -> bool:
        """Whether they should give the run's greedy answers token for token (after rounding alike)."""


class Safetensors:
    """The merged transformers model itself; `--dtype` picks its weights."""

    def check_base(self, model_type: str | None, base: str) -> None:
        return None  # transformers holds any base

    def merged_dir(self, job: Export) -> Path:
        return job.tmp

    def write(self, job: Export, merged: Path, tokenizer: Any) -> None:
        return None  # the merged model is the export

    def finish(self, merged: Path) -> None:
        return None

    def label(self, s: ExportSettings) -> str:
        return "hf"

    def load(self, job: Export, merged: Path) -> tuple[Any, Any]:
        from persllm_cli.export import check

        return check.load_hf(merged)

    def rounded(self, s: ExportSettings) -> tuple[str, bool] | None:
        return None if s.dtype == "float32" else (s.dtype, True)

    def exact(self, s: ExportSettings) -> bool:
        return True


class Gguf:
    """One GGUF file written from the merged model (kept aside in `.merged` until the check is done);
    `--quant` picks its weights."""

    def check_base(self, model_type: str | None, base: str) -> None:
        from persllm_cli.export import gguf_file

        gguf_file.check_architecture(model_type, base)

    def merged_dir(self, job: Export) -> Path:
        return job.tmp / ".merged"

    def write(self, job: Export, merged: Path, tokenizer: Any) -> None:
        from persllm_cli.export import gguf_file

        console.info(f"Writing {job.gguf_name}...")
        gguf_file.write(merged, job.tmp / job.gguf_name, quant=job.settings.quant, tokenizer=tokenizer, name=job.slug)

    def finish(self, merged: Path) -> None:
        shutil.rmtree(merged)

    def label(self, s: ExportSettings) -> str:
        return f"gguf {s.quant}"

    def load(self, job: Export, merged: Path) -> tuple[Any, Any]:
        from persllm_cli.export import check

        return check.load_gguf(job.tmp / job.gguf_name)

    def rounded(self, s: ExportSettings) -> tuple[str, bool] | None:
        return ("float16", False) if s.quant == "f16" else None

    def exact(self, s: ExportSettings) -> bool:
        return s.quant == "f16"


@dataclass(frozen=True)
class FromProject:
    """An export without weights under way: the project, the settings and the hidden folder that
    becomes `-o`."""

    project: Project
    settings: ExportSettings
    tmp: Path


@dataclass(frozen=True)
class Format:
    """One `--format`: with `weights` (a model, checked and given a model card, `usage` its "Use"
    section), or without, its `files` written from the project."""

    name: str
    about: str                                          # its words in --format's help
    weights: Weights | None
    usage: Callable[[Export], list[str]] | None         # the model card's "Use" section
    extra: Callable[[Export], None] | None = None       # files beside the weights
    hint: Callable[[Path, str], str] | None = None      # a last line for the user (the -o folder, the default stage)
    files: Callable[[FromProject], list[str]] | None = None  # without weights: writes them, says what it wrote


# --------------------------------------------------------------------------------- the formats

def _hf_usage(job: Export) -> list[str]:
    first = job.info.stages[0]["id"]
    return ["transformers (the stage is a chat template variable; without it: the default stage):", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "tok = AutoTokenizer.from_pretrained(\".\")", "model = AutoModelForCausalLM.from_pretrained(\".\")",
            "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Who are you?\"}],",
            f"                              add_generation_prompt=True, stage=\"{first}\", return_tensors=\"pt\")",
            "out = model.generate(**ids, max_new_tokens=128)",
            "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", "",
            "OpenAI-compatible servers (`vllm serve .` or `transformers serve`): pass the stage with",
            f"`extra_body={{\"chat_template_kwargs\": {{\"stage\": \"{first}\"}}}}`.", "",
            "llama.cpp: export with `persllm export --format gguf` and run `llama-cli -m FILE.gguf --jinja`."]


def _gguf_usage(job: Export) -> list[str]:
    first = job.info.stages[0]["id"]
    if job.every_stage:
        loras = " ".join(f"--lora {job.lora_name(s['id'])}" for s in job.info.stages)
        return [f"llama.cpp: `llama-server -m {job.gguf_name} --jinja --lora-init-without-apply {loras}`, and with",
                "each chat request the stage twice, its time token and its adapter (the adapter's id is its place",
                f"among the --lora flags, from 0): `\"chat_template_kwargs\": {{\"stage\": \"{first}\"}}, "
                f"\"lora\": [{{\"id\": 0, \"scale\": 1.0}}]`.",
                f"A request without \"lora\" gets the base without any adapter; without a stage, {job.default_stage}'s token.",
                f"llama-cli: `llama-cli -m {job.gguf_name} --jinja --lora {job.lora_name(first)} "
                f"--chat-template-kwargs '{{\"stage\": \"{first}\"}}'`."]
    return [f"llama.cpp: `llama-server -m {job.gguf_name} --jinja` and send",
            f"`\"chat_template_kwargs\": {{\"stage\": \"{first}\"}}` with a chat request (default: {job.default_stage}).",
            f"transformers: `AutoModelForCausalLM.from_pretrained(\".\", gguf_file=\"{job.gguf_name}\")`."]


def _ollama_usage(job: Export) -> list[str]:
    persona = job.info.data.get("persona", "the persona")
    return _gguf_usage(job) + ["", "Ollama: one Modelfile per stage:", "", "```",
                               *[f"ollama create {str(persona).lower().replace(' ', '-')}-{s['id']} -f Modelfile.{s['id']}"
                                 for s in job.info.stages],
                               "```"]


def _modelfiles(job: Export) -> None:
    """One Ollama Modelfile per stage, each FROM the GGUF with that stage's token first (and, for a run
    with one adapter per stage, that stage's LoRA GGUF as its ADAPTER)."""
    from transformers import AutoTokenizer

    from persllm_cli.export import ollama

    # A run with one adapter per stage has no tokenizer of its own: its stages' runs share one.
    run = next(iter(job.info.stage_runs.values())) if job.info.stage_runs else job.info.path
    run_tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    system = job.info.data.get("system")
    for s in job.info.stages:
        adapter = job.lora_name(s["id"]) if job.every_stage else None
        (job.tmp / f"Modelfile.{s['id']}").write_text(
            ollama.modelfile(job.gguf_name, run_tok, s["token"], system, adapter=adapter), encoding="utf-8")


def _cards(job: FromProject) -> list[str]:
    """One character card per stage, JSON and PNG (export/card.py)."""
    from persllm_cli.export import card

    return card.write(job.project, job.settings.run, job.settings.stage, job.tmp, file_slug(job.project.name))


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("hf", "merged safetensors", Safetensors(), _hf_usage),
    Format("gguf", "llama.cpp", Gguf(), _gguf_usage),
    Format("ollama", "GGUF + one Modelfile per stage", Gguf(), _ollama_usage, extra=_modelfiles,
           hint=lambda out, stage: f"Ollama: cd {out} && ollama create NAME -f Modelfile.{stage}"),
    Format("card", "one character card per stage, JSON and PNG, for chat front-ends; no weights", None, None,
           files=_cards, hint=lambda out, stage: f"Import {out}/*.png into the front-end, connected to `persllm serve` "
                                                 "as an OpenAI-compatible endpoint"),
)}


def format_help() -> str:
    """--format's help: every format with its words."""
    parts = [f"{f.name} ({f.about})" for f in FORMATS.values()]
    return ", ".join(parts[:-1]) + f" or {parts[-1]}." if len(parts) > 1 else parts[0] + "."
