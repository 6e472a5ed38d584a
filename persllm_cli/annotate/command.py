"""`persllm annotate`: persona Q&A records from the project's material, written by an LLM.

For each knowledge paragraph of each selected stage (or each line of --instructions), retrieve
knowledge and style context of the same stage, ask the annotator for a question in the chosen
pattern and the persona's answer, and append one record per item to build/annotations.jsonl.
The concurrent runner (runner.py) does retries, accounting, the budget and resume.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.core.project import Project, Stage
from persllm_cli.data.corpus import Paragraph, read_paragraphs
from persllm_cli.core.errors import EXIT_PARTIAL, PersllmError
from persllm_cli.data.records import Record, record_id
from persllm_cli.data.store import read_text, resume_state
from persllm_cli.data.lock import hold
from persllm_cli.llm.pricing import Price, Spend, pricing
from persllm_cli.llm.progress import dry_run, summary
from persllm_cli.llm.registry import default_model, make_backend
from persllm_cli.llm.runner import Item, RunnerSettings, pending, run_items
from persllm_cli.annotate.annotator import Annotator, Job, sidecar


def _rel(project: Project, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(project.root).as_posix()
    except ValueError:
        return str(path)


def read_feedback(path: Path | None) -> list[str]:
    if path is None:
        return []
    text = read_text(Path(path))
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def read_instructions(path: Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line, conversation ending with the user's instruction) per instruction: txt one per line,
    or JSONL with `messages` (or `instruction`/`prompt` strings)."""
    text = read_text(Path(path))
    out: list[tuple[int, list[dict[str, str]]]] = []
    jsonl = Path(path).suffix.lower() in (".jsonl", ".json")
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            out.append((i, [{"role": "user", "content": line.strip()}]))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PersllmError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if msgs is None and isinstance(obj, dict):
            one = obj.get("instruction") or obj.get("prompt")
            msgs = [{"role": "user", "content": one}] if isinstance(one, str) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise PersllmError(f"{path}:{i}: expected an object with messages: [{{role, content}}, ...]")
        users = [j for j, m in enumerate(msgs) if m.get("role") == "user"]
        if not users:
            raise PersllmError(f"{path}:{i}: no user message")
        conv = [{"role": m["role"], "content": m["content"]} for m in msgs[: users[-1] + 1] if m.get("role") != "system"]
        out.append((i, conv))
    if not out:
        raise PersllmError(f"{path}: no instructions in the file (it is empty)")
    return out


def plan(project: Project, s: AnnotateSettings) -> list[Item]:
    """Every item of the run (done or not), in order, with its context: validates all inputs."""
    from persllm_cli.data.embedding import get_embedder
    from persllm_cli.data.retrieval import Index

    stages = project.select_stages(s.stages)
    instructions = read_instructions(s.instructions) if s.instructions else None
    shared = get_embedder(s.embedder)
    fresh = (lambda: get_embedder(s.embedder)) if s.embedder == "tfidf" else (lambda: shared)
    material: list[tuple[Stage, Path, list[Paragraph], list[Paragraph]]] = []
    for st in stages:  # read everything first: a bad file stops the run before any request
        kfile, sfile = project.knowledge_file(st), project.style_file(st)
        know = read_paragraphs(kfile)
        style = read_paragraphs(sfile, required=False)
        if not style:
            console.warn(f"{_rel(project, sfile)} is missing or empty: answers get no style examples")
        material.append((st, kfile, know, style))
    items: list[Item] = []
    for st, kfile, know, style in material:
        kidx, sidx = Index(know, fresh()), Index(style, fresh())
        # Every item's context at once (one embedding and a few matrix products per stage).
        if instructions is not None:
            src_file = _rel(project, s.instructions)
            queries = [conv[-1]["content"] for _, conv in instructions]
            kls, sls = kidx.contexts(queries, s.knowledge_words), sidx.contexts(queries, s.style_words)
            for (line, conv), query, kl, sl in zip(instructions, queries, kls, sls):
                job = Job(st, "instruction", 0, {"file": src_file, "line": line, "text": query}, kl, sl,
                          kidx.text(kl), sidx.text(sl), instruction=conv)
                items.append(Item(record_id(project.name, st.id, "instruction", src_file, line, 0), job))
            continue
        src_file = _rel(project, kfile)
        queries = [p.text for p in know]
        kls = kidx.contexts(queries, s.knowledge_words, [p.line for p in know])
        sls = sidx.contexts(queries, s.style_words)
        for p, kl, sl in zip(know, kls, sls):
            for k in range(s.questions_per_paragraph):
                job = Job(st, s.pattern, k, {"file": src_file, "line": p.line, "text": p.text}, kl, sl,
                          kidx.text(kl), sidx.text(sl))
                items.append(Item(record_id(project.name, st.id, s.pattern, src_file, p.line, k), job))
    return items


def _dry_run(items: list[Item], ann: Annotator, s: AnnotateSettings, model: str, price: Price, output: Path) -> int:
    todo, skipped = pending(items, output, s.limit)
    dry_run(model, [ann.messages(it) for it in todo], skipped, s.max_tokens, price)
    return 0


def _review(items: list[Item], backend: Any, ann: Annotator, rs: RunnerSettings, spend: Spend, price: Price,
            output: Path, standards: list[str]) -> None:
    """Show the first answers and take 'ok' or a standard; repeat on fresh items until 'ok'."""
    done_ids: set[str] = set()
    while True:
        shown: list[Record] = []
        batch = RunnerSettings(**{**rs.__dict__, "limit": ann.s.review_samples})
        run_items([it for it in items if it.id not in done_ids], backend, build_messages=ann.messages,
                  parse=ann.parse, make_record=ann.record, output=output, settings=batch, price=price,
                  on_record=shown.append, request_options=ann.options, spend=spend)
        done_ids.update(r["id"] for r in shown)
        ok = [r for r in shown if r["status"] == "ok"]
        if not ok:
            return
        for r in ok:
            console.info(f"\n[{r['stage']}] Q: {r['messages'][0]['content']}")
            if r.get("analysis"):
                console.info(f"   analysis: {r['analysis']}")
            console.info(f"   A: {r['messages'][-1]['content']}")
        console.info("\nType ok to go on, or a standard to add to the instructions:")
        line = sys.stdin.readline()
        answer = line.strip()
        if not line or answer.lower() in ("", "ok", "y", "yes"):
            return
        standards.append(answer)
        console.note(f"standard added: {answer}")


LONG_LOCAL_PROMPT = 1000   # tokens; beyond this a CPU takes seconds per item just to read the prompt


def _local_notice(project: Project, s: AnnotateSettings, backend: Any, ann: Annotator, items: list[Item]) -> None:
    """On CPU, say once when the default context budgets make long prompts (the defaults stay)."""
    import os

    keys = ("knowledge_words", "style_words")
    chosen = any(k in project.section("annotate") or f"PERSLLM_ANNOTATE_{k.upper()}" in os.environ for k in keys)
    if chosen or getattr(backend, "device", None) != "cpu" or not items:
        return
    longest = max(backend.prompt_tokens(ann.messages(it), ann.options(it)["stage_token"]) for it in items[:8])
    if longest > LONG_LOCAL_PROMPT:
        console.note(f"prompts run to {longest:,} tokens with the default context budgets "
                     f"({s.knowledge_words}/{s.style_words} words), slow for a local model on CPU; smaller "
                     "budgets go much faster, e.g. PERSLLM_ANNOTATE_KNOWLEDGE_WORDS=300 "
                     "PERSLLM_ANNOTATE_STYLE_WORDS=100 (or knowledge_words/style_words in [annotate])")


def run(project: Project, s: AnnotateSettings) -> int:
    """Annotate; returns the exit code (0 all ok, 3 some failed or left for a rerun)."""
    from persllm_cli.annotate import batch

    t0 = time.perf_counter()
    mode = batch.chosen(s)   # --batch-file, --batch-results or --batch; None: live
    model = s.model or default_model(s.backend)
    standards = read_feedback(s.feedback)
    items = plan(project, s)
    ann = Annotator(project, s, standards)
    output = Path(s.output)
    if mode is not None:
        return batch.run(mode, project, s, items, ann, model, output, t0)
    cost = pricing(model, s.prices, backend=s.backend)
    price = cost.price
    if s.dry_run:
        if cost.note:
            console.note(cost.note)
        return _dry_run(items, ann, s, model, price, output)
    with hold(output):  # one writer per output: a second run exits 1 (or waits with --wait)
        return _run(project, s, t0, model, standards, items, ann, output, cost)


def _run(project: Project, s: AnnotateSettings, t0: float, model: str, standards: list[str], items: list[Item],
         ann: Annotator, output: Path, cost: Any) -> int:
    price = cost.price
    backend = make_backend(s.backend, model, s.base_url, s.timeout)
    backend.check()
    if s.backend == "local":
        _local_notice(project, s, backend, ann, items)
    rs = RunnerSettings(concurrency=s.concurrency, max_retries=s.max_retries, max_tokens=s.max_tokens,
                        temperature=s.temperature, limit=s.limit, backoff_base=s.backoff_seconds)
    spend = Spend(budget_usd=s.budget_usd)  # what --review's samples spend comes off the rest of the run
    before = resume_state(output).ok if output.exists() else set()
    if s.review and s.limit != 0:
        _review(items, backend, ann, rs, spend, price, output, standards)
        if s.limit is not None:
            done_now = len(resume_state(output).ok - before)
            rs.limit = max(0, s.limit - done_now)
    def write_sidecar(last_run: dict[str, Any]) -> None:
        sidecar(project, s, output, model, len(items), standards, price, time.perf_counter() - t0, last_run)

    try:
        stats = run_items(items, backend, build_messages=ann.messages, parse=ann.parse, make_record=ann.record,
                          output=output, settings=rs, price=price, request_options=ann.options, spend=spend)
    except KeyboardInterrupt:
        write_sidecar({"interrupted": True})  # an interrupted run's sidecar still counts what the file now holds
        raise
    write_sidecar(stats.as_dict())
    if stats.planned == 0 and stats.skipped == len(items):
        console.info(f"nothing to do: all {stats.skipped} items are already in {output}")
    else:
        summary(stats)
    if cost.note:
        console.note(cost.note)
    if stats.stopped == "budget":
        console.warn(f"budget of ${s.budget_usd} reached: {stats.not_sent} item(s) not sent; "
                     "rerun with a higher --budget-usd to continue")
        return EXIT_PARTIAL
    if stats.failed:
        console.warn(f"{stats.failed} item(s) failed after retries; rerun to retry them")
        return EXIT_PARTIAL
    return 0
