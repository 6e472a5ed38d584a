"""Generations a server may still be running for a client that gave up on them ("ghosts").

Some servers do not stop generating when a client times out and goes (the fake in
tests/fakes/slow_server.py, by default): they finish the answer, or reach its turn in their queue
and then make it. A retry sent at once waits behind that work, times out in its turn and leaves
another ghost. So the runner counts each ghost against its limit on requests in flight for as
long as the server would take to finish it, at the pace this run has observed:

- an answer takes, once it streams, the mean streaming time of the run's successful replies (first
  token to last); a ghost that had been streaming for `streamed` seconds has the rest of that left;
  one that had no token yet also has the shortest first-token wait seen (the prompt's reading);
- ghosts run in as many lanes as the limit allows after its cut (the replies that were still
  streaming: on a one-at-a-time server, one lane), one after another in each lane.

Other servers drop a request whose client has gone (transformers serve 5.25, queued or
generating): waiting for its ghost would leave them idle. Which kind the server is, the run finds
out once: when ghosts are all that hold a request back, nothing of the run's is in flight and
the ghosts would be done within half the first-token limit (so that, if they are real, it does
not time out behind them), that request goes anyway (the probe). If its first token comes well
before the ghosts could be done (in less than half the time they had left), the server dropped
them: they are cleared and no timeout leaves one again in this run. Otherwise they were real,
and are waited for from then on (no more probes).

Before any reply has succeeded nothing is known of the server's pace, and a timeout leaves no
ghost (the runner then behaves as it did without them: the limit is cut, the retry queues).

    ghosts = Ghosts()
    ghosts.observe(completion)                     # each success: the pace
    ghosts.add(time.monotonic(), streamed, lanes)  # each timeout
    ghosts.holding(now)                            # places under the limit they hold now
    ghosts.probe(now, who, within) / ghosts.heard(who, first_token_seconds)   # finding out, once
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
        self.real: bool | None = None   # whether the server finishes what it was left (unknown yet)
        self._probe: tuple[object, float, float] | None = None   # (who, sent at, the ghosts' end then)

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
        seconds = 0.0 if self.real is False else self.left(streamed)
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

    def next_change(self, now: float, within: float | None = None) -> float:
        """When `holding` may next change, or a probe (`within`, as `probe`'s) may go: inf when
        no ghost is left."""
        times = [t for span in self.spans for t in span if t > now]
        if self.real is None and self.spans and within is not None:
            times.append(max(end for _, end in self.spans) - within)
        return min((t for t in times if t > now), default=float("inf"))

    def probe(self, now: float, who: object, within: float | None) -> bool:
        """Whether `who` may send its request now, past the ghosts, to find out whether the server
        runs them: only while that is unknown, one probe at a time, and once the ghosts would be
        done `within` seconds (None: any time)."""
        if self.real is not None or self._probe is not None or not self.spans:
            return False
        end = max(end for _, end in self.spans)
        if within is not None and end - now > within:
            return False
        self._probe = (who, now, end)
        return True

    def heard(self, who: object, first_token_seconds: float | None, *, timed_out: bool = False) -> None:
        """What became of `who`'s request, if it was the probe: its first token's wait, or that it
        timed out (the ghosts held it back: real). Any other end tells nothing; a later request
        probes again."""
        if self._probe is None or self._probe[0] != who:
            return
        _, sent, end = self._probe
        self._probe = None
        if timed_out:
            self.real = True
        elif first_token_seconds is not None:
            self.real = first_token_seconds >= (end - sent) / 2
            if not self.real:   # dropped by the server: nothing to wait for
                now = sent + first_token_seconds
                self.seconds -= sum(b - max(a, now) for a, b in self.spans if b > now)
                self.spans.clear()
