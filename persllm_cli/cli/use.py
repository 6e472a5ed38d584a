"""The commands that use a trained run (or an API model prompted as the persona): chat, serve,
eval, export, converse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from persllm_cli.cli.base import Opt, app, guarded, settings_for
from persllm_cli.core.settings import help_text as _h

# The settings dataclasses hold every flag's help and default (written once, shown from the real
# value by `_h`). Each command package keeps them in its settings.py, which imports no torch or
# transformers; the stages behind them are imported when a command runs.
from persllm_cli.chat.settings import ChatSettings
from persllm_cli.converse.settings import ConverseSettings
from persllm_cli.eval.settings import EvalSettings
from persllm_cli.export.settings import ExportSettings
from persllm_cli.serve.settings import ServeSettings


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

    project, settings = settings_for(ctx, ChatSettings, "chat", project_required=False)
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
    max_model_len: Annotated[Optional[int], Opt(help=_h(ServeSettings, 'max_model_len'), metavar='N')] = None,
    temperature: Annotated[Optional[float], Opt(help=_h(ServeSettings, 'temperature'))] = None,
    weights: Annotated[Optional[str], Opt(help=_h(ServeSettings, 'weights'))] = None,
) -> int:
    """Serve personas behind an OpenAI-compatible API (/v1/models, /v1/chat/completions) and a chat page at /.

    Model ids are NAME@STAGE for every stage of every run (NAME is the run folder's name), and NAME alone for its last stage. Requests to the same run are answered in batches. Set PERSLLM_API_KEY to require Authorization: Bearer KEY; binding anything but 127.0.0.1 requires it. SIGTERM or Ctrl-C stops accepting, lets answers in flight end, and exits 0.
    """
    from persllm_cli.serve import command as serve_stage

    project, settings = settings_for(ctx, ServeSettings, "serve", project_required=False)
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

    project, settings = settings_for(ctx, EvalSettings, "eval", project_required=False)
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

    project, settings = settings_for(ctx, ExportSettings, "export", project_required=False)
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
    no_repeat_ngram: Annotated[Optional[int], Opt(help=_h(ConverseSettings, 'no_repeat_ngram'), metavar='N')] = None,
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

    project, settings = settings_for(ctx, ConverseSettings, "converse", project_required=False)
    return stage.run(project, settings)
