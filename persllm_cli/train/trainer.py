"""Pieces `train.py` plugs into transformers' Trainer and TRL's DPOTrainer.

- `LengthGroupedSeededSampler`: batches of similar length (little padding), in an order fixed by
  the seed and the epoch alone, so `--resume` replays exactly the batches an uninterrupted run sees.
- `pad_collate`: pads a batch to its longest member (never to --max-length) and keeps each
  example's index so the trainer can log which samples every step used.
- `BatchStats`: tokens, padding and sample indices seen since the last log line.
- `ProgressCallback`: progress on stderr (rich when live, plain lines otherwise) and metrics.jsonl.
- `PlainModes`: checkpoints get ordinary file modes (safetensors writes 0600).
- `reporting`: where transformers' own reporters (`--report-to`) write, one phase at a time.
- `TimeRowRate`: the time-token rows' own learning rate, for SFT and (`dpo_trainer_class`) DPO.
- `SFTTrainer`: length-grouped batches, batch statistics and, with `--stage-contrast`, the stage
  contrast (train/contrast.py).
- `loss_plot`, `model_card`.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from persllm_cli.core import console
from persllm_cli.data import store
from persllm_cli.model.chat_format import IGNORE
from persllm_cli.train.contrast import contrast_batch, contrast_loss


class LengthGroupedSampler(Sampler):
    """Shuffle with a generator seeded by (seed, epoch), then sort within mega-batches by length.

    Like transformers' LengthGroupedSampler, but its order depends only on the seed and the epoch
    (not on the global RNG), which is what makes a resumed run see the same batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 50):
        self.lengths = lengths
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        out: list[int] = []
        for i in range(0, len(order), size):
            chunk = sorted(order[i:i + size], key=lambda j: -self.lengths[j])
            out.extend(chunk)
        return iter(out)


def pad_collate(pad_id: int):
    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "sample_index": torch.tensor([f["index"] for f in features], dtype=torch.long)}
    return collate


class BatchStats:
    def __init__(self) -> None:
        self.tokens = 0        # real tokens since the last log
        self.padded = 0        # tokens including padding since the last log
        self.samples: list[int] = []
        self.total_tokens = 0
        self.total_padded = 0

    def add(self, mask: torch.Tensor, samples: list[int]) -> None:
        real, total = int(mask.sum()), mask.numel()
        self.tokens += real
        self.padded += total
        self.total_tokens += real
        self.total_padded += total
        self.samples.extend(samples)

    def take(self) -> tuple[int, int, list[int]]:
        out = (self.tokens, self.padded, self.samples)
        self.tokens, self.padded, self.samples = 0, 0, []
        return out

    @property
    def padding_waste(self) -> float:
        return 1 - self.total_tokens / self.total_padded if self.total_padded else 0.0


ROW_PARAMETER = "trainable_tokens_delta"   # PEFT's name for the values of the trainable token rows


def split_time_rows(optimizer: torch.optim.Optimizer, model: torch.nn.Module, learning_rate: float) -> int:
    """Move the trainable time-token rows out of the optimizer's groups into a group of their own
    with `learning_rate` (no weight decay: a row pulled towards zero drifts towards no stage at
    all). The scheduler made afterwards scales this group's rate like the others (warm-up, decay).
    Returns how many parameter tensors moved."""
    rows = [p for n, p in model.named_parameters() if ROW_PARAMETER in n and p.requires_grad]
    ids = {id(p) for p in rows}
    if not rows:
        return 0
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": rows, "lr": learning_rate, "weight_decay": 0.0})
    return len(rows)


class TimeRowRate:
    """A Trainer mixin: the time-token rows learn at `time_row_lr` (None: with everything else).

    Through the Trainer's own hook, `create_optimizer`, so the optimizer's state (and with it
    --resume, which reloads that state group by group) and DDP see an ordinary optimizer."""

    time_row_lr: float | None = None

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.time_row_lr is not None:
            split_time_rows(optimizer, model if model is not None else self.model, self.time_row_lr)
        return optimizer


def dpo_trainer_class():
    """TRL's DPOTrainer with the time rows' own learning rate (TRL imports only when DPO runs)."""
    from trl import DPOTrainer

    class DPOTrainerRows(TimeRowRate, DPOTrainer):
        pass

    return DPOTrainerRows


class SFTTrainer(TimeRowRate, Trainer):
    """transformers' Trainer with the seeded length-grouped sampler and per-step accounting."""

    def __init__(self, *args, lengths: list[int], stats: BatchStats, **kwargs):
        super().__init__(*args, **kwargs)
        self._lengths = lengths
        self.batch_stats = stats
        self.contrast_seen: list[float] = []   # the stage contrast of each micro-batch since the last log

    def _get_train_sampler(self, train_dataset=None):
        return LengthGroupedSampler(self._lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    self.args.seed)

    # The stage contrast (`--stage-contrast`): its weight, and the time tokens' ids in stage order.
    stage_contrast: float = 0.0
    stage_token_ids: tuple[int, ...] = ()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        samples = inputs.pop("sample_index")
        self.batch_stats.add(inputs["attention_mask"], samples.tolist())
        if self.stage_contrast <= 0 or len(self.stage_token_ids) < 2:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        swapped = contrast_batch(inputs, self.stage_token_ids, samples, self.state.global_step, self.args.seed)
        if swapped is None:   # no example in this batch has a time token (general data only)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        big, rows = swapped
        # One forward pass over the batch and its swapped copies; the copies' labels are all IGNORE,
        # so the language-model loss is exactly the batch's own.
        loss, outputs = super().compute_loss(model, big, return_outputs=True, num_items_in_batch=num_items_in_batch)
        contrast = contrast_loss(outputs.logits, inputs["labels"], rows)
        scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if scaled_for_accumulation:   # the Trainer then leaves the division to the loss; do it here too
            contrast = contrast / self.current_gradient_accumulation_steps
        self.contrast_seen.append(float(contrast.detach()))
        loss = loss + self.stage_contrast * contrast
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The stage contrast goes into each log line (metrics.jsonl, --report-to) beside the loss."""
        if self.contrast_seen and "loss" in logs:
            logs["stage_contrast"] = round(sum(self.contrast_seen) / len(self.contrast_seen), 4)
            self.contrast_seen.clear()
        super().log(logs, *args, **kwargs)


class ProgressCallback(TrainerCallback):
    """Progress on stderr and one metrics.jsonl line per logged step (rank 0 only)."""

    def __init__(self, metrics_path: Path, phase: str, stats: BatchStats | None, world_size: int = 1):
        self.metrics_path = Path(metrics_path)
        self.phase = phase
        self.stats = stats
        self.world = world_size
        self._stack = ExitStack()
        self._progress = None
        self._task = None
        self._t0 = self._last = time.monotonic()
        self._start_step = 0
        self.tokens_per_second: float | None = None
        self._tok_total = 0
        self._time_total = 0.0
        self._seen_num_tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self._t0 = self._last = time.monotonic()
        self._start_step = state.global_step
        if state.is_world_process_zero:
            self._progress = self._stack.enter_context(console.progress("{task.fields[info]}"))
            self._task = self._progress.add_task(self.phase.upper(), total=state.max_steps,
                                                 completed=state.global_step, info="")

    def on_log(self, args, state, control, logs=None, **kw):
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        logs = dict(logs or {})
        tokens = padded = 0
        samples: list[int] = []
        if self.stats is not None:
            tokens, padded, samples = self.stats.take()
        elif isinstance(logs.get("num_tokens"), (int, float)):  # TRL counts tokens (all ranks, cumulative)
            tokens = int(logs["num_tokens"]) - self._seen_num_tokens
            self._seen_num_tokens = int(logs["num_tokens"])
            tokens //= self.world  # TRL's count covers every rank; multiplied back below
        if self.world > 1 and self.stats is not None:
            tokens, padded, samples = _gather(tokens, padded, samples)
        elif self.world > 1:
            tokens *= self.world
        if not state.is_world_process_zero or "train_runtime" in logs:
            return
        tps = tokens / elapsed if elapsed > 0 and tokens else None
        if tokens:
            self._tok_total += tokens
            self._time_total += elapsed
            self.tokens_per_second = self._tok_total / self._time_total
        row = {"phase": self.phase, "step": state.global_step, "epoch": round(state.epoch or 0, 4),
               **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        if tokens:
            row.update(tokens=tokens, tokens_per_second=round(tps, 1) if tps else None,
                       padding_waste=round(1 - tokens / padded, 4) if padded else None)
        if samples:
            row["samples"] = samples
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        done = state.global_step - self._start_step
        left = state.max_steps - state.global_step
        eta = (now - self._t0) / done * left if done else float("nan")
        loss = logs.get("loss")
        fields = ((f"loss {loss:.4f}  " if isinstance(loss, (int, float)) else "")
                  + (f"{tps:,.0f} tok/s" if tps else ""))
        if console.live():  # the bar has its own elapsed/eta columns
            self._progress.update(self._task, completed=state.global_step, info=fields)
        else:
            console.info(f"{self.phase} step {state.global_step}/{state.max_steps}  {fields}"
                         + (f"  eta {_fmt_s(eta)}" if not math.isnan(eta) else ""))

    def on_train_end(self, args, state, control, **kw):
        self._stack.close()


class PlainModes(TrainerCallback):
    """Give each checkpoint the modes plain open() would: safetensors writes its files 0600."""

    def on_save(self, args, state, control, **kw):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            store.plain_modes(checkpoint)


@contextmanager
def reporting(report_to: str, run_dir: Path, phase: str) -> Iterator[None]:
    """While one phase is built and trained, tell transformers' reporter where to write: TensorBoard
    event files in runs/<name>/tensorboard/<phase>/ (one TensorBoard run per phase), a Weights &
    Biases run in runs/<name>/wandb/, always offline (persllm never sends anything; `wandb sync`
    does, when the user wants it). They read these variables when the trainer is made and when
    training begins; the process's own values come back afterwards."""
    env: dict[str, str] = {}
    if report_to == "tensorboard":
        env["TENSORBOARD_LOGGING_DIR"] = str(Path(run_dir) / "tensorboard" / phase)
    elif report_to == "wandb":
        env.update(WANDB_MODE="offline", WANDB_DIR=str(run_dir), WANDB_SILENT="true",
                   WANDB_PROJECT=os.environ.get("WANDB_PROJECT") or "persllm")
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)  # wandb writes to WANDB_DIR/wandb
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if report_to == "wandb":
            import wandb

            if wandb.run is not None:  # one W&B run per phase: sft+dpo's DPO steps start at 1 again
                wandb.finish()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def every_rank(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (just `[value]` outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def _gather(tokens: int, padded: int, samples: list[int]) -> tuple[int, int, list[int]]:
    """Sum the token counts and join the sample indices of every rank (every rank logs each step)."""
    parts = every_rank((tokens, padded, samples))
    return sum(p[0] for p in parts), sum(p[1] for p in parts), [i for p in parts for i in p[2]]


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def trim_metrics(path: Path, phase: str, after_step: int) -> None:
    """Drop lines a resumed run will write again (steps after its checkpoint)."""
    rows = read_metrics(path)
    keep = [r for r in rows if not (r.get("phase") == phase and r.get("step", 0) > after_step)]
    if len(keep) != len(rows):
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")


def loss_plot(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    fig, ax = plt.subplots(figsize=(7, 4))
    for phase in dict.fromkeys(r["phase"] for r in rows):
        pts = [(r["step"], r["loss"]) for r in rows if r["phase"] == phase]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, label=phase.upper())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def _rows_line(rows: dict[str, Any], s: dict[str, Any]) -> str:
    start = "each from its stage's meaning" if rows.get("init") == "stage" else "all from the vocabulary's mean"
    rate = rows.get("learning_rate")
    return f"{start}; learning rate {rate if rate is not None else str(s['learning_rate']) + ', with the LoRA'}"


def _contrast_line(s: dict[str, Any]) -> str:
    w = s.get("stage_contrast") or 0
    return f", stage contrast weight {w:g}" if w > 0 else ""


def model_card(info: dict[str, Any]) -> str:
    stages = "\n".join(f"| `{s['token']}` | {s['id']} | {s['label']} |" for s in info["stages"])
    s = info["settings"]
    first = info["stages"][-1]["id"] if info["stages"] else "ID"
    return f"""# {info['persona']} — PersLLM adapter

A LoRA adapter for **{info['base']}** trained with persllm ({info['method'].upper()}) so the model
answers as {info['persona']} at a chosen stage of life. Each conversation starts with the stage's
time token:

| token | stage | label |
|---|---|---|
{stages}

## Use

    persllm chat {info['run_name']} --stage {first}

## Training

- method: {info['method']}; {'QLoRA (4-bit NF4 base)' if info['hardware'].get('quantized') else 'LoRA (' + info['hardware'].get('dtype', '') + ' base)'}
- LoRA r={s['lora_r']}, alpha={s['lora_alpha']}, dropout={s['lora_dropout']}, all linear layers, plus the
  time-token embedding rows ({_rows_line(info.get('time_rows') or {}, s)})
- learning rate {s['learning_rate']}{_contrast_line(s)}, batch {s['batch_size']} x grad accum {s['grad_accum']} x {info['hardware'].get('processes', 1)} process(es), seed {s['seed']}
- steps: {info.get('steps')}; final loss: {info.get('final_loss')}
- tokens/s: {info.get('tokens_per_second')}; peak memory: {info.get('peak_memory_gb')} GB; padding waste: {info.get('padding_waste')}
- hardware: {info['hardware'].get('summary')}
- versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}

Data hashes and all settings are in `run.json`; the loss curve is `loss.png`.
"""
