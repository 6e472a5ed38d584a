"""Batch files at scale: 10,000 items written as a batch file, and 10,000 result lines imported.

Each step is the real command in its own process (`persllm annotate ...`), timed from start to exit,
its peak memory (max RSS) read from the kernel's accounting of that process (os.wait4). The
baselines run in the same session over the same project:

- writing (`--batch-file`) against `--dry-run` over the same items: both plan every item (read the
  material, retrieve context) and build every prompt; the batch file also renders and writes the
  request lines.
- importing (`--batch-results`) against the live path making the same 10,000 records: `persllm
  annotate` against the local fake server (no latency, --concurrency 16), i.e. the fastest the
  live path can go; the fake runs in its own process.

Goals (issue 28): each under 30 s and 500 MiB on 2 cores.

    python benchmarks/annotate_batch.py [--items 10000] [--paragraph-words 60] [--no-live] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes.openai_server import default_responder  # noqa: E402

GOAL_SECONDS, GOAL_MIB = 30.0, 500.0
WORDS = ("castle lake owl broom letter wand cloak forest train platform friend letter potion garden storm "
         "library staircase portrait dragon feather candle tower bridge kitchen lesson match snitch map "
         "secret cupboard uncle cousin professor goblin vault egg maze graveyard prophecy ministry trial "
         "mirror stone chamber serpent diary locket ring sword cup diadem cottage beach wedding office").split()
VERBS = "found lost carried remembered watched followed opened hid broke mended crossed feared".split()


def paragraph(rng: random.Random, n_words: int, i: int) -> str:
    """One paragraph of plain invented narrative, about `n_words` long."""
    out: list[str] = [f"In the {i}th memory Harry"]
    while sum(len(s.split()) for s in out) < n_words:
        out.append(f"{rng.choice(VERBS)} the {rng.choice(WORDS)} near the {rng.choice(WORDS)},")
    return " ".join(out).rstrip(",") + "."


def make_project(root: Path, items: int, words: int) -> None:
    """Two stages, items/2 knowledge paragraphs each (one item per paragraph), 40 style lines."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "persllm_cli", "init", str(root), "--name", "Harry Potter",
                    "--stage", "early:first year", "--stage", "late:after the war"], check=True, env=env,
                   capture_output=True)
    rng = random.Random(0)
    for stage, n in (("early", items // 2), ("late", items - items // 2)):
        (root / f"data/{stage}/knowledge.txt").write_text(
            "\n".join(paragraph(rng, words, i) for i in range(n)) + "\n", encoding="utf-8")
        (root / f"data/{stage}/style.txt").write_text(
            "\n".join(f"Blimey, the {rng.choice(WORDS)} again, {i} times over." for i in range(40)) + "\n",
            encoding="utf-8")


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Run `persllm ARGS` in its own process: wall seconds and peak RSS (MiB) of that process."""
    log = cwd / f".bench-{int(time.time() * 1000)}.log"
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "persllm_cli", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):
        sys.exit(f"persllm {' '.join(args)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "exit": proc.returncode}


def results_for(requests: Path, out: Path) -> int:
    """A Batch API output file answering every request line, as the fake server would."""
    n = 0
    with open(requests, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src, start=1):
            req = json.loads(line)
            body = req["body"]
            text = default_responder(body, n)
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            reply = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": len(text.split()),
                               "total_tokens": prompt + len(text.split())}}
            dst.write(json.dumps({"id": f"batch_req_{n}", "custom_id": req["custom_id"], "error": None,
                                  "response": {"status_code": 200, "request_id": f"req_{n}", "body": reply}}) + "\n")
    return n


def live_run(root: Path, env: dict[str, str], concurrency: int) -> dict[str, float]:
    """The live path making the same records, against the fake server in its own process."""
    port_file = root / ".fake-url"
    server = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server", "--port-file", str(port_file)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if port_file.exists():
                break
            time.sleep(0.05)
        live_env = dict(env, OPENAI_API_KEY="sk-fake-test-key-0123456789", OPENAI_BASE_URL=port_file.read_text())
        return timed(["annotate", "-o", "build/live.jsonl", "--concurrency", str(concurrency)], root, live_env)
    finally:
        server.kill()
        server.wait()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--paragraph-words", type=int, default=60)
    ap.add_argument("--live-concurrency", type=int, default=16)
    ap.add_argument("--no-live", action="store_true", help="skip the live baseline of the import")
    ap.add_argument("--keep", type=Path, help="build the project here and keep it")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), CI="1")
    env.pop("OPENAI_API_KEY", None)
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)) / "bench"
        make_project(root, args.items, args.paragraph_words)
        loads = [load()]
        dry = timed(["annotate", "--dry-run"], root, env)
        write = timed(["annotate", "--batch-file", "requests.jsonl"], root, env)
        loads.append(load())
        n_req = sum(1 for _ in open(root / "requests.jsonl", encoding="utf-8"))
        size = (root / "requests.jsonl").stat().st_size / 2**20
        assert n_req == args.items, (n_req, args.items)
        results_for(root / "requests.jsonl", root / "results.jsonl")
        imp = timed(["annotate", "--batch-results", "results.jsonl"], root, env)
        loads.append(load())
        made = sum(1 for _ in open(root / "build/annotations.jsonl", encoding="utf-8"))
        assert made == args.items, (made, args.items)
        live = None if args.no_live else live_run(root, env, args.live_concurrency)
        loads.append(load())
    rows = [
        ["--dry-run (baseline of writing)", f"{dry['seconds']:.1f}", f"{dry['peak_mib']:.0f}", "1.00x", ""],
        [f"--batch-file ({n_req:,} requests, {size:,.0f} MiB)", f"{write['seconds']:.1f}",
         f"{write['peak_mib']:.0f}", f"{write['seconds'] / dry['seconds']:.2f}x", _goal(write)],
        [f"--batch-results ({made:,} records)", f"{imp['seconds']:.1f}", f"{imp['peak_mib']:.0f}",
         f"{live['seconds'] / imp['seconds']:.1f}x faster" if live else "-", _goal(imp)],
    ]
    if live:
        rows.append([f"live path, same records (baseline of importing; fake server, concurrency "
                     f"{args.live_concurrency})", f"{live['seconds']:.1f}", f"{live['peak_mib']:.0f}", "1.00x", ""])
    from persllm_cli.core import console

    console.table(f"annotate batch files, {args.items:,} items ({os.cpu_count()} cores; load average "
                  f"{' -> '.join(loads)})", ["step", "seconds", "peak MiB", "vs baseline", "goal"], rows)
    if args.json:
        args.json.write_text(json.dumps({"items": args.items, "requests_mib": size, "dry_run": dry, "batch_file": write,
                                         "batch_results": imp, "live": live, "load": loads}, indent=2) + "\n")


def _goal(m: dict[str, float]) -> str:
    ok = m["seconds"] < GOAL_SECONDS and m["peak_mib"] < GOAL_MIB
    return f"< {GOAL_SECONDS:.0f} s and < {GOAL_MIB:.0f} MiB: " + ("met" if ok else "MISSED")


if __name__ == "__main__":
    main()
