"""A stage's LoRA adapter as a llama.cpp LoRA GGUF (general.type "adapter"), for a run trained with
`train --adapter-per-stage`: one base GGUF holds every stage's time-token row, each stage's file holds
that stage's LoRA weights, and llama.cpp applies the one a request names (`llama-server --lora FILE`,
the request's "lora" list), Ollama the one a Modelfile names (ADAPTER).

The tensors are what llama.cpp's own convert_lora_to_gguf.py writes for the same adapter (held by
tests/test_export_engines.py): `<base tensor name>.lora_a` (PEFT's lora_A, r x in) and `.lora_b`
(lora_B, out x r, its rows permuted for llama's rotary q/k as the base's are), in F16, and
adapter.lora.alpha such that alpha / r is the adapter's own scale. The time-token rows an adapter
trained are not in it: llama.cpp's LoRA cannot change an embedding row of a model with tied
embeddings, so those rows go into the base file (export/stages.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.export.gguf_file import ARCHS, _permute, check_architecture

_PREFIX = "base_model.model."


def lora_pairs(model: Any, adapter: str) -> tuple[dict[str, tuple[Any, Any]], float, int]:
    """({transformers weight name: (A, B)}, scale, rank) of `adapter` in a PeftModel."""
    from peft.tuners.lora import LoraLayer

    pairs: dict[str, tuple[Any, Any]] = {}
    scales, ranks = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter):
            raise PersllmError("GGUF export of an adapter per stage does not support DoRA adapters")
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        pairs[name.removeprefix(_PREFIX) + ".weight"] = (a.detach().float(), b.detach().float())
        scales.add(round(float(module.scaling[adapter]), 9))
        ranks.add(int(a.shape[0]))
    if not pairs:
        raise PersllmError(f"adapter {adapter} has no LoRA weights to export")
    if len(scales) != 1 or len(ranks) != 1:
        # One adapter.lora.alpha per file: llama.cpp scales every pair by alpha / its rank.
        raise PersllmError("GGUF export needs one LoRA rank and scale for every layer of an adapter")
    return pairs, scales.pop(), ranks.pop()


def _gguf_names(config: dict[str, Any], hf_names: list[str]) -> dict[str, str]:
    import gguf

    arch_key = config.get("model_type")
    check_architecture(arch_key, str(arch_key))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[arch_key]), config["num_hidden_layers"])
    out = {}
    for key in hf_names:
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise PersllmError(f"GGUF export: no GGUF name for the adapter's tensor {key}")
        out[key] = target
    return out


def _heads(config: dict[str, Any], key: str) -> int | None:
    """The head count whose row order llama.cpp permutes for this weight (llama's q and k), else None."""
    if config.get("model_type") != "llama":
        return None
    if key.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if key.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def write(model: Any, adapter: str, path: Path, *, config: dict[str, Any], name: str) -> None:
    """Write `adapter` of the PeftModel `model` (on a base with `config`, the transformers config as a
    dict) to `path` as a LoRA GGUF."""
    import gguf
    import numpy as np

    pairs, scale, rank = lora_pairs(model, adapter)
    targets = _gguf_names(config, list(pairs))
    arch = getattr(gguf.MODEL_ARCH, ARCHS[config["model_type"]])
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (a, b) in pairs.items():
        b = b.numpy()
        heads = _heads(config, key)
        if heads is not None:
            b = _permute(b, heads)
        w.add_tensor(targets[key] + ".lora_a", np.ascontiguousarray(a.numpy().astype(np.float16)))
        w.add_tensor(targets[key] + ".lora_b", np.ascontiguousarray(b.astype(np.float16)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _unpermute(weights: Any, n_head: int) -> Any:
    """The inverse of gguf_file._permute: llama.cpp's q/k row order back to transformers'."""
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def read(path: Path, config: dict[str, Any], hf_names: list[str]) -> tuple[dict[str, tuple[Any, Any]], float]:
    """A LoRA GGUF read back as ({transformers weight name: (A, B)} in float32, scale), for the
    export's check: `hf_names` are the model's weights the file may name."""
    import gguf
    import numpy as np
    import torch

    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    if str(fields["general.type"].contents()) != "adapter":
        raise PersllmError(f"{path.name} is no LoRA adapter GGUF")
    alpha = float(fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    by_target = {v: k for k, v in _gguf_names(config, hf_names).items()}
    tensors = {t.name: t for t in reader.tensors}
    pairs = {}
    for tname, t in tensors.items():
        if not tname.endswith(".lora_a"):
            continue
        base = tname.removesuffix(".lora_a")
        key = by_target[base]
        a = np.array(t.data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        bt = tensors[base + ".lora_b"]
        b = np.array(bt.data, dtype=np.float32).reshape([int(n) for n in reversed(bt.shape)])
        heads = _heads(config, key)
        if heads is not None:
            b = _unpermute(b, heads)
        pairs[key] = (torch.from_numpy(a.copy()), torch.from_numpy(np.ascontiguousarray(b)))
    rank = next(iter(pairs.values()))[0].shape[0]
    return pairs, alpha / rank


def attach(model: Any, adapters: dict[str, Path], config: dict[str, Any]) -> Any:
    """`model` (a transformers model) as a PeftModel holding each LoRA GGUF in `adapters` under its
    name, unmerged, as llama.cpp applies them: the caller picks one with `set_adapter`."""
    import torch
    from peft import LoraConfig, get_peft_model

    hf_names = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    peft_model = None
    for adapter, path in adapters.items():
        pairs, scale = read(path, config, hf_names)
        rank = next(iter(pairs.values()))[0].shape[0]
        lora = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=[k.removesuffix(".weight") for k in pairs],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, lora)
        modules = dict(peft_model.named_modules())
        with torch.no_grad():
            for key, (a, b) in pairs.items():
                layer = modules[_PREFIX + key.removesuffix(".weight")]
                layer.lora_A[adapter].weight.copy_(a)
                layer.lora_B[adapter].weight.copy_(b)
    assert peft_model is not None
    return peft_model.eval()
