"""`persllm serve`'s settings: its flags, `[serve]` in persllm.toml and PERSLLM_SERVE_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.settings import setting


@dataclass(frozen=True)
class ServeSettings:
    runs: list[Path] | None = setting(None,
                                      help='Run directories to serve. [default: runs/latest, unless --api-model is given]')
    api_model: str | None = setting(None,
                                    help="Also serve this OpenAI-compatible model as the persona, with retrieval over the project's material.")
    base_url: str | None = setting(None,
                                   help='Server URL for --api-model (else OPENAI_BASE_URL); its key is read from OPENAI_API_KEY only.')
    host: str = setting("127.0.0.1",
                        help='Address to listen on. Any address but a loopback one needs PERSLLM_API_KEY set.')
    port: int = setting(8000, at_least=0, at_most=65535, help='Port to listen on; 0 picks a free one.')
    max_batch: int = setting(8, at_least=1, help='Requests answered together on a model.')
    max_queue: int = setting(64, at_least=1, help='Requests that may wait; more get 429 with Retry-After.')
    max_tokens: int = setting(256, at_least=1, help='Longest answer when a request does not say.')
    max_model_len: int | None = setting(None, at_least=2,
                                        help="Tokens a request may take, prompt and answer together (vLLM's "
                                             "--max-model-len): below the model's own context it bounds each "
                                             "request's memory and prefill time, and longer histories lose their "
                                             "oldest turns sooner. [default: the model's context]")
    temperature: float = setting(0.7, at_least=0, at_most=2, help='Temperature when a request does not say.')
    weights: str = setting("auto", choices=["auto", "merged", "shared"],
                           help='merged: each run its own model with its adapter folded in (fastest on CPU); shared: '
                                'runs on the same base share one loaded base, each adapter kept apart and switched per '
                                'decode step (one copy of the weights; slower per token on CPU). auto: shared on CUDA, '
                                'merged on CPU.')
    max_body_kb: int = setting(1024, at_least=1)
    shutdown_grace: float = setting(10.0, at_least=0)
