"""What `persllm tokenize` and `persllm train` are told (TokenizeSettings, TrainSettings) and what train
checks about the tokenized data, shared by the
commands (train/tokenize.py, train/command.py) and every training process (train/rank.py, train/launch.py)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.settings import setting
from persllm_cli.data import sidecars
from persllm_cli.model.chat_format import PLACES
from persllm_cli.model.time_rows import INITS

METHODS = ("sft", "dpo", "sft+dpo")
# --report-to: transformers' own reporters persllm passes on, and the package each needs.
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass(frozen=True)
class TrainSettings:
    data: Path = setting(Path("build/tokenized"), help='Tokenized data.')
    base: str | None = setting(None, help='Base model (must match the tokenized data). [default: from the data]')
    method: str = setting("sft", choices=METHODS, help='sft, dpo or sft+dpo.')
    qlora: bool = setting(True, help='4-bit NF4 base on CUDA.')
    lora_r: int = setting(16, at_least=1, help='')
    lora_alpha: int = setting(32, more_than=0, help='')
    lora_dropout: float = setting(0.05, at_least=0, less_than=1, help='')
    learning_rate: float = setting(2e-4, more_than=0, less_than=math.inf, help='')
    time_token_learning_rate: float = setting(
        1e-2, more_than=0, less_than=math.inf,
        help='Learning rate of the time-token embedding rows (the LoRA weights keep --learning-rate): '
             'at the LoRA rate a short run leaves the stages nearly alike.')
    time_token_init: str = setting(
        "stage", choices=INITS,
        help="Where each time-token row starts: stage (the mean embedding of the stage's id, label and the "
             "terms only its material has) or mean (one shared mean of the vocabulary, as before).")
    stage_contrast: float = setting(
        0.0, at_least=0, less_than=math.inf,
        help="Weight of the stage contrast in SFT: each answer is also scored under other stages' time tokens "
             "(up to 2, in the same forward pass) and the loss asks its own stage to explain it best. "
             "0 turns it off; each other stage costs one more copy of the example.")
    adapter_per_stage: bool = setting(
        False, help="One LoRA adapter per stage, each trained only on its stage's examples and the general ones "
                    "(runs/NAME/stages/ID/); chat, eval, serve and converse answer with the stage's own adapter.")
    epochs: float = setting(1.0, more_than=0, less_than=math.inf, help='')
    max_steps: int | None = setting(None, at_least=1, help='Stop after N optimizer steps (overrides --epochs).')
    batch_size: int = setting(4, at_least=1, help='Per-device micro batch.')
    grad_accum: int = setting(4, at_least=1, help='')
    beta: float = setting(0.1, more_than=0, less_than=math.inf, help='DPO beta.')
    gpus: str | None = setting(None, help='Train on N GPUs (or all) with DDP under torchrun.')
    nproc: int | None = setting(None, at_least=1, help='Train with N processes on CPU (gloo DDP).')
    resume: bool = setting(False, help="Continue from the run's last checkpoint.")
    output: Path | None = setting(None, help='Run directory. [default: runs/<date>-<method>]')
    seed: int = setting(0, at_least=0, less_than=2**32, help='')
    save_steps: int = setting(50, at_least=1, help='Checkpoint every N steps.')
    report_to: str = setting("none", choices=("none", *REPORTERS),
                             help='Also log the training curves through transformers: tensorboard (event files in '
                                  'runs/<name>/tensorboard/) or wandb (offline, in runs/<name>/wandb/).')


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_reporter(report_to: str) -> None:
    """A reporter whose package is missing fails here, before anything is written."""
    import importlib.util

    package = REPORTERS.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        extra = " (or pip install 'persllm[tensorboard]')" if package == "tensorboard" else ""
        raise PersllmError(f"--report-to {report_to} needs the {package} package, which is not installed: "
                           f"pip install {package}{extra}")


def read_data(data: Path) -> dict:
    """meta.json of a tokenized directory, checked to be one."""
    meta_path = Path(data) / "meta.json"
    if not Path(data).is_dir():
        raise PersllmError(f"tokenized data not found: {data} (run `persllm tokenize` first)")
    if not meta_path.is_file() or not (Path(data) / "sft.jsonl").is_file() or not (Path(data) / "tokenizer").is_dir():
        raise PersllmError(f"{data} is not a `persllm tokenize` output (no meta.json, sft.jsonl or tokenizer/); "
                           "run `persllm tokenize` again")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PersllmError(f"{meta_path}: not valid JSON ({e.msg})") from None


def check_tokenizer(meta: dict, s: TrainSettings, base_path: str, tok) -> None:
    from persllm_cli.model.chat_format import load_tokenizer, tokenizer_fingerprint

    if tokenizer_fingerprint(tok) != meta.get("tokenizer_sha256"):
        raise PersllmError(f"{s.data}/tokenizer does not match {s.data}/meta.json; run `persllm tokenize` again")
    if s.base and s.base != meta.get("base"):
        other = load_tokenizer(base_path, len(meta["stages"]))
        if tokenizer_fingerprint(other) != meta["tokenizer_sha256"]:
            raise PersllmError(f"{s.data} was tokenized for {meta.get('base')}, whose tokenizer differs from "
                               f"{s.base}'s; run `persllm tokenize --base {s.base}` or drop --base")


def settings_from_public(data: dict) -> TrainSettings:
    fields = TrainSettings.__dataclass_fields__
    kw = {k: v for k, v in data.items() if k in fields}
    for k in ("data", "output"):
        if kw.get(k) is not None:
            kw[k] = Path(kw[k])
    return TrainSettings(**kw)


def data_hashes(data: Path, meta: dict) -> dict:
    out = {"tokenizer_sha256": meta.get("tokenizer_sha256"), "inputs": meta.get("inputs", {})}
    for name in ("sft.jsonl", "dpo.jsonl"):
        if (Path(data) / name).is_file():
            out[name] = sidecars.file_sha256(Path(data) / name)
    return out


@dataclass(frozen=True)
class TokenizeSettings:
    train: Path = setting(Path("build/train.jsonl"), help='SFT records.')
    dpo: Path | None = setting(None, help='Preference pairs. [default: build/dpo.jsonl if present]')
    general: Path | None = setting(None, help='General instruction data (JSONL with messages) to mix in.')
    repeat: int = setting(5, at_least=1, help='Repeat persona data this many times when mixing with --general.')
    base: str = setting("smollm2-135m", help='Base model: smollm2-135m, a model directory or a hub id.')
    time_tokens: int | None = setting(None, at_least=1,
                                      help='Number of time tokens; must equal the number of stages. [default: number of stages]')
    max_length: int = setting(2048, at_least=16,
                              help='Longest sequence; longer conversations split at turn boundaries.')
    time_token_at: str = setting(
        "first", choices=PLACES,
        help="Where each example's stage token goes: first (the start of the conversation, as the method has "
             "it) or answer (right before each answer, after the chat template's assistant header; needs a "
             "base with a chat template). Runs trained on the data keep it everywhere they are prompted.")
    output: Path = setting(Path("build/tokenized"),
                           help='Output folder; an existing one must be empty or an earlier tokenize output.')
