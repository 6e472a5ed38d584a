"""The one object that speaks as a persona at a stage: `Speaker`.

`chat`, `eval`, `serve` and `converse` all talk through it. Two kinds:
- `RunSpeaker`: a trained run on this machine (its base, adapter or merged cache, and the tokenizer
  with the time tokens), prompted in the training format (model/chat_format.py); a run with one
  adapter per stage (train --adapter-per-stage) answers with the adapter of the stage asked. It is also a
  `BatchSpeaker`: serve's scheduler decodes its model itself, many requests in one batch;
- `ApiSpeaker` (persona/api.py): an OpenAI-compatible model told who it is and when, with the
  stage's material retrieved into its system prompt (the original project's prompt-only agent).

    speaker = RunSpeaker(Path("runs/latest"), Sampling(max_new_tokens=64, temperature=0))
    speaker.load()
    for piece in speaker.stream([{"role": "user", "content": "Hi"}], "early"):
        print(piece, end="")
    speaker.answer_batch([[{"role": "user", "content": "Hi"}]] * 4, "late")
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

from persllm_cli.core import console
from persllm_cli.data.records import Message
from persllm_cli.model.generate import Sampling


class Speaker(Protocol):
    """Answers in the persona's voice at one of its stages."""

    name: str                       # what it is called in reports and model lists (run name, API model)
    persona: str
    description: str
    stages: list[tuple[str, str]]   # (id, label), chronological
    sampling: Sampling              # the defaults; each call may pass its own

    def ready(self) -> None:
        """Block until it can answer; raise what stopped it from getting there."""
        ...

    def fit(self, messages: list[Message], stage_id: str, sampling: Sampling | None = None) -> tuple[list[Message], int]:
        """The messages that fit the model's context, and how many old ones were dropped."""
        ...

    def stream(self, messages: list[Message], stage_id: str, sampling: Sampling | None = None) -> Iterator[str]:
        """The answer to `messages` at `stage_id`, in pieces as they are generated. Closing the
        iterator early stops the generation."""
        ...

    def answer_batch(self, conversations: list[list[Message]], stage_id: str | None,
                     sampling: Sampling | None = None) -> list[str | None]:
        """One answer per conversation (None for one that failed), all at `stage_id`. A trained
        run also takes None: no stage token at all (eval compares its leakage with the tokens')."""
        ...


@runtime_checkable
class BatchSpeaker(Speaker, Protocol):
    """A speaker on this machine whose model a batching server steps itself, one token at a time for
    many requests together (serve's scheduler): it gives the fitted prompt as token ids, and the loaded
    model and tokenizer to step and decode with. A `RunSpeaker` is one; an API model is not."""

    model: Any       # the loaded causal LM (a PeftModel holding several adapters when runs share a base)
    tokenizer: Any   # its tokenizer, time tokens included (model.chat_format: end_ids, end_texts)

    def fitted_prompt(self, messages: list[Message], stage_id: str,
                      sampling: Sampling | None = None) -> tuple[list[Message], list[int]]:
        """`fit`'s messages and their prompt's token ids in the training format, the stage's time
        token first (encoded once, while fitting)."""
        ...

    def context(self) -> int:
        """How many tokens it reads, prompt and answer together: the model's own context, or fewer
        where a server caps it (`serve --max-model-len`)."""
        ...


def stage_ids(speaker: Speaker) -> list[str]:
    """The speaker's stage ids, chronological: what `core.project.check_stage` checks a stage against."""
    return [sid for sid, _ in speaker.stages]


def stage_label(speaker: Speaker, stage_id: str) -> str:
    return dict(speaker.stages)[stage_id]


class RunSpeaker:
    """A trained run on this machine. `load()` (or `load_in_background()` then `ready()`) before
    answering; a model and tokenizer already loaded may be handed in instead (`loaded=`)."""

    def __init__(self, run_dir: Path, sampling: Sampling | None = None, *, loaded: tuple[Any, Any] | None = None):
        from persllm_cli.model import runs

        self.info = runs.read_run(Path(run_dir))  # checks completeness before any model loads
        self.name = self.info.path.name
        self.persona = str(self.info.data.get("persona", "the persona"))
        self.description = str(self.info.data.get("description", ""))
        self.stages = [(s["id"], s.get("label", s["id"])) for s in self.info.stages]
        self.sampling = sampling or Sampling()
        self.max_context: int | None = None   # a cap below the model's own context (serve --max-model-len)
        self.model: Any = None
        self.tokenizer: Any = None
        # A run with one adapter per stage (train --adapter-per-stage): on CPU each stage's merged
        # model, else the adapter name of each stage on the one loaded model; `route` picks the
        # stage's before each generation.
        self.stage_models: dict[str, Any] | None = None
        self.stage_adapters: dict[str, str] | None = None
        if loaded is not None:
            self.model, self.tokenizer = loaded
        self._loader: threading.Thread | None = None
        self._load_error: BaseException | None = None

    def load(self) -> None:
        from persllm_cli.model import load

        if self.info.stage_runs and load.default_device() == "cpu":
            self.stage_models, self.tokenizer, self.info = load.load_stage_models(self.info.path)
            self.model = self.stage_models[self.stages[-1][0]]
        elif self.info.stage_runs:
            self.model, self.tokenizer, self.info, self.stage_adapters = load.load_stages(self.info.path)
        else:
            self.model, self.tokenizer, self.info = load.load_run(self.info.path)

    def route(self, stage_id: str | None) -> None:
        """Take the model (CPU) or activate the adapter of `stage_id` (None: the last stage's, the
        default time) where the run has one per stage; a run with one adapter for every stage needs
        nothing."""
        sid = stage_id if stage_id is not None else self.stages[-1][0]
        if self.stage_models:
            self.model = self.stage_models[sid]
        elif self.stage_adapters:
            name = self.stage_adapters[sid]
            if getattr(self.model, "active_adapter", None) != name:
                self.model.set_adapter(name)

    def load_in_background(self) -> None:
        """Load while the user types the first message: in a terminal most of the wait for the
        imports and weights then passes unseen. The base is resolved here, in the foreground, so a
        missing model or the one-time conversion of the embedded one shows before the prompt."""
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
        if self.model is None:
            self.load()

    def token(self, stage_id: str) -> str:
        return self.info.stage_token(stage_id)[1]

    def fitted_prompt(self, messages: list[Message], stage_id: str,
                      sampling: Sampling | None = None) -> tuple[list[Message], list[int]]:
        kept, _, ids = self._fit(messages, stage_id, sampling)
        return kept, ids

    def fit(self, messages: list[Message], stage_id: str, sampling: Sampling | None = None) -> tuple[list[Message], int]:
        kept, dropped, _ = self._fit(messages, stage_id, sampling)
        return kept, dropped

    def context(self) -> int:
        from persllm_cli.model.chat_format import context_size

        own = context_size(self.model)
        return own if self.max_context is None else min(own, self.max_context)

    def _fit(self, messages: list[Message], stage_id: str,
             sampling: Sampling | None) -> tuple[list[Message], int, list[int]]:
        from persllm_cli.model.chat_format import fit_prompt

        budget = self.context() - (sampling or self.sampling).max_new_tokens
        return fit_prompt(self.tokenizer, messages, self.token(stage_id), budget)

    def stream(self, messages: list[Message], stage_id: str, sampling: Sampling | None = None) -> Iterator[str]:
        from persllm_cli.model.generate import stream_reply

        token = self.token(stage_id)
        self.route(stage_id)
        return stream_reply(self.model, self.tokenizer, messages, token, sampling or self.sampling)

    def answer_batch(self, conversations: list[list[Message]], stage_id: str | None,
                     sampling: Sampling | None = None) -> list[str | None]:
        """None as `stage_id`: the prompt carries no stage token (the model's own default time)."""
        from persllm_cli.model.generate import generate_batch

        token = None if stage_id is None else self.token(stage_id)
        self.route(stage_id)
        return list(generate_batch(self.model, self.tokenizer, conversations, stage_token=token,
                                   sampling=sampling or self.sampling))


def load_shared(speakers: list[RunSpeaker]) -> list[str | None]:
    """Load the runs with one copy of each base between them, each run's adapter kept apart on it
    under its own name (to be switched per decode step). Returns each speaker's adapter name: None
    for a run with one adapter per stage, which loads its own (`stage_models` on CPU, else
    `stage_adapters`)."""
    from persllm_cli.model.load import load_runs_shared

    shared = iter(load_runs_shared([sp.info.path for sp in speakers if not sp.info.stage_runs]))
    names: list[str | None] = []
    for sp in speakers:
        if sp.info.stage_runs:
            sp.load()
            names.append(None)
        else:
            sp.model, sp.tokenizer, sp.info, name = next(shared)
            names.append(name)
    return names


def with_sampling(sampling: Sampling, **changes: Any) -> Sampling:
    """`sampling` with the given fields changed (None values leave a field as it is)."""
    return replace(sampling, **{k: v for k, v in changes.items() if v is not None})
