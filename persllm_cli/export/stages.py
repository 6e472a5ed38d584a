"""Every stage of a run trained with `train --adapter-per-stage` in one GGUF export (`--format gguf` or
`ollama` without `--stage`): the base model with each stage's own time-token row, as one GGUF with the
stage chat template, and each stage's LoRA adapter as a llama.cpp LoRA GGUF beside it
(export/gguf_lora.py). llama.cpp and Ollama load the base once and apply the adapter of the stage
asked: `llama-server --lora` with the request's "lora" list, or a Modelfile per stage whose ADAPTER
is that stage's file.

The base holds one row per time token, each from its own stage's adapter. A stage's adapter saw only
its own token, so at its stage every input row is its own; only the output logits of the other
stages' time tokens (rows tied to the input ones) differ from the stage's run, by what its
training moved them, and the check leaves those few columns out of its logit comparison.

The check loads the base GGUF with transformers' GGUF reader, puts each LoRA file back on it unmerged
(as llama.cpp applies it), and compares every stage with the stage's run: prompt ids, greedy answers
(f16: identical to the run with its weights rounded to f16 alike) and logits.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.core.errors import PersllmError
from persllm_cli.export.formats import Export
from persllm_cli.model import runs


def lora_name(job: Export, stage_id: str) -> str:
    return f"{job.slug}-{stage_id}-lora.gguf"


def _first_stage_run(info: runs.RunInfo) -> runs.RunInfo:
    """The first stage's run: its tokenizer and stage list are every stage run's."""
    assert info.stage_runs
    return runs.read_run(next(iter(info.stage_runs.values())))


def write(job: Export, merged: Path) -> tuple[dict[str, Any], Any]:
    """The base with every stage's row into `merged` (a transformers model, which the format's weights
    then write as the base GGUF) and each stage's LoRA GGUF into the export. Returns (facts for the
    model card, the export's tokenizer)."""
    import torch

    from persllm_cli.export import gguf_lora, hf
    from persllm_cli.model import load

    tok = hf.export_tokenizer(_first_stage_run(job.info), job.default_stage)
    model, run_tok, info, names = load.load_stages(job.info.path, device="cpu", dtype="float32")
    config = model.get_base_model().config.to_dict()
    rows = {}
    with torch.no_grad():
        for s in info.stages:
            model.set_adapter(names[s["id"]])
            token_id = run_tok.convert_tokens_to_ids(s["token"])
            rows[token_id] = model.get_input_embeddings()(torch.tensor([token_id]))[0].clone()
            console.info(f"Writing {lora_name(job, s['id'])}...")
            gguf_lora.write(model, names[s["id"]], job.tmp / lora_name(job, s["id"]), config=config,
                            name=f"{job.slug}-{s['id']}")
    base = model.unload()   # the base alone, its rows as resized; then each stage's own row
    del model
    with torch.no_grad():
        embed = base.get_input_embeddings().weight
        for token_id, row in rows.items():
            embed[token_id] = row
    facts = hf.save(base, tok, merged, dtype="float32")
    del base
    gc.collect()
    return facts, tok


def check(job: Export, gguf_path: Path, *, exact: bool, rounded: str | None) -> dict[str, Any]:
    """Compare the base GGUF with each stage's LoRA GGUF on it with the stage's run (see the module's
    docstring); returns the model card's figures. `rounded`: the torch dtype the export's matrices are
    stored in, to round the run alike (f16), or None."""
    import torch

    from persllm_cli.export import check as checks
    from persllm_cli.export import gguf_lora
    from persllm_cli.model import load

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ref_model, ref_tok, info, names = load.load_stages(job.info.path, device="cpu", dtype="float32")
    if rounded is not None:
        checks.round_like_export(ref_model, getattr(torch, rounded), vectors=False)
    model, tok = checks.load_gguf(gguf_path)
    config = model.config.to_dict()
    exported = gguf_lora.attach(model, {s["id"]: job.tmp / lora_name(job, s["id"]) for s in info.stages}, config)
    what = f"gguf {job.settings.quant} + LoRA GGUF per stage"
    console.info(f"Checking the {what} export against each stage's run ({len(info.stages)} stages x "
                 f"{len(checks.PROMPTS)} prompts)...")
    tokens = [ref_tok.convert_tokens_to_ids(s["token"]) for s in info.stages]
    total = checks.Report()
    for s in info.stages:
        ref_model.set_adapter(names[s["id"]])
        exported.set_adapter(s["id"])
        others = [t for t in tokens if t != ref_tok.convert_tokens_to_ids(s["token"])]
        one = runs.RunInfo(info.path, {**info.data, "stages": [s]})
        report = checks.compare((ref_model, ref_tok, one), (exported, tok), default_stage=job.default_stage,
                                exact=exact, max_new_tokens=job.settings.check_tokens, what=what, skip_ids=others)
        total.merge(report)
    console.table(f"Check: {what} vs each stage's run{' with its weights rounded alike' if rounded else ''} "
                  f"(greedy, {job.settings.check_tokens} tokens)",
                  ["stage", "prompt", "same answer", "tokens agreeing", "max |logit diff|"], total.rows)
    engine_line = checks.template_in_llama_cpp(tok, info.stages, job.settings.llama_cpp, what)
    del ref_model, exported, model
    gc.collect()
    ties = f" ({total.near_ties} differ after a near tie of the run's own top two tokens)" if total.near_ties else ""
    console.info(f"Check passed: {total.exact}/{total.answers} identical answers{ties}, token agreement "
                 f"{total.agreement:.1%}, largest logit difference {total.max_logit_diff:.2e} (the other stages' "
                 "time tokens left out)")
    console.info(engine_line)
    if total.answers == 0:
        raise PersllmError("export check failed: no stage was compared")
    return {"format": what, "identical": total.exact, "answers": total.answers, "agreement": total.agreement,
            "near_ties": total.near_ties, "max_logit_diff": total.max_logit_diff,
            **({"rounded": rounded} if rounded else {})}
