"""Training throughput: persllm's batching and training path against plain baselines.

CPU part (always): the same LoRA training on the same tokenized conversations, twice in this run:
  - persllm: our Trainer (seeded length-grouped batches, each padded to its longest member);
  - baseline: a plain transformers Trainer with random batches padded to --max-length.
  It prints real (non-pad) tokens/s, padding waste (pad tokens / all tokens in batches) and the ratio.
  The model is a small random-initialised Llama with the embedded SmolLM2 tokenizer (the data
  path is the real one: chat template, time tokens, label masks), so the run takes a minute or two.

GPU part (only when CUDA is visible): a random-initialised 7B-shaped model (Qwen2-7B shapes, as in
shared/gpu/qlora_baseline.py), batch 8 x 1,024 tokens, LoRA r16 on all linear layers, gradient
checkpointing, through persllm's own loader (models.load_for_training) and Trainer, QLoRA NF4 and
bf16 LoRA; tokens/s and peak memory next to the baseline measured on an H100.

    python benchmarks/train_throughput.py [--steps 12] [--examples 192] [--max-length 256] [--json out.json]
    SIZES=0.5B,7B MODES=qlora,lora-bf16 python benchmarks/train_throughput.py --gpu-only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from persllm_cli.trainer_utils import BatchStats, SFTTrainer, pad_collate  # noqa: E402
from persllm_cli.training import _quiet_libraries, _remove_printer  # noqa: E402

GPU_BASELINE = {  # shared/gpu/README.md, H100, plain transformers + peft + bitsandbytes, 8 x 1,024 tokens
    "0.5B": {"qlora": (17535, 5.85), "lora-bf16": (32861, 6.02)},
    "1.5B": {"qlora": (9950, 7.33), "lora-bf16": (15023, 8.83)},
    "7B": {"qlora": (4095, 13.38), "lora-bf16": (6645, 22.62)},
}
SIZES = {"0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
         "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
         "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)}


class Timer(TrainerCallback):
    """Wall time from the end of the first step (warm-up) to the end of the last one."""

    def __init__(self, stats: BatchStats):
        self.stats, self.t0, self.t1, self.tokens0 = stats, None, None, 0

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == 1:
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
    from persllm_cli.tokenization import encode_split

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

    from persllm_cli.models import load_for_training
    from persllm_cli.train import TrainSettings
    from persllm_cli.training import lora_config

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_for_training(str(base), qlora=False, device=device, vocab_size=len(tok))
    model = get_peft_model(model, lora_config(TrainSettings(), [tok.convert_tokens_to_ids("<TIME-I>")]))
    model.train()
    return model


def cpu_part(a) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from persllm_cli.models import resolve_base
    from persllm_cli.tokenization import load_tokenizer

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


def gpu_part(a) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from persllm_cli.tokenization import load_tokenizer

    out = {"gpu": torch.cuda.get_device_name(0)}
    sizes = os.environ.get("SIZES", "7B").split(",")
    modes = os.environ.get("MODES", "qlora,lora-bf16").split(",")
    tok_dir = a.tokenizer
    for size in sizes:
        path = Path(tempfile.gettempdir()) / f"persllm_bench_{size}"
        if not (path / "config.json").exists():
            cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=4096, **SIZES[size])
            torch.manual_seed(0)
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
            m.save_pretrained(path)
            del m
        if tok_dir:
            tok = load_tokenizer(tok_dir, n_stages=1)
        else:  # no tokenizer on the device: a stand-in with the right vocabulary size is enough for timing
            tok = None
        B, T = 8, 1024
        g = torch.Generator().manual_seed(0)
        data = [{"input_ids": torch.randint(0, 49152, (T,), generator=g).tolist(), "index": i} for i in range(B * (a.gpu_steps + 1))]
        for d in data:
            d["labels"] = list(d["input_ids"])
        for mode in modes:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            from peft import get_peft_model

            from persllm_cli.models import load_for_training
            from persllm_cli.train import TrainSettings
            from persllm_cli.training import lora_config

            vocab = len(tok) if tok is not None else 49152 + 1
            model = load_for_training(str(path), qlora=mode == "qlora", device="cuda", vocab_size=vocab)
            model = get_peft_model(model, lora_config(TrainSettings(), [vocab - 1]))
            model.train()
            stats = BatchStats()
            timer = Timer(stats)
            args = TrainingArguments(output_dir=str(path / f"run-{mode}"), per_device_train_batch_size=B,
                                     max_steps=a.gpu_steps, learning_rate=1e-4, logging_steps=10**6, save_strategy="no",
                                     report_to="none", disable_tqdm=True, bf16=True, seed=0,
                                     remove_unused_columns=False, dataloader_num_workers=0)
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collate(0),
                                 lengths=[T] * len(data), stats=stats, callbacks=[timer])
            _remove_printer(trainer)
            try:
                trainer.train()
                tps = timer.tokens_per_second()
                base_tps, base_mem = GPU_BASELINE[size][mode]
                out[f"{size}/{mode}"] = {"tokens_per_second": round(tps), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                        "baseline_tokens_per_second": base_tps, "baseline_peak_gib": base_mem,
                                        "ratio": round(tps / base_tps, 2)}
            except torch.cuda.OutOfMemoryError as e:
                out[f"{size}/{mode}"] = {"error": f"OOM: {str(e)[:200]}"}
            print(f"  {size}/{mode}: {out[f'{size}/{mode}']}", file=sys.stderr, flush=True)
            trainer.accelerator.free_memory()
            del trainer, model
            import gc

            gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--examples", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--gpu-steps", type=int, default=8)
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--tokenizer", help="tokenizer dir for the GPU part (default: a stand-in vocabulary)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    _quiet_libraries()
    from rich.console import Console
    from rich.table import Table

    res: dict = {}
    con = Console()
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
    if torch.cuda.is_available():
        print("GPU: persllm training path on random-init models ...", file=sys.stderr, flush=True)
        gpu = res["gpu"] = gpu_part(a)
        t = Table(title=f"GPU ({gpu['gpu']}), 8 x 1,024 tokens, LoRA r16 all linear, gradient checkpointing")
        for c in ("model/mode", "persllm tok/s", "peak GiB", "baseline tok/s", "baseline GiB", "ratio"):
            t.add_column(c)
        for k, v in gpu.items():
            if k == "gpu":
                continue
            if "error" in v:
                t.add_row(k, v["error"], "", "", "", "")
            else:
                t.add_row(k, f"{v['tokens_per_second']:,}", str(v["peak_gib"]), f"{v['baseline_tokens_per_second']:,}",
                          str(v["baseline_peak_gib"]), f"{v['ratio']:.2f}x")
        con.print(t)
    elif a.gpu_only:
        print("no CUDA device: the GPU part needs one", file=sys.stderr)
        sys.exit(1)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
