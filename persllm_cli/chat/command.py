"""`persllm chat`: talk to a trained persona, or to an API model grounded in the project's material.

Three ways in, one conversation underneath:
- a terminal (stdin is a TTY): a prompt on stderr, the answer streamed to stdout as it is generated,
  slash commands (/stage, /reset, /save, /help, /exit); Ctrl-D leaves (exit 0), Ctrl-C while an answer
  streams stops that answer, Ctrl-C at the prompt leaves with 130 (like the Python REPL's exit on EOF
  and a shell's 130 on interrupt). The prompt comes up at once; the run loads in a background thread
  while the first message is typed, and that message waits for it if need be.
- `--prompt TEXT`: one answer, and nothing but the answer on stdout.
- piped stdin (or `--json`): every non-blank line is its own question, answered without history; one
  answer per line on stdout with its newlines turned into spaces, or with `--json` one object
  {"stage", "prompt", "answer"} per line with the answer exactly as generated.

The speaker behind the conversation (persona/) is either a trained run or an OpenAI-compatible
model with retrieval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.core.project import Project, check_stage
from persllm_cli.core.errors import EXIT_INTERRUPTED, EXIT_USAGE, PersllmError, Terminated
from persllm_cli.model.generate import Sampling
from persllm_cli.persona.api import ApiSpeaker
from persllm_cli.persona.conversation import Conversation
from persllm_cli.persona.speaker import RunSpeaker, Speaker, stage_ids
from persllm_cli.chat.settings import ChatSettings


def run(project: Project | None, settings: ChatSettings) -> int:
    s = settings
    if s.prompt is not None and not s.prompt.strip():
        raise PersllmError("--prompt is empty: give the message to answer", exit_code=EXIT_USAGE)
    interactive = _is_interactive(s)
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature)
    if s.api_model:
        if s.run is not None:
            raise PersllmError("give a run or --api-model, not both", exit_code=EXIT_USAGE)
        speaker: Speaker = ApiSpeaker.for_project(project, s.api_model, s.base_url, sampling)
        stage_id = check_stage(s.stage, stage_ids(speaker))
    else:
        from persllm_cli.model.runs import resolve_run

        run_speaker = RunSpeaker(resolve_run(s.run, project), sampling)
        stage_id = check_stage(s.stage, stage_ids(run_speaker))
        console.note(f"Loading {run_speaker.info.path} (base {run_speaker.info.base})...")
        if interactive:
            run_speaker.load_in_background()
        else:
            run_speaker.load()
        speaker = run_speaker
    conv = Conversation(speaker, stage_id, s.system)
    if s.prompt is not None:
        return _one_shot(conv, s.prompt, s.json_output)
    if not interactive:
        return _lines(conv, sys.stdin, s.json_output)
    return _interactive(conv)


def _is_interactive(s: ChatSettings) -> bool:
    return s.prompt is None and not s.json_output and sys.stdin.isatty()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _one_shot(conv: Conversation, text: str, as_json: bool) -> int:
    if as_json:
        answer = "".join(conv.ask(text, remember=False)).strip()
        _write(json.dumps({"stage": conv.stage_id, "prompt": text, "answer": answer}, ensure_ascii=False) + "\n")
    else:
        for piece in conv.ask(text, remember=False):
            _write(piece)
        _write("\n")
    return 0


def _lines(conv: Conversation, stream: Any, as_json: bool) -> int:
    """One question per non-blank line, each answered on its own (no history)."""
    for line in stream:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if as_json:
            answer = "".join(conv.ask(text, remember=False)).strip()
            _write(json.dumps({"stage": conv.stage_id, "prompt": text, "answer": answer}, ensure_ascii=False) + "\n")
            continue
        # One line per answer, streamed: line breaks inside an answer become spaces.
        pending_space = False
        for piece in conv.ask(text, remember=False):
            flat = piece.replace("\r", "\n").replace("\n", " ")
            if pending_space and not flat.startswith(" "):
                flat = " " + flat
            pending_space = flat.endswith(" ")
            _write(flat.rstrip(" "))
        _write("\n")
    return 0


HELP = """Commands:
  /stage [ID]   speak from another stage (without ID: list the stages)
  /reset        forget the conversation so far
  /save FILE    append the conversation to FILE as one {"messages": [...]} JSON line
  /help         this list
  /exit         leave (Ctrl-D works too; Ctrl-C stops an answer)"""


def _interactive(conv: Conversation) -> int:
    err = console.err()
    try:
        import readline  # noqa: F401 - gives input() line editing and history
    except ImportError:  # pragma: no cover - not on every platform
        pass
    _banner(conv)
    while True:
        err.print(f"[bold green]you ({conv.stage_id})>[/] ", end="")
        err.file.flush()
        try:
            line = input()
        except EOFError:
            err.print()
            return 0
        except KeyboardInterrupt:
            err.print()
            return EXIT_INTERRUPTED
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(conv, text) == "exit":
                return 0
            continue
        conv.speaker.ready()  # a model that failed to load ends the session (one line, exit 1)
        err.print(f"[bold cyan]{_escape(conv.speaker.persona)}>[/] ", end="")
        err.file.flush()
        try:
            for piece in conv.ask(text):
                _write(piece)
        except KeyboardInterrupt as e:
            _write("\n")
            if isinstance(e, Terminated):  # SIGTERM ends the session; Ctrl-C only this answer
                raise
            console.note("(answer stopped; it is not kept in the conversation)")
            continue
        except PersllmError as e:
            _write("\n")
            console.error(str(e))
            continue
        _write("\n")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _banner(conv: Conversation) -> None:
    console.info(f"Talking to {conv.speaker.persona} at stage {conv.stage_id} ({conv.stage_label}). "
                 "Type /help for commands, /exit or Ctrl-D to leave.")


def _command(conv: Conversation, text: str) -> str | None:
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        console.info(HELP)
    elif name == "/reset":
        conv.history.clear()
        console.info("(conversation cleared)")
    elif name == "/stage":
        if not arg:
            for sid, label in conv.speaker.stages:
                mark = "*" if sid == conv.stage_id else " "
                console.info(f" {mark} {sid}: {label}")
            return None
        try:
            conv.set_stage(arg)
        except PersllmError as e:
            console.error(str(e))
            return None
        console.info(f"(now at stage {conv.stage_id}: {conv.stage_label})")
    elif name == "/save":
        if not arg:
            console.error("usage: /save FILE")
        elif not conv.history:
            console.info("(nothing to save yet)")
        else:
            path = Path(arg).expanduser()
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"stage": conv.stage_id, "messages": conv.messages()}, ensure_ascii=False) + "\n")
            except OSError as e:
                console.error(f"cannot write {path}: {e.strerror}")
                return None
            console.info(f"(saved {len(conv.history)} messages to {path})")
    else:
        console.error(f"unknown command {name} (type /help)")
    return None
