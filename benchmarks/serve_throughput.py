"""How much `persllm serve` gains from batching: aggregate tokens/s and time to first token.

    python benchmarks/serve_throughput.py [RUN] [--clients 8] [--requests 3] [--max-tokens 48]

Without RUN it builds a smollm2-135m run (untrained LoRA + time tokens, as tests/run_factory.py
does) in a temporary folder. It starts a real `persllm serve RUN --port 0` and drives it with the
`openai` client, every request streaming at temperature 0.9 (so answers run to max_tokens more
often than greedy ones), in three rounds:
  1 client     one client, requests one after another
  8 clients    CLIENTS threads at once, the same short prompts
  mixed        CLIENTS threads at once, prompts from a few words to a few hundred tokens
For each: aggregate generated tokens/s (all clients' tokens / wall time), time to first token
p50/p95, and the batch sizes the scheduler ran. Goals: 8 clients >= 3x the tokens/s of 1 client,
TTFT p50 < 1 s under 8 clients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHORT = ["Who are you?", "Where do you live?", "What is your favourite spell?", "Tell me about your friends.",
         "What did you do today?", "Do you like school?", "What scares you?", "Say something kind."]
MODEL = ["r1"]  # the served run's name (its folder)
LONG = " ".join(["The castle was quiet that night, and the corridors smelled of candle wax and old stone."] * 20)


def prompts(mixed: bool) -> list[str]:
    if not mixed:
        return SHORT
    return [SHORT[0], LONG + " What do you remember?", SHORT[2], LONG[:400] + " Why?", SHORT[4],
            LONG[:1000] + " And then?", SHORT[6], LONG + LONG[:500] + " Tell me."]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def round_(url: str, clients: int, requests: int, max_tokens: int, mixed: bool) -> dict:
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    ps = prompts(mixed)
    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(requests):
            q = ps[(i + r) % len(ps)]
            start = time.perf_counter()
            first = None
            stream = c.chat.completions.create(model=MODEL[0], messages=[{"role": "user", "content": q}],
                                               max_tokens=max_tokens, temperature=0.9, seed=i * 100 + r,
                                               stream=True, stream_options={"include_usage": True})
            used = 0
            for ch in stream:
                if first is None and ch.choices and ch.choices[0].delta.content:
                    first = time.perf_counter() - start
                if ch.usage:
                    used = ch.usage.completion_tokens
            with lock:
                ttft.append(first if first is not None else time.perf_counter() - start)
                tokens[0] += used

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tok_s": tokens[0] / wall, "tokens": tokens[0], "wall": wall,
            "p50": statistics.median(ttft), "p95": percentile(ttft, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client in each round")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    import httpx2

    from tests.serve_server import ServeProcess

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            from persllm_cli.model.bases import ensure_embedded
            from tests.run_factory import make_run

            base = ensure_embedded("smollm2-135m")
            run = make_run(Path(tmp) / "r1", Path(base))
        MODEL[0] = Path(run).name
        server = ServeProcess(str(run), "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients))
        try:
            round_(server.url, 1, 1, 4, False)  # warm-up
            rows = [("1 client", round_(server.url, 1, args.requests, args.max_tokens, False)),
                    (f"{args.clients} clients", round_(server.url, args.clients, args.requests, args.max_tokens, False)),
                    (f"{args.clients} mixed", round_(server.url, args.clients, args.requests, args.max_tokens, True))]
            health = httpx2.get(server.url + "/health").json()
        finally:
            server.stop()
    one = rows[0][1]["tok_s"]
    print(f"{'round':<12} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x 1 client':>10} {'TTFT p50':>9} {'TTFT p95':>9}")
    for name, r in rows:
        print(f"{name:<12} {r['tokens']:>7} {r['wall']:>7.1f} {r['tok_s']:>7.1f} {r['tok_s'] / one:>10.2f} "
              f"{r['p50']:>8.2f}s {r['p95']:>8.2f}s")
    print(f"largest batch: {health['largest_batch']}")
    print(f"goals: {args.clients} clients >= 3x one client: {'met' if rows[1][1]['tok_s'] >= 3 * one else 'NOT met'}; "
          f"TTFT p50 < 1 s: {'met' if rows[1][1]['p50'] < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
