"""Prices of API models: the table, the lookup, the cost of a request, the note for an unpriced
model, and `Spend`, the one account of what requests cost against a dollar budget.

One place for every command that spends money (annotate, dpo --mode generate, eval's answers and
judge, chat --api-model, converse). Prices are dollars per million tokens [input, output];
persllm.toml `[annotate.prices]` adds or overrides entries for every command, and
`[annotate.batch_prices]` those of requests sent in a batch (`batch_pricing`).
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
BATCH_PRICES_SECTION = "[annotate.batch_prices]"
BATCH_DISCOUNT = 0.5   # the OpenAI Batch API's price: half the live one


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
    key = _key(model, prices)
    if key is None:
        return Pricing(model, Price(), False)
    return Pricing(model, _price(key, prices[key], PRICES_SECTION), True)


def batch_pricing(model: str, table: dict[str, Any] | None = None,
                  batch_table: dict[str, Any] | None = None) -> Pricing:
    """The price of a request sent in a batch (the Batch API, or a file for `vllm run-batch`):
    `[annotate.batch_prices]` when it names the model (e.g. 0 for your own GPU machine); else, for
    an OpenAI model (one of the built-in table), its price times BATCH_DISCOUNT, whatever price
    `[annotate.prices]` gives it; else the model's live price (no discount assumed elsewhere)."""
    key = _key(model, batch_table or {})
    if key is not None:
        return Pricing(model, _price(key, (batch_table or {})[key], BATCH_PRICES_SECTION), True)
    live = pricing(model, table)
    if live.known and _key(model, DEFAULT_PRICES) is not None:
        p = live.price
        return Pricing(model, Price(p.input * BATCH_DISCOUNT, p.output * BATCH_DISCOUNT), True)
    return live


def _key(model: str, prices: dict[str, Any]) -> str | None:
    """The table's entry for `model`: its own name, else the longest name it starts with (and a -)."""
    if model in prices:
        return model
    return max((k for k in prices if model.startswith(k + "-")), key=len, default=None)


def _price(key: str, value: Any, section: str) -> Price:
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
    if not numbers:
        raise PersllmError(f"persllm.toml: {section} {key!r} = {value!r}: it must be [input, output], "
                           "dollars per million tokens, neither negative")
    return Price(float(value[0]), float(value[1]))


def price_table(project: Any) -> dict[str, Any]:
    """persllm.toml's `[annotate.prices]` (empty outside a project)."""
    if project is None:
        return {}
    return project.section("annotate").get("prices") or {}


@dataclass
class Spend:
    """What API requests cost, and the dollar budget they share: one account for the runner, eval's
    reports and converse's turns. A command makes one; each runner call charges it, directly or
    through a `part` that is added back (eval: to report what the answers and the judge each
    spent), so every request of the command counts against the one --budget-usd.

    `usd` counts the dollars of priced models; an unpriced model's requests count $0 and make
    `cost_usd` None (unknown). `budget_hit` is set when a request was not sent for the budget."""

    budget_usd: float | None = None   # None: no limit
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    priced: bool = True
    budget_hit: bool = False

    @property
    def cost_usd(self) -> float | None:
        return self.usd if self.priced else None

    @property
    def left(self) -> float | None:
        """Dollars left before the budget (None: no budget)."""
        return None if self.budget_usd is None else max(0.0, self.budget_usd - self.usd)

    def allows(self, worst_usd: float) -> bool:
        """Whether a request that could cost `worst_usd` stays within the budget."""
        return self.budget_usd is None or self.usd + worst_usd <= self.budget_usd

    def charge(self, usd: float, prompt_tokens: int = 0, completion_tokens: int = 0, *, requests: int = 1,
               priced: bool = True) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.usd += usd
        self.priced = self.priced and priced

    def part(self, priced: bool = True) -> "Spend":
        """A new account for one part of this one's work (one runner call), its budget what is left
        here; `add` it back once the part is done. `priced`: False for a model without a price."""
        return Spend(budget_usd=self.left, priced=priced)

    def add(self, other: "Spend") -> None:
        self.charge(other.usd, other.prompt_tokens, other.completion_tokens, requests=other.requests,
                    priced=other.priced)
        self.budget_hit = self.budget_hit or other.budget_hit

    def as_dict(self) -> dict[str, Any]:
        """The counts a report shows (the dollars unrounded: reports add these up)."""
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": self.cost_usd}
