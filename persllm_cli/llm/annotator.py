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
from persllm_cli.llm.registry import BACKENDS, BACKENDS_HELP


@dataclass(frozen=True)
class AnnotateSettings:
    stages: list[str] | None = setting(None, help='Stage to annotate; repeat for several (default: all).')
    pattern: str = setting("ordinary", choices=PATTERNS,
                           help='Question pattern: ordinary, error (false premise to reject) or thought (opinion).')
    cot: bool = setting(False,
                        help='Ask for an analysis before the answer (stored apart; only the answer is trained on).')
    time_prefix: bool = setting(True, help='Tell the annotator "Now it is {stage label}."')
    questions_per_paragraph: int = setting(1, at_least=1, help='Questions per seed paragraph.')
    limit: int | None = setting(None, at_least=0, help='At most N new records in this run, over all stages.')
    instructions: Path | None = setting(None,
                                        help="Answer these general instructions in the persona's voice instead (txt, one per line, or JSONL with messages).")
    backend: str = setting("openai", choices=BACKENDS,
                           help=f"{BACKENDS_HELP}.")
    model: str | None = setting(None,
                                help='Annotator model: an API model name, or for --backend local smollm2-135m, a model dir or runs/NAME.')
    base_url: str | None = setting(None,
                                   help='OpenAI-compatible server URL (else OPENAI_BASE_URL). The key is read from OPENAI_API_KEY only.')
    concurrency: int = setting(8, at_least=1, help='Requests in flight at once.')
    max_retries: int = setting(5, at_least=0, help='Retries per item before it is recorded as failed.')
    timeout: float = setting(120.0, more_than=0, help=(
        "Longest silence inside an API reply, in seconds: replies stream, and a slow one that keeps coming "
        "is never cut (the first token may take max(300, 5 x S))."))
    budget_usd: float | None = setting(None, at_least=0,
                                       help='Stop cleanly before spending more than this many dollars.')
    dry_run: bool = setting(False, help='Send nothing; print the requests, tokens and dollars the run would take.')
    review: bool = setting(False, help='Show the first answers and ask: ok, or a standard to add.')
    feedback: Path | None = setting(None, help='Standards to add to the instructions, one per line.')
    embedder: str = setting("tfidf", help='Retrieval embedder: tfidf or st:NAME (sentence-transformers).')
    output: Path = setting(Path("build/annotations.jsonl"), help='Output JSONL (appended; reruns resume).')
    batch_file: Path | None = setting(None, help=(
        "Write the pending requests to FILE as OpenAI Batch API lines (for the Batch API or vllm run-batch) "
        "and print their estimate at the batch price; nothing is sent."))
    batch_results: Path | None = setting(None, help=(
        "Import a batch's results (the Batch API's output or error file, or vllm run-batch's output) "
        "as records, exactly as live replies; rerun-safe."))
    batch: bool = setting(False, help=(
        "Send the pending requests as one batch through the server's Batch API (/v1/files, /v1/batches), "
        "wait for it and import the results; Ctrl-C leaves it running and the next run continues it."))
    # persllm.toml only
    max_tokens: int = setting(1024, at_least=1)
    temperature: float = setting(0.7, at_least=0)
    knowledge_words: int = setting(1500, at_least=0)
    style_words: int = setting(500, at_least=0)
    prices: dict[str, list[float]] = field(default_factory=dict)
    review_samples: int = setting(3, at_least=1)
    backoff_seconds: float = setting(1.0, at_least=0)  # first retry waits up to this long; doubles per attempt (with jitter)
    batch_prices: dict[str, list[float]] = field(default_factory=dict)   # [annotate.batch_prices]: price of a batch request
    batch_poll_seconds: float = setting(30.0, more_than=0)  # --batch asks for the batch's state this often
