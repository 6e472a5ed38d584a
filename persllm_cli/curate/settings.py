"""The settings of the curation commands: dedup, split and dpo (one frozen dataclass each; their
fields are the flags, `[dedup]`, `[split]` and `[dpo]` in persllm.toml and PERSLLM_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.settings import setting
from persllm_cli.llm.registry import BACKENDS

MODES = ("retrieve", "generate")


@dataclass(frozen=True)
class DedupSettings:
    input: Path = setting(Path("build/annotations.jsonl"), help='Annotations JSONL.')
    output: Path = setting(Path("build/dedup.jsonl"), help='')
    threshold: float = setting(0.95, more_than=0, at_most=1,
                               help='Drop a question whose cosine similarity to a kept one reaches this.')
    embedder: str = setting("tfidf", help='tfidf or st:NAME.')
    within_stage: bool = setting(False, help="Compare a question only with the kept questions of its own stage, so the same "
                                             "question answered at several stages (annotate --instructions) stays at each.")


@dataclass(frozen=True)
class SplitSettings:
    input: Path = setting(Path("build/dedup.jsonl"), help='')
    test_size: float = setting(0.2, more_than=0, less_than=1, help='Share of records in the test set.')
    seed: int = setting(0, help='')
    train_output: Path = setting(Path("build/train.jsonl"), help='')
    test_output: Path = setting(Path("build/test.jsonl"), help='')


@dataclass(frozen=True)
class DpoSettings:
    input: Path = setting(Path("build/train.jsonl"), help='')
    pool: list[Path] = setting([], help='Answers of other personas to draw rejected answers from; repeatable.')
    skip: int = setting(5, at_least=0, help='Pass over this many nearest questions first.')
    mode: str = setting("retrieve", choices=MODES,
                        help="retrieve (another stage's answer to a similar question) or generate (ask the annotator with another stage's material).")
    output: Path = setting(Path("build/dpo.jsonl"), help='')
    backend: str | None = setting(None, choices=BACKENDS,
                                  help=f"For --mode generate: {' or '.join(BACKENDS)} (else [annotate] settings).")
    model: str | None = setting(None, help='For --mode generate: the annotator model.')
    base_url: str | None = setting(None, help='For --mode generate: OpenAI-compatible server URL.')
    concurrency: int | None = setting(None, at_least=1, help='For --mode generate: requests in flight.')
    budget_usd: float | None = setting(None, at_least=0,
                                       help='For --mode generate: stop cleanly before spending more than this many dollars.')  # --mode generate; else [annotate] budget_usd
    dry_run: bool = setting(False,
                            help='For --mode generate: send nothing; print the requests, tokens and dollars it would take.')  # --mode generate
    embedder: str = setting("tfidf",
                            help='For --mode retrieve: question similarity, tfidf or st:NAME.')  # question similarity for --mode retrieve
    batch_file: Path | None = setting(None, help=(
        "For --mode generate: write the pending requests to FILE as OpenAI Batch API lines (for the Batch API "
        "or vllm run-batch); nothing is sent."))
    batch_results: Path | None = setting(None, help=(
        "For --mode generate: import a batch's results (the Batch API's or vllm run-batch's), then write the pairs."))
    batch: bool = setting(False, help=(
        "For --mode generate: send the pending requests as one batch through the server's Batch API, wait for "
        "it, import the results and write the pairs; Ctrl-C leaves it running and the next run continues it."))
