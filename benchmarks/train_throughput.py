"""Training throughput: persllm's batching and training path against plain baselines.

CPU part (always): the same LoRA training on the same tokenized conversations, twice in this run:
  - persllm: our Trainer (seeded length-grouped batches, each padded to its longest member);
  - baseline: a plain transformers Trainer with random batches padded to --max-length.
  It prints real (non-pad) tokens/s, padding waste (pad tokens / all tokens in batches) and the ratio.
  The model is a small random-initialised Llama with the embedded SmolLM2 tokenizer (the data
  path is the real one: chat template, time tokens, label masks), so the run takes a minute or two.

GPU part (when CUDA is visible, or with an explicit --device): for each size x mode (QLoRA NF4,
bf16 LoRA), on a random-initialised Llama-shaped model (the shapes of shared/gpu/qlora_baseline.py),
both sides in this run, on this device, with the same batch (8 x --seq-len random tokens):
  - baseline: shared/gpu/qlora_baseline.py's loop as it is (from_pretrained, k-bit preparation or
    gradient checkpointing, LoRA r16 alpha 32 on all linear layers, AdamW lr 1e-4, no Trainer);
  - persllm: our training path (model.bases.load_for_training, training.lora_config with one time-token
    row, SFTTrainer with its sampler and collator, bf16 on CUDA; TrainSettings' LoRA defaults).
  Both time the steps after the first three (`--gpu-steps` 8: steps 4-8) and report tokens/s and
  peak memory (torch.cuda.max_memory_allocated, reset before each side; None on CPU) and the ratio
  persllm / baseline. The H100 figures of shared/gpu/README.md are shown only as a reference column.
  With --json, the file is rewritten after every size/mode, so a run cut short keeps what it measured.
  `--device cpu` with SIZES=tiny runs all of it on CPU in seconds: the timings mean nothing there,
  it checks that the code runs (tests/test_bench_smoke.py does that).

    python benchmarks/train_throughput.py [--steps 12] [--examples 192] [--max-length 256] [--json out.json]
    SIZES=0.5B,7B MODES=qlora,lora-bf16 python benchmarks/train_throughput.py --gpu-only --json gpu.json
    SIZES=tiny python benchmarks/train_throughput.py --gpu-only --device cpu --gpu-steps 4 --seq-len 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from persllm_cli.model.bases import is_quantized  # noqa: E402
from persllm_cli.train.trainer import BatchStats, SFTTrainer, pad_collate  # noqa: E402
from persllm_cli.train.rank import _quiet_libraries, _remove_printer  # noqa: E402

# Reference only, not the baseline: shared/gpu/README.md, qlora_baseline.py on an H100 (2026-11-25),
# 8 x 1,024 tokens. The baseline is measured again in every run, on the device at hand.
H100_REFERENCE = {
    "0.5B": {"qlora": (17535, 5.85), "lora-bf16": (32861, 6.02)},
    "1.5B": {"qlora": (9950, 7.33), "lora-bf16": (15023, 8.83)},
    "7B": {"qlora": (4095, 13.38), "lora-bf16": (6645, 22.62)},
}
# "tiny" (with a small vocabulary) only checks the code on CPU in seconds.
SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=512),
         "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
         "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
         "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)}
MODES = ("qlora", "lora-bf16")
VOCAB = 49152  # SmolLM2's, as in qlora_baseline.py


def vocab_of(size: str) -> int:
    return SIZES[size].get("vocab_size", VOCAB)


class Timer(TrainerCallback):
    """Wall time from the end of step `warmup` to the end of the last one."""

    def __init__(self, stats: BatchStats, warmup: int = 1, cuda: bool = False):
        self.stats, self.warmup, self.cuda = stats, warmup, cuda
        self.t0, self.t1, self.tokens0 = None, None, 0

    def on_step_end(self, args, state, control, **kw):
        if self.cuda:
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.t0, self.tokens0 = time.perf_counter(), self.stats.total_tokens
        self.t1 = time.perf_counter()

    def tokens_per_second(self) -> float:
        return (self.stats.total_tokens - self.tokens0) / (self.t1 - self.t0)


class PlainTrainer(Trainer):
    """The baseline: transformers' Trainer as it comes, only counting tokens."""

    def __init__(self, *a, stats: BatchStats, **kw):
        super().__init__(*a, **kw)
        self.batch_stats = stats

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop("sample_index", None)
        self.batch_stats.add(inputs["attention_mask"], [])
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def pad_to_max(pad_id: int, max_length: int):
    inner = pad_collate(pad_id)

    def collate(features):
        batch = inner(features)
        extra = max_length - batch["input_ids"].shape[1]
        if extra > 0:
            b = batch["input_ids"].shape[0]
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((b, extra), pad_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], torch.full((b, extra), -100)], 1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros((b, extra), dtype=torch.long)], 1)
        return batch
    return collate


def synthetic_data(tok, n: int, max_length: int, seed: int = 0) -> list[dict]:
    from persllm_cli.model.chat_format import encode_split

    rng = random.Random(seed)
    words = "the castle owl wand spell friend quidditch potion library forest dragon letter train night".split()
    out = []
    while len(out) < n:
        q = " ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) + "?"
        a = " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(3.5, 0.9)) + 3)) + "."
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for ids, labels in encode_split(tok, msgs, "<TIME-I>", max_length)[0]:
            out.append({"input_ids": ids, "labels": labels, "index": len(out)})
    return out[:n]


def lora_model(base, tok, seed):
    from peft import get_peft_model

    from persllm_cli.model.bases import load_for_training
    from persllm_cli.train.settings import TrainSettings
    from persllm_cli.train.rank import lora_config

    torch.manual_seed(seed)
    model = load_for_training(str(base), qlora=False, device="cpu", vocab_size=len(tok))
    model = get_peft_model(model, lora_config(TrainSettings(), [tok.convert_tokens_to_ids("<TIME-I>")]))
    model.train()
    return model


def cpu_part(a) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from persllm_cli.model.bases import resolve_base
    from persllm_cli.model.chat_format import load_tokenizer

    tok = load_tokenizer(resolve_base("smollm2-135m"), n_stages=1)
    data = synthetic_data(tok, a.examples, a.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=a.max_length,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        results = {}
        for name in ("baseline", "persllm"):
            stats = BatchStats()
            timer = Timer(stats)
            args = TrainingArguments(output_dir=os.path.join(tmp, name), per_device_train_batch_size=a.batch_size,
                                     max_steps=a.steps, learning_rate=2e-4, logging_steps=10**6, save_strategy="no",
                                     report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
                                     remove_unused_columns=False, dataloader_num_workers=0)
            model = lora_model(tmp, tok, 0)
            if name == "persllm":
                trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collate(tok.pad_token_id),
                                     lengths=[len(d["input_ids"]) for d in data], stats=stats, callbacks=[timer])
            else:
                trainer = PlainTrainer(model=model, args=args, train_dataset=data, stats=stats, callbacks=[timer],
                                       data_collator=pad_to_max(tok.pad_token_id, a.max_length))
            _remove_printer(trainer)
            trainer.train()
            results[name] = {"tokens_per_second": round(timer.tokens_per_second(), 1),
                             "padding_waste": round(stats.padding_waste, 4), "steps": a.steps}
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    lengths = [len(d["input_ids"]) for d in data]
    results["data"] = {"examples": len(data), "mean_length": round(sum(lengths) / len(lengths), 1),
                       "max_length": a.max_length, "batch_size": a.batch_size}
    results["ratio"] = round(results["persllm"]["tokens_per_second"] / results["baseline"]["tokens_per_second"], 2)
    return results


# ------------------------------------------------------------------------------ GPU part

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def build_random_model(size: str, path: Path, device: str) -> None:
    """A random-initialised Llama of this size, built in bf16 straight on the device (a 7B in
    seconds on a GPU) and saved once for every run of this size."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{"vocab_size": VOCAB, "max_position_embeddings": 4096, **SIZES[size]})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    free_memory(device)


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def baseline_side(path: Path, mode: str, device: str, steps: int, warmup: int, batch: int, seq_len: int,
                  vocab: int) -> dict:
    """The named baseline, shared/gpu/qlora_baseline.py's loop: plain transformers + peft (+ bitsandbytes
    NF4 for qlora), gradient checkpointing, LoRA r16 on all linear layers, AdamW, no Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    place = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    torch.manual_seed(0)
    if mode == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map=place)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=place)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where gradient checkpointing does nothing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = random_batch(vocab, batch, seq_len).to(device)
    losses = []
    for i in range(steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    sync(device)
    dt = (time.perf_counter() - t0) / (steps - warmup)
    return {"tokens_per_second": round(batch * seq_len / dt, 1), "s_per_step": round(dt, 4), "peak_gib": peak_gib(device),
            "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)], "quantized": is_quantized(model),
            "embedding_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")}


def persllm_side(path: Path, mode: str, device: str, steps: int, warmup: int, batch: int, seq_len: int,
                 vocab: int, work: Path) -> dict:
    """persllm's own path, as `persllm train` runs it: model.bases.load_for_training (NF4 or bf16 on CUDA,
    embeddings grown by one time token), training.lora_config (TrainSettings' defaults, the time-token
    row trainable), SFTTrainer with its length-grouped sampler and pad_collate, bf16 autocast on CUDA."""
    from peft import get_peft_model

    from persllm_cli.model.bases import load_for_training
    from persllm_cli.train.settings import TrainSettings
    from persllm_cli.train.rank import lora_config

    torch.manual_seed(0)
    # A one-stage project's tokenizer: the base vocabulary and one time token, whose row trains.
    model = load_for_training(str(path), qlora=mode == "qlora", device=device, vocab_size=vocab + 1)
    model = get_peft_model(model, lora_config(TrainSettings(), [vocab]))
    model.train()
    rows = random_batch(vocab, batch * steps, seq_len).tolist()
    data = [{"input_ids": ids, "labels": ids, "index": i} for i, ids in enumerate(rows)]
    stats = BatchStats()
    timer = Timer(stats, warmup=warmup, cuda=device == "cuda")
    args = TrainingArguments(output_dir=str(work / f"run-{mode}"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, bf16=device == "cuda", use_cpu=device == "cpu", seed=0,
                             remove_unused_columns=False, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collate(0),
                         lengths=[seq_len] * len(data), stats=stats, callbacks=[timer])
    _remove_printer(trainer)
    try:
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        tps = timer.tokens_per_second()
        return {"tokens_per_second": round(tps, 1), "s_per_step": round(batch * seq_len / tps, 4),
                "peak_gib": peak_gib(device), "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
                "quantized": is_quantized(model),
                "embedding_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")}
    finally:
        trainer.accelerator.free_memory()


def gpu_part(a, device: str, save) -> dict:
    """Baseline and persllm, size by size and mode by mode; `save(out)` after each pair."""
    sizes = [s for s in os.environ.get("SIZES", "7B").split(",") if s]
    modes = [m for m in os.environ.get("MODES", ",".join(MODES)).split(",") if m]
    unknown = [s for s in sizes if s not in SIZES] + [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown size or mode: {', '.join(unknown)} (sizes: {', '.join(SIZES)}; modes: {', '.join(MODES)})")
    if a.gpu_steps < 2:
        sys.exit("--gpu-steps must be at least 2 (the first steps are warm-up)")
    warmup = min(3, a.gpu_steps - 1)
    batch = 8
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
           "device_kind": device, "batch": batch, "seq_len": a.seq_len, "steps": a.gpu_steps,
           "timed_steps": a.gpu_steps - warmup, "results": {}}
    sides = (("baseline", baseline_side), ("persllm", persllm_side))
    with tempfile.TemporaryDirectory(prefix="persllm_bench_") as tmp:
        for size in sizes:
            path = Path(tmp) / size
            t = time.perf_counter()
            try:
                build_random_model(size, path, device)
                built = None
            except Exception as e:
                traceback.print_exc()
                built = {"error": f"building the model: {type(e).__name__}: {str(e)[:300]}"}
                free_memory(device)
            out.setdefault("build_seconds", {})[size] = round(time.perf_counter() - t, 1)
            print(f"  {size}: random model built and saved in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            for mode in modes:
                row: dict = {}
                for side, fn in sides:
                    if built is not None:
                        row[side] = dict(built)
                        continue
                    free_memory(device)
                    reset_peak(device)
                    # Memory still held from before (a leak would count against this side's peak).
                    held = round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda" else None
                    extra = (Path(tmp),) if side == "persllm" else ()
                    t = time.perf_counter()
                    try:
                        row[side] = fn(path, mode, device, a.gpu_steps, warmup, batch, a.seq_len, vocab_of(size), *extra)
                    except Exception as e:  # one failed side (OOM, a library error) must not cost the other figures
                        traceback.print_exc()
                        row[side] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    row[side]["seconds"] = round(time.perf_counter() - t, 1)  # load + all steps: for planning
                    row[side]["held_before_gib"] = held
                    free_memory(device)
                    print(f"  {size}/{mode} {side}: {row[side]}", file=sys.stderr, flush=True)
                base, ours = row["baseline"], row["persllm"]
                if "error" not in base and "error" not in ours:
                    row["ratio"] = round(ours["tokens_per_second"] / base["tokens_per_second"], 3)
                    if ours["peak_gib"] and base["peak_gib"]:
                        row["memory_ratio"] = round(ours["peak_gib"] / base["peak_gib"], 3)
                ref = H100_REFERENCE.get(size, {}).get(mode)
                if ref:
                    row["h100_reference"] = {"tokens_per_second": ref[0], "peak_gib": ref[1]}
                out["results"][f"{size}/{mode}"] = row
                save(out)
            shutil.rmtree(path, ignore_errors=True)  # a 7B is 15 GB of disk
    return out


def gpu_table(gpu: dict):
    from rich.table import Table

    t = Table(title=f"Training path on {gpu['device']}: {gpu['batch']} x {gpu['seq_len']} tokens, LoRA r16 all linear, "
                    f"gradient checkpointing, {gpu['timed_steps']} timed steps of {gpu['steps']}; baseline = "
                    "qlora_baseline.py in this run"
                    + ("; on CPU the timings only show that the code runs, and persllm's non-4-bit path is float32 "
                       "without checkpointing there" if gpu["device_kind"] == "cpu" else ""))
    for c in ("model/mode", "baseline tok/s", "baseline GiB", "persllm tok/s", "persllm GiB", "ratio",
              "H100 reference tok/s (GiB)"):
        t.add_column(c)

    def cells(side: dict) -> list[str]:
        if "error" in side:
            return [side["error"][:60], ""]
        return [f"{side['tokens_per_second']:,.0f}", "-" if side["peak_gib"] is None else str(side["peak_gib"])]

    for k, v in gpu["results"].items():
        ref = v.get("h100_reference")
        t.add_row(k, *cells(v["baseline"]), *cells(v["persllm"]),
                  f"{v['ratio']:.2f}x" if "ratio" in v else "-",
                  f"{ref['tokens_per_second']:,} ({ref['peak_gib']})" if ref else "-")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--examples", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--gpu-steps", type=int, default=8, help="steps per side in the GPU part (the first 3 are warm-up)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence in the GPU part (batch 8)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="device for the GPU part (default: cuda when visible; with cpu it only checks that the code runs)")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here (rewritten after each GPU size/mode)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("PERSLLM_CPU_QLORA", "1")  # else our loader gives float32, not NF4, on CPU
    _quiet_libraries()
    from rich.console import Console
    from rich.table import Table

    res: dict = {}
    con = Console(width=None if sys.stdout.isatty() else 140)  # logs from the device keep whole rows

    def save(gpu: dict | None = None) -> None:
        if gpu is not None:
            res["gpu"] = gpu
        if a.json:
            a.json.write_text(json.dumps(res, indent=2))

    if not a.gpu_only:
        print("CPU: persllm batching vs pad-to-max-length Trainer ...", file=sys.stderr, flush=True)
        cpu = res["cpu"] = cpu_part(a)
        t = Table(title=f"CPU LoRA training, {cpu['data']['examples']} conversations, mean {cpu['data']['mean_length']} "
                        f"tokens, batch {a.batch_size}, {a.steps} steps")
        for c in ("", "real tokens/s", "padding waste"):
            t.add_column(c)
        for name in ("baseline", "persllm"):
            t.add_row(name, f"{cpu[name]['tokens_per_second']:,.1f}", f"{cpu[name]['padding_waste']:.1%}")
        t.add_row("ratio", f"{cpu['ratio']:.2f}x", "")
        con.print(t)
        save()
    if device == "cuda" or a.device == "cpu":
        print(f"GPU part on {device}: qlora_baseline.py's loop vs persllm's training path, random-init models ...",
              file=sys.stderr, flush=True)
        gpu = gpu_part(a, device, save)
        save(gpu)
        con.print(gpu_table(gpu))
    elif a.gpu_only:
        sys.exit("no CUDA device: the GPU part needs one (--device cpu with SIZES=tiny checks its code on CPU)")


if __name__ == "__main__":
    main()
