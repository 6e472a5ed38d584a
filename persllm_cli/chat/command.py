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

The talker behind the conversation is either a trained run (inference.py) or an OpenAI-compatible
model with retrieval (chat_api.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from persllm_cli.core import console
from persllm_cli.core.project import Project
from persllm_cli.core.settings import setting
from persllm_cli.core.errors import EXIT_INTERRUPTED, EXIT_USAGE, PersllmError, Terminated

Message = dict[str, str]


@dataclass
class ChatSettings:
    run: Path | None = None
    stage: str | None = None
    prompt: str | None = None
    system: str | None = None
    max_new_tokens: int = setting(256, at_least=1)
    temperature: float = setting(0.7, at_least=0)
    api_model: str | None = None
    base_url: str | None = None
    json_output: bool = False


class Talker(Protocol):
    """What a conversation talks to: a trained run or an API model."""

    persona: str
    stages: list[tuple[str, str]]  # (id, label), chronological

    def fit(self, messages: list[Message], stage_id: str) -> tuple[list[Message], int]:
        """The messages that fit the model's context, and how many old ones were dropped."""
        ...

    def stream(self, messages: list[Message], stage_id: str) -> Iterator[str]: ...

    def ready(self) -> None:
        """Block until the talker can answer; raise what stopped it from getting there."""
        ...


class RunTalker:
    """A trained run on this machine."""

    def __init__(self, run_dir: Path, max_new_tokens: int, temperature: float) -> None:
        from persllm_cli.model import runs

        self.info = runs.read_run(run_dir)  # checks completeness before any model loads
        self.persona = str(self.info.data.get("persona", "the persona"))
        self.stages = [(s["id"], s.get("label", s["id"])) for s in self.info.stages]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.model: Any = None
        self.tokenizer: Any = None
        self._loader: Any = None
        self._load_error: BaseException | None = None

    def load(self) -> None:
        from persllm_cli.model import load

        self.model, self.tokenizer, self.info = load.load_run(self.info.path)

    def load_in_background(self) -> None:
        """Load while the user types the first message: in a terminal most of the wait for the
        imports and weights then passes unseen. The base is resolved here, in the foreground, so a
        missing model or the one-time conversion of the embedded one shows before the prompt."""
        import threading

        from persllm_cli.model.bases import resolve_base

        resolve_base(self.info.base)

        def load() -> None:
            try:
                self.load()
            except BaseException as e:  # handed to the main thread by ready()
                self._load_error = e

        self._loader = threading.Thread(target=load, name="persllm-load", daemon=True)
        self._loader.start()

    def ready(self) -> None:
        if self._loader is not None:
            if self._loader.is_alive():
                console.note("(still loading the model...)")
            while self._loader.is_alive():
                self._loader.join(0.1)
            self._loader = None
        if self._load_error is not None:
            raise self._load_error

    def _token(self, stage_id: str) -> str:
        return self.info.stage_token(stage_id)[1]

    def fit(self, messages: list[Message], stage_id: str) -> tuple[list[Message], int]:
        from persllm_cli.model.chat_format import context_size, fit_messages

        budget = context_size(self.model) - self.max_new_tokens
        return fit_messages(self.tokenizer, messages, self._token(stage_id), budget)

    def stream(self, messages: list[Message], stage_id: str) -> Iterator[str]:
        from persllm_cli.model.generate import stream_reply

        return stream_reply(self.model, self.tokenizer, messages, self._token(stage_id),
                            self.max_new_tokens, self.temperature)


@dataclass
class Conversation:
    talker: Talker
    stage_id: str
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    _said_dropped: bool = False

    @property
    def stage_label(self) -> str:
        return dict(self.talker.stages)[self.stage_id]

    def set_stage(self, stage_id: str) -> None:
        self.stage_id = check_stage(self.talker, stage_id)

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def ask(self, text: str, remember: bool = True) -> Iterator[str]:
        """Stream the answer to `text`; the exchange joins the history once the answer is complete."""
        history = self.history if remember else []
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = {"role": "user", "content": text}
        messages, dropped = self.talker.fit(system + history + [user], self.stage_id)
        if dropped and remember:
            del self.history[:dropped]
            if not self._said_dropped:
                console.note("(the conversation outgrew the model's context: the oldest turns are dropped from now on)")
                self._said_dropped = True
        pieces: list[str] = []
        for piece in _lstrip_stream(self.talker.stream(messages, self.stage_id)):
            pieces.append(piece)
            yield piece
        if remember:
            self.history += [user, {"role": "assistant", "content": "".join(pieces).strip()}]


def _lstrip_stream(pieces: Iterator[str]) -> Iterator[str]:
    started = False
    for p in pieces:
        if not started:
            p = p.lstrip()
            if not p:
                continue
            started = True
        yield p


def check_stage(talker: Talker, stage_id: str | None) -> str:
    ids = [sid for sid, _ in talker.stages]
    if not ids:
        raise PersllmError("no stages to speak from")
    if stage_id is None:
        return ids[-1]
    if stage_id not in ids:
        raise PersllmError(f"unknown stage {stage_id!r} (stages: {', '.join(ids)})")
    return stage_id


def run(project: Project | None, settings: ChatSettings) -> int:
    s = settings
    if s.prompt is not None and not s.prompt.strip():
        raise PersllmError("--prompt is empty: give the message to answer", exit_code=EXIT_USAGE)
    interactive = _is_interactive(s)
    if s.api_model:
        if s.run is not None:
            raise PersllmError("give a run or --api-model, not both", exit_code=EXIT_USAGE)
        from persllm_cli.persona.api import ApiTalker

        talker: Talker = ApiTalker(project, s.api_model, s.base_url, s.max_new_tokens, s.temperature)
        stage_id = check_stage(talker, s.stage)
    else:
        from persllm_cli.model.runs import resolve_run

        run_talker = RunTalker(resolve_run(s.run, project), s.max_new_tokens, s.temperature)
        stage_id = check_stage(run_talker, s.stage)
        console.note(f"Loading {run_talker.info.path} (base {run_talker.info.base})...")
        if interactive:
            run_talker.load_in_background()
        else:
            run_talker.load()
        talker = run_talker
    conv = Conversation(talker, stage_id, s.system)
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
        conv.talker.ready()  # a model that failed to load ends the session (one line, exit 1)
        err.print(f"[bold cyan]{_escape(conv.talker.persona)}>[/] ", end="")
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
    console.info(f"Talking to {conv.talker.persona} at stage {conv.stage_id} ({conv.stage_label}). "
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
            for sid, label in conv.talker.stages:
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
