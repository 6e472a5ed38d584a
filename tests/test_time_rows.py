"""Time-token rows: each stage starts from its meaning (model/time_rows.py), the rows learn at their
own rate in SFT and DPO (train/trainer.py TimeRowRate), a run begun before either resumes as it
began, and a run trained the old way (shared mean rows, at the LoRA rate) still loads and chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_train import STEP_FLAGS, make_project, tiny_base, tiny_project  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def _stage_rows(model, tok, meta) -> "torch.Tensor":  # noqa: F821
    ids = [s["token_id"] for s in meta["stages"]]
    return model.get_input_embeddings().weight[ids].detach().clone()


def _adapter_rows(run: Path):
    from safetensors import safe_open

    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        key = next(k for k in f.keys() if "trainable_tokens" in k and "embed_tokens" in k)
        return f.get_tensor(key)


def _started_rows(project: Path, init: str = "stage"):
    """The rows a run of `project` starts from, built as training builds them."""
    from transformers import AutoTokenizer

    from persllm_cli.core.project import load_project
    from persllm_cli.model.bases import load_for_training, resolve_base
    from persllm_cli.train.rank import time_rows
    from persllm_cli.train.settings import TrainSettings
    from persllm_cli.model.time_rows import init_time_rows

    meta = json.loads((project / "build" / "tokenized" / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(project / "build" / "tokenized" / "tokenizer")
    model = load_for_training(resolve_base(meta["base"]), qlora=False, device="cpu", vocab_size=len(tok))
    rows = time_rows(load_project(project), TrainSettings(time_token_init=init), meta, project / "runs" / "none")
    info = init_time_rows(model, tok, rows.meanings) if rows.meanings else None
    return _stage_rows(model, tok, meta), info


def test_rows_start_apart_one_per_stage(tiny_project):
    (tiny_project / "data" / "early" / "knowledge.txt").write_text("Hagrid took him to the owl shop and the wand maker.\n")
    (tiny_project / "data" / "late" / "knowledge.txt").write_text("The auror office, the locket and the horcrux hunt.\n")
    mean, _ = _started_rows(tiny_project, "mean")
    assert (mean[0] == mean[1]).all()                      # before: one shared mean for every stage
    rows, info = _started_rows(tiny_project)
    assert info["min_distance"] > 0.05 and all(n >= 3 for n in info["tokens_per_row"])
    assert not (rows[0] == rows[1]).all() and (rows[0] - rows[1]).norm() > 0.05 * mean[0].norm()
    again, _ = _started_rows(tiny_project)
    assert (again == rows).all()                           # the same start on every rank and every run


def test_rows_learn_at_their_own_rate_in_sft_and_dpo(cli, tiny_project):
    start, _ = _started_rows(tiny_project)
    for method in ("sft", "dpo"):
        fast, slow = f"runs/{method}-fast", f"runs/{method}-slow"
        assert cli("-q", "train", "--method", method, *STEP_FLAGS, "--time-token-learning-rate", "0.1", "--output", fast).exit_code == 0
        assert cli("-q", "train", "--method", method, *STEP_FLAGS, "--time-token-learning-rate", "0.0002", "--output", slow).exit_code == 0
        moved_fast = (_adapter_rows(tiny_project / fast) - start).abs().max().item()
        moved_slow = (_adapter_rows(tiny_project / slow) - start).abs().max().item()
        # Adam moves a parameter by about its rate per step: two steps at 0.1 against two at 2e-4.
        assert moved_fast > 0.05 and moved_slow < 0.002, (method, moved_fast, moved_slow)
        info = json.loads((tiny_project / fast / "run.json").read_text())
        assert info["time_rows"]["init"] == "stage" and info["time_rows"]["learning_rate"] == 0.1
        assert info["settings"]["learning_rate"] == 0.0002          # the LoRA keeps its own rate
        assert [m["learning_rate"] for m in _metrics(tiny_project / fast)][0] == pytest.approx(2e-4)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_begun_before_row_rates_resumes_as_it_began(cli, tiny_project, monkeypatch):
    """Its checkpoints hold an optimizer without the rows' group; resuming must not add one."""
    from persllm_cli.train import trainer as trainer_utils

    flags = ["--batch-size", "2", "--grad-accum", "1", "--max-steps", "4", "--save-steps", "2", "--output", "runs/old"]

    def ctrl_c_after_first_checkpoint(self, args, state, control, **kw):
        if state.global_step >= 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:    # the old optimizer: the rows in the LoRA's group
        m.setattr(trainer_utils, "split_time_rows", lambda *a, **k: 0)
        m.setattr(trainer_utils.ProgressCallback, "on_save", ctrl_c_after_first_checkpoint, raising=False)
        assert cli("-q", "train", *flags, "--time-token-init", "mean").exit_code == 130
    run = tiny_project / "runs" / "old"
    info = json.loads((run / "run.json").read_text())
    for key in ("time_token_learning_rate", "time_token_init"):
        del info["settings"][key]
    del info["time_rows"]                                  # run.json as the old code wrote it
    (run / "run.json").write_text(json.dumps(info))
    r = cli("train", *flags, "--resume")
    assert r.exit_code == 0, r.output
    assert "continues as it began" in r.stderr and "Resuming SFT from checkpoints/sft/checkpoint-2" in r.stderr
    assert json.loads((run / "run.json").read_text())["time_rows"] == {"init": "mean", "learning_rate": None, "meanings": []}
    # A run begun with row rates resumes with them (its optimizer state has the rows' group).
    with monkeypatch.context() as m:
        m.setattr(trainer_utils.ProgressCallback, "on_save", ctrl_c_after_first_checkpoint, raising=False)
        assert cli("-q", "train", *flags[:-1], "runs/new").exit_code == 130
    r = cli("train", *flags[:-1], "runs/new", "--resume")
    assert r.exit_code == 0 and "continues as it began" not in r.stderr, r.output


def test_old_run_still_loads_and_chats(cli, smollm2, tmp_path, monkeypatch):
    """A run trained the old way (every row the shared mean, at the LoRA rate; run.json without
    time_rows) loads as before: the adapter's rows replace whatever the resize drew."""
    p = make_project(cli, tmp_path / "proj", n_records=6)
    monkeypatch.chdir(p)
    assert cli("-q", "tokenize", "--max-length", "64").exit_code == 0
    r = cli("-q", "train", *STEP_FLAGS, "--time-token-init", "mean", "--time-token-learning-rate", "0.0002", "--output", "runs/old")
    assert r.exit_code == 0, r.output
    run = p / "runs" / "old"
    info = json.loads((run / "run.json").read_text())
    for key in ("time_token_learning_rate", "time_token_init"):
        del info["settings"][key]
    del info["time_rows"]
    (run / "run.json").write_text(json.dumps(info))
    stored = _adapter_rows(run)
    assert (stored[0] - stored[1]).abs().max() < 0.01     # nearly one row, as old runs were

    from persllm_cli.model.load import load_run

    model, tok, _ = load_run(run)
    meta = json.loads((p / "build" / "tokenized" / "meta.json").read_text())
    assert (_stage_rows(model, tok, meta) == stored).all()
    for stage in ("early", "late"):
        r = cli("chat", "runs/old", "--stage", stage, "--prompt", "Who is your best friend?",
                "--temperature", "0", "--max-new-tokens", "12")
        assert r.exit_code == 0 and r.stdout.strip(), r.output


def test_stage_rows_are_not_what_the_model_says_next(smollm2, tmp_path):
    """SmolLM2 ties its output head to the embedding: a stage row is also an output row. Started
    from its stage's meaning, no time token may become a likely next token (rescaled to a full
    row's length, one was the top prediction at the start of every answer: empty answers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from persllm_cli.model.bases import resize_embeddings
    from persllm_cli.model.chat_format import load_tokenizer, prompt_ids
    from persllm_cli.model.time_rows import StageMeaning, init_time_rows

    tok = load_tokenizer(smollm2, 3)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    resize_embeddings(model, len(tok))
    ids = tok.convert_tokens_to_ids(["<TIME-I>", "<TIME-II>", "<TIME-III>"])
    texts = ["early first year at Hogwarts quirrell broom mirror", "middle fifth year at Hogwarts umbridge dementors",
             "late after the war children horcrux locket auror"]
    init_time_rows(model, tok, [StageMeaning(i, t) for i, t in zip(ids, texts)])
    for question in ("What was your first Quidditch match like?", "Tell me about your children."):
        for token in ("<TIME-I>", "<TIME-III>"):
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids(tok, [{"role": "user", "content": question}], token)])).logits[0, -1]
            rank = (logits > logits[ids].max()).sum().item()
            assert rank > 1000, (question, token, rank)
