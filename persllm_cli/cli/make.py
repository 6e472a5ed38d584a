"""The commands that make a persona, in pipeline order: init, annotate, dedup, split, dpo,
tokenize, train (the material becomes a trained run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from persllm_cli.cli.base import Opt, app, guarded, settings_for
from persllm_cli.core.settings import help_text as _h
from persllm_cli.core.settings import resolve

# The settings dataclasses hold every flag's help and default (written once, shown from the real
# value by `_h`). Each command package keeps them in its settings.py, which imports no torch or
# transformers; the stages behind them are imported when a command runs.
# [annotate]'s live in llm/, below the two command packages that use them (annotate, and dpo
# --mode generate).
from persllm_cli.curate.settings import DedupSettings, DpoSettings, SplitSettings
from persllm_cli.init.settings import InitSettings
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.train.settings import TokenizeSettings, TrainSettings


# ------------------------------------------------------------------------------------------ init

@app.command()
@guarded
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project.", metavar="DIR")],
    name: Annotated[Optional[str], typer.Option(help="The persona's name, e.g. \"Harry Potter\".")] = None,
    description: Annotated[str, typer.Option(help="One line about the persona.")] = "",
    stage: Annotated[Optional[list[str]], typer.Option(help="A life stage as ID or ID:LABEL, in chronological order; repeat for each stage.", metavar="ID[:LABEL]")] = None,
    example: Annotated[Optional[str], typer.Option(help="Copy a shipped example project instead (available: harry).")] = None,
    force: Annotated[bool, typer.Option(help="Create the project even if DIR is not empty. Existing files with content are kept, except persllm.toml: it is rewritten, and a different old one is kept as persllm.toml.bak.")] = False,
    from_card: Annotated[Optional[list[Path]], typer.Option("--from-card", help="Make the project from a character card (chara_card_v2/v3, PNG or JSON); repeat for several stages, in order (name them with --stage). Description, personality, scenario and lorebook become knowledge; first message, example messages and greetings become style.", metavar="FILE")] = None,
) -> int:
    """Create a project: persllm.toml and data/<stage>/knowledge.txt and style.txt."""
    from persllm_cli.init import command as scaffold

    return scaffold.run(InitSettings(directory=directory, name=name, description=description, stages=stage or [],
                                     example=example, force=force, cards=from_card or []))


# ------------------------------------------------------------------------------------- annotate

@app.command()
@guarded
def annotate(
    ctx: typer.Context,
    stage: Annotated[Optional[list[str]], Opt(help=_h(AnnotateSettings, 'stages'), metavar='ID')] = None,
    pattern: Annotated[Optional[str], Opt(help=_h(AnnotateSettings, 'pattern'))] = None,
    cot: Annotated[Optional[bool], Opt('--cot/--no-cot', help=_h(AnnotateSettings, 'cot', flag='--cot/--no-cot'))] = None,
    time_prefix: Annotated[Optional[bool], Opt('--time-prefix/--no-time-prefix', help=_h(AnnotateSettings, 'time_prefix', flag='--time-prefix/--no-time-prefix'))] = None,
    questions_per_paragraph: Annotated[Optional[int], Opt(help=_h(AnnotateSettings, 'questions_per_paragraph'))] = None,
    limit: Annotated[Optional[int], Opt(help=_h(AnnotateSettings, 'limit'))] = None,
    instructions: Annotated[Optional[Path], Opt(help=_h(AnnotateSettings, 'instructions'), metavar='FILE')] = None,
    backend: Annotated[Optional[str], Opt(help=_h(AnnotateSettings, 'backend'))] = None,
    model: Annotated[Optional[str], Opt(help=_h(AnnotateSettings, 'model'))] = None,
    base_url: Annotated[Optional[str], Opt(help=_h(AnnotateSettings, 'base_url'), metavar='URL')] = None,
    concurrency: Annotated[Optional[int], Opt(help=_h(AnnotateSettings, 'concurrency'))] = None,
    max_retries: Annotated[Optional[int], Opt(help=_h(AnnotateSettings, 'max_retries'))] = None,
    timeout: Annotated[Optional[float], Opt(help=_h(AnnotateSettings, 'timeout'), metavar='S')] = None,
    budget_usd: Annotated[Optional[float], Opt(help=_h(AnnotateSettings, 'budget_usd'), metavar='X')] = None,
    dry_run: Annotated[Optional[bool], Opt('--dry-run', help=_h(AnnotateSettings, 'dry_run'))] = None,
    review: Annotated[Optional[bool], Opt('--review', help=_h(AnnotateSettings, 'review'))] = None,
    feedback: Annotated[Optional[Path], Opt(help=_h(AnnotateSettings, 'feedback'), metavar='FILE')] = None,
    embedder: Annotated[Optional[str], Opt(help=_h(AnnotateSettings, 'embedder'))] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(AnnotateSettings, 'output'), metavar='FILE')] = None,
    batch_file: Annotated[Optional[Path], Opt('--batch-file', help=_h(AnnotateSettings, 'batch_file'), metavar='FILE')] = None,
    batch_results: Annotated[Optional[Path], Opt('--batch-results', help=_h(AnnotateSettings, 'batch_results'), metavar='FILE')] = None,
    batch: Annotated[Optional[bool], Opt('--batch', help=_h(AnnotateSettings, 'batch'))] = None,
) -> int:
    """Write persona Q&A records from the project's material with an LLM (resumable, accounted)."""
    from persllm_cli.annotate import command as annotate_stage

    project, settings = settings_for(ctx, AnnotateSettings, "annotate", renamed={"stage": "stages"})
    return annotate_stage.run(project, settings)


# ---------------------------------------------------------------------------------------- dedup

@app.command()
@guarded
def dedup(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Argument(help=_h(DedupSettings, 'input'), metavar='IN')] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(DedupSettings, 'output'), metavar='OUT')] = None,
    threshold: Annotated[Optional[float], Opt(help=_h(DedupSettings, 'threshold'))] = None,
    embedder: Annotated[Optional[str], Opt(help=_h(DedupSettings, 'embedder'))] = None,
    within_stage: Annotated[Optional[bool], Opt('--within-stage', help=_h(DedupSettings, 'within_stage'))] = None,
) -> int:
    """Drop failed records and near-duplicate questions (greedy, in file order)."""
    from persllm_cli.curate import dedup as stage

    project, settings = settings_for(ctx, DedupSettings, "dedup")
    return stage.run(project, settings)


# ---------------------------------------------------------------------------------------- split

@app.command()
@guarded
def split(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Argument(help=_h(SplitSettings, 'input'), metavar='IN')] = None,
    test_size: Annotated[Optional[float], Opt(help=_h(SplitSettings, 'test_size'))] = None,
    seed: Annotated[Optional[int], Opt(help=_h(SplitSettings, 'seed'))] = None,
    train_output: Annotated[Optional[Path], Opt('--train-output', help=_h(SplitSettings, 'train_output'), metavar='FILE')] = None,
    test_output: Annotated[Optional[Path], Opt('--test-output', help=_h(SplitSettings, 'test_output'), metavar='FILE')] = None,
) -> int:
    """Split into train and test, stratified by stage and pattern, never splitting a seed paragraph."""
    from persllm_cli.curate import split as stage

    project, settings = settings_for(ctx, SplitSettings, "split")
    return stage.run(project, settings)


# ------------------------------------------------------------------------------------------ dpo

@app.command()
@guarded
def dpo(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Argument(help=_h(DpoSettings, 'input'), metavar='IN')] = None,
    pool: Annotated[Optional[list[Path]], Opt(help=_h(DpoSettings, 'pool'), metavar='FILE')] = None,
    skip: Annotated[Optional[int], Opt(help=_h(DpoSettings, 'skip'))] = None,
    mode: Annotated[Optional[str], Opt(help=_h(DpoSettings, 'mode'))] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(DpoSettings, 'output'), metavar='OUT')] = None,
    backend: Annotated[Optional[str], Opt(help=_h(DpoSettings, 'backend'))] = None,
    model: Annotated[Optional[str], Opt(help=_h(DpoSettings, 'model'))] = None,
    base_url: Annotated[Optional[str], Opt(help=_h(DpoSettings, 'base_url'), metavar='URL')] = None,
    concurrency: Annotated[Optional[int], Opt(help=_h(DpoSettings, 'concurrency'))] = None,
    budget_usd: Annotated[Optional[float], Opt(help=_h(DpoSettings, 'budget_usd'), metavar='X')] = None,
    dry_run: Annotated[Optional[bool], Opt('--dry-run', help=_h(DpoSettings, 'dry_run'))] = None,
    embedder: Annotated[Optional[str], Opt(help=_h(DpoSettings, 'embedder'))] = None,
    batch_file: Annotated[Optional[Path], Opt('--batch-file', help=_h(DpoSettings, 'batch_file'), metavar='FILE')] = None,
    batch_results: Annotated[Optional[Path], Opt('--batch-results', help=_h(DpoSettings, 'batch_results'), metavar='FILE')] = None,
    batch: Annotated[Optional[bool], Opt('--batch', help=_h(DpoSettings, 'batch'))] = None,
) -> int:
    """Build chosen/rejected preference pairs (TRL's conversational format, with provenance)."""
    from persllm_cli.curate import dpo as stage

    project, settings = settings_for(ctx, DpoSettings, "dpo")
    annotator = resolve(AnnotateSettings, "annotate", {}, project) if settings.mode == "generate" else None
    return stage.run(project, settings, annotator)


# ------------------------------------------------------------------------------------- tokenize

@app.command()
@guarded
def tokenize(
    ctx: typer.Context,
    train: Annotated[Optional[Path], Opt(help=_h(TokenizeSettings, 'train'), metavar='F')] = None,
    dpo: Annotated[Optional[Path], Opt(help=_h(TokenizeSettings, 'dpo'), metavar='F')] = None,
    general: Annotated[Optional[Path], Opt(help=_h(TokenizeSettings, 'general'), metavar='F')] = None,
    repeat: Annotated[Optional[int], Opt(help=_h(TokenizeSettings, 'repeat'))] = None,
    base: Annotated[Optional[str], Opt(help=_h(TokenizeSettings, 'base'))] = None,
    time_tokens: Annotated[Optional[int], Opt(help=_h(TokenizeSettings, 'time_tokens'), metavar='N')] = None,
    max_length: Annotated[Optional[int], Opt(help=_h(TokenizeSettings, 'max_length'))] = None,
    time_token_at: Annotated[Optional[str], Opt(help=_h(TokenizeSettings, 'time_token_at'), metavar='first|answer')] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(TokenizeSettings, 'output'), metavar='DIR')] = None,
) -> int:
    """Render with the chat template, add time tokens, mask non-assistant labels."""
    from persllm_cli.train import tokenize as stage

    project, settings = settings_for(ctx, TokenizeSettings, "tokenize")
    return stage.run(project, settings)


# ---------------------------------------------------------------------------------------- train

@app.command()
@guarded
def train(
    ctx: typer.Context,
    data: Annotated[Optional[Path], Opt(help=_h(TrainSettings, 'data'), metavar='DIR')] = None,
    base: Annotated[Optional[str], Opt(help=_h(TrainSettings, 'base'))] = None,
    method: Annotated[Optional[str], Opt(help=_h(TrainSettings, 'method'))] = None,
    qlora: Annotated[Optional[bool], Opt('--qlora/--no-qlora', help=_h(TrainSettings, 'qlora', flag='--qlora/--no-qlora'))] = None,
    lora_r: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'lora_r'))] = None,
    lora_alpha: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'lora_alpha'))] = None,
    lora_dropout: Annotated[Optional[float], Opt(help=_h(TrainSettings, 'lora_dropout'))] = None,
    learning_rate: Annotated[Optional[float], Opt(help=_h(TrainSettings, 'learning_rate'))] = None,
    time_token_learning_rate: Annotated[Optional[float], Opt(help=_h(TrainSettings, 'time_token_learning_rate'))] = None,
    time_token_init: Annotated[Optional[str], Opt(help=_h(TrainSettings, 'time_token_init'))] = None,
    stage_contrast: Annotated[Optional[float], Opt(help=_h(TrainSettings, 'stage_contrast'), metavar='WEIGHT')] = None,
    adapter_per_stage: Annotated[Optional[bool], Opt('--adapter-per-stage/--one-adapter', help=_h(TrainSettings, 'adapter_per_stage', flag='--adapter-per-stage/--one-adapter'))] = None,
    epochs: Annotated[Optional[float], Opt(help=_h(TrainSettings, 'epochs'))] = None,
    max_steps: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'max_steps'))] = None,
    batch_size: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'batch_size'))] = None,
    grad_accum: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'grad_accum'))] = None,
    beta: Annotated[Optional[float], Opt(help=_h(TrainSettings, 'beta'))] = None,
    gpus: Annotated[Optional[str], Opt(help=_h(TrainSettings, 'gpus'), metavar='N|all')] = None,
    nproc: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'nproc'), metavar='N')] = None,
    resume: Annotated[Optional[bool], Opt('--resume/--no-resume', help=_h(TrainSettings, 'resume', flag='--resume/--no-resume'))] = None,
    output: Annotated[Optional[Path], Opt(help=_h(TrainSettings, 'output'), metavar='runs/NAME')] = None,
    seed: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'seed'))] = None,
    save_steps: Annotated[Optional[int], Opt(help=_h(TrainSettings, 'save_steps'))] = None,
    report_to: Annotated[Optional[str], Opt(help=_h(TrainSettings, 'report_to'))] = None,
) -> int:
    """Train a LoRA/QLoRA adapter with SFT, DPO, or SFT then DPO."""
    from persllm_cli.train import command as stage

    project, settings = settings_for(ctx, TrainSettings, "train")
    return stage.run(project, settings)
