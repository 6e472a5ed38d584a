"""annotate's batch modes: the live run's requests sent another way, its records made the same way.

- `--batch-file FILE`: the pending requests (those `--dry-run` counts) as Batch API lines; nothing sent.
- `--batch-results FILE`: a batch's results (the Batch API's, or `vllm run-batch`'s) imported as records.
- `--batch`: both through the server's Batch API in one command, polled until done.

The prompts are the live path's (`Annotator.messages`), the request body the live client's
(`chat_body`), and every result goes through the live path's parser and record (llm/batch.py).
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

from persllm_cli.annotate.command import Annotator, pending, public, sidecar
from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_PARTIAL, EXIT_USAGE, PersllmError
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data.lock import hold
from persllm_cli.data.records import write_meta
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.llm.batch import (MAX_BYTES, MAX_REQUESTS, Batch, check_imported, import_results, show_imported,
                                   write_requests)
from persllm_cli.llm.openai_compat import chat_body
from persllm_cli.llm.pricing import batch_pricing
from persllm_cli.llm.progress import dry_run
from persllm_cli.llm.runner import Item

MODES = ("batch_file", "batch_results", "batch")


def chosen(s: AnnotateSettings) -> str | None:
    """The batch mode asked for (None: the live run); an impossible mix is a usage error."""
    modes = [m for m in MODES if getattr(s, m)]
    flags = [f"--{m.replace('_', '-')}" for m in modes]
    if len(modes) > 1:
        raise PersllmError(f"{' and '.join(flags)} do not go together: write, import or send, one at a time",
                           EXIT_USAGE)
    if not modes:
        return None
    if s.backend != "openai":
        raise PersllmError(f"{flags[0]} makes OpenAI-compatible chat requests, not --backend {s.backend}: for a "
                           "model on a GPU machine, write --batch-file with --model NAME and run it there with "
                           "vllm run-batch", EXIT_USAGE)
    if s.review:
        raise PersllmError(f"--review shows answers as they come, which a batch does not: drop {flags[0]} "
                           "or --review", EXIT_USAGE)
    if s.dry_run and modes[0] == "batch_results":
        raise PersllmError("--dry-run sends nothing and --batch-results imports: drop one of them", EXIT_USAGE)
    return modes[0]


def make_batch(s: AnnotateSettings, ann: Annotator, model: str, output: Path) -> Batch:
    price = batch_pricing(model, s.prices, s.batch_prices).price
    return Batch("annotate", model,
                 body=lambda it: chat_body(model, ann.messages(it), s.max_tokens, s.temperature),
                 parse=ann.parse, make_record=ann.record, output=output, price=price, max_tokens=s.max_tokens)


def run(mode: str, project: Project, s: AnnotateSettings, items: list[Item], ann: Annotator, model: str,
        output: Path, t0: float) -> int:
    b = make_batch(s, ann, model, output)
    note = batch_pricing(model, s.prices, s.batch_prices).note
    if s.dry_run:   # --batch or --batch-file with --dry-run: the estimate at the batch price, nothing written
        todo, skipped = pending(items, output, s.limit)
        dry_run(f"{model}, at the batch price", [ann.messages(it) for it in todo], skipped, s.max_tokens, b.price)
        return _noted(note, 0)
    if mode == "batch_file":
        return _noted(note, write_file(s, b, items, model))
    with hold(output):  # one writer per output, as the live run
        if mode == "batch_results":
            return _noted(note, import_file(project, s, b, items, ann, t0))
        return _noted(note, send(project, s, b, items, ann, t0))


def _noted(note: str, code: int) -> int:
    if note:
        console.note(note)
    return code


def write_file(s: AnnotateSettings, b: Batch, items: list[Item], model: str) -> int:
    todo, skipped = pending(items, b.output, s.limit)
    path = Path(s.batch_file)
    if not todo:
        console.info(f"nothing to do: all {skipped} items are already in {b.output}; {path} not written")
        return 0
    t0 = time.perf_counter()
    written = write_requests(path, b, todo, budget_usd=s.budget_usd)
    est = written.estimate
    if est.requests == 0:
        path.unlink(missing_ok=True)
        raise PersllmError(f"the budget of ${s.budget_usd} does not cover one request at its worst case; "
                           f"raise --budget-usd ({path} not written)")
    write_meta(path, command="annotate --batch-file", settings=public(s, model), counts={
        "requests": est.requests, "skipped": skipped, "over_budget": written.over_budget, "bytes": written.bytes},
        seconds=time.perf_counter() - t0,
        extra={"estimate_usd": round(est.typical_usd, 6), "most_usd": round(est.most_usd, 6),
               "price_per_million": [b.price.input, b.price.output], "output": str(b.output)})
    console.table(f"batch file: {path} ({model}, at the batch price; nothing sent)", ["", "value"],
                  est.rows(skipped) + [["file size", f"{written.bytes / 2**20:,.1f} MiB"]])
    if written.over_budget:
        console.warn(f"{written.over_budget} request(s) left out: with them the worst case would pass --budget-usd")
    if est.requests > MAX_REQUESTS or written.bytes > MAX_BYTES:
        console.warn(f"{est.requests:,} requests in {written.bytes / 2**20:,.0f} MiB: more than one Batch API file "
                     "takes (50,000 requests, 200 MB); fine for vllm run-batch, else write it in parts with --limit")
    again = _command_line(drop=("--batch-file",))
    console.info(f"wrote {est.requests} request(s) to {path}. Run them with the Batch API (or `persllm annotate "
                 f"--batch`, which does it all) or with `vllm run-batch -i {path} -o results.jsonl --model {model}`, "
                 f"then import the results with: {again} --batch-results results.jsonl")
    return 0


def import_file(project: Project, s: AnnotateSettings, b: Batch, items: list[Item], ann: Annotator,
                t0: float) -> int:
    path = Path(s.batch_results)
    st = import_results([path], b, {it.id: it for it in items})
    check_imported(st, [path])
    show_imported(st, str(path))
    sidecar(project, s, b.output, b.model, len(items), ann.standards, b.price, time.perf_counter() - t0,
            {"batch_results": str(path), **st.as_dict()})
    return _exit(st.failed + st.unchanged, 0)   # unchanged: failed records imported before


def send(project: Project, s: AnnotateSettings, b: Batch, items: list[Item], ann: Annotator, t0: float) -> int:
    from persllm_cli.llm.batch_api import BatchApi, OpenBatch, run_batch
    from persllm_cli.llm.registry import make_backend

    todo, skipped = pending(items, b.output, s.limit)
    model = b.model
    backend = make_backend("openai", model, s.base_url, s.timeout)   # no key: one line, exit 1
    api = BatchApi(backend, max_retries=s.max_retries, backoff=s.backoff_seconds)
    opened: list[str] = []
    try:
        imported, account = run_batch(b, todo, {it.id: it for it in items}, api=api, state=OpenBatch(b.output),
                                      fingerprint=_fingerprint(s, model, api.where),
                                      poll_seconds=s.batch_poll_seconds, budget_usd=s.budget_usd,
                                      skipped=skipped, on_open=opened.append)
    except KeyboardInterrupt:
        if opened:
            console.warn(f"batch {opened[-1]} keeps running at {api.where}; to wait for it and import its "
                         f"results, run again (from {Path.cwd()}): {_command_line()}")
        raise
    if imported is None:
        console.info(f"nothing to do: all {skipped} items are already in {b.output}")
        return 0
    show_imported(imported, f"batch {account['batch_id']} ({account['status']})")
    sidecar(project, s, b.output, model, len(items), ann.standards, b.price, time.perf_counter() - t0,
            {"batch": account, **imported.as_dict()})
    unanswered = account["requests"] - imported.matched
    if account["status"] != "completed" or unanswered > 0:
        console.warn(f"batch {account['batch_id']} ended {account['status']} with {max(0, unanswered)} request(s) "
                     "unanswered; rerun to send what is still to do in a new batch")
    left = account.get("left_out", 0)
    if left:
        console.warn(f"{left} item(s) were left for a later batch; rerun to send them")
    return _exit(imported.failed + imported.unchanged, left + max(0, unanswered))


def _exit(failed: int, left: int) -> int:
    if failed:
        console.warn(f"{failed} item(s) failed; rerun (live, or with a new batch) to retry them")
    return EXIT_PARTIAL if failed or left else 0


def _fingerprint(s: AnnotateSettings, model: str, where: str) -> dict[str, Any]:
    """What shaped the requests and how their replies are read: a batch open under other
    settings is not collected with these."""
    keep = ("stages", "pattern", "cot", "time_prefix", "questions_per_paragraph", "instructions", "max_tokens",
            "temperature", "knowledge_words", "style_words", "embedder")
    public = public_settings(s)
    return {"model": model, "server": where, **{k: public[k] for k in keep}}


def _command_line(drop: tuple[str, ...] = ()) -> str:
    """This run's command line, for a hint to run it again (`drop`: flags left out, with their value)."""
    args = sys.argv[1:]
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop:
            skip = "=" not in a
            continue
        out.append(a)
    return "persllm " + shlex.join(out)
