"""What `persllm eval` works on: its settings, the test items and the systems compared."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from persllm_cli.core.settings import setting
from persllm_cli.data import metrics
from persllm_cli.model.runs import RunInfo


@dataclass
class EvalSettings:
    run: list[Path] = field(default_factory=list)
    test: Path = Path("build/test.jsonl")
    api_model: str | None = None
    base_url: str | None = None
    pool: list[Path] = field(default_factory=list)
    judge: str | None = None
    judge_base_url: str | None = None
    judge_max_tokens: int = setting(512, at_least=1)
    max_new_tokens: int = setting(256, at_least=1)
    batch_size: int = setting(8, at_least=1)
    temperature: float = setting(0.0, at_least=0)
    limit: int | None = setting(None, at_least=1)
    max_pairs: int = setting(2000, at_least=1)
    seed: int = 0
    tokenize: str = setting("auto", choices=metrics.TOKENIZE_CHOICES)
    timeout: float = setting(120.0, more_than=0)
    concurrency: int = setting(8, at_least=1)
    max_retries: int = setting(5, at_least=0)
    budget_usd: float | None = setting(None, at_least=0)
    json_output: bool = False
    output: Path | None = None
    # persllm.toml only
    backoff_seconds: float = setting(1.0, at_least=0)  # first retry of an API request waits up to this long (doubles, jittered)


@dataclass
class TestItem:
    id: str
    persona: str
    stage: str
    pattern: str
    question: str
    reference: str


@dataclass
class System:
    """One column of the comparison: a trained run or a prompted API model."""

    name: str
    kind: str                     # "run" or "api"
    model: str
    persona: str
    labels: dict[str, str]        # stage id -> label
    dir: Path                     # holds answers.jsonl and judge.jsonl
    info: RunInfo | None = None
    description: str = ""
    fingerprint: str = ""         # what made the answers; a change means they are made again

    @property
    def answers_path(self) -> Path:
        return self.dir / "answers.jsonl"
