"""The batch modes as a command runs them (annotate, dpo --mode generate): which one was asked
for, and each one's whole course with what it says on stderr.

- `--batch-file FILE`: `write_file` writes the pending requests (what --dry-run counts) and their
  sidecar, prints the estimate at the batch price and how to go on; nothing is sent.
- `--batch-results FILE`: `import_file` imports a results file (batch.py) and shows what it did.
- `--batch`: `send` sends the pending requests through the server's Batch API (batch_api.py), or
  continues the batch open for the output, and imports its results.

The caller holds the output's lock around the last two, as its live run does, and writes its
output's sidecar; `exit_code` turns what happened into the command's exit code.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_PARTIAL, EXIT_USAGE, PersllmError
from persllm_cli.data.sidecars import write_meta
from persllm_cli.llm.batch import (MAX_BYTES, MAX_REQUESTS, Batch, Imported, check_imported, import_results,
                                   show_imported, write_requests)
from persllm_cli.llm.runner import Item

MODES = ("batch_file", "batch_results", "batch")


def chosen(settings: Any, *, backend: str, review: bool = False, dry_run: bool = False) -> str | None:
    """The batch mode `settings` ask for (its fields batch_file, batch_results, batch), or None
    for a live run; a mix that cannot work is a usage error (exit 2)."""
    modes = [m for m in MODES if getattr(settings, m)]
    flags = [f"--{m.replace('_', '-')}" for m in modes]
    if len(modes) > 1:
        raise PersllmError(f"{' and '.join(flags)} do not go together: write, import or send, one at a time",
                           EXIT_USAGE)
    if not modes:
        return None
    if backend != "openai":
        raise PersllmError(f"{flags[0]} makes OpenAI-compatible chat requests, not --backend {backend}: for a "
                           "model on a GPU machine, write --batch-file with --model NAME and run it there with "
                           "vllm run-batch", EXIT_USAGE)
    if review:
        raise PersllmError(f"--review shows answers as they come, which a batch does not: drop {flags[0]} "
                           "or --review", EXIT_USAGE)
    if dry_run and modes[0] == "batch_results":
        raise PersllmError("--dry-run sends nothing and --batch-results imports: drop one of them", EXIT_USAGE)
    return modes[0]


def write_file(path: Path, b: Batch, todo: list[Item], skipped: int, *, budget_usd: float | None,
               command: str, settings: dict[str, Any]) -> int:
    """`--batch-file`: the pending requests into `path` (and its sidecar), with the estimate."""
    path = Path(path)
    if not todo:
        console.info(f"nothing to do: all {skipped} items are already in {b.output}; {path} not written")
        return 0
    t0 = time.perf_counter()
    written = write_requests(path, b, todo, budget_usd=budget_usd)
    est = written.estimate
    if est.requests == 0:
        path.unlink(missing_ok=True)
        raise PersllmError(f"the budget of ${budget_usd} does not cover one request at its worst case; "
                           f"raise --budget-usd ({path} not written)")
    write_meta(path, command=f"{command} --batch-file", settings=settings, counts={
        "requests": est.requests, "skipped": skipped, "over_budget": written.over_budget, "bytes": written.bytes},
        seconds=time.perf_counter() - t0,
        extra={"estimate_usd": round(est.typical_usd, 6), "most_usd": round(est.most_usd, 6),
               "price_per_million": [b.price.input, b.price.output], "output": str(b.output)})
    console.table(f"batch file: {path} ({b.model}, at the batch price; nothing sent)", ["", "value"],
                  est.rows(skipped) + [["file size", f"{written.bytes / 2**20:,.1f} MiB"]])
    if written.over_budget:
        console.warn(f"{written.over_budget} request(s) left out: with them the worst case would pass --budget-usd")
    if est.requests > MAX_REQUESTS or written.bytes > MAX_BYTES:
        console.warn(f"{est.requests:,} requests in {written.bytes / 2**20:,.0f} MiB: more than one Batch API file "
                     "takes (50,000 requests, 200 MB); fine for vllm run-batch, else write it in parts with --limit")
    again = command_line(drop=("--batch-file",))
    console.info(f"wrote {est.requests} request(s) to {path}. Send them with `{again} --batch` (the Batch API, "
                 f"all in one), or on a GPU machine with `vllm run-batch -i {path} -o results.jsonl --model "
                 f"{b.model}` (the model the requests name: --model), then import the results with: {again} "
                 "--batch-results results.jsonl")
    return 0


def import_file(path: Path, b: Batch, items: list[Item]) -> Imported:
    """`--batch-results`: import `path` into `b.output`; shows the counts. Matching nothing is exit 1."""
    st = import_results([Path(path)], b, {it.id: it for it in items})
    check_imported(st, [Path(path)])
    show_imported(st, str(path))
    return st


def send(b: Batch, todo: list[Item], items: list[Item], skipped: int, *, base_url: str | None, timeout: float,
         max_retries: int, backoff: float, poll_seconds: float, budget_usd: float | None,
         fingerprint: dict[str, Any]) -> tuple[Imported | None, dict[str, Any], int]:
    """`--batch`: send `todo` as one batch through the Batch API of the server (or continue the
    batch open for `b.output`), wait for it and import its results. Returns (what was imported,
    None when nothing was to do; the batch's account; items still to do after it). Ctrl-C leaves
    the batch running and says how to continue; `fingerprint` (the settings that shaped the
    requests, JSON-ready) must match to continue one."""
    from persllm_cli.llm.batch_api import BatchApi, OpenBatch, run_batch
    from persllm_cli.llm.registry import make_backend

    backend = make_backend("openai", b.model, base_url, timeout)   # no key: one line, exit 1
    api = BatchApi(backend, max_retries=max_retries, backoff=backoff)  # type: ignore[arg-type]
    opened: list[str] = []
    try:
        imported, account = run_batch(b, todo, {it.id: it for it in items}, api=api, state=OpenBatch(b.output),
                                      fingerprint={"model": b.model, "server": api.where, **fingerprint},
                                      poll_seconds=poll_seconds, budget_usd=budget_usd, skipped=skipped,
                                      on_open=opened.append)
    except KeyboardInterrupt:
        if opened:
            console.warn(f"batch {opened[-1]} keeps running at {api.where}; to wait for it and import its "
                         f"results, run again (from {Path.cwd()}): {command_line()}")
        raise
    if imported is None:
        console.info(f"nothing to do: all {skipped} items are already in {b.output}")
        return None, {}, 0
    show_imported(imported, f"batch {account['batch_id']} ({account['status']})")
    unanswered = max(0, account["requests"] - imported.matched)
    if account["status"] != "completed" or unanswered:
        console.warn(f"batch {account['batch_id']} ended {account['status']} with {unanswered} request(s) "
                     "unanswered; rerun to send what is still to do in a new batch")
    if account.get("left_out"):
        console.warn(f"{account['left_out']} item(s) were left for a later batch; rerun to send them")
    return imported, account, account.get("left_out", 0) + unanswered


def exit_code(st: Imported, left: int = 0) -> int:
    """3 when items failed (now, or in the same results imported before) or are left to do, else 0."""
    failed = st.failed + st.unchanged   # unchanged records are failed ones: ok ones count as already_ok
    if failed:
        console.warn(f"{failed} item(s) failed; rerun (live, or with a new batch) to retry them")
    return EXIT_PARTIAL if failed or left else 0


def command_line(drop: tuple[str, ...] = ()) -> str:
    """This run's command line, for a hint to run it again (`drop`: flags left out, with their value)."""
    out: list[str] = []
    skip = False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in drop:
            skip = "=" not in a
            continue
        out.append(a)
    return "persllm " + shlex.join(out)
