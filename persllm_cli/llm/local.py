"""The "local" provider: a transformers model on this machine (the embedded smollm2-135m, a model
directory or hub id, or a trained runs/NAME), so the pipeline works offline."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from persllm_cli.data.records import Message
from persllm_cli.llm.protocol import Completion, FatalError
from persllm_cli.model.bases import DEFAULT_BASE


class LocalBackend:
    """A transformers causal LM on this machine: the embedded smollm2-135m, a model directory or
    hub id (model.bases.load_base), or a trained persllm run (model.load.load_run; its stage's time
    token goes first, as in training). Loaded once, on first use; generation is serialised with a
    lock because one model object is not safe to drive from several threads.

    With `sections` the reply is generated section by section under labels we write (guided.py):
    small models do not keep a labelled format by themselves."""

    name = "local"
    in_process = True

    def __init__(self, model: str = DEFAULT_BASE, base_url: str | None = None, timeout: float | None = None, *,
                 device: str | None = None):
        del base_url, timeout   # no server to reach, and generation here never goes silent
        self.model = model
        self.device = device
        self.run_stages: list[dict[str, str]] | None = None   # set when `model` is a trained run
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any] | None = None

    def _load(self) -> tuple[Any, Any, Any]:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_now()
            return self._loaded

    def _load_now(self) -> tuple[Any, Any, Any]:
        from pathlib import Path

        from persllm_cli.model import bases
        from persllm_cli.model.chat_format import load_tokenizer
        from persllm_cli.model.guided import Decoder
        from persllm_cli.model.load import default_device, load_run

        path = Path(self.model).expanduser()
        device = self.device or default_device()
        if (path / "run.json").is_file():
            model, tok, info = load_run(path, device=device)
            self.run_stages = info.stages
        else:
            base = bases.resolve_base(self.model)
            tok = load_tokenizer(base)
            model = bases.load_base(base, device=device, dtype="bfloat16" if device == "cuda" else "float32",
                                    name=self.model)
        model.eval()
        self.device = str(getattr(model, "device", "cpu"))
        if self.device == "cpu":
            _cpu_threads()
        return model, tok, Decoder(model)

    def check(self) -> None:
        self._load()

    def _time_token(self, stage_token: str | None) -> str:
        """What goes before the prompt: a run's time token (the given one, else its last stage's);
        nothing for a plain model, which knows no time tokens."""
        if self.run_stages is None:
            return ""
        tokens = [s["token"] for s in self.run_stages]
        if stage_token is None:
            return tokens[-1]
        if stage_token not in tokens:
            raise FatalError(f"run {self.model} has no time token {stage_token} (it knows {', '.join(tokens)})")
        return stage_token

    def prompt_tokens(self, messages: list[Message], stage_token: str | None = None) -> int:
        from persllm_cli.model.chat_format import prompt_ids

        _, tok, _ = self._load()
        return len(prompt_ids(tok, messages, self._time_token(stage_token)))

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 sections: list[str] | None = None, stage_token: str | None = None,
                 stop: threading.Event | None = None,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        import time

        from persllm_cli.model.guided import free_reply, guided_reply
        from persllm_cli.model.chat_format import has_chat_template, prompt_ids

        model, tok, decoder = self._load()
        eos = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
               if isinstance(i, int) and i != tok.unk_token_id}
        with self._lock:
            t0 = time.perf_counter()
            prompt = prompt_ids(tok, messages, self._time_token(stage_token))
            decoder.stop = stop
            try:
                if sections:
                    out = guided_reply(decoder, tok, prompt, sections, max_tokens=max_tokens,
                                       temperature=temperature, eos=eos)
                else:
                    out = free_reply(decoder, tok, prompt, max_tokens=max_tokens, temperature=temperature, eos=eos,
                                     stop=None if has_chat_template(tok) else "\nUser:")
            finally:
                decoder.stop = None
            c = Completion(text=out.text, prompt_tokens=len(prompt) + out.label_tokens,
                           completion_tokens=out.generated, seconds=time.perf_counter() - t0, model=self.model)
        if on_text is not None and c.text:
            on_text(c.text)   # the whole reply at once: generation here is not streamed
        return c

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float,
               retries: int = 2) -> Iterator[str]:
        """The reply in one piece (see `complete`); `retries` concern a server, and there is none."""
        del retries
        text = self.complete(messages, max_tokens=max_tokens, temperature=temperature).text
        if text:
            yield text


def _cpu_threads() -> None:
    """Threads for CPU generation: the cores this process may use (torch counts the machine's),
    less those other work keeps busy, at least one; OMP_NUM_THREADS, when set, decides instead.
    On a shared 2-core machine with a load of 4, one thread generated 5x faster than two."""
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = max(0.0, os.getloadavg()[0] - 1)   # less our own loading of the model
    except OSError:
        busy = 0.0
    free = max(1, round(allowed - busy))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), allowed, free)))

