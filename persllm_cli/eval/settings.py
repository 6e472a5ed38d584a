"""`persllm eval`'s settings: its flags, `[eval]` in persllm.toml and PERSLLM_EVAL_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.settings import setting
from persllm_cli.data import metrics


@dataclass(frozen=True)
class EvalSettings:
    run: list[Path] = setting([],
                              help='Run directories to evaluate side by side, e.g. runs/sft runs/sft-dpo. [default: runs/latest, unless --api-model is given]')
    test: Path = setting(Path("build/test.jsonl"), help='Test records (questions with reference answers).')
    train: Path = setting(Path("build/train.jsonl"), help=(
        "Training records: their answers, labelled by stage (with the project's material), fit the stage "
        "classifier of the stage-fidelity figures."))
    swap_questions: int = setting(20, at_least=0, help=(
        "Test questions asked again at every other stage, for the stage-swap figures (0: none)."))
    api_model: str | None = setting(None,
                                    help='Also evaluate this OpenAI-compatible model, prompted with the persona and stage (a baseline without training).')
    base_url: str | None = setting(None,
                                   help='Server URL for --api-model (else OPENAI_BASE_URL). The key is read from OPENAI_API_KEY only.')
    pool: list[Path] = setting([],
                               help="Answers of other personas (JSONL with persona and messages, e.g. another project's eval answers) for cross-persona BLEU; repeatable.")
    judge: str | None = setting(None, help=(
        "Judge model (OpenAI-compatible): compares each answer with the reference in both orders, checks "
        "false-premise questions were rejected, scores knowledge (0-5), ranks attitude across systems, and "
        "checks later stages' knowledge does not leak into earlier ones."))
    judge_base_url: str | None = setting(None,
                                         help='Server URL for --judge. [default: --base-url, else OPENAI_BASE_URL]')
    judge_max_tokens: int = setting(512, at_least=1)
    max_new_tokens: int = setting(256, at_least=1, help='Longest answer, in tokens.')
    batch_size: int = setting(8, at_least=1, help='Questions generated together.')
    temperature: float = setting(0.0, at_least=0, help='Sampling temperature; 0 is greedy and repeatable.')
    limit: int | None = setting(None, at_least=1, help='Evaluate only the first N test questions.')
    max_pairs: int = setting(2000, at_least=1, help='Answer pairs per BLEU group before sampling.')
    seed: int = setting(0, help='Seed for sampling answer pairs.')
    tokenize: str = setting("auto", choices=metrics.TOKENIZE_CHOICES,
                            help='BLEU/ROUGE tokenizer: auto (zh or char for CJK text, else 13a), 13a, zh, char, intl.')
    timeout: float = setting(120.0, more_than=0, help=(
        "Longest silence inside an API reply, in seconds (the first token may take max(300, 5 x S))."))
    concurrency: int = setting(8, at_least=1, help='API requests in flight at once (judge and --api-model).')
    max_retries: int = setting(5, at_least=0,
                               help='Retries of a failed API request or a reply without a verdict, with backoff (Retry-After honoured).')
    # persllm.toml / PERSLLM_EVAL_LEAK_QUESTIONS only
    leak_questions: int = setting(20, at_least=0, help="With --judge: questions from later stages asked at each "
                                  "earlier stage, to measure time leakage (0: none).")
    budget_usd: float | None = setting(None, at_least=0,
                                       help="Stop cleanly before this run's API requests (--api-model and --judge together) would cost more than this many dollars.")
    json_output: bool = setting(False, help='Print all metrics as JSON on stdout.')
    output: Path | None = setting(None,
                                  help='Folder for answers and the report. [default: <run>/eval/ for answers; the report there with one run, else build/eval/]')
    # persllm.toml only
    backoff_seconds: float = setting(1.0, at_least=0)  # first retry of an API request waits up to this long (doubles, jittered)
