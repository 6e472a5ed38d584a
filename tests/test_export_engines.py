"""The exports in llama.cpp itself: its Jinja engine renders the stage template byte for byte as
transformers does, and its own converter (convert_hf_to_gguf.py) writes the same GGUF as persllm.

llama.cpp's source comes from `make llama-cpp` (tests/llama_cpp.py): without it these tests fail,
they never skip.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persllm_cli.export import engine, gguf_vocab
from persllm_cli.export.template import stage_template
from tests.conftest import REPO
from tests.llama_cpp import llama_home, llama_renderer, llama_source  # noqa: F401 (fixtures)

STAGES = [{"id": "early", "token": "<TIME-I>"}, {"id": "middle", "token": "<TIME-II>"}, {"id": "late", "token": "<TIME-III>"}]
CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}],
]
# What docs/TEMPLATES.md lists as the Jinja persllm's own part of the template uses.
USED = {"methods": {"startswith", "split", "replace"}, "filters": {"length", "title"}, "tests": {"defined", "none"},
        "functions": {"raise_exception"}}


def _features(template: str) -> dict[str, set[str]]:
    import jinja2
    from jinja2 import nodes

    tree = jinja2.Environment().parse(template)
    found: dict[str, set[str]] = {k: set() for k in USED}
    for call in tree.find_all(nodes.Call):
        if isinstance(call.node, nodes.Getattr):
            found["methods"].add(call.node.attr)
        elif isinstance(call.node, nodes.Name):
            found["functions"].add(call.node.name)
    found["filters"] |= {f.name for f in tree.find_all(nodes.Filter)}
    found["tests"] |= {t.name for t in tree.find_all(nodes.Test)}
    return found


def test_wrapper_keeps_to_the_documented_subset():
    # persllm's own part of the template (around an empty base): only what docs/TEMPLATES.md lists,
    # which llama.cpp's engine implements too (no str.count: llama.cpp fails with "Callee is not a function").
    found = _features(stage_template("", STAGES, "late"))
    at_answer = _features(stage_template("", STAGES, "late", "<|im_start|>assistant\n"))  # --time-token-at answer
    found = {k: found[k] | at_answer[k] for k in found}
    for kind, names in found.items():
        assert names <= USED[kind], (kind, names - USED[kind])
    assert "count" not in found["methods"]
    docs = (REPO / "docs" / "TEMPLATES.md").read_text()
    for names in USED.values():
        for name in names:
            assert re.search(rf"`[^`]*\b{name}\b[^`]*`", docs), name


def test_stage_is_a_template_variable_vllm_passes_on():
    # vLLM hands a request's chat_template_kwargs to the template only when the template reads them
    # (jinja2.meta.find_undeclared_variables); `stage` must be one of them.
    import jinja2
    import jinja2.meta

    env = jinja2.Environment()
    for base in (None, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"):
        variables = jinja2.meta.find_undeclared_variables(env.parse(stage_template(base, STAGES, "late")))
        assert "stage" in variables


def test_unknown_pre_tokenizer_is_one_line():
    class Tok:
        def encode(self, text):
            return [len(text), 1, 2]

    from persllm_cli.core.errors import PersllmError

    with pytest.raises(PersllmError, match="not one persllm knows llama.cpp's pre-tokenizer for"):
        gguf_vocab.pre_tokenizer(Tok())


def test_a_source_without_the_engine_is_unavailable_not_an_error(tmp_path):
    # An older llama.cpp (before its own engine) or a partial folder: export --check says it did not
    # render there, it does not fail the export.
    (tmp_path / "common" / "jinja").mkdir(parents=True)
    (tmp_path / "common" / "jinja" / "lexer.cpp").write_text("")
    assert engine.find_source(tmp_path) == tmp_path.resolve()
    with pytest.raises(engine.Unavailable, match="parser.cpp is missing"):
        engine.renderer(tmp_path, cache=tmp_path / "cache")


def test_pre_tokenizer_table_is_the_converters(llama_source):
    # The fixed text and every hash persllm knows, read back from the converter in llama.cpp's source.
    source = (llama_source / "conversion" / "base.py").read_text(encoding="utf-8")
    function = next(n for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.FunctionDef) and n.name == "get_vocab_base_pre")
    text = next(ast.literal_eval(n.value) for n in ast.walk(function)
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "chktxt")
    assert text == gguf_vocab.CHECK_TEXT
    table = dict(re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', source))
    assert len(table) > 50
    for chkhsh, name in gguf_vocab.PRE_TOKENIZERS.items():
        assert table.get(chkhsh) == name, chkhsh


def _tokenizer(smollm2, template: str | None):
    """SmolLM2's tokenizer with the time tokens, and `template` (None: no chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.add_special_tokens({"additional_special_tokens": [s["token"] for s in STAGES]})
    tok.chat_template = template
    return tok


# A template that opens with a real BOS once (as Llama 3's does), in this project's own words.
BOS_FIRST = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["smollm2 (ChatML)", "no template (plain)", "BOS first",
                                  "smollm2, token at the answer", "BOS first, token at the answer"])
def test_llama_cpp_renders_the_stage_template_like_transformers(smollm2, llama_renderer, kind):
    from persllm_cli.model import chat_format

    from transformers import AutoTokenizer

    base = {"smollm2": AutoTokenizer.from_pretrained(smollm2).chat_template, "no template": None,
            "BOS first": BOS_FIRST}[kind.split(" (")[0].split(",")[0]]
    training = _tokenizer(smollm2, base)  # as the run's tokenizer renders for training
    head = None
    if kind.endswith("at the answer"):
        chat_format.set_time_token_at(training, "answer")   # as `tokenize --time-token-at answer` saves it
        head = chat_format.answer_header(training)
    tok = _tokenizer(smollm2, stage_template(base, STAGES, "middle", head))  # as the export's
    cases = [{"messages": m, "add_generation_prompt": gen, "kwargs": {} if s is None else {"stage": s}}
             for m in CONVERSATIONS for gen in (True, False) for s in [st["id"] for st in STAGES] + [None]]
    rendering = engine.render(llama_renderer, tok.chat_template, cases, bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert rendering.error is None and rendering.caps["supports_string_content"], rendering
    tokens = {s["id"]: s["token"] for s in STAGES}
    for case, got in zip(cases, rendering.results, strict=True):
        want = tok.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=case["add_generation_prompt"],
                                       **case["kwargs"])
        assert got == {"text": want}, case
        # ... and that is what training rendered: the stage's token first (after a real BOS).
        token = tokens[case["kwargs"].get("stage", "middle")]
        rendered = chat_format.render(training, case["messages"], case["add_generation_prompt"])
        assert got["text"] == chat_format.with_stage(training, rendered, token)
    if kind == "BOS first":
        assert got["text"].startswith(tok.bos_token + "<TIME-II>")
    if head:   # the last case: the second conversation, no generation prompt, the default stage
        assert "<TIME" not in got["text"].split(head)[0] and got["text"].count(head + "<TIME-II>") == 1
        assert got["text"].split(head + "<TIME-II>")[1].startswith("Hello.")
    bad = engine.render(llama_renderer, tok.chat_template, [{**cases[0], "kwargs": {"stage": "nope"}}],
                        bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert "unknown stage nope (stages: early, middle, late)" in bad.results[0]["error"]


@pytest.mark.slow
def test_llama_cpp_refuses_what_its_engine_lacks(llama_renderer):
    # The failure the old template met in llama-server, seen by the renderer too: a method the engine lacks.
    rendering = engine.render(llama_renderer, "{{ 'a<s>b'.count('<s>') }}", [{"messages": [], "kwargs": {}}],
                              bos_token="<s>", eos_token="</s>")
    assert "Callee is not a function" in rendering.results[0]["error"]


def _gguf(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type, shape, bytes)) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape], bytes(t.data.tobytes())) for t in reader.tensors}
    return keys, tensors


def _convert(llama_source: Path, model_dir: Path, out: Path, *args: str) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py, run as a user would."""
    done = subprocess.run([sys.executable, str(llama_source / "convert_hf_to_gguf.py"), str(model_dir),
                           "--outfile", str(out), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
def test_gguf_is_what_llama_cpps_converter_writes(tmp_path, cli, smollm2, llama_source):
    from transformers import AutoTokenizer

    from persllm_cli.export import gguf_file
    from tests.run_factory import make_run

    run = make_run(tmp_path / "runs" / "r1", smollm2)
    hf = tmp_path / "hf"
    assert cli("export", str(run), "-o", str(hf), "--no-check").exit_code == 0
    tok = AutoTokenizer.from_pretrained(hf)
    for quant in ("f16", "q8_0"):
        # What `export --format gguf` writes from the same merged model (gguf_file.write on its hf folder).
        ours_keys, ours = _gguf(_write(gguf_file, hf, tmp_path / f"ours-{quant}.gguf", quant, tok))
        ref_keys, ref = _gguf(_convert(llama_source, hf, tmp_path / f"ref-{quant}.gguf", "--outtype", quant))

        differ = {k for k in ours_keys.keys() | ref_keys.keys() if ours_keys.get(k) != ref_keys.get(k)}
        assert differ == {"general.name", "tokenizer.ggml.add_bos_token"}, differ
        # 1. The name: the persona's, where the converter takes the folder's.
        assert (ours_keys["general.name"], ref_keys["general.name"]) == ("harry-potter", "Hf")
        # 2. add_bos_token: written as False; the converter leaves it out for a vocabulary of 49155 rows
        #    (below, it writes False for the base's 49152) and llama.cpp then defaults to False for this
        #    pre-tokenizer, but Ollama's own engine to True.
        assert ours_keys["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.add_bos_token" not in ref_keys
        assert ours_keys["tokenizer.ggml.pre"] == "smollm"
        assert ours_keys["tokenizer.ggml.tokens"][-3:] == ["<TIME-I>", "<TIME-II>", "<TIME-III>"]
        assert "tokenizer.ggml.eot_token_id" not in ours_keys  # llama.cpp finds <|im_end|> by its text, as for the converter's

        assert list(ours) == list(ref)  # the same tensors in the same order
        for name in ours:
            if quant == "q8_0" and name == "token_embd.weight":
                # Kept F16 in a q8_0 file (the time-token rows differ by less than Q8_0's step); the
                # converter quantizes it. Bit-identical to the f16 file's instead.
                assert (ours[name][0], ref[name][0]) == ("F16", "Q8_0")
                assert ours[name] == f16_tensors[name]
            else:
                assert ours[name] == ref[name], name
        if quant == "f16":
            f16_tensors = ours

    base_keys, _ = _gguf(_convert(llama_source, smollm2, tmp_path / "base-vocab.gguf", "--vocab-only"))
    assert base_keys["tokenizer.ggml.add_bos_token"] is False and base_keys["tokenizer.ggml.pre"] == "smollm"


def _write(gguf_file, hf: Path, path: Path, quant: str, tok) -> Path:
    gguf_file.write(hf, path, quant=quant, tokenizer=tok, name="harry-potter")
    return path


@pytest.mark.slow
def test_lora_gguf_is_what_llama_cpps_lora_converter_writes(tmp_path, smollm2, llama_source):
    """A stage's adapter as `export` writes it for a run with one adapter per stage (export/gguf_lora.py)
    against llama.cpp's own convert_lora_to_gguf.py on the same adapter. The converter refuses an
    adapter that holds embedding rows (the time tokens), so it is given the adapter without them:
    export puts those rows in the base GGUF instead."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from persllm_cli.export import gguf_lora
    from persllm_cli.model import load
    from tests.run_factory import make_run, perturb_lora

    run = perturb_lora(make_run(tmp_path / "runs" / "r1", smollm2), seed=3)
    model, _, _ = load.load_run(run, device="cpu", dtype="float32", merge=False)
    ours_keys, ours = _gguf(_write_lora(gguf_lora, model, tmp_path / "ours.gguf"))

    refused = subprocess.run([sys.executable, str(llama_source / "convert_lora_to_gguf.py"), str(run / "adapter"),
                              "--base", str(smollm2), "--outtype", "f16", "--outfile", str(tmp_path / "no.gguf")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "Not a lora_A or lora_B tensor" in refused.stderr
    plain = tmp_path / "adapter"
    shutil.copytree(run / "adapter", plain)
    weights = load_file(plain / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "trainable_tokens" not in k}, plain / "adapter_model.safetensors")
    config = json.loads((plain / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None
    (plain / "adapter_config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, str(llama_source / "convert_lora_to_gguf.py"), str(plain),
                           "--base", str(smollm2), "--outtype", "f16", "--outfile", str(tmp_path / "ref.gguf")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ref_keys, ref = _gguf(tmp_path / "ref.gguf")

    differ = {k for k in ours_keys.keys() | ref_keys.keys() if ours_keys.get(k) != ref_keys.get(k)}
    # The name (the persona's; the converter's is "Adapter"), and where the converter records the
    # adapter's folder as a Hugging Face repository it came from.
    assert differ - {"general.base_model.count", "general.base_model.0.name", "general.base_model.0.repo_url",
                     "general.tags"} == {"general.name"}, differ
    assert (ours_keys["general.type"], ours_keys["adapter.type"], ours_keys["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    assert sorted(ours) == sorted(ref) and len(ours) == 30 * 7 * 2   # every linear layer's A and B
    for name in ours:
        assert ours[name] == ref[name], name   # type, shape and bytes: q/k's B rows permuted alike


def _write_lora(gguf_lora, model, path: Path) -> Path:
    gguf_lora.write(model, "default", path, config=model.get_base_model().config.to_dict(), name="harry-potter")
    return path
