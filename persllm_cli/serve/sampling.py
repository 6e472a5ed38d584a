"""Picking a request's next token from the model's scores, as its sampling asks: OpenAI's presence and
frequency penalties, then greedy at temperature 0, else temperature, top_k, top_p (nucleus) and a
draw with the request's own generator (its seed)."""

from __future__ import annotations

from typing import Any

from persllm_cli.model.generate import Sampling


def pick(logits: Any, s: Sampling, used: list[int], generator: Any) -> int:
    """The next token; `used` are the tokens the answer has so far (for the penalties)."""
    import torch

    if (s.presence_penalty or s.frequency_penalty) and used:
        # OpenAI's definition: minus frequency x count, minus presence once, for each token used so far.
        logits = logits.float().clone()
        ids, counts = torch.tensor(used, device=logits.device).unique(return_counts=True)
        logits[ids] -= s.frequency_penalty * counts.float() + s.presence_penalty
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.float() / s.temperature
    if 0 < s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= s.top_p  # keep the first token always
        sorted_scores[drop] = float("-inf")
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
