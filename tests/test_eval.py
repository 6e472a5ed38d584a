"""`persllm eval`: metrics on hand-made answers, pair formation, the judge against the fake server,
resumable generation with a fake generator, the report files, and input errors."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from persllm_cli.eval import answers as eval_answers
from persllm_cli.eval import judge, protocols
from persllm_cli.data import metrics
from tests.fakes.openai_server import Fail

STAGES = [("early", "first year"), ("late", "after the war")]


# ---------------------------------------------------------------- metrics


def test_bleu_identical_and_disjoint():
    tok = metrics.tokenizer("13a")
    a = tok("The castle was cold and the stairs kept moving under my feet.")
    assert metrics.pair_bleu(a, a) == pytest.approx(100.0)
    assert metrics.sentence_bleu(a, a) == pytest.approx(100.0)
    b = tok("Quidditch practice starts tomorrow at dawn, Wood insists")
    assert metrics.pair_bleu(a, b) < 1.0
    assert metrics.corpus_bleu([a, a], [a, a]) == pytest.approx(100.0)
    assert metrics.corpus_bleu([a], [b]) < 1.0
    assert metrics.corpus_bleu([], []) is None


def test_pair_bleu_is_symmetric():
    tok = metrics.tokenizer("13a")
    a, b = tok("I was afraid of the dark forest at night"), tok("I was afraid of the forest")
    assert metrics.pair_bleu(a, b) == pytest.approx(metrics.pair_bleu(b, a))
    assert metrics.sentence_bleu(a, b) != pytest.approx(metrics.sentence_bleu(b, a))


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 tokens each way: F1 = 5/6.
    assert metrics.rouge_l("the cat sat on the mat".split(), "the cat lay on the mat".split()) == pytest.approx(500 / 6)
    # LCS = 2 ("a", "c"): P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7.
    assert metrics.rouge_l(["a", "b", "c"], ["a", "x", "c", "y"]) == pytest.approx(400 / 7)
    assert metrics.rouge_l(["Same", "Words"], ["same", "words"]) == pytest.approx(100.0)
    assert metrics.rouge_l(["a"], ["b"]) == 0.0
    assert metrics.rouge_l([], ["b"]) == 0.0


def test_lcs_matches_dynamic_programming():
    def dp(a, b):
        t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
        return t[-1][-1]

    rng = random.Random(7)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 90))]
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 90))]
        assert metrics.lcs_length(a, b) == dp(a, b)


def test_tokenizer_choice_and_cjk_scores():
    assert metrics.choose_tokenize(["Hello there, Hermione."]) == "13a"
    assert metrics.choose_tokenize(["我第一次看到霍格沃茨的城堡。"]) == "zh"
    assert metrics.choose_tokenize(["ホグワーツの城を初めて見た。"]) == "char"
    zh = metrics.tokenizer("zh")
    a, b = zh("我第一次看到城堡"), zh("我第一次看到湖")
    assert a == ["我", "第", "一", "次", "看", "到", "城", "堡"]
    assert metrics.pair_bleu(a, a) == pytest.approx(100.0)
    assert 0 < metrics.pair_bleu(a, b) < 100
    # Without CJK tokenisation the two sentences would share no token at all.
    assert metrics.pair_bleu(metrics.tokenizer("13a")("我第一次看到城堡"), metrics.tokenizer("13a")("我第一次看到湖")) == 0.0
    assert metrics.rouge_l(a, b) == pytest.approx(100 * 2 * (6 / 8) * (6 / 7) / (6 / 8 + 6 / 7))


def test_pair_formation_and_sampling():
    rng = random.Random(0)
    assert metrics.sample_pairs(3, None, 10, rng) == [(0, 1), (0, 2), (1, 2)]
    assert metrics.sample_pairs(2, 2, 10, rng) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    big = metrics.sample_pairs(100, None, 50, random.Random("s"))
    assert len(big) == len(set(big)) == 50 and all(i < j for i, j in big)
    assert big == metrics.sample_pairs(100, None, 50, random.Random("s"))  # deterministic
    cross = metrics.sample_pairs(30, 40, 25, random.Random(1))
    assert len(set(cross)) == 25 and all(i < 30 and j < 40 for i, j in cross)


def test_distinction_groups_and_order():
    tok = metrics.tokenizer("13a")
    early = [tok(f"as a first year I loved the feast and the moving stairs {x}") for x in ("today", "again", "truly")]
    late = [tok(f"after the war I teach defence and remember the fallen {x}") for x in ("today", "often")]
    other = [tok("Father says mudbloods should not be at this school at all")]
    d = metrics.distinction({"early": early, "late": late}, {"Draco Malfoy": other}, cap=100, seed=0)
    groups = d["groups"]
    assert [(g["name"], g["pairs"]) for g in groups["intra"]] == [("early", 3), ("late", 1)]
    assert [(g["name"], g["pairs"]) for g in groups["cross_stage"]] == [("early|late", 6)]
    assert [(g["name"], g["pairs"]) for g in groups["cross_persona"]] == [("Draco Malfoy", 5)]
    # Macro average: the mean of the two stage groups, not of the four pairs.
    assert d["intra"] == pytest.approx((groups["intra"][0]["score"] + groups["intra"][1]["score"]) / 2)
    assert d["intra"] > d["cross_stage"] > d["cross_persona"]
    capped = metrics.distinction({"early": early, "late": late}, {}, cap=2, seed=0)
    assert [g["pairs"] for g in capped["groups"]["cross_stage"]] == [2]
    assert capped["cross_persona"] is None


# ---------------------------------------------------------------- judge parsing


@pytest.mark.parametrize("text,choices,want", [
    ("A is warmer.\nVerdict: A", "ab", "a"),
    ("Verdict: B\n\nOn reflection... **Verdict:** **A**", "ab", "a"),
    ("verdict：tie", ("a", "b", "tie"), "tie"),
    ("B", "ab", "b"),
    ("**A**.", "ab", "a"),
    ("Answer A is about apples. No verdict here.", "ab", None),
    ("Verdict: maybe", ("yes", "no"), None),
    ("It does. Verdict: Yes", ("yes", "no"), "yes"),
    ("", ("yes", "no"), None),
])
def test_parse_verdict(text, choices, want):
    assert judge.parse_verdict(text, choices) == want


# ---------------------------------------------------------------- end to end with test doubles


def _record(i: int, stage: str, pattern: str = "ordinary") -> dict:
    q = f"Question {i} about the {stage} years?"
    ref = f"In my {stage} years I remember the thing number {i} and the castle."
    return {"id": f"t{i:02d}", "persona": "Harry Potter", "stage": stage, "pattern": pattern,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ref}], "status": "ok"}


@pytest.fixture
def project(tmp_path, cli) -> Path:
    root = tmp_path / "proj"
    args = ["init", str(root), "--name", "Harry Potter"]
    for sid, label in STAGES:
        args += ["--stage", f"{sid}:{label}"]
    assert cli(*args).exit_code == 0
    # These tests count questions, batches and requests; stage swap (more questions) is tested in test_fidelity.py.
    with open(root / "persllm.toml", "a", encoding="utf-8") as f:
        f.write("\n[eval]\nswap_questions = 0\n")
    recs = [_record(i, "early" if i < 4 else "late", "error" if i in (1, 5) else "ordinary") for i in range(7)]
    (root / "build").mkdir()
    (root / "build" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def _make_run(root: Path, name: str, persona: str = "Harry Potter") -> Path:
    run = root / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    stages = [{"id": sid, "label": label, "token": f"<TIME-{'I' * k}>"} for k, (sid, label) in enumerate(STAGES, 1)]
    (run / "run.json").write_text(json.dumps({"persona": persona, "base": "smollm2-135m", "stages": stages,
                                              "complete": True}))
    return run


class FakeGenerator:
    """Answers with a stage-flavoured sentence; counts what it was asked."""

    def __init__(self, flavour: str = "", fail_after: int | None = None):
        self.name, self.flavour, self.fail_after = "fake", flavour, fail_after
        self.asked: list[tuple[str | None, int]] = []
        self.questions: list[tuple[str | None, list[str]]] = []

    def answer_batch(self, conversations, stage):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt
        self.asked.append((stage, len(conversations)))
        self.questions.append((stage, [c[-1]["content"] for c in conversations]))
        if stage is None:     # no stage token: the model speaks from no time in particular
            return [f"Looking back {self.flavour} I remember {c[-1]['content'].split()[1]} and the castle."
                    for c in conversations]
        return [f"In my {stage} years {self.flavour} I remember {c[-1]['content'].split()[1]} and the castle."
                for c in conversations]


def _use_generators(monkeypatch, gens: dict[str, FakeGenerator]):
    monkeypatch.setattr(eval_answers, "open_speaker", lambda system, s, prices=None: gens[system.name])


def test_eval_two_runs_side_by_side(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    _make_run(project, "sft")
    _make_run(project, "sft-dpo")
    gens = {"sft": FakeGenerator("plainly"), "sft-dpo": FakeGenerator("")}
    _use_generators(monkeypatch, gens)
    result = cli("eval", "runs/sft", "runs/sft-dpo", "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["systems"]) == ["sft", "sft-dpo"]
    # Batches never mix stages: early has 4 questions, late 3.
    assert gens["sft"].asked == [("early", 2), ("early", 2), ("late", 2), ("late", 1)]
    dpo = data["systems"]["sft-dpo"]
    assert dpo["answered"] == 7
    assert dpo["reference"]["items"] == 7 and dpo["reference"]["bleu"] > data["systems"]["sft"]["reference"]["bleu"]
    assert dpo["distinction"]["intra"] > dpo["distinction"]["cross_stage"]
    assert dpo["distinction"]["cross_persona"] is None     # same persona, no --pool
    assert "sft-dpo" in result.stderr and "BLEU intra" in result.stderr
    report = project / "build" / "eval"
    md = (report / "eval.md").read_text()
    assert "| metric | sft | sft-dpo |" in md
    assert (report / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "eval.json").read_text())["systems"]["sft"]["answered"] == 7
    answers = [json.loads(x) for x in (project / "runs" / "sft" / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 7 and {a["status"] for a in answers} == {"ok"}
    assert answers[0]["messages"][1]["content"].startswith("In my early years plainly")


def test_generation_resumes_after_interrupt(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    first = FakeGenerator(fail_after=2)
    _use_generators(monkeypatch, {"sft": first})
    result = cli("eval", "--batch-size", "2", "-o", "out")  # runs/latest is absent: the run is named below
    assert result.exit_code == 1 and "no trained run yet" in result.stderr
    result = cli("eval", str(run), "--batch-size", "2", "-o", "out")
    assert result.exit_code == 130
    path = project / "out" / "sft" / "answers.jsonl"
    assert len(path.read_text().splitlines()) == 4
    assert not (project / "out" / "eval.md").exists()
    second = FakeGenerator()
    _use_generators(monkeypatch, {"sft": second})
    result = cli("eval", str(run), "--batch-size", "2", "-o", "out")
    assert result.exit_code == 0, result.output
    assert second.asked == [("late", 2), ("late", 1)]      # only the 3 missing answers
    ids = [json.loads(x)["id"] for x in path.read_text().splitlines()]
    assert sorted(ids) == [f"t{i:02d}" for i in range(7)]
    third = FakeGenerator()
    _use_generators(monkeypatch, {"sft": third})
    assert cli("eval", str(run), "-o", "out").exit_code == 0
    assert third.asked == []
    # Other generation settings (or a retrained run) make the saved answers stale.
    result = cli("eval", str(run), "--max-new-tokens", "64", "-o", "out")
    assert result.exit_code == 0 and "answering them again" in result.stderr
    assert sum(n for _, n in third.asked) == 7
    assert (project / "out" / "eval.md").exists() and (project / "out" / "eval.png").exists()


def test_pool_gives_cross_persona(project, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    _use_generators(monkeypatch, {"sft": FakeGenerator()})
    pool = tmp_path / "draco.jsonl"
    pool.write_text(json.dumps({"persona": "Draco Malfoy", "stage": "early", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "My father will hear about this, Potter."}]}) + "\n")
    result = cli("eval", str(run), "--pool", str(pool), "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["systems"]["sft"]["distinction"]
    assert d["groups"]["cross_persona"][0]["name"] == "Draco Malfoy"
    assert d["groups"]["cross_persona"][0]["pairs"] == 7
    assert d["intra"] > d["cross_persona"]
    assert (run / "eval" / "eval.md").exists()                 # one run: the report sits with its answers


def _judge_responder(body, n):
    """Prefers the system's answer, wherever it is shown; says yes to premises; finds every item
    neither knowledge nor attitude, and no time leak."""
    text = body["messages"][-1]["content"]
    if "[Character's answer]" in text:
        return "Verdict: neither"
    if "[Later material" in text:
        return "Verdict: no"
    if "[Answer to check]" in text:
        return "It corrects the mistake.\nVerdict: yes"
    a = text.split("[Answer A]")[1].split("[Answer B]")[0]
    return "Verdict: B" if "the thing number" in a else "Verdict: A"   # references say "the thing number"


def test_judge_both_orders_premise_and_resume(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    _use_generators(monkeypatch, {"sft": FakeGenerator()})
    fake_openai.responder = _judge_responder
    result = cli("eval", str(run), "--judge", "gpt-4o-mini", "--json")
    assert result.exit_code == 0, result.output
    calls = fake_openai.completions()
    # 7 classifications, both orders for 7 answers, premise check for the 2 error items, 2 leak checks
    # (late items t04 and t06 asked at the early stage; t05 has a false premise) and the same 2
    # answered with no stage token.
    assert len(calls) == 7 + 7 * 2 + 2 + 2 + 2
    prompts = [c.body["messages"][-1]["content"] for c in calls]
    assert sum("[Answer to check]" in p for p in prompts) == 2
    data = json.loads(result.stdout)
    j = data["systems"]["sft"]["judge"]
    assert j["win"] == 100.0 and j["preference"] == 100.0 and j["consistency"] == 100.0
    assert j["premise_rejected"] == 100.0 and j["premise_items"] == 2
    assert j["leak_rate"] == 0.0 and j["leak_items"] == 2 and j["knowledge_score"] is None
    assert (j["leak_notoken_rate"], j["leak_notoken_items"]) == (0.0, 2)
    spend = data["judge"]
    assert spend["requests"] == 27
    assert spend["prompt_tokens"] == sum(sum(len(m["content"].split()) for m in c.body["messages"]) for c in calls)
    want = (spend["prompt_tokens"] * 0.15 + spend["completion_tokens"] * 0.60) / 1e6
    assert spend["cost_usd"] == pytest.approx(want)
    assert "OPENAI" not in (run / "eval" / "judge.jsonl").read_text() and fake_openai.api_key not in (run / "eval" / "eval.json").read_text()
    # A rerun asks nothing again; a judge stuck on "A" shows its position bias as ties.
    result = cli("eval", str(run), "--judge", "gpt-4o-mini", "--json")
    assert result.exit_code == 0
    assert len(fake_openai.completions()) == 27
    again = json.loads(result.stdout)["judge"]
    assert again["this_run"]["requests"] == 0
    assert (again["requests"], again["prompt_tokens"], again["cost_usd"]) == (27, spend["prompt_tokens"], pytest.approx(want))
    fake_openai.responder = lambda body, n: ("Verdict: A" if "[Answer A]" in body["messages"][-1]["content"] else
                                             "Verdict: neither" if "[Character's answer]" in body["messages"][-1]["content"]
                                             else "Verdict: no")
    result = cli("eval", str(run), "--judge", "fake-model", "--json")
    j = json.loads(result.stdout)["systems"]["sft"]["judge"]
    assert (j["win"], j["tie"], j["loss"], j["consistency"], j["premise_rejected"]) == (0.0, 100.0, 0.0, 0.0, 0.0)
    assert json.loads(result.stdout)["judge"]["cost_usd"] is None   # no known price for fake-model


def test_budget_limits_judge_and_api_answers_together(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    with open(project / "persllm.toml", "a", encoding="utf-8") as f:
        f.write('\n[annotate.prices]\n"gpt-4o-mini" = [1000.0, 1000.0]\n')   # $0.001 a token
    def responder(body, n):
        if any(mark in body["messages"][-1]["content"] for mark in ("[Answer A]", "[Answer to check]", "[Character's answer]")):
            return _judge_responder(body, n)
        return "Well, as I remember it, the thing number one."
    fake_openai.responder = responder
    flags = ["--api-model", "gpt-4o-mini", "--judge", "gpt-4o-mini", "--limit", "4", "--concurrency", "1",
             "--max-new-tokens", "20", "--json"]
    r = cli("eval", *flags, "--budget-usd", "2.0")
    assert r.exit_code == 3, r.output
    assert "budget of $2.0 reached" in r.stderr
    sent = len(fake_openai.completions())
    assert 4 < sent < 4 + 4 + 4 * 2 + 1           # every answer, then part of the judge's 13 requests
    out = project / "build" / "eval" / "api-gpt-4o-mini"
    spent = sum(json.loads(line)["generator"]["cost_usd"] for line in (out / "answers.jsonl").read_text().splitlines())
    for name in ("judge.jsonl", "judge_items.jsonl"):   # verdicts per system; classifications of the items
        if (out / name).exists():
            spent += sum(json.loads(line)["judge"]["cost_usd"] for line in (out / name).read_text().splitlines())
    assert 0 < spent <= 2.0
    assert json.loads(r.stdout)["judge"]["this_run"]["cost_usd"] == pytest.approx(spent - sum(
        json.loads(line)["generator"]["cost_usd"] for line in (out / "answers.jsonl").read_text().splitlines()))
    # Without a budget the rerun asks only what is missing.
    r = cli("eval", *flags)
    assert r.exit_code == 0, r.output
    assert len(fake_openai.completions()) == 4 + 4 + 4 * 2 + 1
    assert cli("eval", *flags, "--budget-usd", "-1").exit_code == 2  # a bad flag value: usage


def test_judge_requests_run_concurrently(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    _use_generators(monkeypatch, {"sft": FakeGenerator()})
    fake_openai.latency = 0.3
    fake_openai.responder = _judge_responder
    result = cli("eval", str(run), "--judge", "gpt-4o-mini", "--limit", "4", "--concurrency", "8")
    assert result.exit_code == 0, result.output
    calls = fake_openai.completions()
    assert len(calls) == 4 + 4 * 2 + 1             # 4 classifications; t01 is the one error-pattern item of four
    # One at a time, requests of 0.3 s would arrive 0.3 s apart; up to eight at once arrive together.
    assert calls[3].time - calls[0].time < 0.3     # the 4 classifications
    assert calls[11].time - calls[4].time < 0.3    # the first 8 verdicts


def test_judge_without_verdict_is_partial(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    _use_generators(monkeypatch, {"sft": FakeGenerator()})
    monkeypatch.setenv("PERSLLM_EVAL_BACKOFF_SECONDS", "0.01")
    fake_openai.push(Fail(500))                    # a transient error uses up the first attempt
    def responder(body, n):
        text = body["messages"][-1]["content"]
        if n <= 2:
            return "I cannot decide."
        return ("Verdict: tie\n" if "[Answer A]" in text else "Verdict: neither" if "[Character's answer]" in text
                else "Verdict: yes")
    fake_openai.responder = responder
    one_at_a_time = ("--concurrency", "1", "--max-retries", "1")
    result = cli("eval", str(run), "--judge", "gpt-4o-mini", "--limit", "1", *one_at_a_time)
    assert result.exit_code == 3                   # the first request (the item's class): a 500, then no verdict -> failed
    first = json.loads((run / "eval" / "judge_items.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "class"
    assert (first["status"], first["judge"]["attempts"]) == ("failed", 2)
    assert first["error"] == "malformed reply: no verdict in the judge's reply (after 2 attempts)"
    assert "rerun" in result.stderr
    result = cli("eval", str(run), "--judge", "gpt-4o-mini", "--limit", "1", "--json", *one_at_a_time)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["systems"]["sft"]["judge"]["tie"] == 100.0


def test_api_model_baseline(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    fake_openai.responder = lambda body, n: f"Well, answer {n}, as I remember it."
    result = cli("eval", "--api-model", "gpt-4o-mini", "--limit", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["systems"]) == ["api:gpt-4o-mini"]
    system_prompt = fake_openai.completions()[0].body["messages"][0]["content"]
    assert "Harry Potter" in system_prompt and "first year" in system_prompt
    assert data["systems"]["api:gpt-4o-mini"]["generation_spend"]["requests"] == 3
    assert (project / "build" / "eval" / "api-gpt-4o-mini" / "answers.jsonl").exists()
    assert (project / "build" / "eval" / "api-gpt-4o-mini" / "eval.md").exists()



def test_api_baseline_honours_retry_after_and_answers_stale_ones_again(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    fake_openai.push(Fail(429, retry_after=0.5))
    fake_openai.responder = lambda body, n: f"Well, answer {n}, as I remember it."
    args = ("eval", "--api-model", "gpt-4o-mini", "--limit", "2", "--concurrency", "1")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    calls = fake_openai.completions()
    assert len(calls) == 3 and calls[1].time - calls[0].time >= 0.5      # the 429's Retry-After was kept
    path = project / "build" / "eval" / "api-gpt-4o-mini" / "answers.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["id"], r["status"], r["generator"]["attempts"]) for r in recs] == [("t00", "ok", 2), ("t01", "ok", 1)]
    assert recs[0]["generator"]["cost_usd"] > 0 and recs[0]["generator"]["prompt_tokens"] > 0
    assert cli(*args).exit_code == 0 and len(fake_openai.completions()) == 3   # nothing asked again
    result = cli(*args, "--max-new-tokens", "32")
    assert result.exit_code == 0 and "answering them again" in result.stderr
    assert len(fake_openai.completions()) == 5 and len(path.read_text().splitlines()) == 4


def test_errors(project, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    _use_generators(monkeypatch, {"sft": FakeGenerator()})
    result = cli("eval", str(run), "--test", "nope.jsonl")
    assert result.exit_code == 1 and "nope.jsonl: file not found" in result.stderr
    result = cli("eval", "runs/missing")
    assert result.exit_code == 1 and "run directory not found" in result.stderr
    other = _make_run(project, "other")
    (other / "run.json").write_text(json.dumps({"persona": "H", "base": "b", "complete": True,
                                                "stages": [{"id": "early", "label": "x", "token": "<TIME-I>"}]}))
    result = cli("eval", str(other))
    assert result.exit_code == 1 and "unknown stage 'late' (stages: early)" in result.stderr
    bad_pool = tmp_path / "pool.jsonl"
    bad_pool.write_text(json.dumps({"status": "ok", "messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}) + "\n")
    result = cli("eval", str(run), "--pool", str(bad_pool))
    assert result.exit_code == 1 and "no persona" in result.stderr
    result = cli("eval", str(run), "--tokenize", "nope")
    assert result.exit_code == 2 and "--tokenize must be one of" in result.stderr
    assert not (run / "eval").exists()            # nothing written by any failed attempt
    assert len(result.stderr.strip().splitlines()) == 1


def test_chinese_material_is_scored_per_character(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    run = _make_run(project, "sft")
    recs = [{"id": f"z{i}", "persona": "哈利·波特", "stage": stage, "pattern": "ordinary", "status": "ok",
             "messages": [{"role": "user", "content": f"你记得第{i}件事吗？"},
                          {"role": "assistant", "content": f"我记得第{i}件事，那是在城堡里。"}]}
            for i, stage in enumerate(["early", "early", "late"])]
    (project / "build" / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))

    class ChineseGenerator(FakeGenerator):
        def answer_batch(self, conversations, stage):
            return ["我记得那件事，在城堡里。" for _ in conversations]

    _use_generators(monkeypatch, {"sft": ChineseGenerator()})
    result = cli("eval", str(run), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokenize"] == "zh"
    sft = data["systems"]["sft"]
    assert sft["distinction"]["intra"] == pytest.approx(100.0)   # the two early answers are identical
    assert 0 < sft["reference"]["rouge_l"] < 100


# ---------------------------------------------------------------- the paper's protocols and time leakage


@pytest.mark.parametrize("text,choices,want", [
    ("Mostly there.\nVerdict: 4", [str(k) for k in range(6)], "4"),
    ("Verdict: 7", [str(k) for k in range(6)], None),
    ("It asks about his feelings. **Verdict:** Attitude", judge.CATEGORIES, "attitude"),
    ("Verdict: opinion", judge.CATEGORIES, None),
])
def test_parse_protocol_verdicts(text, choices, want):
    assert judge.parse_verdict(text, choices) == want


@pytest.mark.parametrize("text,n,want", [
    ("B sounds most like him.\nRanking: B > A = C", 3, [["B"], ["A", "C"]]),
    ("**Ranking:** c, a, b", 3, [["C"], ["A"], ["B"]]),
    ("Ranking: A > B\n\nOn reflection:\nRanking: B = A", 2, [["B", "A"]]),
    ("Ranking: A > B", 3, None),                 # C is missing
    ("Ranking: A > A > B", 3, None),             # A twice
    ("Ranking: A > B > D", 3, None),             # no answer D was shown
    ("B is best, then A.", 2, None),
])
def test_parse_ranking(text, n, want):
    assert judge.parse_ranking(text, n) == want


def test_shuffle_is_seeded_and_unshuffles():
    names = ["sft", "sft-dpo", "api:gpt-4o-mini"]
    order = judge.shuffled_order("t01", names, 0)
    assert sorted(order) == sorted(names)
    assert order == judge.shuffled_order("t01", list(reversed(names)), 0)     # does not depend on the input order
    firsts = [judge.shuffled_order(f"t{k}", ["a", "b"], 0)[0] for k in range(400)]
    assert 150 < firsts.count("a") < 250           # each system is shown first about half the time
    assert firsts != [judge.shuffled_order(f"t{k}", ["a", "b"], 1)[0] for k in range(400)]   # the seed matters
    # The judge's letters map back through the recorded order; tied systems share a rank.
    assert judge.unshuffle([["B"], ["A", "C"]], ["x", "y", "z"]) == {"y": 1, "x": 2, "z": 2}
    assert judge.unshuffle([["C"], ["A"], ["B"]], ["x", "y", "z"]) == {"z": 1, "x": 2, "y": 3}
    # Whatever the order shown, a judge that sees the true ranking gives back the same ranks.
    truth = {"sft-dpo": 1, "api:gpt-4o-mini": 2, "sft": 3}
    for k in range(20):
        order = judge.shuffled_order(f"t{k}", names, 0)
        letters = sorted(judge.LETTERS[:3], key=lambda letter: truth[order[judge.LETTERS.index(letter)]])
        assert judge.unshuffle([[x] for x in letters], order) == truth


def test_leak_questions_come_only_from_later_stages():
    from persllm_cli.eval.command import TestItem, leak_items

    def item(i, stage, pattern="ordinary"):
        return TestItem(id=f"{stage}{i}", persona="H", stage=stage, pattern=pattern, question=f"q {stage} {i}",
                        reference=f"r {stage} {i}")

    items = ([item(i, "a") for i in range(3)] + [item(i, "b") for i in range(4)] + [item(4, "b", "error")]
             + [item(i, "c") for i in range(5)])
    leaks = leak_items(["a", "b", "c"], items, 100, seed=0)
    by_stage = {}
    for x in leaks:
        by_stage.setdefault(x.stage, []).append(x)
    assert set(by_stage) == {"a", "b"}                           # the last stage has nothing later
    assert {x.later_stage for x in by_stage["a"]} == {"b", "c"} and len(by_stage["a"]) == 9   # not the error item
    assert {x.later_stage for x in by_stage["b"]} == {"c"} and len(by_stage["b"]) == 5
    for x in leaks:
        assert x.pattern == protocols.LEAK and x.id == f"leak:{x.stage}:{x.later_stage}{x.question.split()[-1]}"
        assert x.question.startswith(f"q {x.later_stage}") and x.reference.startswith(f"r {x.later_stage}")
    capped = leak_items(["a", "b", "c"], items, 3, seed=0)
    assert [len([x for x in capped if x.stage == st]) for st in "ab"] == [3, 3]
    assert [x.id for x in capped] == [x.id for x in leak_items(["a", "b", "c"], items, 3, seed=0)]   # stable
    assert leak_items(["a", "b", "c"], items, 0, seed=0) == []
    assert leak_items(["a"], [item(0, "a")], 5, seed=0) == []


def _protocol_judge(state: dict):
    """A scripted judge: t00/t06 are knowledge items, t02/t03 attitude items. Answers saying
    "plainly" (the sft run) score 2 and leak; the others score 4, do not leak and rank first.
    The first classification and the first ranking come back malformed (they must be retried)."""
    def responder(body, n):
        text = body["messages"][-1]["content"]
        if "[Character's answer]" in text:
            if not state.get("class_bad"):
                state["class_bad"] = True
                return "Hmm, hard to say."
            num = int(re.search(r"Question (\d+)", text).group(1))
            return "Verdict: knowledge" if num in (0, 6) else "Verdict: attitude" if num in (2, 3) else "Verdict: neither"
        if "[Later material" in text:
            answer = text.split("[Answer given at")[1]
            return "Verdict: yes" if "plainly" in answer or "Looking back" in answer else "Verdict: no"
        if "[Answer to score]" in text:
            return "Verdict: 2" if "plainly" in text.split("[Answer to score]")[1] else "Verdict: 4"
        if "Ranking:" in text:
            state.setdefault("rank_prompts", []).append(text)
            if not state.get("rank_bad"):
                state["rank_bad"] = True
                return "Ranking: A"                  # a label missing: malformed
            shown = re.findall(r"\[Answer ([A-Z])\]\n(.*)", text)
            best = [letter for letter, a in shown if "plainly" not in a]
            worst = [letter for letter, a in shown if "plainly" in a]
            return "Ranking: " + " > ".join(best + worst)
        return _judge_responder(body, n)
    return responder


def test_paper_protocols_and_time_leakage(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    monkeypatch.setenv("PERSLLM_EVAL_BACKOFF_SECONDS", "0.01")
    _make_run(project, "sft")
    _make_run(project, "sft-dpo")
    gens = {"sft": FakeGenerator("plainly"), "sft-dpo": FakeGenerator("")}
    _use_generators(monkeypatch, gens)
    state: dict = {}
    fake_openai.responder = _protocol_judge(state)
    args = ("eval", "runs/sft", "runs/sft-dpo", "--judge", "gpt-4o-mini", "--concurrency", "1", "--json")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    # The late items t04 and t06 (not t05, a false premise) are asked at the early stage, with its
    # token, and once more with no stage token at all (stage None: the speaker adds no token).
    assert gens["sft"].asked == [("early", 6), ("late", 3), (None, 2)]
    assert gens["sft"].questions[-1] == (None, ["Question 4 about the late years?", "Question 6 about the late years?"])
    answers = {json.loads(x)["id"]: json.loads(x) for x in (project / "runs" / "sft" / "eval" / "answers.jsonl").read_text().splitlines()}
    assert {k for k in answers if k.startswith("leak:")} == {"leak:early:t04", "leak:early:t06"}
    assert {(answers[k]["stage"], answers[k]["pattern"]) for k in answers if k.startswith("leak:")} == {("early", "leak")}
    bare = {k: r for k, r in answers.items() if k.startswith("notoken:")}
    assert set(bare) == {"notoken:t04", "notoken:t06"}
    assert all(r["stage"] is None and r["generator"]["stage_token"] is False
               and r["messages"][1]["content"].startswith("Looking back plainly") for r in bare.values())
    prompts = [c.body["messages"][-1]["content"] for c in fake_openai.completions()]
    leak_prompts = [p for p in prompts if "[Later material" in p]
    assert len(leak_prompts) == 8
    assert all("first year" in p and "after the war" in p and re.search(r"Question [46] about the late", p) for p in leak_prompts)
    assert sum("Looking back" in p for p in leak_prompts) == 4    # the no-token answers, judged at the early stage
    # 7 classifications (+1 retry), per run 14 orders + 2 premises + 2 knowledge + 2 leaks + 2 no-token
    # leaks, 2 rankings (+1 retry).
    assert len(prompts) == 7 + 1 + 2 * 22 + 2 + 1
    data = json.loads(result.stdout)
    sft, dpo = data["systems"]["sft"]["judge"], data["systems"]["sft-dpo"]["judge"]
    assert (sft["knowledge_items"], sft["knowledge_score"], dpo["knowledge_score"]) == (2, 2.0, 4.0)
    assert (sft["attitude_items"], sft["attitude_rank"], dpo["attitude_rank"]) == (2, 2.0, 1.0)
    assert (sft["leak_items"], sft["leak_rate"], dpo["leak_rate"]) == (2, 100.0, 0.0)
    assert sft["leak_by_stage"] == {"early": {"items": 2, "leaked": 2, "rate": 100.0}}
    # Without a token both runs leak; with it only sft does: the tokens work for sft-dpo.
    assert (sft["leak_notoken_items"], sft["leak_notoken_rate"], dpo["leak_notoken_rate"]) == (2, 100.0, 100.0)
    assert dpo["leak_notoken_by_stage"] == {"early": {"items": 2, "leaked": 2, "rate": 100.0}}
    assert sft["premise_rejected"] == 100.0 and sft["failed"] == 0
    j = data["judge"]
    assert j["classes"] == {"knowledge": 2, "attitude": 2, "neither": 3}
    assert (j["ranked_items"], j["systems_ranked"], j["leak_questions"], j["requests"]) == (2, 2, 2, len(prompts))
    assert j["leak_notoken_questions"] == 2
    # Each ranking shows the answers in the recorded seeded order, and the letters are read back through it.
    shared = [json.loads(x) for x in (project / "build" / "eval" / "judge_items.jsonl").read_text().splitlines()]
    ranks = [r for r in shared if r["kind"] == "rank" and r["status"] == "ok"]
    assert sorted(r["test_id"] for r in ranks) == ["t02", "t03"]
    for r in ranks:
        assert r["order"] == judge.shuffled_order(r["test_id"], ["sft", "sft-dpo"], 0)
        assert r["verdict"][0] == [judge.LETTERS[r["order"].index("sft-dpo")]]
    first_class = next(r for r in shared if r["kind"] == "class" and r["test_id"] == "t00")
    assert first_class["judge"]["attempts"] == 2                     # the malformed reply was retried
    assert sum(r["judge"]["attempts"] for r in shared if r["kind"] == "rank") == 3
    md = (project / "build" / "eval" / "eval.md").read_text()
    assert "| knowledge score (0-5) | 2.00 | 4.00 |" in md
    assert "| attitude rank (1 = best) | 2.00 | 1.00 |" in md
    assert "| time leak % (lower is better) | 100.00 | 0.00 |" in md
    assert "| sft | early | 2 | 2 | 100.00 |" in md and "| false premise rejected % | 100.00 | 100.00 |" in md
    assert "| time leak % without a stage token | 100.00 | 100.00 |" in md
    assert "## Time tokens against no token" in md
    assert "| sft | early | 2 | 100.00 | 100.00 | +0.00 |" in md and "| sft-dpo | early | 2 | 0.00 | 100.00 | +100.00 |" in md
    assert (project / "build" / "eval" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    # Resume: a rerun asks nothing and reports the same figures.
    again = cli(*args)
    assert again.exit_code == 0 and len(fake_openai.completions()) == len(prompts)
    redo = json.loads(again.stdout)
    assert redo["judge"]["this_run"]["requests"] == 0
    assert gens["sft"].asked == [("early", 6), ("late", 3), (None, 2)]      # no answer asked again either
    assert redo["systems"]["sft"]["judge"] == sft and redo["systems"]["sft-dpo"]["judge"] == dpo


def test_protocols_stop_at_the_budget_and_resume(project, cli, monkeypatch, fake_openai):
    monkeypatch.chdir(project)
    monkeypatch.setenv("PERSLLM_EVAL_BACKOFF_SECONDS", "0.01")
    with open(project / "persllm.toml", "a", encoding="utf-8") as f:
        f.write('\n[annotate.prices]\n"gpt-4o-mini" = [1000.0, 1000.0]\n')   # $0.001 a token
    _make_run(project, "sft")
    _make_run(project, "sft-dpo")
    _use_generators(monkeypatch, {"sft": FakeGenerator("plainly"), "sft-dpo": FakeGenerator("")})
    state: dict = {"class_bad": True, "rank_bad": True}          # no malformed replies here
    fake_openai.responder = _protocol_judge(state)
    args = ("eval", "runs/sft", "runs/sft-dpo", "--judge", "gpt-4o-mini", "--concurrency", "1", "--json")
    r = cli(*args, "--budget-usd", "3")
    assert r.exit_code == 3 and "budget of $3.0 reached" in r.stderr
    sent = len(fake_openai.completions())
    assert 7 < sent < 53                          # the classifications, then part of the rest
    spent = json.loads(r.stdout)["judge"]["this_run"]["cost_usd"]
    assert 0 < spent <= 3.0
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert len(fake_openai.completions()) == 53   # only what was missing was asked
    data = json.loads(r.stdout)
    assert data["judge"]["requests"] == 53 and data["judge"]["this_run"]["requests"] == 53 - sent
    sft, dpo = data["systems"]["sft"]["judge"], data["systems"]["sft-dpo"]["judge"]
    assert (sft["knowledge_score"], dpo["attitude_rank"], sft["leak_rate"]) == (2.0, 1.0, 100.0)


def test_run_speaker_without_a_stage_token(project, monkeypatch):
    """answer_batch(..., None) hands generate_batch no stage token; a stage hands its own."""
    from persllm_cli.model import generate
    from persllm_cli.persona.speaker import RunSpeaker

    seen = []
    monkeypatch.setattr(generate, "generate_batch",
                        lambda model, tok, convs, *, stage_token, sampling=None: seen.append(stage_token) or ["x"] * len(convs))
    speaker = RunSpeaker(_make_run(project, "sft"), loaded=(object(), object()))
    q = [[{"role": "user", "content": "Who won the war?"}]]
    assert speaker.answer_batch(q, None) == ["x"] and speaker.answer_batch(q, "early") == ["x"]
    assert seen == [None, "<TIME-I>"]


def test_api_model_has_no_no_token_answers(project, cli, monkeypatch, fake_openai):
    """Beside a trained run, the prompted API model answers the leak questions only at their stage
    (it has no stage token to leave out); its no-token columns stay empty."""
    monkeypatch.chdir(project)
    _make_run(project, "sft")
    real_open = eval_answers.open_speaker
    monkeypatch.setattr(eval_answers, "open_speaker", lambda system, s, prices=None:
                        FakeGenerator("") if system.kind == "run" else real_open(system, s, prices))
    state: dict = {"class_bad": True, "rank_bad": True}
    judge_ = _protocol_judge(state)
    fake_openai.responder = lambda body, n: (judge_(body, n) if "Verdict" in body["messages"][-1]["content"]
                                             or "Ranking" in body["messages"][-1]["content"]
                                             else "Well, as I remember it, the castle.")
    result = cli("eval", "runs/sft", "--api-model", "gpt-4o-mini", "--judge", "gpt-4o-mini", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    api_ids = [json.loads(x)["id"] for x in
               (project / "build" / "eval" / "api-gpt-4o-mini" / "answers.jsonl").read_text().splitlines()]
    assert not any(i.startswith("notoken:") for i in api_ids) and sum(i.startswith("leak:") for i in api_ids) == 2
    api, sft = data["systems"]["api:gpt-4o-mini"]["judge"], data["systems"]["sft"]["judge"]
    assert (api["leak_items"], api["leak_notoken_items"], api["leak_notoken_rate"]) == (2, 0, None)
    assert (sft["leak_rate"], sft["leak_notoken_rate"]) == (0.0, 100.0)
    md = (project / "build" / "eval" / "eval.md").read_text()
    assert "| time leak % without a stage token | 100.00 | - |" in md
    assert "| sft | early | 2 | 0.00 | 100.00 | +100.00 |" in md and "| api:gpt-4o-mini | early |" not in md.split("## Time tokens against no token")[1]
