"""The GPU part of benchmarks/train_throughput.py, run on CPU with a tiny model so it cannot rot.

The device sessions that run it for real are short and rare; a script that fails there wastes one.
Here both sides (qlora_baseline.py's loop and persllm's training path) must produce numbers for both
modes. The timings mean nothing on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_gpu_part_runs_on_cpu_with_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    # One thread: on a small shared machine, two threads that wait for each other make it 5x slower.
    env = subprocess_env(SIZES="tiny", MODES="qlora,lora-bf16", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--gpu-only", "--device", "cpu",
                        "--gpu-steps", "4", "--seq-len", "64", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["device_kind"] == "cpu" and gpu["batch"] == 8 and gpu["seq_len"] == 64 and gpu["timed_steps"] == 1
    assert set(gpu["results"]) == {"tiny/qlora", "tiny/lora-bf16"}
    for key, row in gpu["results"].items():
        for side in ("baseline", "persllm"):
            got = row[side]
            assert "error" not in got, (key, side, got)
            assert got["tokens_per_second"] > 0 and got["peak_gib"] is None, (key, side, got)
            assert all(loss == loss for loss in got["loss_first_last"]), (key, side, got)  # not NaN
            assert got["quantized"] is key.endswith("qlora"), (key, side, got)
        assert row["ratio"] > 0 and "h100_reference" not in row
    assert "tiny/qlora" in r.stdout and "tiny/lora-bf16" in r.stdout  # the table
