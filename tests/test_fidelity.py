"""Stage fidelity without a judge (eval/fidelity.py, data/terms.py): the classifier, the stage swap
and the future-terms leak on hand-made answer sets whose figures are known, then through `persllm eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persllm_cli.core.project import load_project
from persllm_cli.data import terms
from persllm_cli.eval import answers as eval_answers
from persllm_cli.eval import fidelity
from persllm_cli.eval.items import System
from persllm_cli.eval.items import TestItem as Question

WORDS = {
    "early": ["wand", "owls", "sorting", "hagrid", "cupboard", "quidditch", "broomstick", "troll", "feast", "mirror"],
    "middle": ["umbridge", "dementor", "patronus", "cedric", "prophecy", "detention", "toad", "occlumency", "sirius", "army"],
    "late": ["horcrux", "auror", "children", "locket", "battle", "teddy", "ministry", "sword", "hallows", "office"],
}
ORDER = list(WORDS)
LABELS = {"early": "first year", "middle": "fifth year", "late": "after the war"}


def staged(stage: str, k: int) -> str:
    """A sentence in `stage`'s words only (k picks which)."""
    w = WORDS[stage]
    return f"I keep thinking about the {w[k % 10]} and the {w[(k + 3) % 10]}, and the {w[(k + 7) % 10]} too."


@pytest.fixture
def project(tmp_path, cli) -> Path:
    root = tmp_path / "proj"
    args = ["init", str(root), "--name", "Harry Potter"]
    for sid in ORDER:
        args += ["--stage", f"{sid}:{LABELS[sid]}"]
    assert cli(*args).exit_code == 0
    for sid in ORDER:
        (root / "data" / sid / "knowledge.txt").write_text(
            "\n".join(f"Harry remembers the {a.title()} and the {b.title()}." for a, b in zip(WORDS[sid], WORDS[sid][1:])) + "\n")
    (root / "build").mkdir()
    train = [_record(f"r{sid}{k}", sid, f"Tell me something, {k}?", staged(sid, k)) for sid in ORDER for k in range(10)]
    test = [_record(f"t{sid}{k}", sid, f"What do you remember, {k}?", staged(sid, k + 1)) for sid in ORDER for k in range(2)]
    (root / "build" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "build" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return root


def _record(rid: str, stage: str, question: str, answer: str) -> dict:
    return {"id": rid, "persona": "Harry Potter", "stage": stage, "pattern": "ordinary", "status": "ok",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _items(root: Path) -> list[Question]:
    recs = [json.loads(x) for x in (root / "build" / "test.jsonl").read_text().splitlines()]
    return [Question(id=r["id"], persona="Harry Potter", stage=r["stage"], pattern="ordinary",
                     question=r["messages"][0]["content"], reference=r["messages"][1]["content"]) for r in recs]


def _system(root: Path) -> System:
    return System(name="sys", kind="run", model="m", persona="Harry Potter", labels=LABELS, dir=root / "out")


def _answers(items: list[Question], swaps: list[Question], answer) -> dict[str, dict]:
    return {"sys": {i.id: {"id": i.id, "status": "ok", "messages": [{"role": "user", "content": i.question},
                                                                   {"role": "assistant", "content": answer(i)}]}
                    for i in items + swaps}}


# ---------------------------------------------------------------- terms


def test_terms_words_and_cjk_pairs():
    assert terms.term_list("The Sorting Hat put Harry in 1991, and then they ate.") == ["sorting", "harry", "1991"]
    assert terms.term_list("我在霍格沃茨。") == ["我在", "在霍", "霍格", "格沃", "沃茨"]
    material = {"early": ["He bought the Wand and saw owls."], "middle": ["Then Umbridge came, with her wand. Everyone said so."],
                "late": ["He hunted a Horcrux and met Umbridge. He said little."]}
    first = terms.first_stage(material)
    # Names only: capitalised inside a sentence somewhere; "said" and "owls" are plain words.
    assert first == {"wand": "early", "umbridge": "middle", "horcrux": "late"}
    assert terms.own_terms(material, "middle", 5) == ["came"]   # umbridge is in late too, wand in early; "everyone" a stop word
    assert terms.own_terms(material, "late", 5) == ["horcrux", "hunted", "little"]   # "met": three letters
    found = terms.future_terms("Umbridge said a horcrux is my wand", "early", ORDER, first, question="What of the horcrux?")
    assert found == {"middle": ["umbridge"]}                        # horcrux was in the question
    cjk = terms.first_stage({"early": ["我在霍格沃茨。霍格沃茨很大。"], "late": ["伏地魔死了。伏地魔走了。霍格沃茨"]})
    assert cjk == {"霍格": "early", "格沃": "early", "沃茨": "early", "伏地": "late", "地魔": "late"}


# ---------------------------------------------------------------- known answer sets


def test_perfectly_staged_answers_score_one(project):
    items = _items(project)
    swaps = fidelity.swap_items(ORDER, items, 20, 0)
    assert len(swaps) == len(items) * 2 and {s.id.split(":")[1] for s in swaps} == set(ORDER)
    answers = _answers(items, swaps, lambda i: staged(i.stage, 4))
    basis, per, found = fidelity.score(load_project(project), project / "build" / "train.jsonl", ORDER,
                                       [_system(project)], items, answers)
    f = per["sys"]
    assert basis["answers"] == 30 and basis["material"] == 27
    assert basis["references"]["stage_accuracy"]["accuracy"] == 100.0
    assert f["stage_accuracy"]["accuracy"] == 100.0 and f["stage_accuracy"]["chance"] == pytest.approx(100 / 3)
    assert f["stage_accuracy"]["confusion"] == {"stages": ORDER, "matrix": [[2, 0, 0], [0, 2, 0], [0, 0, 2]]}
    assert (f["swap"]["questions"], f["swap"]["differ"], f["swap"]["recognised"]) == (6, 100.0, 100.0)
    assert f["leak"]["rate"] == 0.0 and found == []


def test_identical_answers_score_chance_and_no_swap(project):
    items = _items(project)
    swaps = fidelity.swap_items(ORDER, items, 20, 0)
    answers = _answers(items, swaps, lambda i: "Well, I remember it, and I think about it often.")
    _, per, _ = fidelity.score(load_project(project), project / "build" / "train.jsonl", ORDER,
                               [_system(project)], items, answers)
    f = per["sys"]
    assert f["stage_accuracy"]["accuracy"] == pytest.approx(100 / 3)    # 2 of 6: one stage named for all
    assert f["stage_accuracy"]["p_chance"] == pytest.approx(0.6488, abs=1e-4)  # luck alone gets 2 of 6 or more this often
    assert f["swap"]["differ"] == 0.0 and f["swap"]["differ_count"] == 0
    assert f["swap"]["recognised"] == pytest.approx(100 / 3)
    assert sum(map(sum, f["stage_accuracy"]["confusion"]["matrix"])) == 6


def test_answers_that_echo_their_question_score_the_questions_row(project):
    """A question's topic already names its stage: answers that only repeat their question score what the
    classifier gives the questions themselves (the floor eval reports), though the stage token does nothing."""
    items = _items(project)
    # Four questions name a word of their own stage, two a word of another stage.
    topic = {"tearly0": "early", "tearly1": "early", "tmiddle0": "middle", "tmiddle1": "late", "tlate0": "late", "tlate1": "early"}
    items = [Question(id=i.id, persona=i.persona, stage=i.stage, pattern=i.pattern, reference=i.reference,
                      question=f"What about the {WORDS[topic[i.id]][5].title()}?") for i in items]
    swaps = fidelity.swap_items(ORDER, items, 20, 0)
    answers = _answers(items, swaps, lambda i: i.question)
    basis, per, _ = fidelity.score(load_project(project), project / "build" / "train.jsonl", ORDER,
                                   [_system(project)], items, answers)
    assert basis["questions"]["stage_accuracy"]["accuracy"] == pytest.approx(100 * 4 / 6)
    assert basis["questions"]["stage_accuracy"]["confusion"]["matrix"] == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]
    f = per["sys"]
    assert f["stage_accuracy"]["accuracy"] == basis["questions"]["stage_accuracy"]["accuracy"]
    assert f["swap"]["differ"] == 0.0 and f["swap"]["recognised"] == pytest.approx(100 / 3)
    result = {"fidelity": basis, "systems": {"sys": {"fidelity": f}}}
    md = "\n".join(fidelity.markdown(result))
    assert "On the test questions themselves it names the stage 66.7% of the time" in md
    assert "| questions (echoed) | 66.7 |" in md


def test_accuracy_interval_and_p_value_match_scipy():
    from scipy.stats import binomtest

    for k, n, stages in [(8, 12, 3), (6, 12, 3), (0, 12, 3), (12, 12, 3), (3, 7, 2), (1, 30, 4)]:
        exact = binomtest(k, n, 1 / stages, alternative="greater")
        assert fidelity.above_chance(k, n, stages) == pytest.approx(exact.pvalue, rel=1e-9)
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert fidelity.wilson(k, n) == pytest.approx([100 * ci.low, 100 * ci.high], abs=1e-6)
    assert fidelity.wilson(0, 0) is None and fidelity.above_chance(0, 0, 3) is None
    acc = fidelity.stage_accuracy(["a"] * 6 + ["b"] * 6, ["a"] * 6 + ["a"] * 6, ["a", "b"])
    assert (acc["correct"], acc["accuracy"], acc["chance"]) == (6, 50.0, 50.0)
    assert acc["p_chance"] == pytest.approx(binomtest(6, 12, 0.5, alternative="greater").pvalue)


def test_future_terms_per_stage_pair(project):
    items = _items(project)
    swaps = fidelity.swap_items(ORDER, items, 20, 0)
    # Every answer at early names a late term; middle answers are clean; the late stage has nothing later.
    answers = _answers(items, swaps, lambda i: staged(i.stage, 0) + (" And the horcrux." if i.stage == "early" else ""))
    _, per, found = fidelity.score(load_project(project), project / "build" / "train.jsonl", ORDER,
                                   [_system(project)], items, answers)
    leak = per["sys"]["leak"]
    assert leak["by_pair"]["early>late"] == {"answers": 6, "leaked": 6, "rate": 100.0}
    assert leak["by_pair"]["early>middle"] == {"answers": 6, "leaked": 0, "rate": 0.0}
    assert leak["by_pair"]["middle>late"] == {"answers": 6, "leaked": 0, "rate": 0.0}
    assert leak["answers"] == 12 and leak["rate"] == 50.0
    assert len(found) == 6 and all(r["terms"] == {"late": ["horcrux"]} and r["asked_at"] == "early" for r in found)


def test_swap_items_are_seeded_and_capped():
    items = [Question(id=f"t{k}", persona="p", stage=ORDER[k % 3], pattern="ordinary", question="q", reference="r")
             for k in range(9)]
    a, b = fidelity.swap_items(ORDER, items, 4, 0), fidelity.swap_items(ORDER, items, 4, 0)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 8
    assert fidelity.swap_items(ORDER, items, 0, 0) == [] and fidelity.swap_items(["early"], items, 4, 0) == []
    assert {fidelity.swapped_from(i.id) for i in a} <= {i.id for i in items}


# ---------------------------------------------------------------- through `persllm eval`


class StagedGenerator:
    """Answers in the words of the stage it is asked at (perfect) or the same line always."""

    name = "fake"

    def __init__(self, same: bool = False):
        self.same = same
        self.asked: list[tuple[str | None, int]] = []

    def answer_batch(self, conversations, stage):
        self.asked.append((stage, len(conversations)))
        if self.same:
            return ["Well, I remember it, and I think about it often." for _ in conversations]
        return [staged(stage, 5) + (" The horcrux, too." if stage == "early" else "") for _ in conversations]


def _make_run(root: Path) -> Path:
    run = root / "runs" / "sft"
    (run / "adapter").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    stages = [{"id": sid, "label": LABELS[sid], "token": f"<TIME-{'I' * k}>"} for k, sid in enumerate(ORDER, 1)]
    (run / "run.json").write_text(json.dumps({"persona": "Harry Potter", "base": "smollm2-135m", "stages": stages,
                                              "complete": True}))
    return run


def test_eval_reports_stage_fidelity(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    run = _make_run(project)
    gen = StagedGenerator()
    monkeypatch.setattr(eval_answers, "open_speaker", lambda system, s, prices=None: gen)
    result = cli("eval", str(run), "--json")
    assert result.exit_code == 0, result.output
    # 6 test questions at their own stage, each asked again at the two other stages.
    assert sum(n for _, n in gen.asked) == 6 + 12
    data = json.loads(result.stdout)
    f = data["systems"]["sft"]["fidelity"]
    assert f["stage_accuracy"]["accuracy"] == 100.0 and f["swap"]["differ"] == 100.0 and f["swap"]["recognised"] == 100.0
    assert f["leak"]["by_pair"]["early>late"]["rate"] == 100.0 and f["leak"]["by_pair"]["middle>late"]["rate"] == 0.0
    assert data["fidelity"]["references"]["stage_accuracy"]["accuracy"] == 100.0
    assert "stage accuracy %" in result.stderr and "stage swap: answers differ %" in result.stderr
    # The questions ("What do you remember, 0?") hold no stage words: the one stage the classifier names for all.
    assert data["fidelity"]["questions"]["stage_accuracy"]["accuracy"] == pytest.approx(100 / 3)
    assert ("stage accuracy to read against: the test set's own answers 100.0%, the questions alone 33.3%"
            in " ".join(result.stderr.split()))
    md = (run / "eval" / "eval.md").read_text()
    # 6 of 6 right at three stages: a 95% interval of 61.0-100% and p = (1/3)^6 by luck alone.
    assert "## Stage fidelity (no judge)" in md and "| sft | 100.0 | 61.0-100.0 | 33.3 | 0.0014 | 6 | 100.0 | 100.0 | 50.0 |" in md
    terms_found = [json.loads(x) for x in (run / "eval" / fidelity.TERMS_FILE).read_text().splitlines()]
    assert len(terms_found) == 6 and terms_found[0]["terms"] == {"late": ["horcrux"]}
    # The same line at every stage: chance, and no swapped answer differs.
    same = StagedGenerator(same=True)
    monkeypatch.setattr(eval_answers, "open_speaker", lambda system, s, prices=None: same)
    result = cli("eval", str(run), "--json", "--max-new-tokens", "32", "--swap-questions", "3")
    f = json.loads(result.stdout)["systems"]["sft"]["fidelity"]
    assert sum(n for _, n in same.asked) == 6 + 6
    assert f["swap"]["questions"] == 3 and f["swap"]["differ"] == 0.0 and f["swap"]["recognised"] == pytest.approx(100 / 3)
    assert f["stage_accuracy"]["accuracy"] == pytest.approx(100 / 3)


def test_eval_without_training_answers_says_so(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    (project / "build" / "train.jsonl").unlink()
    for sid in ORDER:
        (project / "data" / sid / "knowledge.txt").write_text("")
    run = _make_run(project)
    monkeypatch.setattr(eval_answers, "open_speaker", lambda system, s, prices=None: StagedGenerator())
    result = cli("eval", str(run), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "skipped" in data["fidelity"] and "fidelity" not in data["systems"]["sft"]
    assert "Not measured" in (run / "eval" / "eval.md").read_text()
