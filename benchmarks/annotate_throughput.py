"""Annotation throughput: the concurrent runner + OpenAIBackend against the fake server (in process).

1. 300 ms server latency, 64 items: concurrency 1 (the baseline) vs 16. Goal: >= 15x.
2. Zero latency, client overhead: requests per second through the whole path (prompt building,
   the openai client, parsing, accounting, append + flush per record). Goal: >= 200 requests/s
   on 2 cores (the fake server runs in the same process and shares those cores).

    python benchmarks/annotate_throughput.py [--items 64] [--latency 0.3] [--overhead-items 600]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persllm_cli.core import console  # noqa: E402
from persllm_cli.annotate.prompts import parse_reply  # noqa: E402
from persllm_cli.llm.openai_compat import OpenAIBackend  # noqa: E402
from persllm_cli.llm.pricing import Price  # noqa: E402
from persllm_cli.llm.runner import Item, RunnerSettings, run_items  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI  # noqa: E402


def one_run(fake: FakeOpenAI, n: int, concurrency: int, out: Path) -> tuple[float, int]:
    backend = OpenAIBackend("gpt-4o-mini", base_url=fake.url, timeout=30)
    items = [Item(f"item-{concurrency}-{i}", i) for i in range(n)]

    def build(item: Item) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You write persona data."},
                {"role": "user", "content": f"Paragraph {item.data}: Harry met Ron on the train. [Analysis]"}]

    def record(item, reply, usage, error):
        return {"id": item.id, "status": "ok" if reply else "failed", "error": error,
                "messages": [{"role": "user", "content": reply.question}] if reply else [],
                "annotator": usage.as_dict()}

    settings = RunnerSettings(concurrency=concurrency, max_retries=0, max_tokens=256, title=f"c={concurrency}")
    t0 = time.perf_counter()
    stats = run_items(items, backend, build_messages=build,
                      parse=lambda it, c: parse_reply(c.text, cot=True, want_question=True),
                      make_record=record, output=out, settings=settings, price=Price(0.15, 0.6))
    seconds = time.perf_counter() - t0
    assert stats.ok == n, stats
    return seconds, stats.ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--overhead-items", type=int, default=600)
    ap.add_argument("--overhead-concurrency", type=int, default=8)
    args = ap.parse_args()
    console.set_quiet(True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with FakeOpenAI(latency=args.latency) as fake:
            os.environ["OPENAI_API_KEY"] = fake.api_key
            base_s, _ = one_run(fake, args.items, 1, Path(tmp) / "c1.jsonl")
            fast_s, _ = one_run(fake, args.items, 16, Path(tmp) / "c16.jsonl")
        base_rate, fast_rate = args.items / base_s, args.items / fast_s
        rows.append([f"latency {args.latency * 1000:.0f} ms, concurrency 1 (baseline)", args.items,
                     f"{base_s:.2f}", f"{base_rate:.2f}", "1.0x", ""])
        ratio = fast_rate / base_rate
        rows.append([f"latency {args.latency * 1000:.0f} ms, concurrency 16", args.items, f"{fast_s:.2f}",
                     f"{fast_rate:.2f}", f"{ratio:.1f}x", "goal >= 15x: " + ("met" if ratio >= 15 else "MISSED")])
        with FakeOpenAI(latency=0.0) as fake:
            one_run(fake, 32, args.overhead_concurrency, Path(tmp) / "warm.jsonl")  # connections, imports
            zero_s, _ = one_run(fake, args.overhead_items, args.overhead_concurrency, Path(tmp) / "c0.jsonl")
        rate = args.overhead_items / zero_s
        rows.append([f"latency 0, concurrency {args.overhead_concurrency} (client overhead)", args.overhead_items,
                     f"{zero_s:.2f}", f"{rate:.0f}", f"{rate / base_rate:.0f}x",
                     "goal >= 200 req/s: " + ("met" if rate >= 200 else "MISSED")])
    console.set_quiet(False)
    console.table(f"annotate throughput ({os.cpu_count()} cores)",
                  ["run", "requests", "seconds", "requests/s", "vs baseline", "goal"], rows)


if __name__ == "__main__":
    main()
