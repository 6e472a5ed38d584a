"""`persllm train`: SFT/DPO on CPU, the run directory, DDP with gloo, exact resume, clear errors.

Most tests use a tiny random-initialised Llama (2 layers, hidden 64) with the embedded model's
tokenizer: the code path is the same as for a real model and a step takes milliseconds. One test
trains the real SmolLM2-135M to check the adapter size and contents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_persllm, subprocess_env

pytestmark = pytest.mark.slow

STEP_FLAGS = ["--batch-size", "2", "--grad-accum", "1", "--max-steps", "2"]


@pytest.fixture(scope="session")
def tiny_base(_embedded_models, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(_embedded_models / "smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_project(cli, root: Path, n_records: int = 12) -> Path:
    assert cli("init", str(root), "--name", "Harry", "--stage", "early:first year", "--stage", "late:after the war").exit_code == 0
    (root / "build").mkdir()
    recs = []
    for i in range(n_records):
        msgs = [{"role": "user", "content": f"Question {i} about the castle?"},
                {"role": "assistant", "content": "I reckon " + "it is brilliant. " * (1 + i % 3)}]
        recs.append({"id": f"r{i}", "stage": ("early", "late")[i % 2], "status": "ok", "messages": msgs})
    (root / "build" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs = [{"id": f"d{i}", "stage": ("early", "late")[i % 2], "prompt": [{"role": "user", "content": f"Spell {i}?"}],
              "chosen": [{"role": "assistant", "content": "Expelliarmus."}],
              "rejected": [{"role": "assistant", "content": "Something I learnt much later."}]} for i in range(4)]
    (root / "build" / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


@pytest.fixture
def tiny_project(cli, tiny_base, tmp_path, monkeypatch) -> Path:
    p = make_project(cli, tmp_path / "proj")
    monkeypatch.chdir(p)
    r = cli("-q", "tokenize", "--base", str(tiny_base), "--max-length", "64")
    assert r.exit_code == 0, r.output
    return p


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_smollm2_complete_run_and_small_adapter(cli, smollm2, tmp_path, monkeypatch):
    from safetensors import safe_open

    p = make_project(cli, tmp_path / "proj", n_records=6)
    monkeypatch.chdir(p)
    assert cli("-q", "tokenize", "--max-length", "64").exit_code == 0
    r = cli("train", *STEP_FLAGS, "--save-steps", "2", "--output", "runs/smol")
    assert r.exit_code == 0, r.output
    assert "float32" in r.stderr  # the one-line CPU notice
    run = p / "runs" / "smol"
    for name in ("adapter/adapter_model.safetensors", "tokenizer/tokenizer.json", "loss.png", "README.md",
                 "run.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (p / "runs" / "latest").resolve() == run.resolve()
    info = json.loads((run / "run.json").read_text())
    assert info["complete"] is True and info["base"] == "smollm2-135m" and info["method"] == "sft"
    assert [s["token"] for s in info["stages"]] == ["<TIME-I>", "<TIME-II>"]
    assert info["steps"] == 2 and info["tokens_per_second"] > 0 and 0 <= info["padding_waste"] < 1
    size = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 30e6, size
    checkpoint = run / "checkpoints" / "sft" / "checkpoint-2" / "adapter_model.safetensors"
    assert checkpoint.stat().st_size < 30e6  # checkpoints hold no whole embedding matrices either
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert not [k for k, s in shapes.items() if s[0] > 10_000], "a whole embedding matrix was saved"
    deltas = [s for k, s in shapes.items() if "trainable_tokens" in k]
    assert deltas and all(s == [2, 576] for s in deltas)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    from persllm_cli.model.load import load_run
    from persllm_cli.model.chat_format import prompt_ids

    model, tok, run_info = load_run(run)
    ids = prompt_ids(tok, [{"role": "user", "content": "Hello?"}], run_info.stage_token("early")[1])
    assert ids[0] == tok.convert_tokens_to_ids("<TIME-I>")
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape[-1] == len(tok) and not model.training

    # The CPU merge was cached: the next load reads it without PEFT and answers exactly the same.
    assert len(list((tmp_path / "persllm-home" / "merged").iterdir())) == 1
    import persllm_cli.model.load as inference

    def no_adapter(*a, **kw):
        raise AssertionError("the cached merge was not used")

    monkeypatch.setattr(inference, "_attach_adapter", no_adapter)
    again, _, _ = load_run(run)
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([ids])).logits, logits)


def test_run_files_get_the_modes_of_a_plain_open(cli, tiny_project):
    """safetensors and mkstemp write 0600; a run shared with others must read like any file (umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        r = cli("train", *STEP_FLAGS, "--save-steps", "1", "--output", "runs/modes")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    run = tiny_project / "runs" / "modes"
    paths = [p for p in run.rglob("*") if not p.is_symlink()]
    assert run / "adapter" / "adapter_model.safetensors" in paths
    assert run / "checkpoints" / "sft" / "checkpoint-1" / "adapter_model.safetensors" in paths
    wrong = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)}
    assert wrong == {}


def test_sft_then_dpo(cli, tiny_project):
    r = cli("train", "--method", "sft+dpo", *STEP_FLAGS, "--output", "runs/both")
    assert r.exit_code == 0, r.output
    run = tiny_project / "runs" / "both"
    rows = metrics(run)
    assert [(m["phase"], m["step"]) for m in rows] == [("sft", 1), ("sft", 2), ("dpo", 1), ("dpo", 2)]
    assert abs(rows[2]["loss"] - 0.6931) < 1e-3  # DPO starts with the reference = the SFT adapter
    assert (run / "checkpoints" / "sft-adapter" / "adapter_config.json").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["complete"] and set(info["phases"]) == {"sft", "dpo"}
    assert not (run / "adapter" / "ref").exists()  # only the trained adapter is saved


def test_stage_contrast_adds_to_the_loss_and_leaves_the_language_model_loss_alone(cli, tiny_project):
    """`--stage-contrast W`: each log line carries the contrast, and the logged loss is the plain
    run's loss plus W times it (the swapped copies carry no labels). Compared at the first step,
    where both runs hold the same weights and see the same batch."""
    assert cli("train", *STEP_FLAGS, "--output", "runs/plain").exit_code == 0
    r = cli("train", *STEP_FLAGS, "--stage-contrast", "2", "--output", "runs/contrast")
    assert r.exit_code == 0, r.output
    plain, contrast = metrics(tiny_project / "runs" / "plain"), metrics(tiny_project / "runs" / "contrast")
    assert "stage_contrast" not in plain[0]
    c = contrast[0]["stage_contrast"]
    assert 0 < c < 5 * math.log(2)   # two stages: log 2 when the time token changes nothing
    assert contrast[0]["loss"] == pytest.approx(plain[0]["loss"] + 2 * c, abs=2e-3)
    info = json.loads((tiny_project / "runs" / "contrast" / "run.json").read_text())
    assert info["settings"]["stage_contrast"] == 2
    assert "stage contrast weight 2" in (tiny_project / "runs" / "contrast" / "README.md").read_text()


def test_qlora_code_path_on_cpu(cli, tiny_project, monkeypatch):
    """bitsandbytes NF4 runs on CPU too: the QLoRA loader, k-bit preparation and both trainers."""
    monkeypatch.setenv("PERSLLM_CPU_QLORA", "1")
    r = cli("train", "--method", "sft+dpo", *STEP_FLAGS, "--output", "runs/q")
    assert r.exit_code == 0, r.output
    info = json.loads((tiny_project / "runs" / "q" / "run.json").read_text())
    assert info["complete"] and info["hardware"]["quantized"] is True
    r = cli("train", *STEP_FLAGS, "--no-qlora", "--output", "runs/noq")
    assert json.loads((tiny_project / "runs" / "noq" / "run.json").read_text())["hardware"]["quantized"] is False


def test_dpo_only(cli, tiny_project):
    r = cli("train", "--method", "dpo", *STEP_FLAGS, "--beta", "0.2", "--output", "runs/dpo")
    assert r.exit_code == 0, r.output
    info = json.loads((tiny_project / "runs" / "dpo" / "run.json").read_text())
    assert info["complete"] and info["settings"]["beta"] == 0.2 and list(info["phases"]) == ["dpo"]


def test_nproc_2_ranks_end_identical(tiny_project):
    r = run_persllm("train", *STEP_FLAGS, "--nproc", "2", "--output", "runs/ddp", cwd=tiny_project,
                    env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tiny_project / "runs" / "ddp" / "run.json").read_text())
    # Each rank hashed its own trained weights; the saved adapter is rank 0's.
    hashes = info["hardware"]["adapter_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] and len(hashes[0]) == 64
    assert info["complete"] and info["hardware"]["processes"] == 2
    steps = metrics(tiny_project / "runs" / "ddp")
    seen = [i for m in steps for i in m["samples"]]
    assert len(seen) == 8 and len(set(seen)) == 8  # 2 steps x 2 ranks x batch 2, no sample twice
    assert "Launching 2 processes" in r.stderr and not r.stdout.strip()


def test_started_by_torchrun_does_not_relaunch(tiny_project):
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "persllm_cli", "train", *STEP_FLAGS, "--output", "runs/external"]
    import subprocess

    r = subprocess.run(cmd, cwd=tiny_project, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Launching" not in r.stderr
    info = json.loads((tiny_project / "runs" / "external" / "run.json").read_text())
    assert info["complete"] and info["hardware"]["processes"] == 2


def test_resume_continues_exactly(cli, tiny_project, monkeypatch):
    flags = ["--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2"]
    assert cli("-q", "train", *flags, "--output", "runs/straight").exit_code == 0
    from persllm_cli.train import trainer as trainer_utils

    def ctrl_c_after_first_checkpoint(self, args, state, control, **kw):
        if state.global_step >= 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer_utils.ProgressCallback, "on_save", ctrl_c_after_first_checkpoint, raising=False)
        r = cli("-q", "train", *flags, "--output", "runs/cut")
    assert r.exit_code == 130
    cut = tiny_project / "runs" / "cut"
    assert (cut / "checkpoints" / "sft" / "checkpoint-2").is_dir()
    assert not json.loads((cut / "run.json").read_text())["complete"]
    from persllm_cli.core.errors import PersllmError
    from persllm_cli.model.runs import read_run

    with pytest.raises(PersllmError, match="incomplete"):
        read_run(cut)  # chat refuses a run that did not finish
    r = cli("train", *flags, "--resume")  # no --output: the newest unfinished run
    assert r.exit_code == 0, r.output
    assert "Resuming SFT from checkpoints/sft/checkpoint-2" in r.stderr
    a, b = metrics(tiny_project / "runs" / "straight"), metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["samples"] for m in a] == [m["samples"] for m in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4
    assert json.loads((cut / "run.json").read_text())["complete"]


def test_errors(cli, tiny_project, tiny_base, tmp_path):
    def fails(*args, says):
        r = cli("train", *args)
        assert r.exit_code == 1, r.output
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    fails("--data", "nowhere", says="tokenized data not found")
    r = cli("train", "--method", "ppo")
    assert r.exit_code == 2 and "--method must be one of sft, dpo, sft+dpo, not 'ppo'" in r.stderr  # usage
    fails("--gpus", "1", says="no CUDA device is visible")
    fails("--gpus", "foo", says="--gpus must be a number of at least 1 or 'all', not 'foo'")  # the form first
    fails("--base", "no-such-model", says="base model not found")
    # Data made with another tokenizer: a base whose vocabulary differs.
    from transformers import AutoTokenizer

    other = tmp_path / "other-base"
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    tok.add_tokens(["<wizard>"])
    tok.save_pretrained(other)
    (other / "config.json").write_text((tiny_base / "config.json").read_text())
    fails("--base", str(other), *STEP_FLAGS, "--output", "runs/other", says="whose tokenizer differs")
    assert not (tiny_project / "runs" / "other").exists()  # nothing half-made is left behind
    (tiny_project / "build" / "tokenized" / "dpo.jsonl").unlink()
    meta_path = tiny_project / "build" / "tokenized" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["dpo"] = None
    meta_path.write_text(json.dumps(meta))
    fails("--method", "dpo", says="needs preference pairs")
    (tiny_project / "runs" / "taken").mkdir(parents=True)
    (tiny_project / "runs" / "taken" / "x").write_text("x")
    fails("--output", "runs/taken", says="already exists")
    fails("--output", "runs/taken", "--resume", says="no checkpoints")
    (tiny_project / "afile").write_text("mine")
    fails("--output", "afile", says="is not a directory")
    assert not (tiny_project / "runs" / "latest").exists()


def test_bad_hyperparameters_fail_before_anything_is_written(cli, tiny_project):
    for flag, value, says in [("--learning-rate", "-1", "--learning-rate must be more than 0"),
                              ("--learning-rate", "0", "--learning-rate must be more than 0"),
                              ("--learning-rate", "nan", "--learning-rate must be more than 0"),
                              ("--learning-rate", "inf", "--learning-rate must be more than 0 and less than inf"),
                              ("--epochs", "0", "--epochs must be more than 0"),
                              ("--lora-alpha", "-3", "--lora-alpha must be more than 0"),
                              ("--beta", "-1", "--beta must be more than 0"),
                              ("--lora-dropout", "1.5", "--lora-dropout must be at least 0 and less than 1"),
                              ("--lora-dropout", "-0.1", "--lora-dropout must be at least 0 and less than 1"),
                              ("--seed", "-1", "--seed must be at least 0 and less than 4294967296")]:
        r = cli("train", flag, value, "--output", "runs/g")
        assert r.exit_code == 2, (flag, value, r.output)  # a bad flag value is a usage error
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tiny_project / "runs").exists()
    r = cli("-q", "train", "--epochs", "0.5", "--batch-size", "2", "--grad-accum", "1", "--output", "runs/half")
    assert r.exit_code == 0, r.output  # fractional epochs are fine
    assert json.loads((tiny_project / "runs" / "half" / "run.json").read_text())["steps"] == 3  # 12 records / 2 / 2


def test_a_failed_start_leaves_no_half_made_run(cli, tiny_project, monkeypatch):
    import persllm_cli.train.rank as training

    def bug(*a, **k):
        raise ValueError("a bug before the first step")

    monkeypatch.setattr(training, "_run_phases", bug)
    runs = tiny_project / "runs"
    with pytest.raises(ValueError):  # a bug keeps its traceback...
        cli("train", "--output", "runs/g")
    assert not (runs / "g").exists()  # ...but leaves no run.json for a rerun to call "already exists"
    (runs / "empty").mkdir(parents=True)  # a failed start leaves no empty runs/ behind either
    with pytest.raises(ValueError):
        cli("train", "--output", "runs/empty")
    assert list((runs / "empty").iterdir()) == []  # the user's own directory stays, as it was
    (runs / "stopped" / "checkpoints" / "sft").mkdir(parents=True)
    (runs / "stopped" / "run.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(ValueError):
        cli("train", "--output", "runs/stopped", "--resume")
    assert (runs / "stopped" / "run.json").is_file()  # a run being resumed is never removed


def test_gpu_count_and_out_of_memory_messages(cli, tiny_project, monkeypatch):
    import torch

    import persllm_cli.train.rank as training

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 1)
        r = cli("train", "--gpus", "2")
        assert r.exit_code == 1 and "more than the 1 visible GPU" in r.stderr

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "_run_phases", oom)
    r = cli("train", "--output", "runs/oom")
    assert r.exit_code == 1 and "--batch-size" in r.stderr and "--grad-accum" in r.stderr and "--qlora" in r.stderr
    assert not (tiny_project / "runs" / "oom").exists()


def test_report_to_tensorboard_writes_the_loss_curves(cli, tiny_project):
    """--report-to tensorboard goes through transformers' own reporter; the event files are read
    back with TensorBoard's reader and hold the same losses as metrics.jsonl, one TensorBoard run
    per phase."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = cli("train", "--method", "sft+dpo", *STEP_FLAGS, "--report-to", "tensorboard", "--output", "runs/tb")
    assert r.exit_code == 0, r.output
    run = tiny_project / "runs" / "tb"
    assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()  # still there, beside it
    for phase in ("sft", "dpo"):
        folder = run / "tensorboard" / phase
        assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
        events = EventAccumulator(str(folder))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"]
        logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
        expected = [(m["step"], m["loss"]) for m in metrics(run) if m["phase"] == phase]
        assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2]
        for (_, a), (_, b) in zip(logged, expected):
            assert abs(a - b) < 1e-4
    assert not list((run / "checkpoints").rglob("events.out.tfevents.*"))  # not in transformers' default place
    import os

    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # the process's environment is as it was


def test_report_to_is_off_by_default_and_a_missing_package_is_one_line(cli, tiny_project, monkeypatch):
    r = cli("train", *STEP_FLAGS, "--output", "runs/plain")
    assert r.exit_code == 0, r.output
    assert not (tiny_project / "runs" / "plain" / "tensorboard").exists()
    assert json.loads((tiny_project / "runs" / "plain" / "run.json").read_text())["settings"]["report_to"] == "none"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    r = cli("train", *STEP_FLAGS, "--report-to", "tensorboard", "--output", "runs/tb")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--report-to tensorboard needs the tensorboard package" in r.stderr and "pip install tensorboard" in r.stderr
    assert not (tiny_project / "runs" / "tb").exists()
    r = cli("train", "--report-to", "mlflow")
    assert r.exit_code == 2 and "--report-to must be one of none, tensorboard, wandb" in r.stderr


def test_report_to_wandb_stays_offline(cli, tiny_project, monkeypatch):
    """Only where wandb is installed (it is not a dependency): an offline run in runs/<name>/wandb/,
    even when the environment asks for online."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    r = cli("train", *STEP_FLAGS, "--report-to", "wandb", "--output", "runs/wb")
    assert r.exit_code == 0, r.output
    offline = list((tiny_project / "runs" / "wb" / "wandb").glob("offline-run-*"))
    assert offline and not list((tiny_project / "runs" / "wb" / "wandb").glob("run-*"))
    import os

    assert os.environ["WANDB_MODE"] == "online"


# ------------------------------------------------------------------------ one adapter per stage

def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_adapter_per_stage_trains_each_stage_on_its_own_and_answers_with_the_stage_asked(cli, tiny_project):
    import torch

    from persllm_cli.core.errors import PersllmError
    from persllm_cli.model.chat_format import prompt_ids
    from persllm_cli.model.load import load_run
    from persllm_cli.persona.speaker import RunSpeaker

    r = cli("train", "--adapter-per-stage", "--method", "sft+dpo", "--batch-size", "2", "--grad-accum", "1",
            "--max-steps", "4", "--learning-rate", "0.01", "--output", "runs/ps")
    assert r.exit_code == 0, r.output
    run = tiny_project / "runs" / "ps"
    info = json.loads((run / "run.json").read_text())
    assert info["complete"] and info["stage_runs"] == {"early": "stages/early", "late": "stages/late"}
    assert info["steps"] == {"early": 2, "late": 2}   # 4 steps times each stage's half of the 12 examples
    assert not (run / ".data").exists() and not (run / "adapter").exists()
    assert (tiny_project / "runs" / "latest").resolve() == run.resolve()
    assert not (run / "stages" / "latest").exists()
    for sid in ("early", "late"):
        sub = json.loads((run / "stages" / sid / "run.json").read_text())
        assert sub["complete"] and sub["trained_stage"] == sid and sub["steps"] == 2
        assert [(m["phase"], m["step"]) for m in metrics(run / "stages" / sid)] == [("sft", 1), ("sft", 2), ("dpo", 1), ("dpo", 2)]
    # Each stage saw only its own examples: the early run's data holds no late record, and the other way round.
    early_data = json.loads((run / "stages" / "early" / "run.json").read_text())["data"]
    late_data = json.loads((run / "stages" / "late" / "run.json").read_text())["data"]
    assert early_data != late_data

    speaker = RunSpeaker(run)
    speaker.load()
    # On CPU each stage is its own run merged (as `chat` loads a run there): no PEFT layers left.
    assert set(speaker.stage_models) == {"early", "late"} and speaker.stage_adapters is None
    assert not any("lora" in name for name, _ in speaker.stage_models["early"].named_modules())
    ids = {sid: prompt_ids(speaker.tokenizer, [{"role": "user", "content": "Question 3 about the castle?"}],
                           speaker.token(sid)) for sid in ("early", "late")}
    seen = {}
    for sid in ("late", "early", "late"):   # switching back and forth
        speaker.route(sid)
        seen[sid] = _logits(speaker.model, ids[sid])
        alone, _, _ = load_run(run / "stages" / sid)   # the stage's own run, merged
        assert torch.equal(seen[sid], _logits(alone, ids[sid]))
    assert not torch.allclose(_logits(load_run(run / "stages" / "early")[0], ids["late"]), seen["late"], atol=1e-3)
    answers = {sid: speaker.answer_batch([[{"role": "user", "content": "Hello?"}]], sid) for sid in ("early", "late")}
    assert all(a[0] is not None for a in answers.values())

    with pytest.raises(PersllmError, match="holds one adapter per stage"):
        load_run(run)   # one model only: export and the local backend name a stage's run
    e = cli("export", "runs/ps", "-f", "hf", "-o", "out")
    assert e.exit_code == 2 and "--stage (early, late)" in e.stderr and len(e.stderr.strip().splitlines()) == 1, e.stderr
    # A stage's model speaks for that stage alone: its template refuses the others and its card has
    # no row for them.
    e = cli("export", "runs/ps", "-f", "hf", "--stage", "early", "-o", "out", "--no-check")
    assert e.exit_code == 0, e.output
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(tiny_project / "out")
    hello = [{"role": "user", "content": "Hello?"}]
    rendered = exported.apply_chat_template(hello, add_generation_prompt=True)["input_ids"]
    assert rendered == prompt_ids(speaker.tokenizer, hello, speaker.token("early"))   # early is the default
    with pytest.raises(Exception, match="unknown stage late"):
        exported.apply_chat_template(hello, add_generation_prompt=True, stage="late")
    card = (tiny_project / "out" / "README.md").read_text()
    assert "| early (default) |" in card and "| late" not in card and "stage early's own model" in card
    e = cli("export", "runs/ps/stages/early", "-f", "hf", "--stage", "late", "-o", "out2", "--no-check")
    assert e.exit_code == 2 and "trained for stage early alone" in e.stderr and not (tiny_project / "out2").exists()
    again = cli("train", "--adapter-per-stage", "--output", "runs/ps", "--resume")
    assert again.exit_code == 1 and "already finished" in again.stderr


def test_adapter_per_stage_refuses_a_stage_without_examples(cli, tiny_project):
    sft = tiny_project / "build" / "tokenized" / "sft.jsonl"
    sft.write_text("".join(line + "\n" for line in sft.read_text().splitlines() if json.loads(line)["stage"] != "late"))
    r = cli("train", "--adapter-per-stage", *STEP_FLAGS, "--output", "runs/ps")
    assert r.exit_code == 1 and "no training examples at stage(s) late" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tiny_project / "runs" / "ps").exists()


def test_adapter_per_stage_under_nproc_2_trains_each_stage_on_both_ranks(tiny_project):
    r = run_persllm("train", "--adapter-per-stage", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
                    "--nproc", "2", "--output", "runs/psddp", cwd=tiny_project, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("Launching 2 processes") == 2 and not r.stdout.strip()
    run = tiny_project / "runs" / "psddp"
    assert json.loads((run / "run.json").read_text())["complete"] and not (run / ".data").exists()
    for sid in ("early", "late"):
        sub = json.loads((run / "stages" / sid / "run.json").read_text())
        hashes = sub["hardware"]["adapter_sha256_per_rank"]
        assert sub["complete"] and sub["trained_stage"] == sid and sub["hardware"]["processes"] == 2
        assert len(hashes) == 2 and hashes[0] == hashes[1]
        seen = [i for m in metrics(run / "stages" / sid) for i in m["samples"]]
        assert len(seen) == len(set(seen)) == 2 * 2   # its 1 step x 2 ranks x batch 2, no example twice
    assert not list(run.rglob(".launch-*.json"))


def test_stage_data_holds_its_stage_and_the_general_examples(tmp_path):
    from persllm_cli.train.per_stage import Tokenized, stage_data

    data = tmp_path / "tok"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "tokenizer.json").write_text("{}")
    rows = [{"id": "a", "stage": "early", "source": "persona"}, {"id": "b", "stage": "late", "source": "persona"},
            {"id": "g", "stage": None, "source": "general"}, {"id": "c", "stage": "early", "source": "persona"}]
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "dpo.jsonl").write_text(json.dumps({"id": "p", "stage": "late"}) + "\n")
    meta = {"stages": [{"id": "early"}, {"id": "late"}], "files": {"sft": "sft.jsonl", "dpo": "dpo.jsonl"}}
    tokenized = Tokenized.read(data)
    assert (tokenized.own("early"), tokenized.general()) == (2, 1)
    assert stage_data(tokenized, meta, "early", tmp_path / "early") == 3
    assert [json.loads(x)["id"] for x in (tmp_path / "early" / "sft.jsonl").read_text().splitlines()] == ["a", "g", "c"]
    early_meta = json.loads((tmp_path / "early" / "meta.json").read_text())
    assert early_meta["only_stage"] == "early" and early_meta["files"]["dpo"] is None
    assert not (tmp_path / "early" / "dpo.jsonl").exists() and (tmp_path / "early" / "tokenizer" / "tokenizer.json").is_file()
    assert stage_data(tokenized, meta, "late", tmp_path / "late") == 2
    assert (tmp_path / "late" / "dpo.jsonl").read_text().count("\n") == 1


def test_adapter_per_stage_resumes_with_the_stages_not_yet_trained(cli, tiny_project, monkeypatch):
    import persllm_cli.train.rank as training

    real = training._run_phases

    def late_fails(s, rank, device, tok, meta, run_dir, *rest):
        if meta.get("only_stage") == "late":
            raise ValueError("stopped while the second stage trains")
        return real(s, rank, device, tok, meta, run_dir, *rest)

    monkeypatch.setattr(training, "_run_phases", late_fails)
    flags = ("--adapter-per-stage", *STEP_FLAGS, "--output", "runs/ps")
    with pytest.raises(ValueError):
        cli("train", *flags)
    run = tiny_project / "runs" / "ps"
    early = json.loads((run / "stages" / "early" / "run.json").read_text())
    trained_at = (run / "stages" / "early" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert early["complete"] and not json.loads((run / "run.json").read_text())["complete"]   # the first stage is kept
    assert cli("train", *flags).exit_code == 1   # a stopped run is resumed, not overwritten
    monkeypatch.setattr(training, "_run_phases", real)
    r = cli("train", *flags, "--resume")
    assert r.exit_code == 0, r.output
    assert "Stage early: already trained" in r.stderr
    assert (run / "stages" / "early" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == trained_at
    assert json.loads((run / "run.json").read_text())["complete"] and not (run / ".data").exists()
