"""A GGUF file loaded by transformers (its model dequantised, and its tokenizer), the file parsed once.

transformers parses a GGUF file's whole header three times for one model and its tokenizer: for the
config, for the tokenizer and again for the weights. The header holds the vocabulary and the merges
(about 100,000 strings for SmolLM2), which gguf's reader takes apart item by item, several seconds
each time on 2 cores. Its weight loader also builds gguf's tensor-name map anew for every submodule
of the model (hundreds of times for a small Llama). Inside `load` one reader serves all three reads
and each name map is built once; what transformers does with them is unchanged, so the model and the
tokenizer are the ones it would load anyway (tests/test_gguf_load.py compares them).
`benchmarks/gguf_load.py` measures it against transformers' own loading.

Both the one-time conversion of the embedded model (model/bases.py) and `export`'s check of a GGUF
file load through here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def parsed_once() -> Iterator[dict[tuple[str, str], Any]]:
    """Within the block, `gguf.GGUFReader(path)` returns one reader per file and
    `gguf.get_tensor_name_map` one map per (architecture, layers); transformers' loader imports both
    from `gguf` when it runs, so it takes these. Yields the readers made (for tests)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield readers
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]
        readers.clear()


def load(path: Path, **model_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file `path`, as transformers loads them (`from_pretrained`
    with `gguf_file=`), `model_kwargs` going to the model's `from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    with parsed_once():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **model_kwargs)
    return model, tok
