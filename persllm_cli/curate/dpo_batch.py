"""`dpo --mode generate` in a batch: the rejected answers' requests written as a batch file
(`--batch-file`), a batch's results imported into the work file (`--batch-results`), or both
through the server's Batch API (`--batch`); then the pairs are written as after a live run.

The requests are the live run's (`dpo_generate.plan`'s messages, the live client's body), and each
result becomes the work record the live run writes: dpo_generate hands over its own `parse`,
`make_record` and `write_pairs` (so this module does not import it back), at the batch price. The
work file stays append-only and resumable either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from persllm_cli.core import console
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.curate.settings import DpoSettings
from persllm_cli.data.lock import hold
from persllm_cli.data.records import Record
from persllm_cli.llm import batch_command
from persllm_cli.llm.batch import Batch
from persllm_cli.llm.openai_compat import chat_body
from persllm_cli.llm.pricing import batch_pricing
from persllm_cli.llm.progress import dry_run
from persllm_cli.llm.runner import Item, pending


def run(mode: str, project: Project, s: DpoSettings, ann: Any, inputs: list[Record], items: list[Item],
        work: Path, budget: float | None, started: float, *, parse: Callable[..., Any],
        make_record: Callable[..., Record], write_pairs: Callable[..., int]) -> int:
    """`ann` is dpo_generate's Client; `parse`, `make_record` and `write_pairs` are its live run's."""
    a = ann.settings
    cost = batch_pricing(ann.model, a.prices, a.batch_prices)
    b = Batch("dpo generate", ann.model,
              body=lambda it: chat_body(ann.model, it.data.messages, a.max_tokens, a.temperature),
              parse=parse, make_record=make_record,
              output=work, price=cost.price, max_tokens=a.max_tokens)
    todo, skipped = pending(items, work)
    try:
        if s.dry_run:
            dry_run(f"{ann.model}, at the batch price", [it.data.messages for it in todo], skipped, a.max_tokens,
                    cost.price)
            return 0
        if mode == "batch_file":
            settings = public_settings(s)
            settings.update(ann.public())
            return batch_command.write_file(Path(s.batch_file), b, todo, skipped, budget_usd=budget,
                                            command="dpo --mode generate", settings=settings)
        with hold(s.output):   # guards the work file too, as the live run
            left = 0
            if mode == "batch_results":
                st = batch_command.import_file(Path(s.batch_results), b, items)
                last_run = {"batch_results": str(s.batch_results), **st.as_dict()}
            else:
                imported, account, left = batch_command.send(
                    b, todo, items, skipped, base_url=ann.base_url, timeout=a.timeout, max_retries=a.max_retries,
                    backoff=a.backoff_seconds, poll_seconds=a.batch_poll_seconds, budget_usd=budget,
                    fingerprint={"input": str(s.input), "max_tokens": a.max_tokens, "temperature": a.temperature})
                if imported is None:
                    console.info(f"(the answers are in {work})")
                    return write_pairs(project, s, ann, inputs, items, work, cost.price, started, {})
                st = imported
                last_run = {"batch": account, **imported.as_dict()}
            code = write_pairs(project, s, ann, inputs, items, work, cost.price, started, last_run)
            return max(code, batch_command.exit_code(st, left))
    finally:
        if cost.note:
            console.note(cost.note)
