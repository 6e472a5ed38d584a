"""The stage contrast (`train --stage-contrast`): each staged answer is scored again under other
stages' time tokens in the same forward pass, and its own stage is asked to explain it best.
`SFTTrainer` (train/trainer.py) adds `contrast_loss` over the batch `contrast_batch` builds.
"""

from __future__ import annotations

from typing import Any

import torch

from persllm_cli.model.chat_format import IGNORE

NEGATIVES = 2   # other stages each example is contrasted with (all of them when there are fewer)


def contrast_batch(inputs: dict[str, Any], stage_ids: tuple[int, ...], samples: torch.Tensor, step: int,
                   seed: int) -> tuple[dict[str, torch.Tensor], list[list[int]]] | None:
    """The batch with, after it, copies of its staged examples whose time token is another stage's.

    Returns the enlarged inputs and, per staged example, the rows holding its answer under
    [its own stage, other stage, ...] (its own row first); None when no example has a time token.
    Which other stages (at most NEGATIVES) is fixed by the seed, the step and the sample, so a
    resumed run contrasts the same ones."""
    ids = inputs["input_ids"]
    table = torch.tensor(stage_ids, device=ids.device)
    copies, rows = [], []
    n = ids.shape[0]
    for i in range(n):
        hit = torch.isin(ids[i], table)
        if not bool(hit.any()):
            continue
        own = int(ids[i][hit][0])
        others = [t for t in stage_ids if t != own]
        if len(others) > NEGATIVES:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + int(samples[i]))
            others = [others[j] for j in torch.randperm(len(others), generator=g)[:NEGATIVES].tolist()]
        mine = [i]
        for t in others:
            copy = ids[i].clone()
            copy[hit] = t
            mine.append(n + len(copies))
            copies.append((i, copy))
        rows.append(mine)
    if not copies:
        return None
    src = [i for i, _ in copies]
    big = {"input_ids": torch.cat([ids, torch.stack([c for _, c in copies])]),
           "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][src]]),
           "labels": torch.cat([inputs["labels"], torch.full_like(inputs["labels"][src], IGNORE)])}
    return big, rows


CONTRAST_SCALE = 10.0   # stage logits per nat of mean log-likelihood per answer token


def contrast_loss(logits: torch.Tensor, labels: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """Cross-entropy of the right stage when each example's answer is scored under every stage in
    its rows. A stage's score is the answer's mean log-likelihood per token under that stage's time
    token, times CONTRAST_SCALE: summed over a whole answer the differences run to tens of nats,
    and the loss jumps between zero and spikes that throw the adapter about. Low when the answer is
    likelier under its own time token than under the others (0.3 nats a token is already a wide
    margin); log(stages) when the time token changes nothing."""
    import torch.nn.functional as F

    scores = []
    for mine in rows:
        target = labels[mine[0], 1:]
        keep = target != IGNORE
        if not bool(keep.any()):
            continue
        lp = F.log_softmax(logits[mine, :-1][:, keep].float(), dim=-1)          # (stages, answer tokens, vocab)
        per_token = lp.gather(-1, target[keep].expand(len(mine), -1).unsqueeze(-1)).squeeze(-1)
        scores.append(per_token.mean(-1) * CONTRAST_SCALE)
    if not scores:
        return logits.sum() * 0.0
    # Own stage first in every row, so the target class is 0.
    return torch.stack([F.cross_entropy(sc.unsqueeze(0), sc.new_zeros(1, dtype=torch.long)) for sc in scores]).mean()
