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
from persllm_cli.core.settings import resolve
from persllm_cli.core.errors import EXIT_INTERRUPTED, PersllmError

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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    console.set_quiet(quiet)
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
        except KeyboardInterrupt:
            console.error("interrupted; the work done so far is saved")
            raise typer.Exit(EXIT_INTERRUPTED)
        if code:
            raise typer.Exit(code)

    return wrapper


def _settings(ctx: typer.Context, cls: type, section: str, flags: dict[str, Any], *, project_required: bool = True):
    console.quiet_libraries()
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
) -> int:
    """Create a project: persllm.toml and data/<stage>/knowledge.txt and style.txt."""
    from persllm_cli.init import command as scaffold

    return scaffold.run(scaffold.InitSettings(directory=directory, name=name, description=description,
                                              stages=stage or [], example=example, force=force))



# Each command below passes its flags (None = not given) to config.resolve, which layers them
# over persllm.toml and PERSLLM_* variables, then calls the stage. Field names of the stage's
# settings dataclass match the flag names.

Opt = typer.Option


# ------------------------------------------------------------------------------------- annotate

@app.command()
@guarded
def annotate(
    ctx: typer.Context,
    stage: Annotated[Optional[list[str]], Opt(help="Stage to annotate; repeat for several (default: all).", metavar="ID")] = None,
    pattern: Annotated[Optional[str], Opt(help="Question pattern: ordinary, error (false premise to reject) or thought (opinion). [default: ordinary]")] = None,
    cot: Annotated[Optional[bool], Opt("--cot/--no-cot", help="Ask for an analysis before the answer (stored apart; only the answer is trained on). [default: no-cot]")] = None,
    time_prefix: Annotated[Optional[bool], Opt("--time-prefix/--no-time-prefix", help="Tell the annotator \"Now it is {stage label}.\" [default: time-prefix]")] = None,
    questions_per_paragraph: Annotated[Optional[int], Opt(help="Questions per seed paragraph. [default: 1]")] = None,
    limit: Annotated[Optional[int], Opt(help="At most N new records in this run, over all stages.")] = None,
    instructions: Annotated[Optional[Path], Opt(help="Answer these general instructions in the persona's voice instead (txt, one per line, or JSONL with messages).", metavar="FILE")] = None,
    backend: Annotated[Optional[str], Opt(help="openai (any OpenAI-compatible server) or local (transformers, offline). [default: openai]")] = None,
    model: Annotated[Optional[str], Opt(help="Annotator model: an API model name, or for --backend local smollm2-135m, a model dir or runs/NAME.")] = None,
    base_url: Annotated[Optional[str], Opt(help="OpenAI-compatible server URL (else OPENAI_BASE_URL). The key is read from OPENAI_API_KEY only.", metavar="URL")] = None,
    concurrency: Annotated[Optional[int], Opt(help="Requests in flight at once. [default: 8]")] = None,
    max_retries: Annotated[Optional[int], Opt(help="Retries per item before it is recorded as failed. [default: 5]")] = None,
    timeout: Annotated[Optional[float], Opt(help="Seconds to wait for one request. [default: 120]", metavar="S")] = None,
    budget_usd: Annotated[Optional[float], Opt(help="Stop cleanly before spending more than this many dollars.", metavar="X")] = None,
    dry_run: Annotated[Optional[bool], Opt("--dry-run", help="Send nothing; print the requests, tokens and dollars the run would take.")] = None,
    review: Annotated[Optional[bool], Opt("--review", help="Show the first answers and ask: ok, or a standard to add.")] = None,
    feedback: Annotated[Optional[Path], Opt(help="Standards to add to the instructions, one per line.", metavar="FILE")] = None,
    embedder: Annotated[Optional[str], Opt(help="Retrieval embedder: tfidf or st:NAME (sentence-transformers). [default: tfidf]")] = None,
    output: Annotated[Optional[Path], Opt("-o", "--output", help="Output JSONL (appended; reruns resume). [default: build/annotations.jsonl]", metavar="FILE")] = None,
) -> int:
    """Write persona Q&A records from the project's material with an LLM (resumable, accounted)."""
    flags = dict(locals())
    flags["stages"] = flags.pop("stage")
    from persllm_cli.annotate import command as annotate_stage

    project, settings = _settings(ctx, annotate_stage.AnnotateSettings, "annotate", flags)
    return annotate_stage.run(project, settings)


# ---------------------------------------------------------------------------------------- dedup

@app.command()
@guarded
def dedup(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Argument(help="Annotations JSONL. [default: build/annotations.jsonl]", metavar="IN")] = None,
    output: Annotated[Optional[Path], Opt("-o", "--output", help="[default: build/dedup.jsonl]", metavar="OUT")] = None,
    threshold: Annotated[Optional[float], Opt(help="Drop a question whose cosine similarity to a kept one reaches this. [default: 0.95]")] = None,
    embedder: Annotated[Optional[str], Opt(help="tfidf or st:NAME. [default: tfidf]")] = None,
) -> int:
    """Drop failed records and near-duplicate questions (greedy, in file order)."""
    from persllm_cli.curate import dedup as stage

    project, settings = _settings(ctx, stage.DedupSettings, "dedup", dict(locals()))
    return stage.run(project, settings)


# ---------------------------------------------------------------------------------------- split

@app.command()
@guarded
def split(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Argument(help="[default: build/dedup.jsonl]", metavar="IN")] = None,
    test_size: Annotated[Optional[float], Opt(help="Share of records in the test set. [default: 0.2]")] = None,
    seed: Annotated[Optional[int], Opt(help="[default: 0]")] = None,
    train_output: Annotated[Optional[Path], Opt("--train-output", help="[default: build/train.jsonl]", metavar="FILE")] = None,
    test_output: Annotated[Optional[Path], Opt("--test-output", help="[default: build/test.jsonl]", metavar="FILE")] = None,
) -> int:
    """Split into train and test, stratified by stage and pattern, never splitting a seed paragraph."""
    from persllm_cli.curate import split as stage

    project, settings = _settings(ctx, stage.SplitSettings, "split", dict(locals()))
    return stage.run(project, settings)


# ------------------------------------------------------------------------------------------ dpo

@app.command()
@guarded
def dpo(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Argument(help="[default: build/train.jsonl]", metavar="IN")] = None,
    pool: Annotated[Optional[list[Path]], Opt(help="Answers of other personas to draw rejected answers from; repeatable.", metavar="FILE")] = None,
    skip: Annotated[Optional[int], Opt(help="Pass over this many nearest questions first. [default: 5]")] = None,
    mode: Annotated[Optional[str], Opt(help="retrieve (another stage's answer to a similar question) or generate (ask the annotator with another stage's material). [default: retrieve]")] = None,
    output: Annotated[Optional[Path], Opt("-o", "--output", help="[default: build/dpo.jsonl]", metavar="OUT")] = None,
    backend: Annotated[Optional[str], Opt(help="For --mode generate: openai or local (else [annotate] settings).")] = None,
    model: Annotated[Optional[str], Opt(help="For --mode generate: the annotator model.")] = None,
    base_url: Annotated[Optional[str], Opt(help="For --mode generate: OpenAI-compatible server URL.", metavar="URL")] = None,
    concurrency: Annotated[Optional[int], Opt(help="For --mode generate: requests in flight.")] = None,
    budget_usd: Annotated[Optional[float], Opt(help="For --mode generate: stop cleanly before spending more than this many dollars.", metavar="X")] = None,
    dry_run: Annotated[Optional[bool], Opt("--dry-run", help="For --mode generate: send nothing; print the requests, tokens and dollars it would take.")] = None,
    embedder: Annotated[Optional[str], Opt(help="For --mode retrieve: question similarity, tfidf or st:NAME. [default: tfidf]")] = None,
) -> int:
    """Build chosen/rejected preference pairs (TRL's conversational format, with provenance)."""
    from persllm_cli.curate import dpo as stage

    project, settings = _settings(ctx, stage.DpoSettings, "dpo", dict(locals()))
    return stage.run(project, settings)


# ------------------------------------------------------------------------------------- tokenize

@app.command()
@guarded
def tokenize(
    ctx: typer.Context,
    train: Annotated[Optional[Path], Opt(help="SFT records. [default: build/train.jsonl]", metavar="F")] = None,
    dpo: Annotated[Optional[Path], Opt(help="Preference pairs. [default: build/dpo.jsonl if present]", metavar="F")] = None,
    general: Annotated[Optional[Path], Opt(help="General instruction data (JSONL with messages) to mix in.", metavar="F")] = None,
    repeat: Annotated[Optional[int], Opt(help="Repeat persona data this many times when mixing with --general. [default: 5]")] = None,
    base: Annotated[Optional[str], Opt(help="Base model: smollm2-135m, a model directory or a hub id. [default: smollm2-135m]")] = None,
    time_tokens: Annotated[Optional[int], Opt(help="Number of time tokens; must equal the number of stages. [default: number of stages]", metavar="N")] = None,
    max_length: Annotated[Optional[int], Opt(help="Longest sequence; longer conversations split at turn boundaries. [default: 2048]")] = None,
    output: Annotated[Optional[Path], Opt("-o", "--output", help="Output folder; an existing one must be empty or an earlier tokenize output. [default: build/tokenized]", metavar="DIR")] = None,
) -> int:
    """Render with the chat template, add time tokens, mask non-assistant labels."""
    from persllm_cli.train import tokenize as stage

    project, settings = _settings(ctx, stage.TokenizeSettings, "tokenize", dict(locals()))
    return stage.run(project, settings)


# ---------------------------------------------------------------------------------------- train

@app.command()
@guarded
def train(
    ctx: typer.Context,
    data: Annotated[Optional[Path], Opt(help="Tokenized data. [default: build/tokenized]", metavar="DIR")] = None,
    base: Annotated[Optional[str], Opt(help="Base model (must match the tokenized data). [default: from the data]")] = None,
    method: Annotated[Optional[str], Opt(help="sft, dpo or sft+dpo. [default: sft]")] = None,
    qlora: Annotated[Optional[bool], Opt("--qlora/--no-qlora", help="4-bit NF4 base on CUDA. [default: qlora]")] = None,
    lora_r: Annotated[Optional[int], Opt(help="[default: 16]")] = None,
    lora_alpha: Annotated[Optional[int], Opt(help="[default: 32]")] = None,
    lora_dropout: Annotated[Optional[float], Opt(help="[default: 0.05]")] = None,
    learning_rate: Annotated[Optional[float], Opt(help="[default: 2e-4]")] = None,
    epochs: Annotated[Optional[float], Opt(help="[default: 1]")] = None,
    max_steps: Annotated[Optional[int], Opt(help="Stop after N optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Per-device micro batch. [default: 4]")] = None,
    grad_accum: Annotated[Optional[int], Opt(help="[default: 4]")] = None,
    beta: Annotated[Optional[float], Opt(help="DPO beta. [default: 0.1]")] = None,
    gpus: Annotated[Optional[str], Opt(help="Train on N GPUs (or all) with DDP under torchrun.", metavar="N|all")] = None,
    nproc: Annotated[Optional[int], Opt(help="Train with N processes on CPU (gloo DDP).", metavar="N")] = None,
    resume: Annotated[Optional[bool], Opt("--resume/--no-resume", help="Continue from the run's last checkpoint. [default: no-resume]")] = None,
    output: Annotated[Optional[Path], Opt(help="Run directory. [default: runs/<date>-<method>]", metavar="runs/NAME")] = None,
    seed: Annotated[Optional[int], Opt(help="[default: 0]")] = None,
    save_steps: Annotated[Optional[int], Opt(help="Checkpoint every N steps. [default: 50]")] = None,
) -> int:
    """Train a LoRA/QLoRA adapter with SFT, DPO, or SFT then DPO."""
    from persllm_cli.train import command as stage

    project, settings = _settings(ctx, stage.TrainSettings, "train", dict(locals()))
    return stage.run(project, settings)


# ----------------------------------------------------------------------------------------- chat

@app.command()
@guarded
def chat(
    ctx: typer.Context,
    run: Annotated[Optional[Path], typer.Argument(help="Run directory (default: runs/latest of the project).", metavar="RUN")] = None,
    stage: Annotated[Optional[str], Opt(help="Stage to speak from (default: the last stage).", metavar="ID")] = None,
    prompt: Annotated[Optional[str], Opt(help="Answer this once and print only the answer.", metavar="TEXT")] = None,
    system: Annotated[Optional[str], Opt(help="A system message (with --api-model: added to the persona prompt).", metavar="TEXT")] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help="Longest answer, in tokens (default: 256).")] = None,
    temperature: Annotated[Optional[float], Opt(help="Sampling temperature; 0 for greedy (default: 0.7).")] = None,
    api_model: Annotated[Optional[str], Opt(help="Chat through an OpenAI-compatible model with retrieval over the project's material instead.", metavar="M")] = None,
    base_url: Annotated[Optional[str], Opt(help="Server URL for --api-model.", metavar="URL")] = None,
    json_output: Annotated[Optional[bool], Opt("--json", help="One JSON object per answer ({\"stage\", \"prompt\", \"answer\"}), reading questions line by line.")] = None,
) -> int:
    """Talk to a trained persona (streaming), or answer once with --prompt.

    In a terminal: type a message and the answer streams as it is generated. Commands: /stage ID, /reset, /save FILE (appends the conversation as a JSON line), /help, /exit or Ctrl-D. Ctrl-C stops an answer; at the prompt it leaves (exit 130).

    With stdin not a terminal: each non-blank line is a question answered on its own (no history), one answer per line on stdout (line breaks inside an answer become spaces); with --json one object per line, the answer exact.

    --api-model M talks to an OpenAI-compatible model instead (key from OPENAI_API_KEY), giving it the chosen stage's knowledge and style paragraphs closest to each message.
    """
    flags = dict(locals())  # taken before the import below adds a name
    from persllm_cli.chat import command as chat_stage

    project, settings = _settings(ctx, chat_stage.ChatSettings, "chat", flags, project_required=False)
    return chat_stage.run(project, settings)


# ----------------------------------------------------------------------------------------- eval

@app.command("eval")
@guarded
def eval_(
    ctx: typer.Context,
    run: Annotated[Optional[list[Path]], typer.Argument(help="Run directories to evaluate side by side, e.g. runs/sft runs/sft-dpo. [default: runs/latest, unless --api-model is given]", metavar="RUN")] = None,
    test: Annotated[Optional[Path], Opt(help="Test records (questions with reference answers). [default: build/test.jsonl]", metavar="FILE")] = None,
    api_model: Annotated[Optional[str], Opt(help="Also evaluate this OpenAI-compatible model, prompted with the persona and stage (a baseline without training).", metavar="M")] = None,
    base_url: Annotated[Optional[str], Opt(help="Server URL for --api-model (else OPENAI_BASE_URL). The key is read from OPENAI_API_KEY only.", metavar="URL")] = None,
    pool: Annotated[Optional[list[Path]], Opt(help="Answers of other personas (JSONL with persona and messages, e.g. another project's eval answers) for cross-persona BLEU; repeatable.", metavar="FILE")] = None,
    judge: Annotated[Optional[str], Opt(help="Judge model (OpenAI-compatible): compares each answer with the reference in both orders and checks false-premise questions were rejected.", metavar="M")] = None,
    judge_base_url: Annotated[Optional[str], Opt(help="Server URL for --judge. [default: --base-url, else OPENAI_BASE_URL]", metavar="URL")] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help="Longest answer, in tokens. [default: 256]")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Questions generated together. [default: 8]")] = None,
    temperature: Annotated[Optional[float], Opt(help="Sampling temperature; 0 is greedy and repeatable. [default: 0]")] = None,
    limit: Annotated[Optional[int], Opt(help="Evaluate only the first N test questions.")] = None,
    max_pairs: Annotated[Optional[int], Opt(help="Answer pairs per BLEU group before sampling. [default: 2000]")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for sampling answer pairs. [default: 0]")] = None,
    tokenize: Annotated[Optional[str], Opt(help="BLEU/ROUGE tokenizer: auto (zh or char for CJK text, else 13a), 13a, zh, char, intl. [default: auto]")] = None,
    timeout: Annotated[Optional[float], Opt(help="Seconds to wait for one API request. [default: 120]", metavar="S")] = None,
    concurrency: Annotated[Optional[int], Opt(help="API requests in flight at once (judge and --api-model). [default: 8]")] = None,
    max_retries: Annotated[Optional[int], Opt(help="Retries of a failed API request or a reply without a verdict, with backoff (Retry-After honoured). [default: 5]")] = None,
    budget_usd: Annotated[Optional[float], Opt(help="Stop cleanly before this run's API requests (--api-model and --judge together) would cost more than this many dollars.", metavar="X")] = None,
    json_output: Annotated[Optional[bool], Opt("--json", help="Print all metrics as JSON on stdout.")] = None,
    output: Annotated[Optional[Path], Opt("-o", "--output", help="Folder for answers and the report. [default: <run>/eval/ for answers; the report there with one run, else build/eval/]", metavar="DIR")] = None,
) -> int:
    """Answer the test questions and measure how well each persona stays itself and in its stage.

    Reports BLEU between answers (within a stage, across stages, across personas), BLEU and ROUGE-L against the reference answers and, with --judge, an LLM judge's verdicts. Answers are saved and reused: a rerun only generates what is missing. Writes eval.md, eval.png and eval.json; exits 3 when some answers or verdicts are missing (rerun to retry).
    """
    from persllm_cli.eval import command as stage

    project, settings = _settings(ctx, stage.EvalSettings, "eval", dict(locals()), project_required=False)
    return stage.run(project, settings)


# ------------------------------------------------------------------------------------- converse

@app.command()
@guarded
def converse(
    ctx: typer.Context,
    speakers: Annotated[Optional[list[str]], typer.Argument(help="Two or more speakers: runs/NAME@STAGE (a trained run at a stage), PROJECT_DIR@STAGE (its runs/latest), api:MODEL@STAGE (MODEL prompted as this project's persona, with retrieval over its material) or api:MODEL:PROJECT_DIR@STAGE (another project's). Without @STAGE: the last stage.", metavar="SPEAKER...")] = None,
    scene: Annotated[Optional[str], Opt(help="The opening context every speaker sees (required to start; a rerun may leave it out).", metavar="TEXT")] = None,
    turns: Annotated[Optional[int], Opt(help="Turns in the whole conversation, all speakers together. [default: 6]", metavar="N")] = None,
    first: Annotated[Optional[int], Opt(help="Which speaker opens (1 = the first given); then round robin. [default: 1]", metavar="K")] = None,
    output: Annotated[Optional[Path], Opt("-o", "--output", help="Transcript JSONL, one record per turn, with FILE.md beside it; rerunning with the same file continues the conversation. [default: build/converse.jsonl]", metavar="FILE")] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help="Longest line, in tokens. [default: 128]")] = None,
    temperature: Annotated[Optional[float], Opt(help="Sampling temperature; 0 for greedy. [default: 0.7]")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for sampling on this machine (trained runs).")] = None,
    base_url: Annotated[Optional[str], Opt(help="Server URL for api: speakers (else OPENAI_BASE_URL). The key is read from OPENAI_API_KEY only.", metavar="URL")] = None,
    judge: Annotated[Optional[str], Opt(help="Judge model (OpenAI-compatible): a verdict per turn on whether the speaker stayed in character and in its stage.", metavar="M")] = None,
    judge_base_url: Annotated[Optional[str], Opt(help="Server URL for --judge. [default: --base-url, else OPENAI_BASE_URL]", metavar="URL")] = None,
    timeout: Annotated[Optional[float], Opt(help="Seconds to wait for one API request. [default: 120]", metavar="S")] = None,
    max_retries: Annotated[Optional[int], Opt(help="Retries of a failed API request, with backoff. [default: 5]")] = None,
    budget_usd: Annotated[Optional[float], Opt(help="Stop cleanly (exit 3) before this run's API requests (speakers and judge) would cost more than this many dollars.", metavar="X")] = None,
    dry_run: Annotated[Optional[bool], Opt("--dry-run", help="Send nothing and load nothing; print the requests, tokens and dollars the API turns would take.")] = None,
) -> int:
    """Let personas talk to each other: trained runs at a stage (one persona at two stages can talk to itself) and prompted API personas, in turns.

    Lines stream to stdout under each speaker's name; every finished turn is saved (JSONL and markdown), so Ctrl-C (exit 130) keeps them and a rerun with the same -o continues. At the end: BLEU between the speakers against BLEU within each speaker and, with --judge, verdicts per turn.
    """
    flags = dict(locals())
    from persllm_cli.converse import command as stage

    project, settings = _settings(ctx, stage.ConverseSettings, "converse", flags, project_required=False)
    return stage.run(project, settings)


def main() -> None:
    """Console-script entry point. Typer's standalone mode turns usage errors into exit 2."""
    app(prog_name="persllm")
