"""What the embedded model keeps of a conversation's first token (why `tokenize --time-token-at answer`).

SmolLM2's chat template has no BOS, so a stage token put first is the very first token. Six ordinary
words are put there in turn (and, for comparison, second, after `<|im_start|>`), before the same short
ChatML exchange, and the untrained model's hidden states at that position are compared across the
six words: mean pairwise cosine similarity and the state's norm, per layer. A position whose state is
the same whatever the word (cosine near 1, a norm hundreds of times the others': the "attention
sink") cannot carry which stage was asked past the first layers.

    python benchmarks/first_token.py
"""

from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = ["Paris", "dragon", "seven", "happy", "winter", "engine"]
EXCHANGE = "<|im_start|>user\nWhere do you live?<|im_end|>\n<|im_start|>assistant\n"


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm_cli.model.bases import resolve_base

    path = str(resolve_base("smollm2-135m"))
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    tail = tok(EXCHANGE, add_special_tokens=False)["input_ids"]
    opener = tok("<|im_start|>", add_special_tokens=False)["input_ids"]
    words = [tok(w, add_special_tokens=False)["input_ids"][:1] for w in WORDS]

    def states(prefix: list[int]) -> tuple:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([prefix + tail]), output_hidden_states=True).hidden_states

    first = [states(w) for w in words]
    second = [states(opener + w) for w in words]
    print("layer | first: mean cosine | first: norm | second: mean cosine | second: norm")
    for layer in range(1, len(first[0])):
        rows = []
        for runs, pos in ((first, 0), (second, 1)):
            h = [r[layer][0, pos].float() for r in runs]
            cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in combinations(h, 2)]
            rows += [f"{sum(cos) / len(cos):.3f}", f"{float(sum(x.norm() for x in h) / len(h)):.0f}"]
        print(f"{layer} | " + " | ".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
