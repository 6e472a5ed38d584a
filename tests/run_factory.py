"""Build a real, complete run directory without `persllm train`, for chat tests and benchmarks.

The layout is what `train` writes (see persllm_cli/runs.py): the base tokenizer with the time tokens
added as special tokens in run/tokenizer, a PEFT adapter (LoRA on all linear layers plus the new
time-token embedding rows) in run/adapter, run.json with complete = true, and runs/latest.
The LoRA weights are untrained (B = 0), so the run answers like the base model; the time-token rows
are the ones the resize drew, stored in the adapter.
"""

from __future__ import annotations

from pathlib import Path

STAGES = [("early", "first year at Hogwarts"), ("middle", "fifth year"), ("late", "after the war")]


def make_run(run_dir: Path, base_dir: Path, *, base_name: str = "smollm2-135m",
             stages: list[tuple[str, str]] = STAGES, persona: str = "Harry Potter", time_token_at: str | None = None) -> Path:
    """Write a complete run for the base model in `base_dir`; run.json names it `base_name`.
    `time_token_at` is saved with the tokenizer as `tokenize --time-token-at` saves it (None: unsaid, "first")."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm_cli.model import runs
    from persllm_cli.core.project import time_token

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens = [time_token(i) for i in range(1, len(stages) + 1)]
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    if time_token_at:
        from persllm_cli.model.chat_format import set_time_token_at

        set_time_token_at(tok, time_token_at)
    tok.save_pretrained(run_dir / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    new_ids = tok.convert_tokens_to_ids(tokens)
    config = LoraConfig(r=8, target_modules="all-linear", trainable_token_indices={"embed_tokens": new_ids},
                        task_type="CAUSAL_LM")
    # Only the LoRA weights and the new rows: never the whole (resized) embedding matrices.
    get_peft_model(model, config).save_pretrained(run_dir / "adapter", save_embedding_layers=False)
    runs.write_run_json(run_dir, {
        "persona": persona, "base": base_name,
        "stages": [{"id": sid, "label": label, "token": t} for (sid, label), t in zip(stages, tokens)],
        "method": "sft", "complete": True,
    })
    runs.update_latest(run_dir)
    return run_dir


def perturb_lora(run_dir: Path, seed: int, scale: float = 0.05) -> Path:
    """Give the run's LoRA B weights random values (seeded), so it answers unlike its base and unlike
    a run perturbed with another seed."""
    import torch
    from safetensors.torch import load_file, save_file

    f = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    weights = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k, v in weights.items():
        if "lora_B" in k:
            weights[k] = torch.randn(v.shape, generator=g) * scale
    save_file(weights, f)
    return Path(run_dir)


def make_staged_run(run_dir: Path, base_dir: Path, *, stages: list[tuple[str, str]] = STAGES, **kw) -> Path:
    """A complete run with one adapter per stage, as `train --adapter-per-stage` lays it out:
    stages/<id>/ holds an ordinary run whose LoRA weights are perturbed with the stage's index as seed."""
    import shutil

    from persllm_cli.model import runs

    run_dir = Path(run_dir)
    first = None
    for i, (sid, _) in enumerate(stages):
        sub = run_dir / "stages" / sid
        if first is None:
            first = make_run(sub, base_dir, stages=stages, **kw)
            (sub.parent / runs.LATEST).unlink()
        else:
            shutil.copytree(first, sub)
        perturb_lora(sub, seed=i + 1)
    data = runs.read_run(first).data
    runs.write_run_json(run_dir, {**data, "stage_runs": {sid: f"stages/{sid}" for sid, _ in stages}})
    runs.update_latest(run_dir)
    return run_dir
