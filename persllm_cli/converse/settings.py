"""`persllm converse`'s settings: its flags, `[converse]` in persllm.toml and PERSLLM_CONVERSE_*
variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.settings import setting


@dataclass(frozen=True)
class ConverseSettings:
    speakers: list[str] | None = setting(None,
                                         help="Two or more speakers: runs/NAME@STAGE (a trained run at a stage), PROJECT_DIR@STAGE (its runs/latest), api:MODEL@STAGE (MODEL prompted as this project's persona, with retrieval over its material) or api:MODEL:PROJECT_DIR@STAGE (another project's). Without @STAGE: the last stage.")
    scene: str | None = setting(None,
                                help='The opening context every speaker sees (required to start; a rerun may leave it out).')
    turns: int = setting(6, at_least=1, help='Turns in the whole conversation, all speakers together.')
    first: int = setting(1, at_least=1, help='Which speaker opens (1 = the first given); then round robin.')
    output: Path = setting(Path("build/converse.jsonl"),
                           help='Transcript JSONL, one record per turn, with FILE.md beside it; rerunning with the same file continues the conversation.')
    max_new_tokens: int = setting(128, at_least=1, help='Longest line, in tokens.')
    temperature: float = setting(0.7, at_least=0, help='Sampling temperature; 0 for greedy.')
    seed: int | None = setting(None, help='Seed for sampling on this machine (trained runs).')
    no_repeat_ngram: int = setting(
        4, at_least=0,
        help="Trained runs never say a run of N tokens already in what they see (the scene, the conversation so far, "
             "their own line), so a small model cannot echo the other speaker or loop; 0 turns it off. "
             "api: speakers sample as their server does.")
    base_url: str | None = setting(None,
                                   help='Server URL for api: speakers (else OPENAI_BASE_URL). The key is read from OPENAI_API_KEY only.')
    judge: str | None = setting(None,
                                help='Judge model (OpenAI-compatible): a verdict per turn on whether the speaker stayed in character and in its stage.')
    judge_base_url: str | None = setting(None,
                                         help='Server URL for --judge. [default: --base-url, else OPENAI_BASE_URL]')
    timeout: float = setting(120.0, more_than=0, help=(
        "Longest silence inside an API reply, in seconds (the first token may take max(300, 5 x S))."))
    max_retries: int = setting(5, at_least=0, help='Retries of a failed API request, with backoff.')
    budget_usd: float | None = setting(None, at_least=0,
                                       help="Stop cleanly (exit 3) before this run's API requests (speakers and judge) would cost more than this many dollars.")
    dry_run: bool = setting(False,
                            help='Send nothing and load nothing; print the requests, tokens and dollars the API turns would take.')
    # persllm.toml only
    backoff_seconds: float = setting(1.0, at_least=0)
