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
