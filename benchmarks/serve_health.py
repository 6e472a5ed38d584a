"""Does one heavy request stall `persllm serve`? `/health` latency while a long history is prepared.

    python benchmarks/serve_health.py [--messages 3000] [--baseline-src DIR]

It builds a smollm2-135m run (as tests/run_factory.py does), starts a real `persllm serve` and sends
one streaming chat request with MESSAGES short alternating turns (107 KB for 3,000: far under the
body limit, far over the model's context) and max_tokens = the context (8,192) - 256, so the server
must drop all but the last few turns before it can start: parse, fit, tokenize, then a prefill of
at most 256 tokens. The request's time to its first token is the time it took to prepare; the
client then hangs up (the server stops generating). From the moment the request is sent until that
first token, another client asks `GET /health` every 50 ms; the table gives those answers' latency
(median, 95th percentile, worst) next to `/health` on the idle server. Goal: every `/health` under
100 ms while the request is prepared.

--baseline-src DIR runs the same measurement first against the persllm source tree in DIR (for
example the commit before this work: `git archive 03f0b3a | tar -x -C DIR`), the named baseline, and
prints both with the ratio. Report the load average beside the figures (the test box is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def history(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n - 1):
        out.append({"role": "user" if i % 2 == 0 else "assistant",
                    "content": f"Message {i}: what happened at the lake that summer?"})
    out.append({"role": "user", "content": "And what do you remember now?"})
    return out


CONTEXT = 8192        # smollm2-135m's
PROMPT_ROOM = 256


def measure(run: Path, src: Path, messages: int) -> dict:
    import httpx2 as httpx

    from tests.conftest import subprocess_env
    from tests.serve_server import ServeProcess

    env = subprocess_env()
    env["PYTHONPATH"] = str(src) + os.pathsep + str(REPO)   # the server's code comes from src
    server = ServeProcess(str(run), env=env, cwd=src)   # `python -m` puts the working directory first
    try:
        url = server.url
        with httpx.Client(timeout=600) as c:
            body = {"model": run.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                    "temperature": 0}
            c.post(url + "/v1/chat/completions", json=body).raise_for_status()   # warm-up
            idle = []
            for _ in range(20):
                t = time.perf_counter()
                c.get(url + "/health").raise_for_status()
                idle.append(time.perf_counter() - t)
                time.sleep(0.02)
        heavy: dict = {}
        body = {"model": run.name, "messages": history(messages), "max_tokens": CONTEXT - PROMPT_ROOM,
                "temperature": 0, "stream": True}

        def send() -> None:
            t = time.perf_counter()
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                heavy["status"] = r.status_code
                for line in r.iter_lines():
                    if '"content": "' in line and '"role"' not in line:   # the first token, not the role chunk
                        break
            heavy["seconds"] = time.perf_counter() - t

        thread = threading.Thread(target=send)
        during: list[float] = []
        with httpx.Client(timeout=600) as c:
            thread.start()
            time.sleep(0.05)
            while thread.is_alive():
                t = time.perf_counter()
                c.get(url + "/health").raise_for_status()
                if thread.is_alive():   # an answer that came back after the request finished says nothing
                    during.append(time.perf_counter() - t)
                time.sleep(0.05)
        thread.join()
    finally:
        server.stop()
    return {"idle": idle, "during": during or [float("nan")], **heavy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--baseline-src", type=Path, help="a persllm source tree to measure first, as the baseline")
    args = ap.parse_args()
    from persllm_cli.model.bases import ensure_embedded
    from tests.run_factory import make_run

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "r1", Path(ensure_embedded("smollm2-135m")))
        sides = []
        if args.baseline_src:
            sides.append((f"baseline ({args.baseline_src})", measure(run, args.baseline_src.resolve(), args.messages)))
        sides.append(("this tree", measure(run, REPO, args.messages)))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'server':<40} {'TTFT s':>8} {'status':>6} {'/health idle p50':>17} {'during: n':>10} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'max ms':>7}")
    for name, r in sides:
        d = r["during"]
        print(f"{name:<40} {r['seconds']:>8.1f} {r['status']:>6} {statistics.median(r['idle']) * 1000:>15.1f}ms "
              f"{len(d):>10} {statistics.median(d) * 1000:>7.1f} {percentile(d, 0.95) * 1000:>7.1f} {max(d) * 1000:>7.1f}")
    if len(sides) == 2:
        (_, b), (_, n) = sides
        print(f"worst /health while preparing: {max(b['during']) / max(n['during']):.1f}x better; the request's "
              f"preparation (TTFT) {b['seconds'] / n['seconds']:.1f}x faster")
    worst = max(sides[-1][1]["during"])
    print(f"goal: every /health < 100 ms while the request is prepared: {'met' if worst < 0.1 else 'NOT met'} "
          f"(worst {worst * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
