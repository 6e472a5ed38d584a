"""The merged transformers export: the run's adapter folded into its base, saved as safetensors with
config, generation config, and the run's tokenizer (time tokens included) carrying the stage template.

The merge always happens on weights in 16 or 32 bits: a QLoRA run trained against a 4-bit base is
merged onto the base loaded in float32, never into 4-bit weights (that would round the adapter away).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from persllm_cli.export.template import stage_template, stop_ids
from persllm_cli.model import load, runs

DTYPES = ("float32", "float16", "bfloat16")


def merged_model(info: runs.RunInfo) -> Any:
    """The run folded into its float32 base, on CPU (where CUDA is present too): what `persllm chat`
    generates with on CPU, and its cache of merged runs."""
    model, _, _ = load.load_run(info.path, device="cpu", dtype="float32", merge=True)
    return model


def export_tokenizer(info: runs.RunInfo, default_stage: str) -> Any:
    """The run's tokenizer with the stage-aware chat template."""
    from transformers import AutoTokenizer

    from persllm_cli.model.chat_format import answer_header, time_token_at

    tok = AutoTokenizer.from_pretrained(info.path / "tokenizer")
    head = answer_header(tok) if time_token_at(tok) == "answer" else None
    tok.chat_template = stage_template(getattr(tok, "chat_template", None), info.stages, default_stage, head)
    return tok


def write(info: runs.RunInfo, out: Path, *, dtype: str, default_stage: str) -> dict[str, Any]:
    """Write the merged model into `out` (an empty folder). Returns facts for the model card."""
    return save(merged_model(info), export_tokenizer(info, default_stage), out, dtype=dtype)


def save(model: Any, tok: Any, out: Path, *, dtype: str) -> dict[str, Any]:
    """Save a transformers model (in `dtype`) with the export's tokenizer and a generation config that
    stops where the run stops. Returns facts for the model card."""
    import torch

    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    gen = model.generation_config
    eos = stop_ids(tok)
    gen.eos_token_id = eos if len(eos) > 1 else (eos[0] if eos else gen.eos_token_id)
    if gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    model.config.dtype = getattr(torch, dtype)
    # Shards of at most 2 GB: save_pretrained writes one shard at a time.
    model.save_pretrained(out, max_shard_size="2GB")
    tok.save_pretrained(out)
    facts = {"architecture": model.config.model_type, "parameters": model.num_parameters(),
             "vocab_size": len(tok)}
    del model
    gc.collect()
    return facts


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))
