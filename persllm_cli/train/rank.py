"""One training process (one rank): load, wrap with LoRA, run the SFT and/or DPO phase, save the run.

Called in-process by `persllm train`, or per rank by persllm_cli.train.launch under torchrun.
Heavy imports live here so that train.py (imported by the CLI) stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from persllm_cli.core import console
from persllm_cli.data import store
from persllm_cli.model import runs
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.core.errors import PersllmError
from persllm_cli.model.bases import is_quantized
from persllm_cli.data.sidecars import versions
from persllm_cli.train.settings import TrainSettings, check_tokenizer, data_hashes
from persllm_cli.train.trainer import (BatchStats, PlainModes, ProgressCallback, SFTTrainer, dpo_trainer_class, every_rank,
                                       loss_plot, model_card, pad_collate, read_metrics, reporting, trim_metrics)
from persllm_cli.model.time_rows import StageMeaning

OOM_HINT = ("out of GPU memory; reduce --batch-size (and raise --grad-accum to keep the effective batch), "
            "tokenize with a lower --max-length, or use --qlora")


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("accelerate", "peft", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def lora_config(s: TrainSettings, token_ids: list[int]):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules="all-linear", trainable_token_indices=token_ids)


def last_checkpoint(folder: Path) -> Path | None:
    found = [(int(p.name.split("-")[-1]), p) for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


@dataclass(frozen=True)
class TimeRows:
    """How this run starts and trains the time-token rows."""

    meanings: list[StageMeaning] | None   # None: the shared mean (as runs were trained before)
    learning_rate: float | None           # None: at the LoRA learning rate, in the LoRA's optimizer group


def time_rows(project: Project, s: TrainSettings, meta: dict, run_dir: Path) -> TimeRows:
    """The rows' start and rate from the settings; a resumed run that began before rows had either
    keeps training as it began (its checkpoints' optimizer state has no group for the rows)."""
    if s.resume and _began_before_time_rows(run_dir):
        if int(os.environ.get("RANK", 0)) == 0:
            console.note("this run began before time tokens had their own start and learning rate; "
                         "it continues as it began (shared mean rows, at --learning-rate)")
        return TimeRows(None, None)
    if s.time_token_init == "mean":
        return TimeRows(None, s.time_token_learning_rate)
    from persllm_cli.data import corpus
    from persllm_cli.model.time_rows import meanings

    material = {st.id: [p.text for f in (project.knowledge_file(st), project.style_file(st))
                        for p in corpus.read_paragraphs(f, required=False)] for st in project.stages}
    return TimeRows(meanings(meta["stages"], material), s.time_token_learning_rate)


def _began_before_time_rows(run_dir: Path) -> bool:
    """Whether run.json says this run trained its rows in the LoRA's optimizer group (written before
    the rows had a group of their own, or a resumed one of those: both keep `learning_rate` None)."""
    try:
        data = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (data.get("time_rows") or {}).get("learning_rate") is None


def _base_for_training(s: TrainSettings, rank: "Rank", device: str, tok, base_path: str, rows: TimeRows):
    """The base, resized for the time tokens, their rows started (before PEFT copies them)."""
    from persllm_cli.model.bases import load_for_training
    from persllm_cli.model.time_rows import init_time_rows

    model = load_for_training(base_path, qlora=s.qlora, device=device, local_rank=rank.local, vocab_size=len(tok))
    if rows.meanings:
        init_time_rows(model, tok, rows.meanings)
    return model


class Rank:
    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.local = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _training_args(cls, s: TrainSettings, out: Path, device: str, world: int, n_examples: int, **extra):
    per_step = s.batch_size * s.grad_accum * world
    steps = s.max_steps or max(1, int(-(-n_examples * s.epochs // per_step)))
    # out is runs/<name>/checkpoints/<phase>; a reporter (--report-to) names its run <name>-<phase>.
    common = dict(
        output_dir=str(out), per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate, num_train_epochs=s.epochs, max_steps=s.max_steps or -1,
        lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10), weight_decay=0.0,
        logging_steps=1, save_strategy="steps", save_steps=s.save_steps, seed=s.seed, data_seed=s.seed,
        report_to=s.report_to, run_name=f"{out.parent.parent.name}-{out.name}", disable_tqdm=True,
        use_cpu=device == "cpu", bf16=device == "cuda",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world > 1 else None,
        ddp_find_unused_parameters=False, dataloader_num_workers=0, remove_unused_columns=False,
    )
    common.update(extra)
    return cls(**common)


def _remove_printer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback as HFProgress

    trainer.remove_callback(PrinterCallback)  # it prints log dicts on stdout, which is for data
    trainer.remove_callback(HFProgress)


def _train(trainer, resume_from: Path | None):
    try:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise PersllmError(OOM_HINT) from None


def _sft(s, rank, device, tok, data, ckpt, metrics, resume, token_ids, base_path, rows: TimeRows):
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed

    examples = [json.loads(line) for line in (Path(s.data) / "sft.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    dataset = [{"input_ids": e["input_ids"], "labels": e["labels"], "index": i} for i, e in enumerate(examples)]
    set_seed(s.seed)
    model = get_peft_model(_base_for_training(s, rank, device, tok, base_path, rows), lora_config(s, token_ids))
    _small_saves(model)
    model.train()
    args = _training_args(TrainingArguments, s, ckpt, device, rank.world, len(dataset))
    stats = BatchStats()
    progress = ProgressCallback(metrics, "sft", stats, rank.world)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate(tok.pad_token_id),
                         lengths=[len(e["input_ids"]) for e in dataset], stats=stats, callbacks=[progress, PlainModes()])
    trainer.time_row_lr = rows.learning_rate
    trainer.stage_contrast = s.stage_contrast
    trainer.stage_token_ids = tuple(token_ids)
    _remove_printer(trainer)
    out = _train(trainer, resume)
    return trainer, model, {"tokens_per_second": progress.tokens_per_second, "padding_waste": round(stats.padding_waste, 4),
                            "steps": trainer.state.global_step, "train_loss": out.training_loss}


def _dpo(s, rank, device, tok, data, ckpt, metrics, resume, token_ids, base_path, sft_adapter: Path | None, meta,
         rows: TimeRows):
    import datasets
    from peft import PeftModel
    from transformers import set_seed
    from trl import DPOConfig

    pairs = [json.loads(line) for line in (Path(s.data) / "dpo.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    ds = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    set_seed(s.seed)
    model = _base_for_training(s, rank, device, tok, base_path, rows)  # the SFT adapter's rows replace the start
    peft_config = None
    if sft_adapter is not None:
        model = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)
    else:
        peft_config = lora_config(s, token_ids)
    # Gradient checkpointing (TRL's default) on CPU only costs a second forward pass, 10% of a step.
    args = _training_args(DPOConfig, s, ckpt, device, rank.world, len(ds), beta=s.beta, max_length=meta.get("max_length"),
                          precompute_ref_log_probs=False, gradient_checkpointing=device == "cuda")
    progress = ProgressCallback(metrics, "dpo", None, rank.world)
    trainer = dpo_trainer_class()(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                                  peft_config=peft_config, callbacks=[progress, PlainModes()])
    trainer.time_row_lr = rows.learning_rate
    _remove_printer(trainer)
    _small_saves(trainer.model)
    _copy_ref_token_rows(trainer.model)
    _expose_head_bias(trainer.model)
    out = _train(trainer, resume)
    tokens = sum(2 * len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in trainer.train_dataset)
    samples = out.metrics.get("train_samples_per_second")
    # TRL's own token count (through the callback) when it logs one, else an estimate from samples/s.
    tps = progress.tokens_per_second or (round(samples * tokens / len(trainer.train_dataset), 1) if samples else None)
    return trainer, trainer.model, {"tokens_per_second": tps, "steps": trainer.state.global_step,
                                    "train_loss": out.training_loss}


def _copy_ref_token_rows(model) -> None:
    """TRL copies LoRA weights into its frozen "ref" adapter but not trainable-token rows; do that too."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(".default") and "trainable_tokens" in name:
            ref = params.get(name[: -len(".default")] + ".ref")
            if ref is not None:
                ref.data.copy_(p.data)


def _small_saves(model) -> None:
    """Checkpoints too: never the whole (resized) embedding matrices, only LoRA and the time-token rows."""
    import functools

    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)


def _expose_head_bias(model) -> None:
    """TRL's fused LM-head loss reads `lm_head.bias`; PEFT's trainable-token wrapper (the head is tied
    to the embedding, so it is wrapped too) forwards only `.weight` (merged with the trained rows)."""
    head = model.get_output_embeddings()
    if head is not None and "bias" not in dir(head):
        try:
            head.bias
        except AttributeError:
            base = getattr(getattr(head, "token_adapter", None), "base_layer", None)
            head.bias = getattr(base, "bias", None)


def lora_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _save_adapter(model, target: Path) -> None:
    # save_embedding_layers=False: the resized vocabulary would otherwise make PEFT save both whole
    # embedding matrices; the time-token rows are already in the adapter as trainable tokens.
    with store.replace_dir(target) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"], save_embedding_layers=False)


def _hardware(device: str, rank: Rank, s: TrainSettings) -> dict:
    hw = {"device": device, "processes": rank.world, "cpu_count": os.cpu_count(),
          "quantized": device == "cuda" and s.qlora, "dtype": "bfloat16" if device == "cuda" else "float32"}
    if device == "cuda":
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        hw["summary"] = f"{rank.world} x {hw['gpus'][0]}" + (" (QLoRA NF4)" if s.qlora else " (bf16 LoRA)")
    else:
        hw["summary"] = f"CPU, {rank.world} process(es), {os.cpu_count()} cores (float32 LoRA)"
    return hw


def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _run_phases(s, rank, device, tok, meta, run_dir, token_ids, base_path, rows: TimeRows):
    """SFT and/or DPO; in sft+dpo the SFT adapter is saved first and DPO starts from it."""
    ckpt_root = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    results: dict[str, dict] = {}
    phases = s.method.split("+")
    sft_adapter = ckpt_root / "sft-adapter"
    model = trainer = None
    for phase in phases:
        if phase == "sft" and len(phases) > 1 and (sft_adapter / "adapter_config.json").is_file():
            if rank.main:
                console.info("SFT already done in this run; continuing with DPO.")
            continue
        resume = last_checkpoint(ckpt_root / phase) if s.resume else None
        if rank.main:
            trim_metrics(metrics, phase, int(resume.name.split("-")[-1]) if resume else 0)
            if resume:
                console.info(f"Resuming {phase.upper()} from {resume.relative_to(run_dir)}")
        if phase == "sft":
            with reporting(s.report_to, run_dir, phase):
                trainer, model, results[phase] = _sft(s, rank, device, tok, s.data, ckpt_root / "sft", metrics, resume,
                                                      token_ids, base_path, rows)
            if len(phases) > 1:
                if rank.main:
                    _save_adapter(model, sft_adapter)
                trainer.accelerator.wait_for_everyone()
                del model, trainer
        else:
            with reporting(s.report_to, run_dir, phase):
                trainer, model, results[phase] = _dpo(s, rank, device, tok, s.data, ckpt_root / "dpo", metrics, resume,
                                                      token_ids, base_path, sft_adapter if "sft" in phases else None, meta,
                                                      rows)
    return trainer, model, results


def train_rank(project: Project, s: TrainSettings, meta: dict, run_dir: Path) -> int:
    from persllm_cli.model.bases import resolve_base
    from persllm_cli.model.chat_format import load_tokenizer

    _quiet_libraries()
    rank = Rank()
    device = "cpu" if (s.nproc or not torch.cuda.is_available()) else "cuda"
    if s.gpus is not None and device != "cuda":
        raise PersllmError("--gpus asks for CUDA, but no CUDA device is visible")
    if device == "cuda":
        torch.cuda.set_device(rank.local)
    base_name = s.base or meta["base"]
    base_path = resolve_base(base_name)
    tok = load_tokenizer(Path(s.data) / "tokenizer")
    check_tokenizer(meta, s, base_path, tok)
    token_ids = [st["token_id"] for st in meta["stages"]]
    if rank.main and device == "cpu" and os.environ.get("PERSLLM_CPU_QLORA") != "1":
        console.note("No CUDA here (or --nproc): training LoRA on a float32 base on CPU; QLoRA needs a GPU.")
    ckpt_root = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    rows = time_rows(project, s, meta, run_dir)
    info = {"persona": project.name, "base": base_name, "base_path": base_path,
            "stages": [{"id": st["id"], "label": st["label"], "token": st["token"]} for st in meta["stages"]],
            "method": s.method, "settings": public_settings(s), "data": data_hashes(s.data, meta),
            "versions": versions(), "hardware": _hardware(device, rank, s), "run_name": f"runs/{run_dir.name}",
            "time_rows": {"init": "stage" if rows.meanings else "mean", "learning_rate": rows.learning_rate,
                          "meanings": [m.text for m in rows.meanings or []]},
            # one stage's adapter of a --adapter-per-stage run (train/per_stage.py) says which
            **({"trained_stage": meta["only_stage"]} if meta.get("only_stage") else {}), "complete": False}
    if rank.main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        runs.write_run_json(run_dir, {**info, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    t_start = time.monotonic()
    phases = s.method.split("+")
    try:
        trainer, model, results = _run_phases(s, rank, device, tok, meta, run_dir, token_ids, base_path, rows)
    except torch.cuda.OutOfMemoryError:
        raise PersllmError(OOM_HINT) from None
    if model is None:
        raise PersllmError("nothing to train")
    unwrapped = trainer.accelerator.unwrap_model(model)
    # What was actually trained, not what was asked for.
    info["hardware"]["quantized"] = is_quantized(unwrapped)
    if rank.world > 1:
        # DDP must leave every rank with the same weights; run.json shows that it did.
        digests = every_rank(lora_hash(unwrapped))
        info["hardware"]["adapter_sha256_per_rank"] = digests
        if rank.main and len(set(digests)) > 1:
            console.warn("the ranks ended with different adapter weights (a bug: please report it); "
                         "rank 0's adapter is saved")
    if not rank.main:
        return 0
    _save_adapter(unwrapped, run_dir / "adapter")
    tmp_tok = run_dir / ".tokenizer.tmp"
    if tmp_tok.exists():
        shutil.rmtree(tmp_tok)
    tok.save_pretrained(str(tmp_tok))
    if (run_dir / "tokenizer").exists():
        shutil.rmtree(run_dir / "tokenizer")
    os.replace(tmp_tok, run_dir / "tokenizer")
    loss_plot(metrics, run_dir / "loss.png")
    rows = [r for r in read_metrics(metrics) if isinstance(r.get("loss"), (int, float))]
    last = results[phases[-1]]
    tps = last.get("tokens_per_second") or results.get("sft", {}).get("tokens_per_second")
    info.update(tokens_per_second=round(tps, 1) if tps else None,
                peak_memory_gb=_peak_memory_gb(device), padding_waste=results.get("sft", {}).get("padding_waste"),
                phases=results, steps=last["steps"], final_loss=rows[-1]["loss"] if rows else None,
                seconds=round(time.monotonic() - t_start, 1),
                adapter_bytes=sum(f.stat().st_size for f in (run_dir / "adapter").rglob("*") if f.is_file()))
    (run_dir / "README.md").write_text(model_card(info), encoding="utf-8")
    info["complete"] = True
    runs.write_run_json(run_dir, info)
    if not meta.get("only_stage"):   # a stage's own run: runs/latest comes when every stage is done
        runs.update_latest(run_dir)
    console.table(f"Trained {run_dir}", ["", "value"], [
        ["method", s.method], ["steps", info["steps"]],
        ["final loss", round(info["final_loss"], 4) if info["final_loss"] is not None else None],
        ["tokens/s", info["tokens_per_second"]], ["padding waste", info["padding_waste"]],
        ["peak memory GB", info["peak_memory_gb"]], ["adapter MB", round(info["adapter_bytes"] / 1e6, 1)],
        ["seconds", info["seconds"]]])
    return 0
