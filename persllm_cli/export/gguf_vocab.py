"""The tokenizer part of the GGUF, written as llama.cpp's own converter (convert_hf_to_gguf.py) writes
it for the same base, so llama.cpp, Ollama and every GGUF reader tokenize like training did.

- The pre-tokenizer (`tokenizer.ggml.pre`, the regex llama.cpp splits text with) is chosen the way
  the converter chooses it: the base tokenizer's ids for a fixed text, hashed, looked up in a table.
  The time tokens appear nowhere in that text, so the hash is the base's. (Choosing by vocabulary
  size, as persllm once did, broke on exactly those tokens: llama.cpp refused the file.)
- Merges, special-token ids, add_bos/add_eos and the chat template come from `gguf.SpecialVocab`,
  the converter's own class in the `gguf` package.
- One deliberate difference, `add_bos_token`: see `add_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError

# The converter's fixed text (llama.cpp, conversion/base.py `get_vocab_base_pre`, MIT licence): the
# hashes below are of its token ids, so it must stay byte for byte the same. tests/test_export_engines.py
# compares it, and every row of PRE_TOKENIZERS, with the converter in the llama.cpp source it tests against.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's pre-tokenizer name, for the byte-level BPE
# tokenizers of the architectures the GGUF export writes (llama, qwen2).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3-Embedding's
}


def check_hash(tokenizer: Any) -> str:
    """The converter's `chkhsh` of a tokenizer: its ids for CHECK_TEXT (special tokens added, as the
    converter calls it), hashed."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization; a one-line error when llama.cpp has none."""
    chkhsh = check_hash(tokenizer)
    if chkhsh not in PRE_TOKENIZERS:
        raise PersllmError("GGUF export: this base's tokenizer is not one persllm knows llama.cpp's "
                           f"pre-tokenizer for (chkhsh {chkhsh[:12]}; known: SmolLM/SmolLM2, Llama 3, Qwen2); "
                           "`--format hf` works for any base")
    return PRE_TOKENIZERS[chkhsh]


def _tokens(tokenizer: Any, tj: dict[str, Any], n_rows: int) -> tuple[list[str], list[int]]:
    """Every row's token and type, as the converter's get_vocab_base lists them (rows past the
    tokenizer's vocabulary are [PADn], unused)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_rows):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if t in added:
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_tokenizer(w: Any, hf_dir: Path, tokenizer: Any, n_rows: int) -> None:
    """Write the tokenizer of the merged export in `hf_dir` (its tokenizer.json, tokenizer_config.json
    and chat template: the run's tokenizer with the stage template) into GGUF writer `w`."""
    import gguf

    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder")):
        raise PersllmError("GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2); "
                           f"this base's tokenizer is {model.get('type')}")
    tokens, types = _tokens(tokenizer, tj, n_rows)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n_rows)
    special.add_to_gguf(w, quiet=True)
    # The one difference from the converter: add_bos_token is always written. The converter writes it
    # from what the tokenizer files say, which for SmolLM's vocabulary is nothing, and then adds False
    # only when the vocabulary has exactly 49152 rows - true of the base, false once the time tokens
    # are added. llama.cpp defaults to False for this pre-tokenizer, but Ollama's own engine defaults
    # to True and would put a BOS before every prompt that training never saw.
    if "bos" not in special.add_special_token:
        w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
