"""`persllm chat`'s settings: its flags, `[chat]` in persllm.toml and PERSLLM_CHAT_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.settings import setting


@dataclass(frozen=True)
class ChatSettings:
    run: Path | None = setting(None, help='Run directory (default: runs/latest of the project).')
    stage: str | None = setting(None, help='Stage to speak from (default: the last stage).')
    prompt: str | None = setting(None, help='Answer this once and print only the answer.')
    system: str | None = setting(None, help='A system message (with --api-model: added to the persona prompt).')
    max_new_tokens: int = setting(256, at_least=1, help='Longest answer, in tokens.')
    temperature: float = setting(0.7, at_least=0, help='Sampling temperature; 0 for greedy.')
    api_model: str | None = setting(None,
                                    help="Chat through an OpenAI-compatible model with retrieval over the project's material instead.")
    base_url: str | None = setting(None, help='Server URL for --api-model.')
    json_output: bool = setting(False,
                                help='One JSON object per answer ({"stage", "prompt", "answer"}), reading questions line by line.')
