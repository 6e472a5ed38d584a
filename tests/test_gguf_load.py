"""model/gguf_load.py: a GGUF file parsed once, and the model and tokenizer transformers would load anyway.

The file is a small Llama (two layers) with SmolLM2's whole vocabulary, written Q8_0 by persllm's GGUF
writer: the header is as large as the embedded model's, the weights small.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def small_gguf(tmp_path, smollm2) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from persllm_cli.export import gguf_file

    tok = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    path = tmp_path / "gguf" / "small-q8_0.gguf"
    path.parent.mkdir()
    gguf_file.write(hf, path, quant="q8_0", tokenizer=tok, name="small")
    return path


class _Counted:
    """gguf.GGUFReader, counting the files it parses."""

    def __init__(self, monkeypatch):
        import gguf

        self.parsed: list[str] = []
        real = gguf.GGUFReader

        def counted(path, mode="r"):
            self.parsed.append(str(path))
            return real(path, mode)

        monkeypatch.setattr(gguf, "GGUFReader", counted)


@pytest.mark.slow
def test_one_parse_and_the_same_model_and_tokenizer_as_transformers(small_gguf, monkeypatch):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm_cli.model import gguf_load

    counted = _Counted(monkeypatch)
    # transformers on its own: the header parsed for the config, the tokenizer and the weights.
    want_tok = AutoTokenizer.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name)
    want = AutoModelForCausalLM.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name, dtype=torch.float32)
    assert len(counted.parsed) == 3
    del counted.parsed[:]
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    model, tok = gguf_load.load(small_gguf, dtype=torch.float32)

    assert counted.parsed == [str(small_gguf)]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)  # put back after the block
    got, expected = model.state_dict(), want.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert model.config.to_dict() == want.config.to_dict()
    assert tok.get_vocab() == want_tok.get_vocab() and len(tok.get_vocab()) == 49152
    assert tok.chat_template == want_tok.chat_template
    text = "<|im_start|>user\nWho are you, really? Tell me in 10 words.<|im_end|>\n"
    assert tok(text)["input_ids"] == want_tok(text)["input_ids"]
    assert (tok.bos_token, tok.eos_token) == (want_tok.bos_token, want_tok.eos_token)


def _minimal_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_reader_per_file_and_one_name_map_per_architecture(tmp_path, monkeypatch):
    import gguf

    from persllm_cli.model import gguf_load

    one, other = _minimal_gguf(tmp_path / "one.gguf"), _minimal_gguf(tmp_path / "other.gguf")
    counted = _Counted(monkeypatch)
    with gguf_load.parsed_once() as readers:
        first = gguf.GGUFReader(one)
        assert gguf.GGUFReader(str(one)) is first and gguf.GGUFReader(other) is not first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert len(readers) == 2
    assert counted.parsed == [str(one), str(other)]
    assert gguf.GGUFReader(one) is not gguf.GGUFReader(one)  # after the block: transformers' own again
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
