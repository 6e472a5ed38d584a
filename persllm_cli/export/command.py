"""`persllm export`: a run as a merged transformers model (hf), a GGUF file (gguf), or a GGUF with one
Ollama Modelfile per stage (ollama), checked against the run itself before it is kept; or, with no
weights, one character card per stage (card). What each format writes and how it is checked is its
entry in export/formats.py. A run with one adapter per stage exports one stage's run (`--stage`), or,
as GGUF, every stage: the base and a LoRA GGUF per stage (export/stages.py).

Everything is built in a hidden temporary folder next to `-o` and renamed into place at the end:
a failure, a failed check or Ctrl-C leaves no half export.
"""

from __future__ import annotations

import gc
import resource
import time
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_USAGE, PersllmError
from persllm_cli.core.project import Project
from persllm_cli.data.lock import hold
from persllm_cli.data.store import replace_dir
from persllm_cli.export.formats import FORMATS, Export, Format, FromProject, Gguf
from persllm_cli.export.settings import ExportSettings


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PersllmError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PersllmError(f"{out} is not empty; choose another -o or pass --force to replace it")


def _base_model_type(base: str) -> str | None:
    from persllm_cli.model import bases
    import json

    where = Path(bases.resolve_base(base))
    if (where / "config.json").is_file():
        return json.loads((where / "config.json").read_text(encoding="utf-8")).get("model_type")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base).model_type
    except (OSError, ValueError) as e:
        raise PersllmError(f"base model {base} could not be loaded: {' '.join(str(e).split())[:200]}") from None


def run(project: Project | None, settings: ExportSettings) -> int:
    from persllm_cli.export import hf, model_card
    from persllm_cli.model import runs

    if settings.output is None:
        raise PersllmError("say where the export goes: -o DIR")
    fmt = FORMATS[settings.format]
    if fmt.weights is None:
        return _export_files(project, settings, fmt)
    run_dir = runs.resolve_run(settings.run, project)
    info = runs.read_run(run_dir)
    default_stage, _ = info.stage_token(settings.stage)  # an unknown stage fails here
    every_stage = False
    if info.stage_runs:   # one adapter per stage: GGUF holds them all, a merged model one, the stage's own run
        every_stage = settings.stage is None and isinstance(fmt.weights, Gguf)
        if settings.stage is None and not every_stage:
            raise PersllmError(f"{run_dir} holds one adapter per stage; say which stage's model to export with "
                               f"--stage ({', '.join(info.stage_runs)}), or export every stage with --format gguf "
                               "or ollama", exit_code=EXIT_USAGE)
        if not every_stage:
            run_dir = info.stage_runs[default_stage]
            info = runs.read_run(run_dir)
    if info.trained_stage is not None:   # a stage's own run: its model, template and Modelfiles hold that stage alone
        if settings.stage not in (None, info.trained_stage):
            raise PersllmError(f"{run_dir} was trained for stage {info.trained_stage} alone; for stage {settings.stage}: "
                               f"persllm export {run_dir.parent.parent} --stage {settings.stage}", exit_code=EXIT_USAGE)
        info, default_stage = info.as_trained(), info.trained_stage
    if settings.check:
        from persllm_cli.export import engine

        engine.find_source(settings.llama_cpp)  # a llama_cpp setting that is no llama.cpp source fails here
    out = Path(settings.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # One export into a folder at a time: a second one says who holds it (or waits with --wait).
    with hold(out):
        _prepare_output(out, settings.force)
        fmt.weights.check_base(_base_model_type(info.base), info.base)  # a missing or unfit base fails here

        started = time.monotonic()
        with replace_dir(out, prefix=f".{out.name}.export-") as tmp:  # a failure leaves no half export
            job = Export(info, settings, tmp, default_stage)
            merged = fmt.weights.merged_dir(job)
            merged.mkdir(exist_ok=True)
            if every_stage:
                from persllm_cli.export import stages

                console.info(f"Writing {info.base} with every stage's time token, and each stage's adapter as a "
                             "LoRA GGUF...")
                facts, tokenizer = stages.write(job, merged)
            else:
                console.info(f"Merging {run_dir.name} into its base {info.base} ({settings.dtype})...")
                facts = hf.write(info, merged, dtype=settings.dtype, default_stage=default_stage)
                tokenizer = hf.export_tokenizer(info, default_stage)
            fmt.weights.write(job, merged, tokenizer)
            if fmt.extra is not None:
                fmt.extra(job)
            export_seconds = time.monotonic() - started
            export_peak = _peak_gb()
            figures: dict[str, Any] = {}
            if settings.check and every_stage:
                rounded = fmt.weights.rounded(settings)
                figures = stages.check(job, tmp / job.gguf_name, exact=fmt.weights.exact(settings),
                                       rounded=None if rounded is None else rounded[0])
            elif settings.check:
                figures = _check(job, fmt, merged)
            fmt.weights.finish(merged)
            (tmp / "README.md").write_text(model_card.render(info, fmt.name, default_stage, facts, figures, fmt.usage(job)),
                                           encoding="utf-8")
        console.info(f"Exported {fmt.name} to {out} in {export_seconds:.1f} s (peak memory {export_peak:.2f} GB"
                     f"{'' if not settings.check else f'; with the check {time.monotonic() - started:.1f} s, {_peak_gb():.2f} GB'})")
        if fmt.hint is not None:
            console.info(fmt.hint(out, default_stage))
        return 0


def _export_files(project: Project | None, settings: ExportSettings, fmt: Format) -> int:
    """A format without weights: its files from the project, built aside like any export."""
    assert fmt.files is not None
    if project is None:
        raise PersllmError(f"--format {fmt.name} is made from a project's material: run it inside the project "
                           "or pass -C DIR")
    out = Path(settings.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold(out):
        _prepare_output(out, settings.force)
        with replace_dir(out, prefix=f".{out.name}.export-") as tmp:
            written = fmt.files(FromProject(project, settings, tmp))
        console.info(f"Exported {fmt.name} to {out}: {'; '.join(written)}")
        if fmt.hint is not None:
            console.info(fmt.hint(out, settings.stage or project.stages[-1].id))
    return 0


def _check(job: Export, fmt: Format, merged: Path) -> dict[str, Any]:
    from persllm_cli.export import check
    from persllm_cli.model import load

    from transformers.utils import logging as hf_logging

    info, settings, default_stage = job.info, job.settings, job.default_stage
    ref_model, ref_tok, _ = load.load_run(info.path)
    reference = (ref_model, ref_tok, info)   # the stages exported (a stage's own run: that stage alone)
    hf_logging.disable_progress_bar()
    exported, what, exact = fmt.weights.load(job, merged), fmt.weights.label(settings), fmt.weights.exact(settings)
    rounded = fmt.weights.rounded(settings)  # an export in 16 bits: (the dtype of its matrices, vectors too?)
    n = len(info.stages)
    console.info(f"Checking the {what} export against the run ({n} stage{'s' * (n > 1)} x {len(check.PROMPTS)} prompts)...")
    as_trained = check.compare(reference, exported, default_stage=default_stage, exact=exact and rounded is None,
                               max_new_tokens=settings.check_tokens, what=what)
    _report(f"{what} export vs the run as trained (float32)", settings, as_trained)
    report = as_trained
    if rounded is not None:
        import torch

        check.round_like_export(reference[0], getattr(torch, rounded[0]), vectors=rounded[1])
        report = check.compare(reference, exported, default_stage=default_stage, exact=True,
                               max_new_tokens=settings.check_tokens, what=f"{what} vs the run rounded alike")
        _report(f"{what} export vs the run with its weights rounded alike", settings, report)
    engine_line = check.template_in_llama_cpp(exported[1], info.stages, settings.llama_cpp, what)
    del exported, reference, ref_model
    gc.collect()
    ties = f" ({report.near_ties} differ after a near tie of the run's own top two tokens)" if report.near_ties else ""
    console.info(f"Check passed: {report.exact}/{report.answers} identical answers{ties}, token agreement "
                 f"{report.agreement:.1%}, largest logit difference {report.max_logit_diff:.2e}"
                 + (f"; against the float32 run: {as_trained.exact}/{as_trained.answers} identical, token agreement "
                    f"{as_trained.agreement:.1%}" if rounded is not None else ""))
    console.info(engine_line)
    figures = {"format": what, "identical": report.exact, "answers": report.answers,
               "agreement": report.agreement, "near_ties": report.near_ties, "max_logit_diff": report.max_logit_diff}
    if rounded is not None:
        figures["vs_float32"] = {"identical": as_trained.exact, "answers": as_trained.answers,
                                 "agreement": as_trained.agreement, "near_ties": as_trained.near_ties,
                                 "max_logit_diff": as_trained.max_logit_diff}
    return figures


def _report(title: str, settings: ExportSettings, report: Any) -> None:
    console.table(f"Check: {title} (greedy, {settings.check_tokens} tokens)",
                  ["stage", "prompt", "same answer", "tokens agreeing", "max |logit diff|"], report.rows)
