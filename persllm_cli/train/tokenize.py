"""`persllm tokenize`: turn train/DPO records into token ids the trainer reads as they are.

Output directory (default build/tokenized/), written to a temporary folder and renamed into place;
an existing one is replaced only when it is empty or an earlier tokenize output:

  sft.jsonl    one training example per line:
               {"id", "stage", "source": "persona"|"general", "input_ids": [...], "labels": [...]}
               labels are -100 on every token but the assistant's (its text and its end-of-turn
               marker). Persona examples appear `--repeat` times when `--general` data is mixed in.
  dpo.jsonl    preference pairs for TRL's DPOTrainer, in its plain-text ("standard") format:
               {"id", "stage", "prompt": text, "chosen": text, "rejected": text}. The prompt is the
               conversation rendered with the chat template up to the assistant's turn, with the stage
               token in front, exactly as the SFT examples start; chosen/rejected are the assistant
               turns as the template renders them. Absent when there are no pairs. TRL tokenizes
               this text itself, and would read a control-token string in it (`<|im_end|>`,
               `<TIME-II>`) as that token; a pair whose messages spell one is therefore left out
               and counted (`dpo_skipped_control_text`), where sft.jsonl encodes such text as text.
  tokenizer/   the base tokenizer plus the time tokens <TIME-I>..<TIME-N> (special tokens).
  meta.json    base (as named), base_path, tokenizer_sha256, stages with their tokens and ids,
               max_length, input hashes: `train` checks these to refuse data made for another model.
  stats.json   counts, lengths, truncations and splits (also printed as a table).

The stage token goes at the very start of the conversation (after a BOS token when the template
writes one), before any system prompt, so one token sets the time for everything that follows.
With `--general F`, persona examples are written `--repeat` times (the paper used 5) next to the
general ones; without it `--repeat` has no effect. General instruction data gets no stage token: it teaches skills that belong to no
point in the persona's life, and tying it to a stage would blur what the tokens mean.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data.curation import read_numbered
from persllm_cli.core.errors import PersllmError
from persllm_cli.model.chat_format import (IGNORE, encode_split, has_control_text, load_tokenizer, render,
                                           set_time_token_at, tokenizer_fingerprint, with_stage)
from persllm_cli.train.settings import TokenizeSettings

FORMAT_VERSION = 1
WRITES = {"sft.jsonl", "dpo.jsonl", "tokenizer", "meta.json", "stats.json"}  # what -o DIR holds afterwards


# ------------------------------------------------------------------------------------ the stage

def _check_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str) for m in msgs):
        raise PersllmError(f"{where}: messages must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in msgs):
        raise PersllmError(f"{where}: no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _stage_of(project: Project, record: dict, where: str):
    sid = record.get("stage")
    if not isinstance(sid, str):
        raise PersllmError(f"{where}: record has no stage")
    try:
        return project.stage(sid)
    except PersllmError as e:
        raise PersllmError(f"{where}: {e}") from None


def _assistant_text(rendered_full: str, rendered_prompt: str, tokenizer) -> str:
    completion = rendered_full[len(rendered_prompt):]
    eos = tokenizer.eos_token
    # TRL appends EOS when the completion does not end with it; the template's trailing newline
    # after the end-of-turn marker would make it add a second one.
    if eos and completion.rstrip().endswith(eos):
        completion = completion.rstrip()
    return completion


def _dpo_pair(tokenizer, project: Project, r: dict, where: str) -> dict | None:
    """The pair in TRL's text format, or None when its text spells a control token (see the docstring)."""
    stage = _stage_of(project, r, where)
    prompt = r.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise PersllmError(f"{where}: prompt must be a list of messages")
    out = {"id": r.get("id"), "stage": stage.id}
    p_text = render(tokenizer, prompt, add_generation_prompt=True)
    out["prompt"] = with_stage(tokenizer, p_text, stage.token)
    if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] and tokenizer.bos_token and out["prompt"].startswith(tokenizer.bos_token):
        out["prompt"] = out["prompt"][len(tokenizer.bos_token):]  # TRL tokenizes with the tokenizer's own BOS
    for key in ("chosen", "rejected"):
        ans = r.get(key)
        if isinstance(ans, str):
            ans = [{"role": "assistant", "content": ans}]
        if not isinstance(ans, list) or not ans or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in ans):
            raise PersllmError(f"{where}: {key} must be a list with one assistant message")
        if has_control_text(tokenizer, [*prompt, ans[-1]]):
            return None
        full = render(tokenizer, prompt + [{"role": "assistant", "content": ans[-1]["content"]}])
        if not full.startswith(p_text):
            raise PersllmError("this model's chat template is not prefix-stable; cannot prepare DPO pairs")
        out[key] = _assistant_text(full, p_text, tokenizer)
    return out


def run(project: Project, settings: TokenizeSettings) -> int:
    """Render, mask and save; validate everything before writing anything. One tokenize per output
    folder at a time: a second one exits 1 (or waits with --wait)."""
    from persllm_cli.data.lock import hold

    with hold(settings.output):
        return _run(project, settings)


def _run(project: Project, settings: TokenizeSettings) -> int:
    import time

    from persllm_cli.model.bases import resolve_base

    t0 = time.monotonic()
    n_stages = len(project.stages)
    if settings.time_tokens is not None and settings.time_tokens != n_stages:
        raise PersllmError(f"--time-tokens {settings.time_tokens} does not match the project's {n_stages} stage(s) "
                           f"({', '.join(s.id for s in project.stages)}); each stage needs exactly one time token")
    _check_output(settings.output)
    train_records = read_numbered(settings.train, what="training records")
    dpo_path = settings.dpo
    if dpo_path is None:
        candidate = project.root / "build" / "dpo.jsonl"
        dpo_path = candidate if candidate.is_file() else None
    dpo_records = read_numbered(dpo_path, what="preference pairs") if dpo_path else []
    general_records = read_numbered(settings.general, what="general records") if settings.general else []
    base_path = resolve_base(settings.base)
    try:
        tok = load_tokenizer(base_path, n_stages)
    except OSError as e:
        raise PersllmError(f"cannot load the tokenizer of {settings.base}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise PersllmError(f"{settings.base}: needs a fast tokenizer (tokenizer.json) to locate answer tokens")
    set_time_token_at(tok, settings.time_token_at)   # saved with the tokenizer, so every run prompts alike

    repeat = settings.repeat if general_records else 1
    stats = {"persona_records": 0, "general_records": 0, "skipped_unusable": 0, "examples": 0,
             "split_conversations": 0, "extra_pieces": 0, "truncated": 0, "dropped_no_answer_tokens": 0,
             "repeat": repeat, "dpo_pairs": 0, "per_stage": {s.id: 0 for s in project.stages}}
    examples: list[dict] = []

    def add(rid, stage_id, source, msgs, token, where):
        pieces, truncated = encode_split(tok, msgs, token, settings.max_length)
        stats["truncated"] += truncated
        if len(pieces) > 1:
            stats["split_conversations"] += 1
            stats["extra_pieces"] += len(pieces) - 1
        out = []
        for ids, labels in pieces:
            if all(x == IGNORE for x in labels):
                stats["dropped_no_answer_tokens"] += 1
                continue
            out.append({"id": rid, "stage": stage_id, "source": source, "input_ids": ids, "labels": labels})
        return out

    persona: list[dict] = []
    for n, r in train_records:
        where = f"{settings.train}:{n}"
        if "status" in r and records.unusable_reason(r):
            stats["skipped_unusable"] += 1
            continue
        stage = _stage_of(project, r, where)
        msgs = _check_messages(r.get("messages"), where)
        persona.extend(add(r.get("id"), stage.id, "persona", msgs, stage.token, where))
        stats["persona_records"] += 1
        stats["per_stage"][stage.id] += 1
    general: list[dict] = []
    for n, r in general_records:
        where = f"{settings.general}:{n}"
        msgs = _check_messages(r.get("messages"), where)
        general.extend(add(r.get("id") or f"general-{n}", None, "general", msgs, None, where))
        stats["general_records"] += 1
    for _ in range(repeat):
        examples.extend(persona)
    examples.extend(general)
    if not examples:
        raise PersllmError(f"{settings.train}: no usable training conversations")
    made = [_dpo_pair(tok, project, r, f"{dpo_path}:{n}") for n, r in dpo_records]
    pairs = [p for p in made if p is not None]
    stats["dpo_pairs"] = len(pairs)
    stats["dpo_skipped_control_text"] = len(made) - len(pairs)

    lengths = [len(e["input_ids"]) for e in examples]
    label_tokens = sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples)
    stats.update(examples=len(examples), tokens=sum(lengths), answer_tokens=label_tokens,
                 mean_length=round(statistics.fmean(lengths), 1), median_length=int(statistics.median(lengths)),
                 max_length=max(lengths), min_length=min(lengths))

    stages = [{"id": s.id, "label": s.label, "token": s.token, "token_id": tok.convert_tokens_to_ids(s.token)}
              for s in project.stages]
    inputs = {str(p): sidecars.file_sha256(p) for p in (settings.train, dpo_path, settings.general) if p}
    meta = {"format": FORMAT_VERSION, "persona": project.name, "base": settings.base, "base_path": base_path,
            "tokenizer_sha256": tokenizer_fingerprint(tok), "vocab_size": len(tok), "stages": stages,
            "time_token_at": settings.time_token_at,
            "max_length": settings.max_length, "chat_template": bool(getattr(tok, "chat_template", None)),
            "files": {"sft": "sft.jsonl", "dpo": "dpo.jsonl" if pairs else None},
            "inputs": inputs, "settings": public_settings(settings), "seconds": round(time.monotonic() - t0, 2)}
    _write_dir(settings.output, tok, examples, pairs, meta, stats)
    _print_stats(stats, settings.output)
    return 0


def _check_output(out: Path) -> None:
    """Refuse an -o that is not ours to replace: the output directory is swapped out wholesale, so it
    must be missing, empty, or what an earlier tokenize wrote (`-o .` must never take a project)."""
    out = Path(out)
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()} if out.is_dir() else None
    if names is None or (names and not {"meta.json", "sft.jsonl"} <= names <= WRITES):
        raise PersllmError(f"{out} exists and is not a tokenize output; choose another -o")


def _write_dir(out: Path, tok, examples, pairs, meta, stats) -> None:
    _check_output(out)  # again: the tokenizing took a while
    out = Path(out).resolve()  # a symlinked output keeps its link; the directory it names is replaced
    try:
        with store.replace_dir(out) as tmp:
            with open(tmp / "sft.jsonl", "w", encoding="utf-8") as f:
                for e in examples:
                    f.write(json.dumps(e, separators=(",", ":")) + "\n")
            if pairs:
                store.write_jsonl_atomic(tmp / "dpo.jsonl", pairs)
            tok.save_pretrained(tmp / "tokenizer")
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except Exception as e:  # disk full, a size limit, a permission: the old output stays as it was
        err = store.os_error(e)
        if err is None:
            raise
        raise store.write_failed(Path(err.filename or out), err, f"{out} is unchanged") from None


def _print_stats(stats: dict, out: Path) -> None:
    rows = [[k.replace("_", " "), stats[k]] for k in (
        "persona_records", "general_records", "repeat", "examples", "tokens", "answer_tokens", "mean_length",
        "median_length", "max_length", "split_conversations", "extra_pieces", "truncated",
        "dropped_no_answer_tokens", "skipped_unusable", "dpo_pairs", "dpo_skipped_control_text")]
    rows += [[f"records in stage {k}", v] for k, v in stats["per_stage"].items()]
    console.table(f"Tokenized into {out}", ["", "value"], rows)
