"""Stage fidelity without a judge: does a system answer as the persona was *at the stage asked*?

Three measures per system, computed from the answers alone (no API, no GPU):

- stage accuracy: a classifier (scikit-learn: TF-IDF of character 3-5-grams, so any language works,
  and a class-balanced logistic regression) is fitted on the training split's answers labelled by
  stage, plus the stage's material (knowledge.txt and style.txt) when the project is at hand: the
  training answers alone are too few to recognise a stage in answers to new questions (on the
  example persona they place the test set's own reference answers at chance). It predicts the stage
  of each answer to a test question asked at that question's stage; accuracy against chance
  (1 / number of stages) and the confusion matrix. The same classifier on the references is the
  ceiling to read it against, and on the test questions themselves the floor: what an answer that
  only repeats its question would score, since a question's topic already belongs to a stage.
- stage swap: up to `swap_questions` test questions are asked again at every other stage (ids
  swap:<stage>:<test id>). Per question: do its answers differ between stages (any two not the
  same text), and is each of them classified as the stage it was asked at? Answers that never
  change with the stage score exactly chance on the second count.
- future terms: a name (data.terms.first_stage: a word the material capitalises inside a sentence,
  or in scripts without capitals a character pair used twice) that first appears in a later
  stage's material, found in an answer given at an earlier stage (test and swapped answers alike)
  and not in the question asked. The rate per pair (stage asked at, stage the name comes from);
  the names are listed in future_terms.jsonl next to eval.md. The references' rate, at their own
  stage, is the floor to read it against.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from persllm_cli.core.project import Project
from persllm_cli.data import corpus, records
from persllm_cli.data import store
from persllm_cli.data.terms import first_stage, future_terms
from persllm_cli.eval.items import System, TestItem

SWAP = "swap:"   # the id prefix of a test question asked at another stage
TERMS_FILE = "future_terms.jsonl"

HOW_TO_READ = (
    "- Stage fidelity (no judge): *stage accuracy* is the share of answers a classifier of stage wording places"
    " at the stage they were asked at; chance is 1 / number of stages, the references' row its ceiling. The"
    " topic of a question already hints at its stage, so accuracy alone does not show that the time token"
    " acts: the *questions (echoed)* row is what answers that only repeat their questions would score. With"
    " few test questions one answer moves it far: the 95% interval says how far, and *p (chance)*"
    " how likely a stage-blind model would score as high by luck. *Stage swap* asks the same questions at"
    " every stage: *answers differ* is the share of questions whose answers are not all the same, *asked"
    " stage recognised* the share of those answers placed at the stage they were asked at (exactly chance"
    " when the answers never change with the stage). *Future terms* is the share of answers at a stage with a"
    " later one that hold a name (a word the material capitalises inside a sentence) first seen in a later"
    " stage's material and not in the question. A name the model makes up, or a later event told without its"
    " names, is not counted; the references' rate is the floor.")

# (label, path in a system's result) for the stderr table and eval.md's main table
ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("stage accuracy %", ("fidelity", "stage_accuracy", "accuracy")),
    ("stage accuracy, chance %", ("fidelity", "stage_accuracy", "chance")),
    ("stage swap: answers differ %", ("fidelity", "swap", "differ")),
    ("stage swap: asked stage recognised %", ("fidelity", "swap", "recognised")),
    ("future terms in earlier answers %", ("fidelity", "leak", "rate")),
]


# ---------------------------------------------------------------- the questions


def swap_items(order: list[str], items: list[TestItem], limit: int, seed: int) -> list[TestItem]:
    """Up to `limit` test questions (chosen with a generator seeded by `seed`, in test-set order),
    each asked at every stage but its own."""
    if limit <= 0 or len(order) < 2:
        return []
    pool = [i for i in items if i.stage in order]
    chosen = {i.id for i in random.Random(f"{seed}|swap").sample(pool, min(limit, len(pool)))}
    return [TestItem(id=f"{SWAP}{stage}:{i.id}", persona=i.persona, stage=stage, pattern=i.pattern,
                     question=i.question, reference=i.reference)
            for i in pool if i.id in chosen for stage in order if stage != i.stage]


def swapped_from(item_id: str) -> str:
    """The test id a swapped question was made from."""
    return item_id[len(SWAP):].split(":", 1)[1]


# ---------------------------------------------------------------- the classifier


class StageClassifier:
    """Character 3-5-grams (TF-IDF) and a class-balanced logistic regression."""

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.pipe = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True),
                                  LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"))

    def fit(self, texts: list[str], stages: list[str]) -> "StageClassifier":
        self.pipe.fit(texts, stages)
        return self

    def predict(self, texts: list[str]) -> list[str]:
        return [str(p) for p in self.pipe.predict(texts)] if texts else []


def training_texts(train: Path, order: list[str], project: Project | None) -> tuple[list[str], list[str], dict[str, int]]:
    """(texts, stages, counts): the training split's answers and, with a project, its material."""
    texts: list[str] = []
    stages: list[str] = []
    counts = {"answers": 0, "material": 0}
    if Path(train).is_file():
        for r in store.read_records(Path(train), what="training records"):
            text = records.answer(r)
            if records.unusable_reason(r) is None and r.get("stage") in order and text and text.strip():
                texts.append(text)
                stages.append(r["stage"])
                counts["answers"] += 1
    for stage, paragraphs in material(project, order).items():
        texts += paragraphs
        stages += [stage] * len(paragraphs)
        counts["material"] += len(paragraphs)
    return texts, stages, counts


def material(project: Project | None, order: list[str]) -> dict[str, list[str]]:
    """Each stage's knowledge and style paragraphs, in chronological order (empty without a project)."""
    if project is None:
        return {}
    out = {}
    for stage in project.stages:
        if stage.id in order:
            out[stage.id] = [p.text for f in (project.knowledge_file(stage), project.style_file(stage))
                             for p in corpus.read_paragraphs(f, required=False)]
    return out


# ---------------------------------------------------------------- the measures


def stage_accuracy(asked: list[str], predicted: list[str], order: list[str]) -> dict[str, Any]:
    """Accuracy (0-100), chance, per-stage accuracy and the confusion matrix (rows: asked, columns:
    predicted, both in `order`)."""
    index = {s: k for k, s in enumerate(order)}
    matrix = [[0] * len(order) for _ in order]
    for a, p in zip(asked, predicted):
        if a in index and p in index:
            matrix[index[a]][index[p]] += 1
    by_stage = {s: {"answers": sum(matrix[k]), "correct": matrix[k][k],
                    "accuracy": _pct(matrix[k][k], sum(matrix[k]))} for s, k in index.items()}
    correct = sum(matrix[k][k] for k in range(len(order)))
    n = len(asked)
    return {"answers": n, "correct": correct, "accuracy": _pct(correct, n),
            "chance": 100.0 / len(order) if order else None,
            "interval": wilson(correct, n), "p_chance": above_chance(correct, n, len(order)),
            "by_stage": by_stage, "confusion": {"stages": list(order), "matrix": matrix}}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """The 95% Wilson score interval of k successes in n, in percent: how far the accuracy of so
    few answers could be from the model's own rate (8 right of 12: 39.1-86.2%)."""
    if n == 0:
        return None
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)]


def above_chance(k: int, n: int, stages: int) -> float | None:
    """One-sided exact binomial p-value: the chance of k or more right answers in n if each answer
    were placed at a stage drawn at random (1 / stages). Small means above chance is unlikely luck
    (8 right of 12 at three stages: 0.019; 6 of 12, 1.5x chance: 0.18)."""
    if n == 0 or stages < 2:
        return None
    q = 1.0 / stages
    return min(1.0, sum(math.comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(k, n + 1)))


def swap_measure(groups: dict[str, dict[str, str]], predicted: dict[tuple[str, str], str],
                 order: list[str]) -> dict[str, Any]:
    """`groups`: test id -> {stage asked: answer} (only questions answered at two or more stages);
    `predicted`: (test id, stage asked) -> the classifier's stage."""
    differ = sum(1 for g in groups.values() if len({" ".join(t.split()) for t in g.values()}) > 1)
    asked = [st for tid, g in groups.items() for st in g]
    pred = [predicted[(tid, st)] for tid, g in groups.items() for st in g]
    recognised = stage_accuracy(asked, pred, order)
    return {"questions": len(groups), "differ": _pct(differ, len(groups)), "differ_count": differ,
            "answers": len(asked), "recognised": recognised["accuracy"], "confusion": recognised["confusion"]}


def leak_measure(answers: list[tuple[str, str, str, str]], order: list[str],
                 first: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`answers`: (answer id, stage asked, question, answer). Returns the rates (overall: answers at
    a stage with a later one that hold a later stage's term; per pair asked>later) and the terms found."""
    pairs = {f"{s}>{t}": {"answers": 0, "leaked": 0} for k, s in enumerate(order) for t in order[k + 1:]}
    found_rows: list[dict[str, Any]] = []
    considered = leaked = 0
    for aid, stage, question, text in answers:
        if stage not in order or order.index(stage) == len(order) - 1:
            continue
        considered += 1
        found = future_terms(text, stage, order, first, question)
        for t in order[order.index(stage) + 1:]:
            pairs[f"{stage}>{t}"]["answers"] += 1
            if t in found:
                pairs[f"{stage}>{t}"]["leaked"] += 1
        if found:
            leaked += 1
            found_rows.append({"id": aid, "asked_at": stage, "terms": found})
    for v in pairs.values():
        v["rate"] = _pct(v["leaked"], v["answers"])
    return {"answers": considered, "leaked": leaked, "rate": _pct(leaked, considered), "by_pair": pairs}, found_rows


def _pct(n: int, d: int) -> float | None:
    return 100.0 * n / d if d else None


# ---------------------------------------------------------------- per system


def score(project: Project | None, train: Path, order: list[str], systems: list[System], items: list[TestItem],
          answers: dict[str, dict[str, records.Record]]) -> tuple[dict[str, Any], dict[str, dict], list[dict]]:
    """(what the measures rest on, with the references' figures; each system's figures; the
    future terms found, one row per answer). `answers`: system -> answer id -> record, test and
    swapped answers together."""
    texts, stages, counts = training_texts(train, order, project)
    basis: dict[str, Any] = {"train": str(train), **counts, "stages": list(order)}
    if len(set(stages)) < 2:
        basis["skipped"] = (f"no training answers of two or more stages in {train}" if project is None
                            else "fewer than two stages with training answers or material")
        return basis, {}, []
    clf = StageClassifier().fit(texts, stages)
    first = first_stage(material(project, order))
    basis["leak"] = "material" if first else "no material (run inside the project)"
    refs = [i for i in items if i.stage in order]
    basis["references"] = {
        "stage_accuracy": stage_accuracy([i.stage for i in refs], clf.predict([i.reference for i in refs]), order),
        "leak": leak_measure([(i.id, i.stage, i.question, i.reference) for i in refs], order, first)[0] if first else None}
    # The questions alone: what a system that echoes each question would score on stage accuracy.
    basis["questions"] = {"stage_accuracy": stage_accuracy([i.stage for i in refs], clf.predict([i.question for i in refs]),
                                                           order)}
    by_id = {i.id: i for i in items}
    per_system: dict[str, dict] = {}
    found_all: list[dict] = []
    for system in systems:
        ok = {k: records.answer(r) or "" for k, r in answers.get(system.name, {}).items() if r.get("status") == "ok"}
        asked = [(k, by_id[k].stage if k in by_id else k[len(SWAP):].split(":", 1)[0]) for k in ok
                 if k in by_id or k.startswith(SWAP)]
        predicted = dict(zip((k for k, _ in asked), clf.predict([ok[k] for k, _ in asked])))
        test = [(k, st) for k, st in asked if k in by_id and st in order]
        groups: dict[str, dict[str, str]] = defaultdict(dict)
        where: dict[tuple[str, str], str] = {}
        for k, st in asked:
            if k.startswith(SWAP):
                tid = swapped_from(k)
                if tid in ok:
                    groups[tid][by_id[tid].stage] = ok[tid]
                    where[(tid, by_id[tid].stage)] = predicted[tid]
                groups[tid][st] = ok[k]
                where[(tid, st)] = predicted[k]
        groups = {tid: g for tid, g in groups.items() if len(g) > 1}
        leak, found = leak_measure([(k, st, by_id[k if k in by_id else swapped_from(k)].question, ok[k])
                                    for k, st in asked], order, first) if first else (None, [])
        found_all += [{"system": system.name, **row} for row in found]
        per_system[system.name] = {
            "stage_accuracy": stage_accuracy([st for _, st in test], [predicted[k] for k, _ in test], order),
            "swap": swap_measure(groups, where, order), "leak": leak}
    return basis, per_system, found_all


# ---------------------------------------------------------------- eval.md


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _span(v: list[float] | None) -> str:
    return "-" if not v else f"{v[0]:.1f}-{v[1]:.1f}"


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.2g}"


def bounds(basis: dict[str, Any]) -> str:
    """One line to read the systems' stage accuracy against: the references' ceiling and the questions' floor."""
    ref, questions = basis["references"]["stage_accuracy"], basis["questions"]["stage_accuracy"]
    return (f"stage accuracy to read against: the test set's own answers {_f(ref['accuracy'])}%, the questions alone"
            f" {_f(questions['accuracy'])}% (what answers that only repeat them would score), chance {_f(ref['chance'])}%")


def markdown(result: dict[str, Any]) -> list[str]:
    """The section of eval.md on stage fidelity (empty when it was not measured)."""
    basis = result.get("fidelity")
    if not basis:
        return []
    lines = ["## Stage fidelity (no judge)", ""]
    if basis.get("skipped"):
        return lines + [f"Not measured: {basis['skipped']}.", ""]
    ref, questions = basis["references"], basis["questions"]
    lines += [f"A stage classifier (character 3-5-grams, logistic regression) was fitted on {basis['answers']} training"
              f" answers and {basis['material']} material paragraphs. On the test set's own reference answers it names"
              f" the stage {_f(ref['stage_accuracy']['accuracy'])}% of the time (chance"
              f" {_f(ref['stage_accuracy']['chance'])}%): the most a system's answers can be expected to reach."
              f" On the test questions themselves it names the stage {_f(questions['stage_accuracy']['accuracy'])}%"
              " of the time: what answers that only repeat their questions would score, with no sense of time.", "",
              "| system | stage accuracy % | 95% interval | chance % | p (chance) | swapped questions |"
              " answers differ % | asked stage recognised % | future terms % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("references", {"stage_accuracy": ref["stage_accuracy"], "swap": None, "leak": ref.get("leak")}),
            ("questions (echoed)", {"stage_accuracy": questions["stage_accuracy"], "swap": None, "leak": None})]
    rows += [(name, v["fidelity"]) for name, v in result["systems"].items() if v.get("fidelity")]
    for name, f in rows:
        sw = f.get("swap") or {}
        acc = f["stage_accuracy"]
        lines.append(f"| {name} | {_f(acc['accuracy'])} | {_span(acc.get('interval'))} | {_f(acc['chance'])} |"
                     f" {_p(acc.get('p_chance'))} | {_f(sw.get('questions'))} | {_f(sw.get('differ'))} |"
                     f" {_f(sw.get('recognised'))} | {_f((f.get('leak') or {}).get('rate'))} |")
    stages = basis["stages"]
    for name, f in rows:
        m = f["stage_accuracy"]["confusion"]["matrix"]
        lines += ["", f"Confusion, {name} (rows: stage asked at; columns: stage the classifier names):", "",
                  "| asked \\ named | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
        lines += [f"| {st} | " + " | ".join(str(x) for x in m[k]) + " |" for k, st in enumerate(stages)]
    pair_rows = [(name, pair, v) for name, f in rows if f.get("leak") for pair, v in f["leak"]["by_pair"].items()]
    if pair_rows:
        lines += ["", f"Future terms by stage pair (the terms found: `{TERMS_FILE}`):", "",
                  "| system | asked at | term first in | answers | with such a term | % |", "|---|---|---|---:|---:|---:|"]
        for name, pair, v in pair_rows:
            at, later = pair.split(">")
            lines.append(f"| {name} | {at} | {later} | {v['answers']} | {v['leaked']} | {_f(v['rate'])} |")
    return lines + [""]


def add(result: dict[str, Any], report_dir: Path, project: Project | None, train: Path, order: list[str],
        systems: list[System], items: list[TestItem], answers: dict[str, dict[str, records.Record]]) -> None:
    """Put the stage-fidelity figures into eval's result (`fidelity` at the top, and per system)
    and write the future terms found to future_terms.jsonl in `report_dir`."""
    basis, per_system, found = score(project, train, order, systems, items, answers)
    result["fidelity"] = basis
    for name, figures in per_system.items():
        result["systems"][name]["fidelity"] = figures
    if not basis.get("skipped"):
        store.make_dirs(report_dir)
        store.write_jsonl_atomic(report_dir / TERMS_FILE, found)
