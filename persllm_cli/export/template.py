"""The exported chat template: the base's template with the stage token put where the run has it,
exactly as model/chat_format.py renders conversations for training: first (after a real BOS, else at
the very start), or, for a run tokenized with `--time-token-at answer`, after every assistant header.

The stage is a template variable: `apply_chat_template(messages, stage="early")` in transformers,
`chat_template_kwargs={"stage": "early"}` in OpenAI-compatible servers; without it the default stage.
"""

from __future__ import annotations

import json
from typing import Any

# What chat_format.render writes when the base has no chat template: User:/Assistant: lines.
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set r = {'user': 'User', 'assistant': 'Assistant', 'system': 'System'} -%}"
    "{{ (r[m['role']] if m['role'] in r else m['role']|title) ~ ': ' ~ m['content']"
    " ~ (eos_token if m['role'] == 'assistant' else '') ~ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def stage_template(base_template: str | None, stages: list[dict[str, str]], default_stage: str,
                   answer_head: str | None = None) -> str:
    """A Jinja chat template that renders like `with_stage(render(...), token_of(stage))`: the token
    first, or after each `answer_head` (chat_format.answer_header) when the run puts it at the answer."""
    tokens = {s["id"]: s["token"] for s in stages}
    known = ", ".join(tokens)
    body = base_template or PLAIN_TEMPLATE
    head = json.dumps(answer_head, ensure_ascii=False)   # a Jinja string literal (JSON's escapes are Jinja's)
    # The base template renders into a variable (no whitespace control around it, so its output is
    # kept byte for byte); the stage token then goes where chat_format.with_stage puts it. Only the
    # Jinja that every engine implements (docs/TEMPLATES.md): "BOS exactly once" is a split into two
    # parts, since llama.cpp's engine has no str.count.
    return (
        "{%- set persllm_tokens = " + json.dumps(tokens, ensure_ascii=False) + " -%}"
        "{%- if stage is not defined or stage is none -%}{%- set stage = " + json.dumps(default_stage) + " -%}{%- endif -%}"
        "{%- if stage not in persllm_tokens -%}{{ raise_exception('unknown stage ' ~ stage ~ ' (stages: "
        + known + ")') }}{%- endif -%}"
        "{%- set persllm_token = persllm_tokens[stage] -%}"
        "{% set persllm_body %}" + body + "{% endset %}"
        + ("{{ persllm_body.replace(" + head + ", " + head + " ~ persllm_token) }}"
           if answer_head else
        "{%- if bos_token and persllm_body.startswith(bos_token) and persllm_body.split(bos_token)|length == 2 -%}"
        "{{ bos_token ~ persllm_token ~ persllm_body[bos_token|length:] }}"
        "{%- else -%}{{ persllm_token ~ persllm_body }}{%- endif -%}")
    )


def stop_strings(tokenizer: Any) -> list[str]:
    """Strings that end the assistant's turn: the EOS and ChatML's <|im_end|>, or the plain layout's
    next user line."""
    from persllm_cli.model.chat_format import PLAIN_STOP, has_chat_template

    stops = []
    for t in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        if t and t in tokenizer.get_vocab() and t not in stops:
            stops.append(t)
    if not has_chat_template(tokenizer):
        stops.append(PLAIN_STOP)
    return stops


def stop_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in stop_strings(tokenizer) if t in vocab]
