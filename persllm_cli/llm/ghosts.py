"""Generations a server is probably still running for a client that gave up on them ("ghosts").

Many servers do not stop generating when a client times out and goes (transformers serve among
them, and the fake in tests/fakes/slow_server.py): they finish the answer, or reach its turn in
their queue and then make it. A retry sent at once waits behind that work, times out in its turn
and leaves another ghost. So the runner counts each ghost against its limit on requests in flight
for as long as the server would take to finish it, at the pace this run has observed (a server
that does stop costs a wait of at most one answer's time per ghost):

- an answer takes, once it streams, the mean streaming time of the run's successful replies (first
  token to last); a ghost that had been streaming for `streamed` seconds has the rest of that left;
  one that had no token yet also has the shortest first-token wait seen (the prompt's reading);
- ghosts run in as many lanes as the limit allows after its cut (the replies that were still
  streaming: on a one-at-a-time server, one lane), one after another in each lane.

Before any reply has succeeded nothing is known of the server's pace, and a timeout leaves no
ghost (the runner then behaves as it did without them: the limit is cut, the retry queues).

    ghosts = Ghosts()
    ghosts.observe(completion)                     # each success: the pace
    ghosts.add(time.monotonic(), streamed, lanes)  # each timeout
    ghosts.holding(now)                            # places under the limit they hold now
"""

from __future__ import annotations

from persllm_cli.llm.protocol import Completion


class Ghosts:
    """Not thread-safe: the runner calls it under its lock."""

    def __init__(self) -> None:
        self.answers = 0              # streamed replies observed
        self.streaming = 0.0          # their streaming seconds, together
        self.first: float | None = None   # the shortest wait for a first token
        self.spans: list[tuple[float, float]] = []   # (start, end) of the ghosts not yet done
        self.added = 0                # ghosts counted in this run
        self.seconds = 0.0            # the server time they were given, together

    def observe(self, c: Completion) -> None:
        if c.first_token_seconds is None:   # not streamed: nothing of the pace
            return
        self.answers += 1
        self.streaming += max(0.0, c.seconds - c.first_token_seconds)
        self.first = c.first_token_seconds if self.first is None else min(self.first, c.first_token_seconds)

    def left(self, streamed: float | None) -> float:
        """Seconds the server would still take for a reply given up after `streamed` seconds of
        streaming (None: before its first token); 0 when the run has no pace yet."""
        if not self.answers:
            return 0.0
        answer = self.streaming / self.answers
        if streamed is None:
            return (self.first or 0.0) + answer
        return max(0.0, answer - streamed)

    def add(self, now: float, streamed: float | None, lanes: int) -> float:
        """Count a ghost from `now`; the seconds it was given (0: none counted)."""
        seconds = self.left(streamed)
        if seconds <= 0:
            return 0.0
        ends = sorted(end for _, end in self.spans if end > now)
        lanes = max(1, lanes)
        start = now if len(ends) < lanes else ends[-lanes]   # the lane that frees first
        self.spans.append((start, start + seconds))
        self.added += 1
        self.seconds += seconds
        return seconds

    def holding(self, now: float) -> int:
        """How many places under the limit the ghosts hold at `now` (those running, not those
        waiting for their lane)."""
        self.spans = [(a, b) for a, b in self.spans if b > now]
        return sum(1 for a, _ in self.spans if a <= now)

    def next_change(self, now: float) -> float:
        """When `holding` may next change (inf when no ghost is left)."""
        times = [t for span in self.spans for t in span if t > now]
        return min(times, default=float("inf"))
