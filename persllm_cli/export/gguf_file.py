"""The GGUF export: a merged transformers export (hf.py) rewritten as one GGUF file with the `gguf`
package that llama.cpp maintains. Tokenizer, time tokens and the stage chat template go inside
(gguf_vocab.py). The metadata is what llama.cpp's own converter writes for the same export but for
two keys, each for a reason: general.name (the persona's, not the folder's) and add_bos_token
(gguf_vocab.add_tokenizer); tests/test_export_engines.py runs the converter and holds this.

Tensors are streamed: the header is written from the safetensors' shapes alone, then each tensor
is read, converted (q/k rows permuted for llama, as llama.cpp's converter does; f16 or q8_0) and
written before the next is read, so the export never holds a second copy of the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.export import gguf_vocab

ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}
QUANTS = ("f16", "q8_0")


def check_architecture(model_type: str | None, base: str) -> None:
    if model_type not in ARCHS:
        raise PersllmError(f"GGUF export does not support the {model_type!r} architecture of base {base} "
                           f"(supported: {', '.join(ARCHS)}; `--format hf` works for any base)")


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's row order for rotary q/k weights (convert_hf_to_gguf's LlamaModel.permute)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# Kept in F16 in a q8_0 file: the embedding rows hold the time tokens, whose differences can be far
# smaller than Q8_0's step (a lightly trained run's stage rows differ by ~1e-5 and would come out
# identical, every stage then saying the same); llama.cpp's own mixes keep these tensors finer too.
KEEP_F16 = ("token_embd.weight", "output.weight")


def write(hf_dir: Path, path: Path, *, quant: str, tokenizer: Any, name: str) -> None:
    """Write `path` from the merged export in `hf_dir`."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch_key = config.get("model_type")
    check_architecture(arch_key, name)
    arch = getattr(gguf.MODEL_ARCH, ARCHS[arch_key])
    n_layers = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise PersllmError(f"GGUF export does not support rope scaling ({rope.get('rope_type')}) yet")

    files = sorted(hf_dir.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    names = gguf.get_tensor_name_map(arch, n_layers)
    tied = config.get("tie_word_embeddings", False)
    n_rows = where["model.embed_tokens.weight"].get_slice("model.embed_tokens.weight").get_shape()[0]

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):  # as the converter: only when the config states it
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_vocab_size(n_rows)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocab.add_tokenizer(w, hf_dir, tokenizer, n_rows)

    q8 = gguf.GGMLQuantizationType.Q8_0
    plan = []  # (hf name, kind)
    n_params = 0
    for key in where:
        if key == "lm_head.weight" and tied:
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise PersllmError(f"GGUF export: no GGUF name for tensor {key} of a {arch_key} model")
        shape = list(where[key].get_slice(key).get_shape())
        if len(shape) == 1:
            kind, nbytes, dtype, shape_out = "f32", shape[0] * 4, np.float32, shape
        elif quant == "q8_0" and shape[-1] % 32 == 0 and target not in KEEP_F16:
            kind = "q8_0"
            shape_out = [shape[0], shape[1] // 32 * 34]
            nbytes, dtype = shape_out[0] * shape_out[1], np.uint8
        else:
            kind, nbytes, dtype, shape_out = "f16", shape[0] * shape[1] * 2, np.float16, shape
        w.add_tensor_info(target, shape_out, np.dtype(dtype), nbytes, raw_dtype=q8 if kind == "q8_0" else None)
        plan.append((key, kind))
        n_params += int(np.prod(shape))
    w.add_size_label(gguf.size_label(n_params, n_params, 0, 0))  # "135M", as the converter labels it

    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for key, kind in plan:
        t = where[key].get_tensor(key).float().numpy()
        if arch_key == "llama" and key.endswith("self_attn.q_proj.weight"):
            t = _permute(t, n_head)
        elif arch_key == "llama" and key.endswith("self_attn.k_proj.weight"):
            t = _permute(t, n_kv)
        if kind == "f32":
            data = t.astype(np.float32)
        elif kind == "f16":
            data = t.astype(np.float16)
        else:
            data = gguf.quants.quantize(t, q8)
        w.write_tensor_data(np.ascontiguousarray(data))
        del t, data
    w.close()
