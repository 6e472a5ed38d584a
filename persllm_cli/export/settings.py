"""`persllm export`'s settings: its flags, `[export]` in persllm.toml and PERSLLM_EXPORT_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.settings import setting
from persllm_cli.export.formats import FORMATS, format_help


@dataclass(frozen=True)
class ExportSettings:
    run: Path | None = setting(None, help='Run directory (default: runs/latest of the project); for --format card, '
                                            'the run whose models the cards name (it need not be trained yet).')
    format: str = setting("hf", choices=tuple(FORMATS), help=format_help())
    output: Path | None = setting(None, help='Folder for the export; must be new or empty unless --force.')
    stage: str | None = setting(None, help='Default stage of the exported chat template (--format card: the one '
                                             'stage to make a card of). [default: the last stage; every stage for card]')
    dtype: str = setting("float32", choices=("float32", "float16", "bfloat16"),
                         help='Weights of the hf export: float32, float16 or bfloat16.')
    quant: str = setting("f16", choices=("f16", "q8_0"), help='GGUF weights: f16 or q8_0.')
    check: bool = setting(True,
                          help='Load the export as a consumer would and compare it with the run on a few prompts per stage.')
    check_tokens: int = setting(24, at_least=1, help='Greedy tokens per check answer.')
    force: bool = setting(False, help='Replace a non-empty output folder.')
    llama_cpp: Path | None = setting(None, help='A llama.cpp source folder: --check renders the chat template with its '
                                                'Jinja engine too. [default: one found by itself]')
