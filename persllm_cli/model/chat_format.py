"""The chat format: the one owner of how a conversation becomes text and tokens.

tokenize and train encode with it, chat, eval, serve and converse prompt with it, export writes it
into the exported chat template. A conversation is rendered with the tokenizer's chat template (plain
`User:`/`Assistant:` lines when it has none), and the stage's time token goes first (after a real
BOS), exactly as training saw it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import time_token
from persllm_cli.data.records import Message




IGNORE = -100


def load_tokenizer(path: str | Path, n_stages: int | None = None):
    """The tokenizer at `path`, with <TIME-I>..<TIME-N> added as special tokens when `n_stages` is given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if n_stages:
        tok.add_tokens([time_token(i) for i in range(1, n_stages + 1)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the model's chat template, or plain User:/Assistant: lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    parts = []
    for m in messages:
        role = {"user": "User", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"].title())
        end = eos if m["role"] == "assistant" else ""
        parts.append(f"{role}: {m['content']}{end}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def with_stage(tokenizer, text: str, token: str | None) -> str:
    """Put the stage token at the start of a rendered conversation (after a leading BOS)."""
    if not token:
        return text
    bos = tokenizer.bos_token
    # A real BOS opens the text once; ChatML-style templates reuse their "BOS" as a turn marker.
    if bos and text.startswith(bos) and text.count(bos) == 1:
        return bos + token + text[len(bos):]
    return token + text


def encode(tokenizer, messages: list[dict[str, str]], token: str | None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels keep only the assistant turns' tokens.

    Assistant spans are found in characters by rendering growing prefixes of the conversation
    (prompt with generation prompt vs. prompt plus the answer), then mapped to tokens with the
    tokenizer's offsets, so BPE merges at turn edges cannot shift the mask.
    """
    full = with_stage(tokenizer, render(tokenizer, messages), token)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        before = with_stage(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True), token)
        upto = with_stage(tokenizer, render(tokenizer, messages[: i + 1]), token)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise PersllmError("this model's chat template renders a conversation differently from its "
                               "beginning (e.g. it drops earlier reasoning), so answer tokens cannot be "
                               "located; use a base model with a prefix-stable template")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= off[0] < e for s, e in spans) else IGNORE for t, off in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _exchanges(messages: list[dict[str, str]]) -> tuple[list[dict], list[list[dict]]]:
    """Leading system messages, then groups of messages each ending with an assistant turn."""
    system = []
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        system.append(messages[i])
        i += 1
    groups, cur = [], []
    for m in messages[i:]:
        cur.append(m)
        if m["role"] == "assistant":
            groups.append(cur)
            cur = []
    if cur:  # trailing user turns with no answer teach nothing; keep them with the last group
        if groups:
            groups[-1].extend(cur)
        else:
            groups.append(cur)
    return system, groups


def encode_split(tokenizer, messages, token, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Encode, splitting at turn boundaries when longer than `max_length`.

    Each piece repeats the system messages and the stage token. Returns (pieces, truncated), where a
    piece that is one exchange and still too long is cut to `max_length` and counted.
    """
    ids, labels = encode(tokenizer, messages, token)
    if len(ids) <= max_length:
        return [(ids, labels)], 0
    system, groups = _exchanges(messages)
    chunks: list[list[dict]] = []
    cur: list[dict] = []
    for g in groups:
        if cur and len(encode(tokenizer, system + cur + g, token)[0]) > max_length:
            chunks.append(cur)
            cur = list(g)
        else:
            cur = cur + g
    if cur:
        chunks.append(cur)
    pieces, truncated = [], 0
    for chunk in chunks:
        p_ids, p_labels = encode(tokenizer, system + chunk, token)
        if len(p_ids) > max_length:
            p_ids, p_labels = p_ids[:max_length], p_labels[:max_length]
            truncated += 1
        pieces.append((p_ids, p_labels))
    return pieces, truncated


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the vocabulary (time tokens included) and the template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update((getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    return h.hexdigest()


# Said when the tokenizer has no chat template: the plain layout's next user turn.
PLAIN_STOP = "\nUser:"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_ids(tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and ChatML's end of turn, where it has them."""
    return [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(i, int) and i != tokenizer.unk_token_id]


def end_texts(tokenizer: Any) -> tuple[str, ...]:
    """Text that ends an answer besides those ids: the next user turn, when there is no chat template."""
    return () if has_chat_template(tokenizer) else (PLAIN_STOP,)


def build_prompt(tokenizer: Any, messages: list[Message], stage_token: str | None) -> str:
    """The text the model continues: the conversation rendered exactly as `tokenize` rendered it
    for training (stage token first, after a real BOS), ending with the assistant's turn opened."""
    return with_stage(tokenizer, render(tokenizer, messages, add_generation_prompt=True), stage_token)


def prompt_ids(tokenizer: Any, messages: list[Message], stage_token: str | None) -> list[int]:
    """Token ids of a prompt ending where the assistant's answer starts, as training saw it."""
    # The template writes its own special tokens; adding a BOS again would differ from training.
    return tokenizer(build_prompt(tokenizer, messages, stage_token), add_special_tokens=False)["input_ids"]


def context_size(model: Any) -> int:
    """How many tokens the model attends over (prompt plus answer)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def fit_messages(tokenizer: Any, messages: list[Message], stage_token: str, budget: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (never the system message or the last user message) until the prompt
    takes at most `budget` tokens. Returns (kept messages, number of messages dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while len(prompt_ids(tokenizer, system + rest, stage_token)) > budget:
        if len(rest) <= 1:
            raise PersllmError(f"the message is too long for the model's context ({budget} tokens left for the "
                               "prompt); shorten it or lower --max-new-tokens")
        # Drop a whole exchange (user + assistant) so the conversation still starts with the user.
        cut = 2 if len(rest) > 2 and rest[0]["role"] == "user" and rest[1]["role"] == "assistant" else 1
        rest = rest[cut:]
        dropped += cut
    return system + rest, dropped
