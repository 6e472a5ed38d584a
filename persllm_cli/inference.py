"""Loading a trained run for generation (`chat`, `eval`, `annotate --backend local` with runs/NAME).

    model, tokenizer, info = load_run(run_dir)

The base model comes from run.json (resolved with models.resolve_base, so the embedded default is
found again on any machine), its embeddings are resized to the run's tokenizer (with the time
tokens), the adapter is applied, and the model is put in eval mode: 4-bit NF4 on CUDA when the run
was trained with QLoRA (bf16 otherwise), float32 on CPU. Build prompts with
`persllm_cli.tokenization.prompt_ids(tokenizer, messages, info.stage_token(stage)[1])` so they start
with the stage token exactly as the training examples did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persllm_cli.errors import PersllmError
from persllm_cli.runs import RunInfo, read_run


def load_run(run_dir: Path | str, device: str | None = None) -> tuple[Any, Any, RunInfo]:
    """(model, tokenizer, RunInfo) of a complete run directory. `device`: "cuda", "cpu" or None (auto)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm_cli.models import resize_embeddings, resolve_base

    info = read_run(Path(run_dir))
    base_path = resolve_base(info.base)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(info.path / "tokenizer"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if device == "cuda":
        kwargs = {"dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()}}
        if info.data.get("settings", {}).get("qlora", True):
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    except OSError as e:
        raise PersllmError(f"cannot load the run's base model {info.base}: {e}") from None
    resize_embeddings(model, len(tokenizer))
    model = PeftModel.from_pretrained(model, str(info.path / "adapter"))
    model.eval()
    return model, tokenizer, info
