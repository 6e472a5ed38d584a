"""What a run of the concurrent runner shows: its counts (`RunStats`), the progress line with the
tokens arriving, the one warning of a run whose requests keep timing out or being refused, the
table at the end (`summary`) and, for --dry-run, what the requests would take (`dry_run`).
Everything goes to stderr."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from persllm_cli.core import console
from persllm_cli.data.records import Message
from persllm_cli.llm.pricing import Price
from persllm_cli.llm.protocol import Backend, estimate_prompt_tokens


@dataclass
class RunStats:
    total: int = 0          # items given
    skipped: int = 0        # already ok in the output
    planned: int = 0        # to do in this run (after resume and limit)
    ok: int = 0
    failed: int = 0
    not_sent: int = 0       # left for a later run (budget, Ctrl-C, fatal error)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    stopped: str | None = None   # "budget", "interrupted", "fatal" or None
    timeouts: int = 0       # attempts that timed out (no token for --timeout, or no first token)
    overloads: int = 0      # attempts refused for overload (429, 503, connection refused)
    concurrency: float = 0  # the adaptive limit at the end of the run
    ghosts: int = 0         # timed-out requests the server was likely still generating (llm/ghosts.py)
    ghost_seconds: float = 0.0   # the server time the runner left them, together
    ghosts_real: bool | None = None   # whether the server ran them (False: it drops them), if found out
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["cost_usd"] = round(self.cost_usd, 6)
        d["seconds"] = round(self.seconds, 3)
        return d


class Arriving:
    """Tokens arriving now, from a streaming backend's `received` count: "12.5 tok/s" over the
    last few seconds, or how long the stream has been silent, so a slow server can be told from a
    dead one. Empty for a backend that does not stream."""

    WINDOW = 5.0

    def __init__(self, backend: Backend):
        self.backend = backend
        self.samples: list[tuple[float, int]] = []
        self.last_change = time.monotonic()

    def text(self, in_flight: int) -> str:
        received = getattr(self.backend, "received", None)
        if not isinstance(received, int):
            return ""
        now = time.monotonic()
        if self.samples and received != self.samples[-1][1]:
            self.last_change = now
        self.samples.append((now, received))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW:
            self.samples.pop(0)
        if in_flight == 0:
            return ""
        (t_first, n_first), (t_last, n_last) = self.samples[0], self.samples[-1]
        silent = now - self.last_change
        if n_last == n_first and silent >= 2:
            return f"no token for {silent:.0f}s"
        rate = (n_last - n_first) / (t_last - t_first) if t_last > t_first else 0.0
        return f"{rate:.1f} tok/s arriving"


def trouble_line(backend: Backend, timeouts: int, overloads: int, limit: int, last: str) -> str:
    """The one warning of a run whose requests keep timing out or being refused."""
    where = getattr(backend, "where", backend.name)
    now = f"now sending {limit} request{'s' if limit != 1 else ''} at a time"
    if timeouts >= overloads:
        return (f"requests to {where} keep timing out ({timeouts} so far; last: {last}); {now}. "
                "A slow server? --timeout is the longest silence allowed inside a reply: raise it, "
                "or lower --concurrency or --max-tokens")
    return (f"the server at {where} keeps refusing requests ({overloads} so far; last: {last}); {now}. "
            "Lower --concurrency (or --max-tokens) to ask less of it")


def summary(stats: RunStats, title: str = "annotate") -> None:
    """The end-of-run table on stderr."""
    rate = stats.requests / stats.seconds if stats.seconds > 0 else 0.0
    rows = [
        ["records ok", stats.ok], ["records failed", stats.failed],
        ["already done (skipped)", stats.skipped], ["not sent (left for a rerun)", stats.not_sent],
        ["requests", stats.requests], ["prompt tokens", f"{stats.prompt_tokens:,}"],
        ["completion tokens", f"{stats.completion_tokens:,}"], ["cost", f"${stats.cost_usd:.4f}"],
        ["seconds", f"{stats.seconds:.1f}"], ["requests/s", f"{rate:.1f}"],
    ]
    if stats.timeouts or stats.overloads:
        rows += [["timed out (retried)", stats.timeouts], ["refused for overload (retried)", stats.overloads],
                 ["requests in flight at the end (adapted)", int(stats.concurrency)]]
    if stats.ghosts:
        said = {True: "it ran them", False: "it dropped them", None: "not known if it ran them"}[stats.ghosts_real]
        rows += [["given-up answers waited for (the server's time)",
                  f"{stats.ghosts} ({stats.ghost_seconds:.0f} s; {said})"]]
    console.table(title, ["", "value"], rows)
    for reason, n in sorted(stats.errors.items(), key=lambda kv: -kv[1]):
        console.note(f"  {n} failed: {reason}")


@dataclass
class Estimate:
    """What a set of requests would take: their count, prompt tokens (estimated), and the dollars
    with typical and with the longest replies `max_tokens` allows. `--dry-run` shows one, and so
    does a batch file or a batch as it is written (at the batch price)."""

    requests: int
    prompt_tokens: int
    max_tokens: int
    price: Price

    @classmethod
    def of(cls, prompts: list[list[Message]], max_tokens: int, price: Price) -> "Estimate":
        return cls(len(prompts), sum(estimate_prompt_tokens(m) for m in prompts), max_tokens, price)

    @property
    def completion_tokens(self) -> int:
        return self.requests * self.max_tokens

    @property
    def typical_usd(self) -> float:
        return self.price.cost(self.prompt_tokens, self.requests * min(self.max_tokens, 400))

    @property
    def most_usd(self) -> float:
        return self.price.cost(self.prompt_tokens, self.completion_tokens)

    def rows(self, skipped: int) -> list[list[object]]:
        return [["requests", self.requests], ["already done (skipped)", skipped],
                ["prompt tokens (estimate)", f"{self.prompt_tokens:,}"],
                ["completion tokens (at most)", f"{self.completion_tokens:,}"],
                ["cost (typical)", f"${self.typical_usd:.4f}"], ["cost (at most)", f"${self.most_usd:.4f}"]]


def dry_run(title: str, prompts: list[list[Message]], skipped: int, max_tokens: int, price: Price) -> None:
    """What sending `prompts` would take, as a table on stderr; nothing is sent (`--dry-run`)."""
    console.table(f"dry run: {title} (nothing sent)", ["", "value"],
                  Estimate.of(prompts, max_tokens, price).rows(skipped))
