"""The stage contrast (`train --stage-contrast`, train/trainer.py): each staged answer is scored
again under other stages' time tokens, in the same forward pass, and the loss is the cross-entropy
of its own stage over those scores."""

from __future__ import annotations

import math

import pytest
import torch

from persllm_cli.model.chat_format import IGNORE
from persllm_cli.train.contrast import NEGATIVES, contrast_batch, contrast_loss

T1, T2, T3, T4 = 101, 102, 103, 104


def _batch(rows: list[list[int]], answer_from: int) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :answer_from] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_copies_swap_the_time_token_and_carry_no_labels():
    inputs = _batch([[T1, 5, 6, 7, 8], [9, 5, 6, 7, 8], [T3, 5, 6, T3, 8]], answer_from=2)
    big, rows = contrast_batch(inputs, (T1, T2, T3), torch.tensor([0, 1, 2]), step=0, seed=0)
    # The general example (no time token) gets no copies; each staged one gets the two other stages.
    assert rows == [[0, 3, 4], [2, 5, 6]]
    assert big["input_ids"][:3].tolist() == inputs["input_ids"].tolist()
    assert [big["input_ids"][r][0].item() for r in (3, 4)] == [T2, T3]
    assert big["input_ids"][5].tolist() == [T1, 5, 6, T1, 8] and big["input_ids"][6].tolist() == [T2, 5, 6, T2, 8]
    assert (big["labels"][3:] == IGNORE).all() and big["labels"][:3].tolist() == inputs["labels"].tolist()
    assert big["attention_mask"].shape == big["input_ids"].shape


def test_no_time_token_means_no_contrast():
    assert contrast_batch(_batch([[9, 5, 6]], 1), (T1, T2), torch.tensor([0]), 0, 0) is None


def test_many_stages_take_a_fixed_sample_of_others():
    inputs = _batch([[T1, 5, 6, 7]], 1)
    _, rows = contrast_batch(inputs, (T1, T2, T3, T4), torch.tensor([7]), step=3, seed=0)
    assert len(rows[0]) == 1 + NEGATIVES
    big_a, _ = contrast_batch(inputs, (T1, T2, T3, T4), torch.tensor([7]), step=3, seed=0)
    big_b, _ = contrast_batch(inputs, (T1, T2, T3, T4), torch.tensor([7]), step=3, seed=0)
    assert big_a["input_ids"].tolist() == big_b["input_ids"].tolist()   # a resumed run draws the same
    swapped = {int(x[0]) for x in big_a["input_ids"][1:]}
    assert len(swapped) == NEGATIVES and T1 not in swapped


def _logits(favour: list[float], answer: list[int], vocab: int = 12) -> torch.Tensor:
    """Per row, logits that give each answer token a log-odds bonus of favour[row]."""
    out = torch.zeros(len(favour), len(answer) + 1, vocab)
    for r, bonus in enumerate(favour):
        for t, tok in enumerate(answer):
            out[r, t, tok] = bonus
    return out


def test_loss_is_chance_when_the_stage_changes_nothing_and_falls_as_the_own_stage_explains_more():
    answer = [3, 4, 5]
    labels = torch.tensor([[IGNORE, *answer]])
    same = contrast_loss(_logits([1.0, 1.0, 1.0], answer), labels, [[0, 1, 2]])
    assert same.item() == pytest.approx(math.log(3), rel=1e-5)
    better = contrast_loss(_logits([3.0, 1.0, 1.0], answer), labels, [[0, 1, 2]])
    worse = contrast_loss(_logits([0.0, 1.0, 1.0], answer), labels, [[0, 1, 2]])
    assert better.item() < math.log(3) < worse.item()


def test_gradient_reaches_every_stage_row():
    answer = [3, 4]
    labels = torch.tensor([[IGNORE, *answer]])
    logits = _logits([1.0, 2.0, 0.5], answer).requires_grad_()
    contrast_loss(logits, labels, [[0, 1, 2]]).backward()
    # Pushes the own row's answer tokens up and the other stages' down.
    assert logits.grad[0, 0, 3] < 0 and logits.grad[1, 0, 3] > 0 and logits.grad[2, 0, 3] > 0
