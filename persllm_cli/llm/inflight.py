"""What the concurrent runner's workers share (runner.py): the adaptive limit on requests in flight,
with the given-up requests it still counts (ghosts.py), the budget's reservations, the spend and the
counts of timeouts and overload answers. See runner.py's docstring for the policy."""

from __future__ import annotations

import threading
import time

from persllm_cli.data.records import Message
from persllm_cli.llm.ghosts import Ghosts
from persllm_cli.llm.pricing import Price
from persllm_cli.llm.protocol import Completion, FatalError, estimate_prompt_tokens


class InFlight:
    """What the runner's workers share, behind one lock: the requests in flight under the adaptive
    limit (and the ghosts it keeps), the budget's reservations, the spend and the counts."""

    def __init__(self, *, concurrency: int, max_tokens: int, adaptive: bool, price: Price,
                 budget: float | None, first_token_limit: float | None = None):
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.concurrency = concurrency
        self.max_tokens = max_tokens   # each request's worst case, for the budget
        self.adaptive = adaptive       # cut the limit on timeouts and overload answers
        self.price = price
        self.budget = budget   # dollars this run may spend (None: no limit)
        self.spent = 0.0
        self.reserved = 0.0
        self.in_flight = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.budget_hit = False
        self.fatal: FatalError | None = None
        self.limit = float(concurrency)   # the adaptive limit on requests in flight
        self.epoch = 0                             # bumped at each cut
        self.timeouts = 0
        self.overloads = 0
        self.last_trouble = ""
        self.first_token_limit = first_token_limit   # the backend's, when it streams
        self.ghosts = Ghosts()   # generations the server may still be running for nobody
        # a probe past the ghosts must not time out behind them if they are real (ghosts.py)
        self.probe_within = first_token_limit / 2 if first_token_limit else None

    def congested(self, epoch: int, kind: str, message: str, streaming: int | None,
                  streamed: float | None = None) -> None:
        """A request that started in `epoch` timed out or was refused for overload: cut the limit,
        once per epoch, to half and to no more than the replies still streaming (`streaming`).
        A request that timed out leaves a ghost (`streamed`: how long its reply had been coming,
        None if no token came) that holds a place under the limit while the server finishes it."""
        with self.lock:
            if kind == "timeout":
                self.timeouts += 1
            else:
                self.overloads += 1
            self.last_trouble = message
            if not self.adaptive:
                return
            if epoch == self.epoch:
                cut = self.limit // 2
                if streaming is not None:
                    cut = min(cut, streaming)
                self.limit = max(1.0, cut)
                self.epoch += 1
            if kind == "timeout":
                # a probe held back by the ghosts until it timed out: they are real
                self.ghosts.heard(threading.get_ident(), None, timed_out=streamed is None)
                self.ghosts.add(time.monotonic(), streamed, lanes=int(self.limit))

    def succeeded(self, c: Completion) -> None:
        queued = (c.first_token_seconds is not None and self.first_token_limit is not None
                  and c.first_token_seconds > self.first_token_limit / 2)
        with self.lock:
            self.ghosts.observe(c)
            if self.limit < self.concurrency and not queued:
                self.limit = min(float(self.concurrency), self.limit + 1 / self.limit)
                self.settled.notify_all()

    def reserve(self, messages: list[Message]) -> float | None:
        """Reserve the worst-case cost of one request, or None when it could pass the budget.

        While other requests are in flight their reservations (worst cases) may free up, so wait
        for them to settle before giving up."""
        worst = self.price.cost(estimate_prompt_tokens(messages), self.max_tokens)
        with self.lock:
            while not self.stop.is_set():
                # the adaptive limit: wait for a request to finish, or a ghost to be done
                now = time.monotonic()
                held = self.ghosts.holding(now)
                if self.in_flight + held < int(self.limit):
                    break
                if held and not self.in_flight and self.ghosts.probe(now, threading.get_ident(), self.probe_within):
                    break   # nothing of ours to learn from: this request finds out if they are real
                self.settled.wait(min(0.5, self.ghosts.next_change(now, self.probe_within) - now))
            if self.stop.is_set():
                return None
            budget = self.budget
            while budget is not None and self.spent + self.reserved + worst > budget:
                if self.in_flight == 0 or self.stop.is_set():
                    self.budget_hit = self.budget_hit or self.in_flight == 0
                    self.stop.set()
                    return None
                self.settled.wait(0.5)
            self.reserved += worst
            self.in_flight += 1
            return worst

    def settle(self, reserved: float, c: Completion | None) -> float:
        cost = self.price.cost(c.prompt_tokens, c.completion_tokens) if c else 0.0
        with self.lock:
            self.ghosts.heard(threading.get_ident(), c.first_token_seconds if c else None)
            self.reserved -= reserved
            self.in_flight -= 1
            self.requests += 1
            self.spent += cost
            if c:
                self.prompt_tokens += c.prompt_tokens
                self.completion_tokens += c.completion_tokens
            self.settled.notify_all()
        return cost
