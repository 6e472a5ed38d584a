"""Where the time tokens' embedding rows start training: each from what its stage means.

Resizing the vocabulary gives every new row the mean of the old ones (bases.resize_embeddings), so
all stage tokens start identical; at the LoRA learning rate a short run barely moves them, and the
model then answers the same at every stage. Here, before PEFT copies the rows into its trainable
tokens, each stage's input row becomes the mean embedding of the tokens of its *meaning*: its id,
its label and the terms only its material holds (data.terms.own_terms).

Not rescaled to a row's typical norm, although a mean of many rows is shorter than any of them: the
embedding is tied to the output head in many small models (SmolLM2), so a row's length is also how
strongly the model predicts that token. Rescaled, the stage rows became the most likely next token
at the start of every answer on the example persona (and the answers came out empty, time tokens
being special); as plain means they rank ~10,000th of 49,152, the shared mean ~22,000th.

Only the input rows are set. The trained values are stored in the adapter and replace these at
load time, so loading a run never needs this function, and a run trained before it existed (all
rows the shared mean) loads exactly as it did. An untied output head keeps the mean rows, which
is what loading builds again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INITS = ("stage", "mean")   # "mean": the shared mean of the old rows, as runs were trained before
TERMS_PER_STAGE = 24


@dataclass(frozen=True)
class StageMeaning:
    token_id: int
    text: str        # the stage's id, label and own terms


def meanings(stages: list[dict], material: dict[str, list[str]], terms_per_stage: int = TERMS_PER_STAGE) -> list[StageMeaning]:
    """One text per stage of tokenize's meta.json (`id`, `label`, `token_id`); `material` maps a
    stage id to its paragraphs (knowledge and style), in chronological order."""
    from persllm_cli.data.terms import own_terms

    out = []
    for st in stages:
        own = own_terms(material, st["id"], terms_per_stage) if material else []
        out.append(StageMeaning(int(st["token_id"]), " ".join([st["id"], st.get("label") or "", *own]).strip()))
    return out


def init_time_rows(model: Any, tokenizer: Any, stages: list[StageMeaning]) -> dict[str, Any]:
    """Set each stage's input-embedding row from its meaning (see the module docstring).

    Returns what was done: the token count behind each row and the smallest distance between two
    stage rows relative to a vocabulary row's typical (median) norm."""
    import torch

    emb = model.get_input_embeddings().weight
    new_ids = {s.token_id for s in stages}
    with torch.no_grad():
        old = emb[: min(new_ids)].float()
        norm = old.norm(dim=1).median()
        rows, used = [], []
        for s in stages:
            ids = [i for i in tokenizer(s.text, add_special_tokens=False)["input_ids"] if i not in new_ids]
            if not ids:
                raise ValueError(f"no tokens for the meaning of time token {s.token_id}: {s.text!r}")
            rows.append(emb[ids].float().mean(0))
            used.append(len(ids))
        for s, v in zip(stages, rows):
            emb[s.token_id] = v.to(emb.dtype)
        gaps = [float((a - b).norm() / norm) for i, a in enumerate(rows) for b in rows[i + 1:]]
    return {"init": "stage", "tokens_per_row": used, "min_distance": round(min(gaps), 4) if gaps else None}
