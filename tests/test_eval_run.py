"""`persllm eval` with a real run (smollm2 + untrained LoRA + time tokens): answers come from
model.generate.generate_batch, match what `chat` would say at that stage, and a rerun generates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.run_factory import make_run

QUESTIONS = [("e1", "early", "Who is your best friend?"), ("e2", "early", "What is your favourite lesson at school?"),
             ("m1", "middle", "Do you trust the Ministry?"), ("l1", "late", "What do you do for a living now?")]


@pytest.fixture(scope="module")
def _eval_run(_embedded_models, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("eval-runs") / "r1", _embedded_models / "smollm2-135m")


@pytest.mark.slow
def test_eval_a_real_run_then_rerun_generates_nothing(_eval_run, smollm2, cli, tmp_path, monkeypatch):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({
        "id": rid, "persona": "Harry Potter", "stage": stage, "pattern": "ordinary", "status": "ok",
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"A reference answer about {q}"}],
    }) + "\n" for rid, stage, q in QUESTIONS))
    from persllm_cli.model import generate, load

    real_load, loaded = load.load_run, []
    monkeypatch.setattr(load, "load_run", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    # Without stage swap, whose extra questions tests/test_fidelity.py covers: these ids are counted below.
    args = ("eval", str(_eval_run), "--test", str(test), "--max-new-tokens", "8", "--batch-size", "2", "-o", "out",
            "--swap-questions", "0")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "BLEU intra" in result.stderr and "r1" in result.stderr          # the table
    out = tmp_path / "out"
    answers = [json.loads(x) for x in (out / "r1" / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["e1", "e2", "m1", "l1"]           # stage by stage
    assert all(a["status"] == "ok" and a["messages"][1]["content"].strip() for a in answers)
    md = (out / "eval.md").read_text()
    assert "| metric | r1 |" in md and "| answered | 4/4 |" in md and "| r1 | middle | 1 |" in md
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "eval.json").read_text())["systems"]["r1"]["answered"] == 4

    # Batched, left-padded answers are what chat says to the same question at the same stage.
    assert len(loaded) == 1
    model, tokenizer, info = loaded[0]
    for a in answers:
        _, token = info.stage_token(a["stage"])
        alone = "".join(generate.stream_reply(model, tokenizer, a["messages"][:1], token, generate.Sampling(max_new_tokens=8, temperature=0.0))).strip()
        assert a["messages"][1]["content"] == alone, a["id"]

    def no_loading(*_a, **_k):
        raise AssertionError("the rerun loaded the model")

    monkeypatch.setattr(load, "load_run", no_loading)
    before = (out / "r1" / "answers.jsonl").read_text()
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    assert (out / "r1" / "answers.jsonl").read_text() == before
    assert json.loads(result.stdout)["systems"]["r1"]["answered"] == 4
