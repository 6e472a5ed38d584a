"""The chat format: the one owner of how a conversation becomes text and tokens.

tokenize and train encode with it, chat, eval, serve and converse prompt with it, export writes it
into the exported chat template. A conversation is rendered with the tokenizer's chat template (plain
`User:`/`Assistant:` lines when it has none), and the stage's time token goes first (after a real
BOS), exactly as training saw it.

Message text is always text. A message may contain the very strings the format is made of
(`<|im_end|>`, `<|im_start|>`, `<TIME-II>`, the tokenizer's BOS/EOS): they are encoded as the
characters they are, never as control tokens, so nobody can forge a turn, a system message or another
stage's time token by typing it, and training data that quotes them does not teach the model control
tokens in odd places. Only the format itself (the template, the stage token, the plain layout's EOS)
places control tokens. A conversation without such text encodes exactly as before (one tokenizer call
on the rendered text); one with it is rendered with each such string held by a private stand-in
character, and the rendered text is then encoded piece by piece between the format's own control
tokens, each piece as plain text (transformers 5.25 added the same idea as
`apply_chat_template(..., sanitize_control_tokens=True)`; it is done here because the label mask needs
offsets and the stage token goes into the rendered text, and older transformers lack it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import time_token
from persllm_cli.data.records import Message
from persllm_cli.model import control_tokens

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


# Where the stage token goes, kept in the tokenizer's config (tokenizer_config.json), so a run's
# tokenizer carries it to every command that prompts the run: "first" (the method's place, and the
# place of every run that does not say), or "answer": right before each answer, after the template's
# assistant header (`tokenize --time-token-at answer`).
TIME_TOKEN_AT = "persllm_time_token_at"
PLACES = ("first", "answer")


def time_token_at(tokenizer: Any) -> str:
    """Where this tokenizer's runs put the stage token: "first" unless it says "answer"."""
    at = (getattr(tokenizer, "init_kwargs", None) or {}).get(TIME_TOKEN_AT) or "first"
    if at not in PLACES:
        raise PersllmError(f"the tokenizer's {TIME_TOKEN_AT} is {at!r}; persllm knows {', '.join(PLACES)}")
    return at


def set_time_token_at(tokenizer: Any, at: str) -> None:
    """Record where the stage token goes; save_pretrained writes it into tokenizer_config.json."""
    if at not in PLACES:
        raise PersllmError(f"--time-token-at must be one of {', '.join(PLACES)}, not {at!r}")
    if at == "answer":
        answer_header(tokenizer)   # refuses a base without a usable chat template now, not mid-run
    tokenizer.init_kwargs[TIME_TOKEN_AT] = at


def answer_header(tokenizer: Any) -> str:
    """The text the chat template writes to open the assistant's turn (its generation prompt, e.g.
    ChatML's `<|im_start|>assistant\n`): the stage token goes right after it when placed at the answer."""
    if not has_chat_template(tokenizer):
        raise PersllmError("the stage token can go before the answer only with a base that has a chat "
                           "template; this one has none (use --time-token-at first)")
    probe = [{"role": "user", "content": "x"}]
    plain, opened = render(tokenizer, probe), render(tokenizer, probe, add_generation_prompt=True)
    head = opened[len(plain):] if opened.startswith(plain) else ""
    if not head.strip():
        raise PersllmError("this base's chat template has no generation prompt to put the stage token after "
                           "(use --time-token-at first)")
    return head


def with_stage(tokenizer, text: str, token: str | None) -> str:
    """Put the stage token where this tokenizer's runs have it: at the start of a rendered conversation
    (after a leading BOS), or, placed at the answer, after every assistant header (the turn being
    answered included)."""
    if not token:
        return text
    if time_token_at(tokenizer) == "answer":
        head = answer_header(tokenizer)
        return text.replace(head, head + token)
    bos = tokenizer.bos_token
    # A real BOS opens the text once; ChatML-style templates reuse their "BOS" as a turn marker.
    if bos and text.startswith(bos) and text.count(bos) == 1:
        return bos + token + text[len(bos):]
    return token + text


def encode(tokenizer, messages: list[dict[str, str]], token: str | None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels keep only the assistant turns' tokens.

    Assistant spans are found in characters by rendering growing prefixes of the conversation
    (prompt with generation prompt vs. prompt plus the answer), then mapped to tokens with the
    tokenizer's offsets, so BPE merges at turn edges cannot shift the mask. Control-token text in a
    message is encoded as text (see the module's docstring), here as in `prompt_ids`.
    """
    held, table = control_tokens.escape(messages, control_tokens.controls(tokenizer))

    def text(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return control_tokens.unescape(with_stage(tokenizer, render(tokenizer, msgs, add_generation_prompt=gen),
                                                  token), table)

    rendered = with_stage(tokenizer, render(tokenizer, held), token)
    full = control_tokens.unescape(rendered, table)
    spans = []
    for i, m in enumerate(held):
        if m["role"] != "assistant" or i == 0:
            continue
        before = text(held[:i], gen=True)
        upto = text(held[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise PersllmError("this model's chat template renders a conversation differently from its "
                               "beginning (e.g. it drops earlier reasoning), so answer tokens cannot be "
                               "located; use a base model with a prefix-stable template")
        spans.append((len(before), len(upto)))
    ids, offsets = control_tokens.encode(tokenizer, rendered, table, offsets=True)
    labels = [t if any(s <= off[0] < e for s, e in spans) else IGNORE for t, off in zip(ids, offsets)]
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
    for training (stage token first, after a real BOS), ending with the assistant's turn opened.
    For showing; never tokenize it yourself (a message's control-token text would become control
    tokens): `prompt_ids` is the encoding."""
    return with_stage(tokenizer, render(tokenizer, messages, add_generation_prompt=True), stage_token)


def prompt_ids(tokenizer: Any, messages: list[Message], stage_token: str | None) -> list[int]:
    """Token ids of a prompt ending where the assistant's answer starts, as training saw it (the same
    encoding as `encode`: control-token text in a message stays text)."""
    held, table = control_tokens.escape(messages, control_tokens.controls(tokenizer))
    # The template writes its own special tokens; adding a BOS again would differ from training.
    return control_tokens.encode(tokenizer, build_prompt(tokenizer, held, stage_token), table)[0]


def has_control_text(tokenizer: Any, messages: list[dict[str, str]]) -> bool:
    """Whether a message's text spells one of the tokenizer's control tokens (encoded as text here;
    for callers that hand text to another library's tokenizing)."""
    c = control_tokens.controls(tokenizer)
    return any(isinstance(m.get("content"), str) and c.find(m["content"]) for m in messages)


def warm_up(tokenizer: Any) -> None:
    """Build now what encoding control-token text needs (a copy of the tokenizer, a few tenths of a
    second), so that a server's first such message does not pay for it."""
    control_tokens.controls(tokenizer).plain(tokenizer)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of bare text (no chat format), read as text only: for text a caller appends itself."""
    return control_tokens.text_ids(tokenizer, text)


def context_size(model: Any) -> int:
    """How many tokens the model attends over (prompt plus answer)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class PromptTooLong(PersllmError):
    """Even the last message alone does not fit the room left for the prompt."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"the message is too long for the model's context ({tokens} tokens; {max(budget, 0)} left for "
                         "the prompt); shorten it or lower --max-new-tokens")
        self.tokens, self.budget = tokens, budget


def fit_messages(tokenizer: Any, messages: list[Message], stage_token: str, budget: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (never the system message or the last user message) until the prompt
    takes at most `budget` tokens. Returns (kept messages, number of messages dropped); see
    `fit_prompt`, which also gives the kept prompt's ids."""
    kept, dropped, _ = fit_prompt(tokenizer, messages, stage_token, budget)
    return kept, dropped


def fit_prompt(tokenizer: Any, messages: list[Message], stage_token: str,
               budget: int) -> tuple[list[Message], int, list[int]]:
    """`fit_messages`, and the prompt ids of the messages kept: the fitting has encoded them already,
    so a caller that needs the ids (serve) does not encode the prompt a second time.

    Turns go a whole exchange (user + assistant) at a time, so the conversation still starts with the
    user. The cut points are known without encoding anything; the prompt is encoded once whole, and
    when it is too long the newest cut that fits is found by doubling the part kept from the end, then
    halving: each trial encodes at most about twice what fits, so a long history costs one pass over
    it, not one pass per dropped turn.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]

    encoded: dict[int, list[int]] = {}   # cut -> the prompt ids from there on

    def size(cut: int) -> int:
        if cut not in encoded:
            encoded[cut] = prompt_ids(tokenizer, system + rest[cut:], stage_token)
        return len(encoded[cut])

    if budget > 0 and size(0) <= budget:
        return messages, 0, encoded[0]
    cuts = [0]
    while len(rest) - cuts[-1] > 1:
        at = cuts[-1]
        pair = len(rest) - at > 2 and rest[at]["role"] == "user" and rest[at + 1]["role"] == "assistant"
        cuts.append(at + (2 if pair else 1))
    last = len(cuts) - 1
    alone = size(cuts[last])
    if alone > budget:
        raise PromptTooLong(alone, budget)
    fits, too_long, step = last, 0, 1   # cuts[fits] fits; cuts[too_long] does not (cut 0 was too long)
    while fits - step > 0:
        if size(cuts[fits - step]) > budget:
            too_long = fits - step
            break
        fits -= step
        step *= 2
    while fits - too_long > 1:
        mid = (fits + too_long) // 2
        if size(cuts[mid]) <= budget:
            fits = mid
        else:
            too_long = mid
    return system + rest[cuts[fits]:], cuts[fits], encoded[cuts[fits]]
