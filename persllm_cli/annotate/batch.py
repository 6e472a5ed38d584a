"""annotate's batch modes: the live run's requests sent another way, its records made the same way.

- `--batch-file FILE`: the pending requests (those `--dry-run` counts) as Batch API lines; nothing sent.
- `--batch-results FILE`: a batch's results (the Batch API's, or `vllm run-batch`'s) imported as records.
- `--batch`: both through the server's Batch API in one command, polled until done.

The prompts are the live path's (`Annotator.messages`), the request body the live client's
(`chat_body`), and every result goes through the live path's parser and record (llm/batch.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from persllm_cli.annotate.annotator import Annotator, public, sidecar
from persllm_cli.core import console
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data.lock import hold
from persllm_cli.llm import batch_command
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.llm.batch import Batch
from persllm_cli.llm.openai_compat import chat_body
from persllm_cli.llm.pricing import batch_pricing
from persllm_cli.llm.progress import dry_run
from persllm_cli.llm.runner import Item, pending

# What shaped the requests and how their replies are read: a batch left open under other
# settings is not collected with these (the model and the server are added).
FINGERPRINT = ("stages", "pattern", "cot", "time_prefix", "questions_per_paragraph", "instructions", "max_tokens",
               "temperature", "knowledge_words", "style_words", "embedder")


def chosen(s: AnnotateSettings) -> str | None:
    """The batch mode asked for, or None for a live run."""
    return batch_command.chosen(s, backend=s.backend, review=s.review, dry_run=s.dry_run)


def make_batch(s: AnnotateSettings, ann: Annotator, model: str, output: Path) -> Batch:
    price = batch_pricing(model, s.prices, s.batch_prices).price
    return Batch("annotate", model,
                 body=lambda it: chat_body(model, ann.messages(it), s.max_tokens, s.temperature),
                 parse=ann.parse, make_record=ann.record, output=output, price=price, max_tokens=s.max_tokens)


def run(mode: str, project: Project, s: AnnotateSettings, items: list[Item], ann: Annotator, model: str,
        output: Path, t0: float) -> int:
    b = make_batch(s, ann, model, output)
    todo, skipped = pending(items, output, s.limit)
    note = batch_pricing(model, s.prices, s.batch_prices).note
    try:
        if s.dry_run:   # --batch or --batch-file with --dry-run: the estimate at the batch price only
            dry_run(f"{model}, at the batch price", [ann.messages(it) for it in todo], skipped, s.max_tokens,
                    b.price)
            return 0
        if mode == "batch_file":
            return batch_command.write_file(Path(s.batch_file), b, todo, skipped, budget_usd=s.budget_usd,
                                            command="annotate", settings=public(s, model))
        with hold(output):  # one writer per output, as the live run
            return _import(project, s, b, items, todo, skipped, ann, mode, t0)
    finally:
        if note:
            console.note(note)


def _import(project: Project, s: AnnotateSettings, b: Batch, items: list[Item], todo: list[Item], skipped: int,
            ann: Annotator, mode: str, t0: float) -> int:
    left = 0
    if mode == "batch_results":
        st = batch_command.import_file(Path(s.batch_results), b, items)
        last_run: dict[str, Any] = {"batch_results": str(s.batch_results)}
    else:
        public_ = public_settings(s)
        st, account, left = batch_command.send(
            b, todo, items, skipped, base_url=s.base_url, timeout=s.timeout, max_retries=s.max_retries,
            backoff=s.backoff_seconds, poll_seconds=s.batch_poll_seconds, budget_usd=s.budget_usd,
            fingerprint={k: public_[k] for k in FINGERPRINT})
        if st is None:
            return 0
        last_run = {"batch": account}
    sidecar(project, s, b.output, b.model, len(items), ann.standards, b.price, time.perf_counter() - t0,
            {**last_run, **st.as_dict()})
    return batch_command.exit_code(st, left)
