"""Answers for `persllm eval`, from a Speaker (persona/): a trained run answering in batches, or
a prompted API model answering through the concurrent runner. Both append to the system's
answers.jsonl; a rerun only asks what has no fresh answer (see `generate`)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from persllm_cli.core import console
from persllm_cli.eval.items import System, TestItem
from persllm_cli.eval.settings import EvalSettings
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.core.settings import public_settings
from persllm_cli.llm.protocol import Completion, redact_url
from persllm_cli.llm.pricing import Pricing, Spend, pricing
from persllm_cli.llm.registry import API, make_backend
from persllm_cli.llm.runner import Item, Malformed, RunnerSettings, Usage, run_items
from persllm_cli.model.generate import Sampling
from persllm_cli.persona.api import ApiSpeaker
from persllm_cli.persona.speaker import RunSpeaker, Speaker


def _answer_all_api(speaker: ApiSpeaker, system: System, items: list[TestItem], path: Path, s: EvalSettings,
                    price: Pricing, on_record: Callable[[records.Record], None],
                    budget: Spend | None = None) -> Spend:
    """The prompted baseline's answers to `items` (all of them: the caller has left out the fresh
    ones), appended to `path`. They go through the concurrent runner (retries, Retry-After,
    accounting), not in batches."""
    def parse(_item: Item, c: Completion) -> str:
        if not c.text.strip():
            raise Malformed("empty answer")
        return c.text.strip()

    def make_record(it: Item, text: str | None, usage: Usage, error: str | None) -> records.Record:
        extra = usage.as_dict()
        extra["cost_usd"] = price.cost(usage.cost_usd)
        return _answer_record(system, it.data, text, speaker.name, extra, error)

    rs = RunnerSettings(concurrency=s.concurrency, max_retries=s.max_retries,
                        max_tokens=s.max_new_tokens, temperature=s.temperature,
                        backoff_base=s.backoff_seconds, title=f"answering ({system.name})")
    budget = budget if budget is not None else Spend()
    spend = budget.part(priced=price.known)
    run_items([Item(i.id, i) for i in items], speaker.backend,
              build_messages=lambda it: speaker.messages([{"role": "user", "content": it.data.question}],
                                                         it.data.stage),
              parse=parse, make_record=make_record, output=path, settings=rs, price=price.price,
              on_record=on_record, resume=False, spend=spend)
    budget.add(spend)
    return spend


def _answer_record(system: System, item: TestItem, text: str | None, model: str, extra: dict[str, Any],
                   error: str | None = None) -> records.Record:
    ok = bool(text and text.strip())
    extra = {**extra, "stage_token": False} if item.no_token else extra
    return {"id": item.id, "persona": system.persona, "stage": item.stage or None, "pattern": item.pattern,
            "messages": [{"role": "user", "content": item.question}]
                        + ([{"role": "assistant", "content": text}] if ok else []),
            "generator": {"system": system.name, "kind": system.kind, "model": model,
                          "fingerprint": system.fingerprint, **extra},
            "status": "ok" if ok else "failed", "error": None if ok else (error or "no answer")}


def open_speaker(system: System, s: EvalSettings, prices: dict[str, list[float]] | None = None) -> Speaker:
    """The speaker that answers for `system`: a trained run (loaded now), or the prompted API model."""
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature)
    if system.kind == "run":
        assert system.info is not None
        speaker = RunSpeaker(system.info.path, sampling)
        speaker.load()
        return speaker
    backend = make_backend(API, system.model, s.base_url, s.timeout)
    backend.check()
    stages = [(sid, label) for sid, label in system.labels.items()]
    return ApiSpeaker(backend, system.persona, system.description, stages, sampling)


def generate(system: System, items: list[TestItem], s: EvalSettings, open_gen: Callable[..., Speaker] | None = None,
             prices: dict[str, list[float]] | None = None,
             budget: Spend | None = None) -> tuple[dict[str, records.Record], int, Spend | None]:
    """Answer every item not answered yet, appending to the system's answers.jsonl.

    Returns the latest answer record per test id (of these items), how many have no answer, and
    what an API generator spent. The generator is only opened (a model loaded, a server checked)
    when something is left to answer."""
    path = system.answers_path
    state = store.resume_state(path)
    fresh = {rid for rid in state.ok
             if (state.records[rid].get("generator") or {}).get("fingerprint") == system.fingerprint}
    pending = [i for i in items if i.id not in fresh]
    stale = sum(1 for i in pending if i.id in state.ok)
    if stale:
        console.note(f"{system.name}: {stale} saved answer(s) came from another version of the model or other "
                     "generation settings; answering them again")
    spend = None
    if pending:
        speaker = (open_gen or open_speaker)(system, s, prices)

        def keep(rec: records.Record) -> None:
            state.records[rec["id"]] = rec

        if isinstance(speaker, ApiSpeaker):
            if any(i.no_token for i in pending):
                raise ValueError("a prompted API model has no stage token to leave out")
            spend = _answer_all_api(speaker, system, pending, path, s, pricing(system.model, prices), keep, budget)
        else:
            _answer_in_batches(system, speaker, pending, path, s.batch_size, keep)
        sidecars.write_meta(path, command="eval", settings=_sidecar_settings(s), inputs=[s.test],
                           counts={"answered": len(pending), "items": len(items)},
                           extra={"system": system.name, "model": system.model})
    ids = {i.id for i in items}
    got = {k: r for k, r in state.records.items() if k in ids}
    failed = sum(1 for i in items if got.get(i.id, {}).get("status") != "ok")
    return got, failed, spend


def _answer_in_batches(system: System, speaker: Speaker, pending: list[TestItem], path: Path, batch_size: int,
                       keep: Callable[[records.Record], None]) -> None:
    """A local model: stage by stage (one time token per batch; the no-token items together, with
    None for the stage: no token at all), `batch_size` questions at a time."""
    by_stage: dict[str | None, list[TestItem]] = defaultdict(list)
    for i in pending:
        by_stage[None if i.no_token else i.stage].append(i)
    with store.Appender(path) as out, console.progress() as bar:
        task = bar.add_task(f"answering ({system.name})", total=len(pending))
        for stage, group in by_stage.items():
            for k in range(0, len(group), batch_size):
                batch = group[k:k + batch_size]
                t0 = time.perf_counter()
                texts = speaker.answer_batch([[{"role": "user", "content": i.question}] for i in batch], stage)
                if len(texts) != len(batch):
                    raise RuntimeError(f"generator returned {len(texts)} answers for {len(batch)} questions")
                secs = (time.perf_counter() - t0) / len(batch)
                for item, text in zip(batch, texts):
                    rec = _answer_record(system, item, text, speaker.name, {"seconds": round(secs, 3)})
                    out.append(rec)
                    keep(rec)
                bar.advance(task, len(batch))


def _sidecar_settings(s: EvalSettings) -> dict[str, Any]:
    settings = public_settings(s)
    for key in ("base_url", "judge_base_url"):
        if settings.get(key):
            settings[key] = redact_url(settings[key])
    return settings
