"""The cache of CPU-merged runs (persllm_cli/merged.py): what its key depends on, and its bounds.

That a cached merge answers exactly like a fresh one is checked on a trained run in test_train.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from persllm_cli.model import merged


def fake_run_and_base(tmp_path: Path) -> tuple[Path, Path]:
    run, base = tmp_path / "run", tmp_path / "base"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"lora weights")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"base weights")
    return run, base


def test_key_follows_adapter_base_and_tokenizer(tmp_path):
    run, base = fake_run_and_base(tmp_path)
    first = merged.cache_dir(run, str(base), 100)
    assert first is not None and first.parent == Path(os.environ["PERSLLM_HOME"]) / "merged"
    assert merged.cache_dir(run, str(base), 100) == first  # stable
    assert merged.cache_dir(run, str(base), 101) != first  # another tokenizer size
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"lora weights, retrained")
    retrained = merged.cache_dir(run, str(base), 100)
    assert retrained != first
    (base / "model.safetensors").write_bytes(b"other base weights")
    assert merged.cache_dir(run, str(base), 100) not in (first, retrained)
    assert merged.cache_dir(run, "org/model", 100) is None  # a hub id: not cached


class FakeModel:
    def __init__(self, params: int) -> None:
        self.params = params

    def num_parameters(self) -> int:
        return self.params

    def save_pretrained(self, out: Path) -> None:
        (Path(out) / "config.json").write_text(json.dumps({"params": self.params}))


def test_store_keeps_only_recent_small_models(tmp_path):
    root = Path(os.environ["PERSLLM_HOME"]) / "merged"
    for i in range(merged.KEEP + 2):
        where = root / f"entry{i}"
        merged.store(FakeModel(1000), where)
        assert (where / "config.json").is_file()
        os.utime(where, (1_000_000 + i, 1_000_000 + i))  # a clear order of use
    kept = sorted(p.name for p in root.iterdir())
    assert kept == [f"entry{i}" for i in range(2, merged.KEEP + 2)]
    merged.store(FakeModel(merged.MAX_BYTES // 4 + 1), root / "big")
    assert not (root / "big").exists()
    assert merged.load(root / "missing") is None and merged.load(None) is None


def test_a_cache_that_cannot_be_written_costs_nothing(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache folder would go")
    merged.store(FakeModel(1000), blocked / "entry")  # mkdir fails: no error, nothing written
    assert blocked.read_text().startswith("a file")
