"""Loading a trained run for generation: the run's base (model/bases.py), its adapter, its tokenizer.

    model, tokenizer, info = load_run(Path("runs/latest"))
    model, _, _ = load_run(run, device="cpu", dtype="float32", merge=True)   # export's merge
    models, tokenizer, info = load_stage_models(run)   # one adapter per stage, on CPU: merged per stage

On CPU the adapter is folded into float32 weights and the result cached (model/merged.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError, first_line
from persllm_cli.model import bases as models
from persllm_cli.model import merged, runs


def load_run(run_dir: Path, *, device: str | None = None, dtype: str | None = None,
             merge: bool | None = None) -> tuple[Any, Any, runs.RunInfo]:
    """(model, tokenizer, info) for a complete run directory, ready to generate (eval mode).

    `device`: "cuda" or "cpu" (default: CUDA when there is one). The base is the one run.json
    names, loaded by default as training loaded it: on CUDA in 4-bit NF4 (bfloat16 for a run trained
    without QLoRA), on CPU in float32; a `dtype` given ("float32", "bfloat16", "float16") loads it
    unquantised in that dtype (export merges onto float32 weights even where CUDA is present).
    Its embeddings are resized to the run's tokenizer before the adapter (LoRA weights and the
    trained time-token rows) goes on top. `merge` (default: on CPU) folds the adapter into the
    weights, which makes CPU generation about three times faster for the cost of a second;
    merging into 4-bit weights would lose precision, so on CUDA the adapter stays apart by default.
    A float32 CPU merge is cached (see merged.py): later loads of the same run skip PEFT and the merge.
    """
    tokenizer, info, base = _tokenizer_and_info(Path(run_dir))
    run = info.path
    device = device or default_device()
    merging = merge if merge is not None else device == "cpu"
    cacheable = merging and device == "cpu" and dtype in (None, "float32")
    cached_at = merged.cache_dir(run, base, len(tokenizer)) if cacheable else None
    model = merged.load(cached_at)
    if model is not None:
        model.eval()
        return model, tokenizer, info

    model = _load_base(info, base, device, dtype)
    # The trained input rows come from the adapter; an untied output head's new rows are not
    # trained, so they must be built exactly as training built them.
    models.resize_embeddings(model, len(tokenizer))
    model = _attach_adapter(model, run, info.base)
    if merging:
        model = model.merge_and_unload()
        merged.store(model, cached_at)
    model.eval()
    return model, tokenizer, info


def default_device() -> str:
    """Where a model generates unless told: CUDA when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_base(info: runs.RunInfo, base: str, device: str | None = None, dtype: str | None = None) -> Any:
    """The run's base on `device`: in `dtype`, or by default as training loaded it (on CUDA 4-bit
    NF4 unless trained without QLoRA, else bfloat16; on CPU float32)."""
    device = device or default_device()
    nf4 = False
    if dtype is None:
        nf4 = device == "cuda" and bool(info.data.get("settings", {}).get("qlora", True))
        dtype = "bfloat16" if device == "cuda" else "float32"
    return models.load_base(base, device=device, dtype=dtype, nf4=nf4, name=info.base)


def load_runs_shared(run_dirs: list[Path], *, device: str | None = None,
                     dtype: str | None = None) -> list[tuple[Any, Any, runs.RunInfo, str]]:
    """(model, tokenizer, info, adapter name) per run, where runs on the same base (and with
    tokenizers of the same size) share one loaded base: one PeftModel holding every run's adapter
    (`load_adapter`), the caller activating a run's adapter with `model.set_adapter(name)` before
    each forward pass. The adapters stay unmerged, so on CPU each forward pass is slower than a
    merged run's (the LoRA products are computed apart), for the memory of a single base.
    `device` and `dtype` as for load_run.
    """
    loaded = [_tokenizer_and_info(Path(d)) for d in run_dirs]
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (tok, info, base) in enumerate(loaded):
        groups.setdefault((str(base), len(tok)), []).append(i)
    out: list[Any] = [None] * len(loaded)
    for (base, _), members in groups.items():
        first_tok, first_info, _ = loaded[members[0]]
        model = _load_base(first_info, base, device, dtype)
        models.resize_embeddings(model, len(first_tok))
        model = _attach_adapter(model, first_info.path, first_info.base, adapter_name="run0")
        out[members[0]] = (model, first_tok, first_info, "run0")
        for n, i in enumerate(members[1:], start=1):
            tok, info, _ = loaded[i]
            name = f"run{n}"
            _attach_adapter(model, info.path, info.base, adapter_name=name, into=model)
            out[i] = (model, tok, info, name)
        model.eval()
    return out


def load_stages(run_dir: Path, *, device: str | None = None,
                dtype: str | None = None) -> tuple[Any, Any, runs.RunInfo, dict[str, str]]:
    """(model, tokenizer, info, adapter name per stage) for a run trained with --adapter-per-stage:
    one copy of the base holding every stage's adapter (load_runs_shared), which the caller
    activates with `model.set_adapter(name)` before generating at that stage. `device` and `dtype`
    as for load_run."""
    info = runs.read_run(Path(run_dir))
    assert info.stage_runs, "not a run with one adapter per stage"
    stages = list(info.stage_runs)
    loaded = load_runs_shared([info.stage_runs[sid] for sid in stages], device=device, dtype=dtype)
    models_ = {id(model) for model, *_ in loaded}
    if len(models_) > 1:
        raise PersllmError(f"the stage runs in {info.path} do not share one base and tokenizer; train them again")
    model, tokenizer = loaded[0][0], loaded[0][1]
    return model, tokenizer, info, {sid: name for sid, (*_, name) in zip(stages, loaded)}


def load_stage_models(run_dir: Path) -> tuple[dict[str, Any], Any, runs.RunInfo]:
    """({stage id: model}, tokenizer, info) for a run trained with --adapter-per-stage, on CPU: each
    stage's run loaded as `load_run` loads it there, merged into float32 weights (and cached, see
    merged.py). A merged model decodes without the LoRA products, 2.3x as fast as the adapters kept
    apart on one base (load_stages) on the demo's run, for one copy of the weights per stage."""
    info = runs.read_run(Path(run_dir))
    assert info.stage_runs, "not a run with one adapter per stage"
    models: dict[str, Any] = {}
    tokenizer = None
    for sid, sub in info.stage_runs.items():
        models[sid], tok, _ = load_run(sub, device="cpu")
        if tokenizer is None:
            tokenizer = tok
        elif len(tok) != len(tokenizer):
            raise PersllmError(f"the stage runs in {info.path} do not share one tokenizer; train them again")
    return models, tokenizer, info


def _tokenizer_and_info(run_dir: Path) -> tuple[Any, runs.RunInfo, str]:
    """The run's tokenizer (checked to hold its time tokens), its run.json and its resolved base."""
    info = runs.read_run(run_dir)
    run = info.path
    if info.stage_runs:   # no one model: its stages' runs each hold one (load_stages loads them together)
        raise PersllmError(f"{run} holds one adapter per stage (train --adapter-per-stage), not one model; "
                           f"name a stage's own run, e.g. {next(iter(info.stage_runs.values()))}")
    base = models.resolve_base(info.base)

    import logging

    # bitsandbytes (imported by peft) warns about an optional CPU kernel package on every start.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a chat screen is no place for loader chatter
    hf_logging.disable_progress_bar()

    try:
        tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    except (OSError, ValueError) as e:
        raise PersllmError(f"the tokenizer in {run / 'tokenizer'} could not be loaded: {first_line(e)}") from None
    vocab = tokenizer.get_vocab()
    missing = [s["token"] for s in info.stages if s["token"] not in vocab]
    if missing:
        raise PersllmError(f"the tokenizer in {run / 'tokenizer'} lacks the time token(s) {', '.join(missing)}")
    return tokenizer, info, base


def _attach_adapter(model: Any, run: Path, base_name: str, *, adapter_name: str = "default", into: Any = None) -> Any:
    """`model` with the run's adapter on top; with `into` (a PeftModel), the adapter is added to it
    under `adapter_name` instead."""
    from peft import PeftModel

    where = run / "adapter"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if into is not None:
                into.load_adapter(where, adapter_name=adapter_name)
            else:
                model = PeftModel.from_pretrained(model, where, adapter_name=adapter_name)
        except (RuntimeError, ValueError, KeyError) as e:
            # e.g. "size mismatch for ...lora_A.weight": trained on another base.
            raise PersllmError(f"adapter in {run} does not fit base {base_name}: {first_line(e, 300)}") from None
    for w in caught:
        text = str(w.message)
        if "missing adapter keys" in text:
            raise PersllmError(f"adapter in {run} does not fit base {base_name}: {text[:300]}")
    return model

