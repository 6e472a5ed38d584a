"""Time and peak memory of `persllm export` for the embedded 135M model (hf and gguf f16), each in
its own process (peak RSS is per process), without the check and with it, and q8_0 with its check
(token agreement with the run).

    python benchmarks/export_time.py [--keep DIR]

Goals (2 cores): an export in < 60 s and a peak RSS < 2x the float32 model's size (2 x 538 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="persllm-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("PERSLLM_HOME", str(work / "home"))
    os.environ.update(env)
    from persllm_cli.model.bases import ensure_embedded
    from tests.run_factory import make_run

    base = ensure_embedded("smollm2-135m")
    run = work / "runs" / "bench"
    if not (run / "run.json").exists():
        make_run(run, base)
    fp32 = (base / "model.safetensors").stat().st_size
    results = []
    rounds = [("hf", "f16", "--no-check"), ("hf", "f16", "--check"), ("gguf", "f16", "--no-check"),
              ("gguf", "f16", "--check"), ("gguf", "q8_0", "--check")]
    for fmt, quant, check in rounds:
            out = work / f"out-{fmt}-{quant}{check}"
            cmd = ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "persllm_cli", "export", str(run),
                   "--format", fmt, "--quant", quant, "-o", str(out), "--force", check, "--check-tokens", "24"]
            started = time.monotonic()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.monotonic() - started
            if proc.returncode != 0:
                sys.exit(proc.stderr[-2000:])
            rss = int(re.search(r"MAXRSS (\d+)", proc.stderr).group(1)) * 1024
            line = next((l for l in proc.stderr.splitlines() if l.startswith("Exported")), "")
            summary = " | ".join(l.strip() for l in proc.stderr.splitlines()
                                 if l.lstrip().startswith(("Check", "check", "hf", "gguf", "token agreement", "largest")))
            results.append({"format": fmt, "quant": quant if fmt != "hf" else None, "check": check == "--check", "process_s": round(wall, 1),
                            "peak_rss_mb": round(rss / 2**20), "peak_vs_fp32": round(rss / fp32, 2),
                            "export_line": line, "check_line": summary})
            print(json.dumps(results[-1]), flush=True)
    print(f"fp32 model: {fp32 / 2**20:.0f} MiB; goals: export < 60 s, peak < {2 * fp32 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
