"""Annotation against a slow one-at-a-time server (llama.cpp, Ollama or transformers serve on a
laptop CPU).

The server (tests/fakes/slow_server.py, in process) generates one answer at a time, ~300 tokens
at 10 tokens/s (30 s an answer), and finishes every generation it starts, even one whose client
has gone away. It comes in two kinds (--server):

- plain: a queued request hears nothing until its turn; the headers come with its first token
  (as Ollama does);
- announce: a queued request gets its headers and a chunk holding only the role at once, then
  nothing until its turn (as transformers serve does).

8 items, --concurrency 4 --timeout 20:

- before: whole (unstreamed) replies with --timeout bounding the wait and a fixed concurrency,
  as annotate ran before streaming (OpenAIBackend(stream=False), RunnerSettings(adaptive=False));
  run for as long as the server needs for 8 answers, then stopped.
- now: streamed replies, the silence timeout and the adaptive limit, against each kind of server.

Goals (now, each server): all 8 ok, no more than 8 generations started on the server, total time
within 15% of the server's own time for 8 answers.

    python benchmarks/annotate_slow_server.py [--items 8] [--tokens 300] [--rate 10] [--timeout 20]
        [--concurrency 4] [--server plain|announce|both] [--skip-before]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persllm_cli.core import console  # noqa: E402
from persllm_cli.annotate.prompts import parse_reply  # noqa: E402
from persllm_cli.llm.openai_compat import OpenAIBackend  # noqa: E402
from persllm_cli.data.store import read_jsonl  # noqa: E402
from persllm_cli.llm.runner import Item, RunnerSettings, run_items  # noqa: E402
from tests.fakes.slow_server import SlowOpenAI  # noqa: E402


def one_run(args: argparse.Namespace, out: Path, *, streamed: bool, cap: float | None, announce: bool) -> dict:
    fake = SlowOpenAI(tokens=args.tokens, rate=args.rate, announce=announce).start()
    os.environ["OPENAI_API_KEY"] = fake.api_key
    backend = OpenAIBackend("fake-model", base_url=fake.url, timeout=args.timeout, stream=streamed)

    def build(item: Item) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You write persona data."},
                {"role": "user", "content": f"Paragraph {item.data}: Harry met Ron on the train. [Analysis]"}]

    def record(item, reply, usage, error):
        return {"id": item.id, "status": "ok" if reply else "failed", "error": error,
                "annotator": usage.as_dict()}

    settings = RunnerSettings(concurrency=args.concurrency, max_retries=5, max_tokens=args.tokens + 50,
                              adaptive=streamed, title="now" if streamed else "before")
    items = [Item(f"item-{i}", i) for i in range(args.items)]
    result: dict = {}

    def go() -> None:
        result["stats"] = run_items(items, backend, build_messages=build,
                                    parse=lambda it, c: parse_reply(c.text, cot=True, want_question=True),
                                    make_record=record, output=out, settings=settings)

    t0 = time.perf_counter()
    # A daemon thread: the "before" run never ends by itself, it is given `cap` seconds.
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(cap)
    seconds = time.perf_counter() - t0
    recs = read_jsonl(out) if out.exists() else []
    fake_started, fake_finished, fake_abandoned = fake.started, fake.finished, fake.abandoned
    fake.stop()
    return {"seconds": seconds, "finished": not t.is_alive(),
            "ok": sum(r["status"] == "ok" for r in recs), "failed": sum(r["status"] == "failed" for r in recs),
            "started": fake_started, "abandoned": fake_abandoned, "done_gen": fake_finished,
            "stats": result.get("stats")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--server", choices=["plain", "announce", "both"], default="both",
                    help="announce: a queued request gets a role-only chunk at once (see above)")
    ap.add_argument("--skip-before", action="store_true", help="measure only the current behaviour")
    args = ap.parse_args()
    kinds = ["plain", "announce"] if args.server == "both" else [args.server]
    server_s = args.items * args.tokens / args.rate   # the server's own time for all the answers
    console.set_quiet(True)
    rows = []
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_before:
            # Whole replies: no chunk comes before the answer, so both kinds of server are the same.
            b = one_run(args, Path(tmp) / "before.jsonl", streamed=False, cap=server_s, announce=False)
            rows.append(["before: whole replies, fixed concurrency (baseline)", f"{b['ok']}/{args.items}",
                         b["failed"], b["started"], b["abandoned"],
                         f"{b['seconds']:.1f}" + ("" if b["finished"] else " (stopped)"),
                         f"{b['seconds'] / server_s:.2f}x", ""])
        for kind in kinds:
            n = one_run(args, Path(tmp) / f"now-{kind}.jsonl", streamed=True, cap=None, announce=kind == "announce")
            ratio = n["seconds"] / server_s
            met = n["ok"] == args.items and n["started"] <= args.items and ratio <= 1.15
            rows.append([f"now, {kind} server: streamed, silence timeout, adaptive limit", f"{n['ok']}/{args.items}",
                         n["failed"], n["started"], n["abandoned"], f"{n['seconds']:.1f}", f"{ratio:.2f}x",
                         ("all ok, <= %d started, <= 1.15x: " % args.items) + ("met" if met else "MISSED")])
            stats = n["stats"]
            if stats is not None:
                summaries.append(f"now, {kind} server: {stats.requests} requests, {stats.timeouts} timed out, "
                                 f"{stats.overloads} refused, {getattr(stats, 'ghosts', 0)} given up and waited for")
    console.set_quiet(False)
    console.table(f"annotate vs a one-at-a-time server: {args.items} items x {args.tokens} tokens at "
                  f"{args.rate:g} tok/s (server's own time {server_s:.0f} s), --concurrency {args.concurrency} "
                  f"--timeout {args.timeout:g} ({os.cpu_count()} cores, load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})",
                  ["run", "ok", "failed", "generations started", "abandoned", "seconds", "vs server time", "goal"],
                  rows)
    for line in summaries:
        console.info(line)


if __name__ == "__main__":
    main()
