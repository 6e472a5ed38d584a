"""How long `persllm chat` makes a user wait: loading a run from the cache, and the first token.

    python benchmarks/chat_latency.py [RUN] [--repeats 3]

Without RUN it builds a smollm2-135m run (untrained LoRA + time tokens, as tests/run_factory.py
does) in a temporary folder first; the embedded model must be converted already or it is converted
once (not timed). The run's entry in the merged-model cache (PERSLLM_HOME/merged, see
persllm_cli/merged.py) is removed first, so that the first load of each pair below is a miss.
Times, on this machine's CPU (or GPU when there is one):
  import   torch/transformers(/peft) imports in a fresh process (paid once per process)
  process  a whole `persllm chat RUN --prompt hi --max-new-tokens 1`: the first time for a run
           (PEFT, merge, cache write), then again from the merged cache (goal < 10 s)
  load     model.load.load_run in this process, first time and from the merged cache (goal < 10 s)
  first    time to the first streamed text piece of a short greedy answer (goal < 1 s): for the
           first answer after loading (weights still paging in) and the median of the next ones
  tok/s    new tokens per second over a 32-token answer
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOALS = {"load": 10.0, "first": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                    help="fold the adapter into the weights (load_run's default: on CPU)")
    args = ap.parse_args()

    from persllm_cli.model.bases import ensure_embedded

    base_dir = ensure_embedded("smollm2-135m")
    tmp = None
    run = args.run
    if run is None:
        from tests.run_factory import make_run

        tmp = tempfile.TemporaryDirectory(prefix="persllm-bench-")
        run = make_run(Path(tmp.name) / "runs" / "bench", base_dir)

    import logging
    import shutil
    import subprocess

    from transformers import AutoTokenizer

    from persllm_cli.model import merged
    from persllm_cli.model import runs

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as load_run does
    info = runs.read_run(run)
    entry = merged.cache_dir(info.path, str(base_dir), len(AutoTokenizer.from_pretrained(info.path / "tokenizer")))

    def forget() -> None:
        if entry is not None and entry.exists():
            shutil.rmtree(entry)

    # Imports are timed in fresh processes: this one already paid for them while building the run.
    def fresh(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - t0

    t_import_peft = fresh("import torch, transformers, peft")
    t_import = fresh("import torch, transformers")

    # What a user waits for: a whole `persllm chat --prompt` process, one new token.
    def process() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "persllm_cli", "chat", str(run), "--max-new-tokens", "1",
                        "--temperature", "0", "--prompt", "hi"], check=True, capture_output=True,
                       cwd=str(Path(__file__).resolve().parent.parent))
        return time.perf_counter() - t0

    forget()
    t_process_first = process()
    t_process = process()
    import torch

    from persllm_cli.model.load import load_run
    from persllm_cli.model.generate import Sampling, stream_reply

    forget()
    t0 = time.perf_counter()
    load_run(run, merge=args.merge)
    t_load_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tok, info = load_run(run, merge=args.merge)
    t_load = time.perf_counter() - t0
    _, token = info.stage_token(None)
    messages = [{"role": "user", "content": "Where did you grow up?"}]

    firsts = []
    for _ in range(args.repeats + 1):  # the first answer after loading (cold) is reported apart
        t0 = time.perf_counter()
        for _piece in stream_reply(model, tok, messages, token, Sampling(max_new_tokens=8, temperature=0)):
            firsts.append(time.perf_counter() - t0)
            break
    cold, firsts = firsts[0], firsts[1:]
    t0 = time.perf_counter()
    text = "".join(stream_reply(model, tok, messages, token, Sampling(max_new_tokens=32, temperature=0)))
    gen = time.perf_counter() - t0
    n_new = len(tok(text, add_special_tokens=False)["input_ids"])

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    first = statistics.median(firsts)
    rows = [
        ("import with peft", t_import_peft, None),
        ("import without peft", t_import, None),
        ("chat --prompt, 1st time", t_process_first, GOALS["load"]),
        ("chat --prompt, cached", t_process, GOALS["load"]),
        ("load, 1st time", t_load_first, GOALS["load"]),
        ("load, cached", t_load, GOALS["load"]),
        ("first token, 1st answer", cold, GOALS["first"]),
        ("first token (median)", first, GOALS["first"]),
    ]
    mode = "merged" if not hasattr(model, "peft_config") else "adapter apart"
    print(f"persllm chat latency, smollm2-135m run {run} on {device}, {mode}")
    print(f"{'what':<24}{'seconds':>10}{'goal':>8}{'ratio':>8}")
    for name, value, goal in rows:
        g = f"{goal:.1f}" if goal else "-"
        r = f"{value / goal:.2f}" if goal else "-"
        print(f"{name:<24}{value:>10.2f}{g:>8}{r:>8}")
    print(f"{'tokens/s (32 new)':<24}{n_new / gen:>10.1f}")
    if tmp is not None:
        forget()  # the run is gone: so is its cache entry
        tmp.cleanup()


if __name__ == "__main__":
    main()
