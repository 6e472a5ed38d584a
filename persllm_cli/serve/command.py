"""`persllm serve`: trained runs (and/or an API model with retrieval) behind an OpenAI-compatible
API and a chat page, on one machine.

    persllm serve runs/sft runs/sft-dpo --port 8000
    curl -s localhost:8000/v1/models

Safety: it binds 127.0.0.1 unless told otherwise, and binding any other address needs an API key
from the environment (PERSLLM_API_KEY), never from a flag, so it shows neither in `ps` nor in shell
history; keyless, it answers only requests addressed to its loopback names (serve/guard.py).

SIGTERM or Ctrl-C: the server keeps listening but answers new chat requests 503 with Retry-After,
lets the answers in flight run until CLOSING seconds before `shutdown_grace` is over, then ends them
where they are (each stream still gets its last chunk, finish_reason "length", and [DONE]), stops
listening and exits within the grace: 0 after SIGTERM, 130 after Ctrl-C (as every persllm command).
A second signal ends everything at once. With nothing in flight it exits at once.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_INTERRUPTED, EXIT_USAGE, PersllmError
from persllm_cli.core.project import Project
from persllm_cli.model.generate import Sampling
from persllm_cli.serve.settings import ServeSettings

if TYPE_CHECKING:
    from persllm_cli.persona.speaker import RunSpeaker

KEY_ENV = "PERSLLM_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(project: Project | None, settings: ServeSettings) -> int:
    s = settings
    key = os.environ.get(KEY_ENV) or None
    if not is_loopback(s.host) and key is None:
        raise PersllmError(f"refusing to serve on {s.host} without an API key: set {KEY_ENV} "
                           "(clients send it as Authorization: Bearer KEY), or bind 127.0.0.1", exit_code=EXIT_USAGE)
    from persllm_cli.serve.app import create_app
    from persllm_cli.serve.state import Limits, Served, State
    from persllm_cli.serve.batcher import Scheduler

    sampling = Sampling(max_new_tokens=s.max_tokens, temperature=s.temperature)
    served: list[Served] = []
    adapters: dict[str, str] = {}   # scheduler key -> adapter name on a shared base (--weights shared)
    run_dirs = list(s.runs or [])
    if s.api_model:
        from persllm_cli.persona.api import ApiSpeaker

        served.append(Served(ApiSpeaker.for_project(project, s.api_model, s.base_url, sampling)))
    if run_dirs or not s.api_model:
        from persllm_cli.model.runs import resolve_run
        from persllm_cli.persona.speaker import RunSpeaker, load_shared

        dirs = [resolve_run(d, project) for d in run_dirs] if run_dirs else [resolve_run(None, project)]
        speakers = [RunSpeaker(d, sampling) for d in dirs]  # every run checked before any loads
        if _share(s.weights):
            console.note(f"Loading {len(speakers)} run(s), one copy of each base, adapters apart...")
            for sp, name in zip(speakers, load_shared(speakers)):
                served.append(Served(sp, key=str(sp.info.path)))
                if name is not None:
                    adapters[str(sp.info.path)] = name
        else:
            for sp in speakers:
                console.note(f"Loading {sp.info.path} (base {sp.info.base})...")
                sp.load()
                served.append(Served(sp, key=str(sp.info.path)))
        for sp in speakers:
            _cap_context(sp, s.max_model_len)
    names = [x.name for x in served]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PersllmError(f"two served models are both named {twice[0]!r}: serve runs from folders with different names")
    runs_loaded = {}
    for x in served:
        if x.key is None:
            continue
        for sid, model in x.stage_models.items():   # one adapter per stage, on CPU: a merged model per stage
            runs_loaded[x.key_at(sid)] = (model, x.run.tokenizer)
        for sid, adapter in x.stage_adapters.items():   # one adapter per stage: one key per stage
            runs_loaded[x.key_at(sid)] = (x.run.model, x.run.tokenizer)
            adapters[x.key_at(sid)] = adapter
        if not x.stage_adapters and not x.stage_models:
            runs_loaded[x.key] = (x.run.model, x.run.tokenizer)
    from persllm_cli.model.chat_format import warm_up

    for _, tok in runs_loaded.values():
        warm_up(tok)
    scheduler = Scheduler(runs_loaded, max_batch=s.max_batch, max_queue=s.max_queue,
                                     adapters=adapters) if runs_loaded else None
    limits = Limits(max_body_bytes=s.max_body_kb * 1024, default_max_tokens=s.max_tokens,
                    default_temperature=s.temperature, api_concurrency=s.max_batch)
    state = State(served, scheduler, api_key=key, limits=limits, host=s.host)
    app = create_app(state)
    # The loaded models, tokenizers and libraries are ~500,000 objects the garbage collector would walk
    # whenever a request's allocations trigger a full collection: a pause of 0.3-0.6 s for every
    # request on a busy 2-core box (benchmarks/serve_health.py). They live as long as the server:
    # frozen, they are never walked again.
    import gc

    gc.collect()
    gc.freeze()
    if scheduler:
        scheduler.start()
    return _serve(app, state, s)


def _cap_context(speaker: RunSpeaker, cap: int | None) -> None:
    """--max-model-len: fewer tokens than the loaded model reads, never more."""
    from persllm_cli.model.chat_format import context_size

    own = context_size(speaker.model)
    if cap is not None and cap > own:
        raise PersllmError(f"--max-model-len {cap} is more than {speaker.name} can read: its context is {own} tokens",
                           exit_code=EXIT_USAGE)
    speaker.max_context = cap


def _share(weights: str) -> bool:
    if weights != "auto":
        return weights == "shared"
    import torch

    return torch.cuda.is_available()


def closing_time(grace: float) -> float:
    """Seconds of the grace kept for ending the cut answers, closing connections and exiting."""
    return min(2.0, grace / 2)


def _serve(app, state, s: ServeSettings) -> int:
    import signal

    import uvicorn

    got: list[int] = []
    began: list[float] = []   # when the first signal came

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - signal handler
            got.append(sig)
            if not state.draining:
                began.append(time.monotonic())
                state.draining = True
                console.note("stopping: new requests get 503; ending the answers in flight...")
                if state.scheduler:
                    state.scheduler.stop_accepting()
                threading.Thread(target=_drain, args=(self, state, s.shutdown_grace, began[0]), daemon=True).start()
            else:  # a second signal: end them now
                _end_all(state)
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

    # Connections are drained before uvicorn is told to stop (_drain); what is left then is idle.
    config = uvicorn.Config(app, host=s.host, port=s.port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=0.5, lifespan="off")
    server = Server(config)
    _announce(server, state, s)
    server.run()
    _end_all(state)
    code = EXIT_INTERRUPTED if signal.SIGINT in got else 0
    if state.scheduler:
        state.scheduler.close(timeout=min(1.0, max(0.1, began[0] + s.shutdown_grace - 1.0 - time.monotonic()))
                              if began else 30.0)
    if began:
        # Stopped by a signal: every client has had its answer's end and nothing is left to write. Exit
        # now: tearing the interpreter and torch down took 0.5-2 s on a busy box (past the grace), and
        # aborts the process when a decode step still runs in the scheduler thread.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _drain(server, state, grace: float, began: float) -> None:
    """Let the requests in flight end until the closing time, cut what is left, then stop listening."""
    cut_at = began + grace - closing_time(grace)
    while state.in_flight > 0 and time.monotonic() < cut_at:
        time.sleep(0.05)
    if state.in_flight > 0:
        _end_all(state)
        last = max(began + grace - 1.0, time.monotonic() + 0.2)
        while state.in_flight > 0 and time.monotonic() < last:
            time.sleep(0.05)
    server.should_exit = True
    if state.in_flight > 0:
        server.force_exit = True


def _end_all(state) -> None:
    state.cut_answers()   # the clients hear at once, whatever the model is doing
    if state.scheduler:
        state.scheduler.finish_all()
    for handle in list(state.api_streams):
        handle.cut()


def _announce(server, state, s: ServeSettings) -> None:
    """Say where it listens once the socket is bound (port 0 picks a free one)."""
    def wait() -> None:
        import time

        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if not server.started:
            return
        port = s.port
        for srv in getattr(server, "servers", []):
            for sock in srv.sockets:
                port = sock.getsockname()[1]
        host = f"[{s.host}]" if ":" in s.host else s.host
        ids = ", ".join(state.models())
        console.info(f"Serving {ids}")
        console.info(f"Listening on http://{host}:{port} (page at /, API at /v1){' - API key required' if state.api_key else ''}")

    threading.Thread(target=wait, daemon=True).start()
