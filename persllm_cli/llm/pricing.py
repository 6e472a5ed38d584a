"""Prices of API models: the table, the lookup, the cost of a request and the note for an unpriced model.

One place for every command that spends money (annotate, dpo --mode generate, eval's answers and
judge, chat --api-model, converse). Prices are dollars per million tokens [input, output];
persllm.toml `[annotate.prices]` adds or overrides entries for every command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persllm_cli.core.errors import PersllmError

DEFAULT_PRICES: dict[str, list[float]] = {
    "gpt-4o": [2.5, 10.0], "gpt-4o-mini": [0.15, 0.6], "gpt-4-turbo": [10.0, 30.0], "gpt-4": [30.0, 60.0],
    "gpt-4.1": [2.0, 8.0], "gpt-4.1-mini": [0.4, 1.6], "gpt-4.1-nano": [0.1, 0.4],
    "gpt-3.5-turbo": [0.5, 1.5], "o1": [15.0, 60.0], "o3": [2.0, 8.0], "o3-mini": [1.1, 4.4],
    "o4-mini": [1.1, 4.4],
}
PRICES_SECTION = "[annotate.prices]"


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens."""

    input: float = 0.0
    output: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


@dataclass(frozen=True)
class Pricing:
    """A model's price; `known` is False for a model missing from the table (counted in tokens only)."""

    model: str
    price: Price
    known: bool

    def cost(self, usd: float) -> float | None:
        """What to record as the cost: the dollars when the price is known, else None (unknown)."""
        return usd if self.known else None

    @property
    def note(self) -> str:
        """The one line said about an unpriced model (empty when the price is known)."""
        if self.known:
            return ""
        return f"no price known for {self.model!r}: counting $0 (add it under {PRICES_SECTION} in persllm.toml)"


def pricing(model: str, table: dict[str, Any] | None = None, *, backend: str = "openai") -> Pricing:
    """The model's price: exact name, else the longest known prefix (gpt-4o-2024-08-06 -> gpt-4o).

    A model on this machine (backend "local") costs nothing, and that is known."""
    if backend == "local":
        return Pricing(model, Price(), True)
    prices = {**DEFAULT_PRICES, **(table or {})}
    key = model if model in prices else max((k for k in prices if model.startswith(k + "-")), key=len, default=None)
    if key is None:
        return Pricing(model, Price(), False)
    value = prices[key]
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
    if not numbers:
        raise PersllmError(f"persllm.toml: {PRICES_SECTION} {key!r} = {value!r}: it must be [input, output], "
                           "dollars per million tokens, neither negative")
    return Pricing(model, Price(float(value[0]), float(value[1])), True)


def price_table(project: Any) -> dict[str, Any]:
    """persllm.toml's `[annotate.prices]` (empty outside a project)."""
    if project is None:
        return {}
    return project.section("annotate").get("prices") or {}
