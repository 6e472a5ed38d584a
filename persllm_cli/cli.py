"""The `persllm` command line: parse flags, resolve settings, call the stage.

Kept thin and light: no torch/transformers here or in anything imported at module level, so
`persllm --help` answers at once. Each command imports its stage module when it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from persllm_cli import __version__
from persllm_cli.core import console
from persllm_cli.core.project import Project, open_project
from persllm_cli.core.errors import EXIT_INTERRUPTED, PersllmError, Terminated, stop_on_sigterm
from persllm_cli.core.settings import help_text as _h
from persllm_cli.core.settings import resolve
# The settings dataclasses hold every flag's help and default (written once, shown from the real
# value by `_h`); these modules are light, the stages behind them are imported when a command runs.
from persllm_cli.chat.settings import ChatSettings
from persllm_cli.converse.settings import ConverseSettings
from persllm_cli.curate.settings import DedupSettings, DpoSettings, SplitSettings
from persllm_cli.eval.settings import EvalSettings
from persllm_cli.export.settings import ExportSettings
from persllm_cli.init.settings import InitSettings
from persllm_cli.llm.annotator import AnnotateSettings   # annotate's and dpo --mode generate's: see llm/annotator.py
from persllm_cli.serve.settings import ServeSettings
from persllm_cli.train.settings import TokenizeSettings, TrainSettings

app = typer.Typer(
    name="persllm",
    help="Turn a character's written material into a model that speaks as that character at a chosen "
         "point in its life (the PersLLM method).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Globals:
    project_dir: Path | None = None

    def project(self, required: bool = True) -> Project | None:
        return open_project(self.project_dir, required=required)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"persllm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    project: Annotated[Optional[Path], typer.Option("-C", "--project", help="Use the project in DIR or the nearest folder above it with persllm.toml, instead of the one around the working directory. Paths given on the command line still resolve against the working directory.", metavar="DIR")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="When another persllm run is writing the same output, wait for it to finish instead of exiting 1.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    console.set_quiet(quiet)
    from persllm_cli.data import lock

    lock.set_wait(wait)
    ctx.obj = Globals(project_dir=project)


def guarded(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn a PersllmError into one red line and its exit code, Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except PersllmError as e:
            console.error(str(e))
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt as e:
            how = " by SIGTERM" if isinstance(e, Terminated) else ""
            console.error(f"interrupted{how}; the work done so far is saved")
            raise typer.Exit(EXIT_INTERRUPTED)
        if code:
            raise typer.Exit(code)

    return wrapper


def _settings(ctx: typer.Context, cls: type, section: str, *, project_required: bool = True,
              renamed: dict[str, str] | None = None) -> tuple[Project | None, Any]:
    """The project and this command's settings, resolved from its flags: `ctx.params`, the parsed
    values by parameter name, each under its field's name (`renamed` maps a flag to a differently
    named field). Click gives a list flag that was not given as `()`: not given, like None."""
    console.quiet_libraries()
    flags = {name: None if value == () else value for name, value in ctx.params.items()}
    for flag, name in (renamed or {}).items():
        flags[name] = flags.pop(flag)
    project = ctx.obj.project(required=project_required)
    return project, resolve(cls, section, flags, project)


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

    return scaffold.run(InitSettings(directory=directory, name=name, description=description,
                                              stages=stage or [], example=example, force=force,
                                              cards=from_card or []))


# Each command below passes its parsed flags (ctx.params; None = not given) to
# core.settings.resolve, which layers them over persllm.toml and PERSLLM_* variables, then calls the
# stage. Field names of the stage's settings dataclass match the parameter names (a rename is given
# to _settings); each flag's help and default come from that field.

Opt = typer.Option


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

    project, settings = _settings(ctx, AnnotateSettings, "annotate", renamed={"stage": "stages"})
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
) -> int:
    """Drop failed records and near-duplicate questions (greedy, in file order)."""
    from persllm_cli.curate import dedup as stage

    project, settings = _settings(ctx, DedupSettings, "dedup")
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

    project, settings = _settings(ctx, SplitSettings, "split")
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

    project, settings = _settings(ctx, DpoSettings, "dpo")
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
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(TokenizeSettings, 'output'), metavar='DIR')] = None,
) -> int:
    """Render with the chat template, add time tokens, mask non-assistant labels."""
    from persllm_cli.train import tokenize as stage

    project, settings = _settings(ctx, TokenizeSettings, "tokenize")
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

    project, settings = _settings(ctx, TrainSettings, "train")
    return stage.run(project, settings)


# ----------------------------------------------------------------------------------------- chat

@app.command()
@guarded
def chat(
    ctx: typer.Context,
    run: Annotated[Optional[Path], typer.Argument(help=_h(ChatSettings, 'run'), metavar='RUN')] = None,
    stage: Annotated[Optional[str], Opt(help=_h(ChatSettings, 'stage'), metavar='ID')] = None,
    prompt: Annotated[Optional[str], Opt(help=_h(ChatSettings, 'prompt'), metavar='TEXT')] = None,
    system: Annotated[Optional[str], Opt(help=_h(ChatSettings, 'system'), metavar='TEXT')] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help=_h(ChatSettings, 'max_new_tokens'))] = None,
    temperature: Annotated[Optional[float], Opt(help=_h(ChatSettings, 'temperature'))] = None,
    api_model: Annotated[Optional[str], Opt(help=_h(ChatSettings, 'api_model'), metavar='M')] = None,
    base_url: Annotated[Optional[str], Opt(help=_h(ChatSettings, 'base_url'), metavar='URL')] = None,
    json_output: Annotated[Optional[bool], Opt('--json', help=_h(ChatSettings, 'json_output'))] = None,
) -> int:
    """Talk to a trained persona (streaming), or answer once with --prompt.

    In a terminal: type a message and the answer streams as it is generated. Commands: /stage ID, /reset, /save FILE (appends the conversation as a JSON line), /help, /exit or Ctrl-D. Ctrl-C stops an answer; at the prompt it leaves (exit 130).

    With stdin not a terminal: each non-blank line is a question answered on its own (no history), one answer per line on stdout (line breaks inside an answer become spaces); with --json one object per line, the answer exact.

    --api-model M talks to an OpenAI-compatible model instead (key from OPENAI_API_KEY), giving it the chosen stage's knowledge and style paragraphs closest to each message.
    """
    from persllm_cli.chat import command as chat_stage

    project, settings = _settings(ctx, ChatSettings, "chat", project_required=False)
    return chat_stage.run(project, settings)


# ---------------------------------------------------------------------------------------- serve

@app.command()
@guarded
def serve(
    ctx: typer.Context,
    runs: Annotated[Optional[list[Path]], typer.Argument(help=_h(ServeSettings, 'runs'), metavar='RUN')] = None,
    api_model: Annotated[Optional[str], Opt(help=_h(ServeSettings, 'api_model'), metavar='M')] = None,
    base_url: Annotated[Optional[str], Opt(help=_h(ServeSettings, 'base_url'), metavar='URL')] = None,
    host: Annotated[Optional[str], Opt(help=_h(ServeSettings, 'host'))] = None,
    port: Annotated[Optional[int], Opt(help=_h(ServeSettings, 'port'))] = None,
    max_batch: Annotated[Optional[int], Opt(help=_h(ServeSettings, 'max_batch'))] = None,
    max_queue: Annotated[Optional[int], Opt(help=_h(ServeSettings, 'max_queue'))] = None,
    max_tokens: Annotated[Optional[int], Opt(help=_h(ServeSettings, 'max_tokens'))] = None,
    temperature: Annotated[Optional[float], Opt(help=_h(ServeSettings, 'temperature'))] = None,
    weights: Annotated[Optional[str], Opt(help=_h(ServeSettings, 'weights'))] = None,
) -> int:
    """Serve personas behind an OpenAI-compatible API (/v1/models, /v1/chat/completions) and a chat page at /.

    Model ids are NAME@STAGE for every stage of every run (NAME is the run folder's name), and NAME alone for its last stage. Requests to the same run are answered in batches. Set PERSLLM_API_KEY to require Authorization: Bearer KEY; binding anything but 127.0.0.1 requires it. SIGTERM or Ctrl-C stops accepting, lets answers in flight end, and exits 0.
    """
    from persllm_cli.serve import command as serve_stage

    project, settings = _settings(ctx, ServeSettings, "serve", project_required=False)
    return serve_stage.run(project, settings)


# ----------------------------------------------------------------------------------------- eval

@app.command("eval")
@guarded
def eval_(
    ctx: typer.Context,
    run: Annotated[Optional[list[Path]], typer.Argument(help=_h(EvalSettings, 'run'), metavar='RUN')] = None,
    test: Annotated[Optional[Path], Opt(help=_h(EvalSettings, 'test'), metavar='FILE')] = None,
    train: Annotated[Optional[Path], Opt(help=_h(EvalSettings, 'train'), metavar='FILE')] = None,
    swap_questions: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'swap_questions'), metavar='N')] = None,
    api_model: Annotated[Optional[str], Opt(help=_h(EvalSettings, 'api_model'), metavar='M')] = None,
    base_url: Annotated[Optional[str], Opt(help=_h(EvalSettings, 'base_url'), metavar='URL')] = None,
    pool: Annotated[Optional[list[Path]], Opt(help=_h(EvalSettings, 'pool'), metavar='FILE')] = None,
    judge: Annotated[Optional[str], Opt(help=_h(EvalSettings, 'judge'), metavar='M')] = None,
    judge_base_url: Annotated[Optional[str], Opt(help=_h(EvalSettings, 'judge_base_url'), metavar='URL')] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'max_new_tokens'))] = None,
    batch_size: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'batch_size'))] = None,
    temperature: Annotated[Optional[float], Opt(help=_h(EvalSettings, 'temperature'))] = None,
    limit: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'limit'))] = None,
    max_pairs: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'max_pairs'))] = None,
    seed: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'seed'))] = None,
    tokenize: Annotated[Optional[str], Opt(help=_h(EvalSettings, 'tokenize'))] = None,
    timeout: Annotated[Optional[float], Opt(help=_h(EvalSettings, 'timeout'), metavar='S')] = None,
    concurrency: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'concurrency'))] = None,
    max_retries: Annotated[Optional[int], Opt(help=_h(EvalSettings, 'max_retries'))] = None,
    budget_usd: Annotated[Optional[float], Opt(help=_h(EvalSettings, 'budget_usd'), metavar='X')] = None,
    json_output: Annotated[Optional[bool], Opt('--json', help=_h(EvalSettings, 'json_output'))] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(EvalSettings, 'output'), metavar='DIR')] = None,
) -> int:
    """Answer the test questions and measure how well each persona stays itself and in its stage.

    Reports stage fidelity without a judge (a stage classifier's accuracy, the same questions asked at every stage, later stages' terms in earlier answers), BLEU between answers (within a stage, across stages, across personas), BLEU and ROUGE-L against the reference answers and, with --judge, an LLM judge's verdicts. Answers are saved and reused: a rerun only generates what is missing. Writes eval.md, eval.png and eval.json; exits 3 when some answers or verdicts are missing (rerun to retry).
    """
    from persllm_cli.eval import command as stage

    project, settings = _settings(ctx, EvalSettings, "eval", project_required=False)
    return stage.run(project, settings)


# --------------------------------------------------------------------------------------- export

@app.command()
@guarded
def export(
    ctx: typer.Context,
    run: Annotated[Optional[Path], typer.Argument(help=_h(ExportSettings, 'run'), metavar='RUN')] = None,
    format: Annotated[Optional[str], Opt('--format', '-f', help=_h(ExportSettings, 'format'))] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(ExportSettings, 'output'), metavar='DIR')] = None,
    stage: Annotated[Optional[str], Opt(help=_h(ExportSettings, 'stage'), metavar='ID')] = None,
    dtype: Annotated[Optional[str], Opt(help=_h(ExportSettings, 'dtype'))] = None,
    quant: Annotated[Optional[str], Opt(help=_h(ExportSettings, 'quant'))] = None,
    check: Annotated[Optional[bool], Opt('--check/--no-check', help=_h(ExportSettings, 'check', flag='--check/--no-check'))] = None,
    check_tokens: Annotated[Optional[int], Opt(help=_h(ExportSettings, 'check_tokens'))] = None,
    force: Annotated[Optional[bool], Opt('--force', help=_h(ExportSettings, 'force'))] = None,
) -> int:
    """Export a run as a merged transformers model, a GGUF file, or an Ollama model, time tokens kept; or character cards.

    The exported chat template takes the stage (apply_chat_template(..., stage="early"), or chat_template_kwargs in OpenAI-compatible servers); without it, the default stage. With --check (the default) the export is loaded back the way a consumer would and compared with the run: same prompt tokens, same greedy answers (hf, gguf f16), the largest logit difference, q8_0's token agreement. Nothing is written unless everything passed.

    --format card writes one character card per stage (JSON and PNG) for chat front-ends, naming the model RUN@STAGE that `persllm serve` lists; no weights, nothing loaded.
    """
    from persllm_cli.export import command as exporter

    project, settings = _settings(ctx, ExportSettings, "export", project_required=False)
    return exporter.run(project, settings)


# ------------------------------------------------------------------------------------- converse

@app.command()
@guarded
def converse(
    ctx: typer.Context,
    speakers: Annotated[Optional[list[str]], typer.Argument(help=_h(ConverseSettings, 'speakers'), metavar='SPEAKER...')] = None,
    scene: Annotated[Optional[str], Opt(help=_h(ConverseSettings, 'scene'), metavar='TEXT')] = None,
    turns: Annotated[Optional[int], Opt(help=_h(ConverseSettings, 'turns'), metavar='N')] = None,
    first: Annotated[Optional[int], Opt(help=_h(ConverseSettings, 'first'), metavar='K')] = None,
    output: Annotated[Optional[Path], Opt('-o', '--output', help=_h(ConverseSettings, 'output'), metavar='FILE')] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help=_h(ConverseSettings, 'max_new_tokens'))] = None,
    temperature: Annotated[Optional[float], Opt(help=_h(ConverseSettings, 'temperature'))] = None,
    seed: Annotated[Optional[int], Opt(help=_h(ConverseSettings, 'seed'))] = None,
    base_url: Annotated[Optional[str], Opt(help=_h(ConverseSettings, 'base_url'), metavar='URL')] = None,
    judge: Annotated[Optional[str], Opt(help=_h(ConverseSettings, 'judge'), metavar='M')] = None,
    judge_base_url: Annotated[Optional[str], Opt(help=_h(ConverseSettings, 'judge_base_url'), metavar='URL')] = None,
    timeout: Annotated[Optional[float], Opt(help=_h(ConverseSettings, 'timeout'), metavar='S')] = None,
    max_retries: Annotated[Optional[int], Opt(help=_h(ConverseSettings, 'max_retries'))] = None,
    budget_usd: Annotated[Optional[float], Opt(help=_h(ConverseSettings, 'budget_usd'), metavar='X')] = None,
    dry_run: Annotated[Optional[bool], Opt('--dry-run', help=_h(ConverseSettings, 'dry_run'))] = None,
) -> int:
    """Let personas talk to each other: trained runs at a stage (one persona at two stages can talk to itself) and prompted API personas, in turns.

    Lines stream to stdout under each speaker's name; every finished turn is saved (JSONL and markdown), so Ctrl-C (exit 130) keeps them and a rerun with the same -o continues. At the end: BLEU between the speakers against BLEU within each speaker and, with --judge, verdicts per turn.
    """
    from persllm_cli.converse import command as stage

    project, settings = _settings(ctx, ConverseSettings, "converse", project_required=False)
    return stage.run(project, settings)


def main() -> None:
    """Console-script entry point. Typer's standalone mode turns usage errors into exit 2."""
    stop_on_sigterm()  # SIGTERM stops a run like Ctrl-C (exit 130); a file-size limit fails the write (exit 1)
    app(prog_name="persllm")
