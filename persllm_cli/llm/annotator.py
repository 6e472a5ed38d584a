"""The annotator's settings: persllm.toml's `[annotate]`, the LLM that writes records.

`annotate` is configured by all of it; `dpo --mode generate` asks the same annotator (its backend,
model, server, retries, limits and prices) and takes its own flags over these. The CLI resolves
this section once and hands it to both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from persllm_cli.core.settings import setting
from persllm_cli.data.records import PATTERNS
from persllm_cli.llm.backends import BACKENDS

DEFAULT_MODEL = {"openai": "gpt-4o-mini", "local": "smollm2-135m"}


@dataclass
class AnnotateSettings:
    stages: list[str] | None = None
    pattern: str = setting("ordinary", choices=PATTERNS)
    cot: bool = False
    time_prefix: bool = True
    questions_per_paragraph: int = setting(1, at_least=1)
    limit: int | None = setting(None, at_least=0)
    instructions: Path | None = None
    backend: str = setting("openai", choices=BACKENDS)
    model: str | None = None
    base_url: str | None = None
    concurrency: int = setting(8, at_least=1)
    max_retries: int = setting(5, at_least=0)
    timeout: float = setting(120.0, more_than=0)
    budget_usd: float | None = setting(None, at_least=0)
    dry_run: bool = False
    review: bool = False
    feedback: Path | None = None
    embedder: str = "tfidf"
    output: Path = Path("build/annotations.jsonl")
    # persllm.toml only
    max_tokens: int = setting(1024, at_least=1)
    temperature: float = setting(0.7, at_least=0)
    knowledge_words: int = setting(1500, at_least=0)
    style_words: int = setting(500, at_least=0)
    prices: dict[str, list[float]] = field(default_factory=dict)
    review_samples: int = setting(3, at_least=1)
    backoff_seconds: float = setting(1.0, at_least=0)  # first retry waits up to this long; doubles per attempt (with jitter)
