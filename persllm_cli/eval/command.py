"""`persllm eval`: answer the test questions with trained runs (or a prompted API model), then
measure distinction, overlap with the references and, optionally, an LLM judge's verdicts.

Flow: validate every input (test set, runs, pools, judge) -> generate the missing answers per
system (eval_answers.py: a run in batches per stage, an API model through the runner), appending
to `answers.jsonl` (a rerun skips answered ids)
-> metrics (metrics.py) -> judge (judge.py) -> table on stderr, `--json` on stdout, and
eval.md / eval.png / eval.json (evalreport.py).

Where files go:
  answers   <run>/eval/answers.jsonl (and judge.jsonl) for a run; build/eval/api-<model>/ for
            --api-model; with -o DIR: DIR/<system>/answers.jsonl.
  report    with one system, next to its answers; with several, build/eval/; with -o, DIR.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.eval import answers as eval_answers
from persllm_cli.eval import fidelity, judge, protocols
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.data.lock import hold
from persllm_cli.core.project import Project, check_stage
from persllm_cli.core.errors import EXIT_PARTIAL, PersllmError
from persllm_cli.llm.protocol import Backend
from persllm_cli.llm.pricing import Spend, price_table, pricing
from persllm_cli.llm.registry import API, make_backend
from persllm_cli.llm.runner import RunnerSettings
from persllm_cli.eval.items import System, TestItem
from persllm_cli.eval.settings import EvalSettings
from persllm_cli.model.runs import read_run, resolve_run


# ---------------------------------------------------------------- inputs


def read_test(path: Path, limit: int | None) -> list[TestItem]:
    recs = store.read_records(path, what="test records")
    items, dropped = [], Counter()
    for r in recs:
        why = records.unusable_reason(r) or (None if isinstance(r.get("id"), str) else "no id")
        why = why or (None if isinstance(r.get("stage"), str) else "no stage")
        if why:
            dropped[why] += 1
            continue
        items.append(TestItem(id=r["id"], persona=str(r.get("persona") or ""), stage=r["stage"],
                              pattern=str(r.get("pattern") or "ordinary"),
                              question=records.question(r), reference=records.answer(r)))
    if dropped:
        console.warn(f"{path}: left out {sum(dropped.values())} unusable record(s) "
                     f"({', '.join(f'{k}: {v}' for k, v in sorted(dropped.items()))})")
    if not items:
        raise PersllmError(f"{path}: no usable test records (each needs an id, a stage, a question and an answer)")
    items = list({i.id: i for i in items}.values())  # a repeated id: the last record wins
    return items[:limit] if limit is not None else items


def read_pools(paths: list[Path]) -> dict[str, list[str]]:
    """Answers of other personas, by persona, from answer or record files (records marked
    failed and records without an answer are left out; a missing status counts as ok)."""
    pools: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for i, r in enumerate(store.read_records(path, what="answers"), start=1):
            text = records.answer(r)
            if r.get("status", "ok") != "ok" or not text or not text.strip():
                continue
            persona = r.get("persona")
            if not isinstance(persona, str) or not persona.strip():
                raise PersllmError(f"{path}: record {i} has no persona; --pool files need a persona field per record")
            pools[persona.strip()].append(text)
    return dict(pools)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "model"


def systems_for(project: Project | None, s: EvalSettings, items: list[TestItem]) -> list[System]:
    root = project.root if project else Path.cwd()
    default_persona = project.name if project else Counter(i.persona for i in items).most_common(1)[0][0]
    project_labels = {st.id: st.label for st in project.stages} if project else {}
    run_dirs = [resolve_run(r, project) for r in s.run]
    if not run_dirs and not s.api_model:
        run_dirs = [resolve_run(None, project)]
    out: list[System] = []
    names: Counter[str] = Counter()
    needed = sorted({i.stage for i in items})
    for d in run_dirs:
        info = read_run(d)
        ids = [x["id"] for x in info.stages]
        for st in needed:  # every stage the test set asks at, the run must have
            try:
                check_stage(st, ids)
            except PersllmError as e:
                raise PersllmError(f"run {d}: {e}; the test set asks at that stage") from None
        name = d.name
        names[name] += 1
        if names[name] > 1:
            name = f"{name}#{names[name]}"
        sysdir = s.output / _slug(name) if s.output else d / "eval"
        out.append(System(name=name, kind="run", model=str(info.data.get("base", "?")),
                          persona=str(info.data.get("persona") or default_persona),
                          labels={st["id"]: st.get("label", st["id"]) for st in info.stages}, dir=sysdir, info=info,
                          fingerprint=_fingerprint(sidecars.file_sha256(d / "run.json"), s)))
    if s.api_model:
        name = f"api:{s.api_model}"
        sysdir = (s.output or root / "build" / "eval") / _slug(f"api-{s.api_model}")
        order = [st for st in project_labels if st in needed] + [st for st in needed if st not in project_labels]
        labels = {st: project_labels.get(st, st) for st in order}
        out.append(System(name=name, kind="api", model=s.api_model, persona=default_persona, labels=labels, dir=sysdir,
                          description=project.description if project else "",
                          fingerprint=_fingerprint(f"api:{s.api_model}", s)))
    return out


def _fingerprint(source: str, s: EvalSettings) -> str:
    """Answers depend on the model (run.json changes when a run is trained again) and on how it
    was asked to answer; the stage prompts are part of the model or of the template."""
    key = f"{source}|max_new_tokens={s.max_new_tokens}|temperature={s.temperature}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def stage_order(project: Project | None, systems: list[System], items: list[TestItem]) -> list[str]:
    """The test set's stages from earliest to latest: the project's order, else the first system's."""
    order = [st.id for st in project.stages] if project else list(systems[0].labels) if systems else []
    used = {i.stage for i in items}
    return [st for st in order if st in used] + sorted(used - set(order))


def leak_items(order: list[str], items: list[TestItem], per_stage: int, seed: int) -> list[TestItem]:
    """For every stage with a later one: up to `per_stage` questions of later stages' test items
    (their references hold the later knowledge), to be asked at that earlier stage. False-premise
    items are left out (their premise is untrue at any stage). Chosen with a generator seeded by
    (seed, stage), so a rerun asks the same ones. Ids: leak:<earlier stage>:<test id>."""
    out = []
    for k, stage in enumerate(order):
        later = set(order[k + 1:])
        pool = [i for i in items if i.stage in later and i.pattern != "error"]
        if not pool or per_stage <= 0:
            continue
        chosen = {i.id for i in random.Random(f"{seed}|leak|{stage}").sample(pool, min(per_stage, len(pool)))}
        out += [TestItem(id=f"leak:{stage}:{i.id}", persona=i.persona, stage=stage, pattern=protocols.LEAK,
                         question=i.question, reference=i.reference, later_stage=i.stage)
                for i in pool if i.id in chosen]
    return out


NO_TOKEN = "notoken:"   # the id prefix of a leak question answered with no stage token


def no_token_items(leaks: list[TestItem]) -> list[TestItem]:
    """The leak questions once each, to be answered by a trained run with no stage token (ids
    notoken:<test id>). Without a token the answer does not depend on the stage it is checked
    against, so a question chosen for several earlier stages is answered once; the judge then
    checks that one answer against each of those stages (`leak-notoken:<stage>:<test id>`)."""
    out: dict[str, TestItem] = {}
    for i in leaks:
        tid = i.id.split(":", 2)[2]
        out.setdefault(tid, TestItem(id=NO_TOKEN + tid, persona=i.persona, stage="", pattern=protocols.LEAK,
                                     question=i.question, reference=i.reference, later_stage=i.later_stage,
                                     no_token=True))
    return list(out.values())


# ---------------------------------------------------------------- the command


def run(project: Project | None, s: EvalSettings) -> int:
    """Validate everything, generate what is missing, score, judge, report."""
    t0 = time.perf_counter()
    if project is None and not Path(s.test).exists():
        raise PersllmError(f"not inside a persllm project (no persllm.toml here or above) and no {s.test}; "
                           "run eval in a project, pass -C DIR, or name a --test file")
    items = read_test(Path(s.test), s.limit)
    systems = systems_for(project, s, items)
    pools = read_pools(s.pool)
    prices = price_table(project)
    judge_backend = None
    if s.judge:
        judge_backend = make_backend(API, s.judge, s.judge_base_url or s.base_url, s.timeout)
        judge_backend.check()

    # One writer per answers/verdicts folder: a second eval of the same run exits 1 (or waits with
    # --wait) instead of asking for the same answers twice. Sorted, so two waiting evals never deadlock.
    with ExitStack() as locks:
        for folder in sorted({system.dir.resolve() for system in systems}):
            locks.enter_context(hold(folder))
        return _run(project, s, t0, items, systems, pools, prices, judge_backend)


def _run(project: Project | None, s: EvalSettings, t0: float, items: list[TestItem], systems: list[System],
         pools: dict[str, list[str]], prices: Any, judge_backend: Any) -> int:
    answers: dict[str, dict[str, records.Record]] = {}
    spends: dict[str, Spend] = {}
    failed_total = 0
    budget = Spend(budget_usd=s.budget_usd)
    if s.budget_usd is not None:
        for model in {m for m in (s.api_model, s.judge) if m}:
            if not pricing(model, prices).known:
                console.note(f"no price known for {model!r}: --budget-usd cannot limit its requests "
                             "(add it under [annotate.prices] in persllm.toml)")
    order = stage_order(project, systems, items)
    leaks = leak_items(order, items, s.leak_questions, s.seed) if s.judge else []
    swaps = fidelity.swap_items(order, items, s.swap_questions, s.seed)  # stage fidelity: always, no judge
    # A trained run also answers the leak questions with no stage token: the leak rate without
    # the tokens is what the tokens are measured against.
    bare = no_token_items(leaks)
    leak_answers: dict[str, dict[str, records.Record]] = {}
    swap_answers: dict[str, dict[str, records.Record]] = {}
    item_ids = {i.id for i in items}
    for system in systems:
        asked = items + swaps + leaks + (bare if system.kind == "run" else [])
        got, failed, spend = eval_answers.generate(system, asked, s, prices=prices, budget=budget)
        answers[system.name] = {k: r for k, r in got.items() if k in item_ids}
        swap_answers[system.name] = {k: r for k, r in got.items() if k.startswith(fidelity.SWAP)}
        leak_answers[system.name] = {k: r for k, r in got.items() if k not in item_ids}
        if spend is not None:
            spends[system.name] = spend
        failed_total += failed
        if failed:
            console.warn(f"{system.name}: {failed} question(s) without an answer; rerun to retry them")

    from persllm_cli.eval import report as evalreport

    result = evalreport.score(systems, items, answers, pools, s)
    report_dir = s.output or (systems[0].dir if len(systems) == 1 else (project.root if project else Path.cwd()) / "build" / "eval")
    fidelity.add(result, report_dir, project, s.train, order, systems, items,
                 {name: {**answers[name], **swap_answers[name]} for name in answers})
    if judge_backend is not None:
        failed_total += judge_all(judge_backend, systems, items, answers, s, result, prices, budget,
                                  leaks=leaks, leak_answers=leak_answers, shared_dir=report_dir)
    if budget.budget_hit:
        console.warn(f"budget of ${s.budget_usd} reached: some requests were not sent; "
                     "rerun with a higher --budget-usd to continue (answers and verdicts so far are kept)")
    for name, spend in spends.items():
        result["systems"][name]["generation_spend"] = spend.as_dict()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    evalreport.write(report_dir, result, s)
    if failed_total:
        return EXIT_PARTIAL
    return 0


def judge_all(backend: Backend, systems: list[System], items: list[TestItem],
              answers: dict[str, dict[str, records.Record]], s: EvalSettings, result: dict[str, Any],
              prices: dict[str, list[float]] | None = None, budget: Spend | None = None, *,
              leaks: list[TestItem] | None = None, leak_answers: dict[str, dict[str, records.Record]] | None = None,
              shared_dir: Path | None = None) -> int:
    """Ask the judge about every answered item of every system; fill result['systems'][*]['judge'].

    First every test item is classified (knowledge, attitude or neither; kept in
    <shared_dir>/judge_items.jsonl with the attitude rankings, which span all systems); then per
    system the pairwise comparison, false premises, knowledge scores and leak checks (the system's
    judge.jsonl; a trained run's leak questions both with the stage token and without one); then
    the attitude items are ranked across systems."""
    leaks, leak_answers = leaks or [], leak_answers or {}
    shared = (shared_dir or systems[0].dir) / "judge_items.jsonl"
    store.make_dirs(shared.parent)
    total, new = Spend(), Spend()
    failed = 0
    persona = systems[0].persona
    labels: dict[str, str] = {}
    for system in reversed(systems):
        labels.update(system.labels)

    def settings(title: str) -> RunnerSettings:
        return RunnerSettings(concurrency=s.concurrency, max_retries=s.max_retries,
                              backoff_base=s.backoff_seconds, title=title)

    def account(recs: dict[str, records.Record], spend: Spend) -> None:
        total.add(judge.total_spend(recs))
        new.add(spend)

    kw = dict(max_tokens=s.judge_max_tokens, pricing=pricing(backend.model, prices), budget=budget)
    questions = [judge.TestQuestion(test_id=i.id, persona=persona, stage_label=labels.get(i.stage, i.stage),
                                    question=i.question, reference=i.reference) for i in items]
    categories, class_recs, spend = judge.classify(backend, questions, shared, settings=settings("classifying items"), **kw)
    account(class_recs, spend)
    unclassified = len(items) - len(categories)
    failed += unclassified
    for system in systems:
        jitems = []
        for i in items:
            r = answers[system.name].get(i.id)
            if r and r.get("status") == "ok":
                jitems.append(protocols.Answered(test_id=i.id, persona=system.persona,
                                                 stage_label=system.labels.get(i.stage, i.stage), pattern=i.pattern,
                                                 question=i.question, reference=i.reference, answer=records.answer(r),
                                                 category=categories.get(i.id), stage=i.stage))
        for i in leaks:
            # With the stage's token (leak:<stage>:<test id>), and for a trained run the same
            # question answered with no token, judged against the same stage (leak-notoken:...).
            tid = i.id.split(":", 2)[2]
            for no_token, rid, jid in ((False, i.id, i.id), (True, NO_TOKEN + tid, f"leak-notoken:{i.stage}:{tid}")):
                r = leak_answers.get(system.name, {}).get(rid)
                if r and r.get("status") == "ok":
                    jitems.append(protocols.Answered(test_id=jid, persona=system.persona,
                                                     stage_label=system.labels.get(i.stage, i.stage), pattern=i.pattern,
                                                     question=i.question, reference=i.reference, answer=records.answer(r),
                                                     later_label=system.labels.get(i.later_stage, i.later_stage),
                                                     stage=i.stage, no_token=no_token))
        verdicts, spend = judge.run(backend, jitems, system.dir / "judge.jsonl", settings=settings(f"judging ({system.name})"), **kw)
        summary = protocols.summarize(jitems, verdicts, backend.model)
        result["systems"][system.name]["judge"] = summary
        failed += summary["failed"]
        account(verdicts, spend)
    # Attitude items: every system's answer in one request, in a seeded shuffled order.
    attitude = [i for i in items if categories.get(i.id) == "attitude"]
    rank_items = []
    for i in attitude:
        got = {system.name: records.answer(answers[system.name][i.id]) for system in systems
               if answers[system.name].get(i.id, {}).get("status") == "ok"}
        rank_items.append(judge.RankItem(test_id=i.id, persona=persona, stage_label=labels.get(i.stage, i.stage),
                                         question=i.question, reference=i.reference, answers=got))
    ranks: dict[str, dict[str, int]] = {}
    if len(systems) > 1 and rank_items:
        ranks, rank_recs, spend = judge.rank(backend, rank_items, shared, seed=s.seed,
                                             settings=settings("ranking attitude"), **kw)
        account(rank_recs, spend)
        unranked = sum(1 for it in rank_items if len(it.answers) > 1 and it.test_id not in ranks)
        failed += unranked
    for system in systems:
        mine = [r[system.name] for r in ranks.values() if system.name in r]
        summary = result["systems"][system.name]["judge"]
        summary["attitude_items"] = len(mine)
        summary["attitude_rank"] = sum(mine) / len(mine) if mine else None
    counts = Counter(categories.values())
    # Totals cover every verdict in the report (asked now or by an earlier run); this_run is what this run spent.
    result["judge"] = {"model": backend.model, **total.as_dict(), "this_run": new.as_dict(),
                       "classes": {c: counts.get(c, 0) for c in judge.CATEGORIES}, "unclassified": unclassified,
                       "ranked_items": len(ranks), "systems_ranked": len(systems) if len(systems) > 1 else 0,
                       "leak_questions": len(leaks),
                       "leak_notoken_questions": len(no_token_items(leaks)) if any(x.kind == "run" for x in systems) else 0,
                       "items_file": str(shared)}
    if len(systems) == 1 and attitude:
        console.note("attitude ranking needs two or more systems side by side (runs or --api-model); skipped")
    if failed:
        console.warn(f"the judge gave no verdict on {failed} item(s); rerun to ask again")
    return failed
