"""Dynamic batching: one scheduler thread owns the loaded models and answers waiting requests together.

Each round the scheduler takes the oldest waiting request and up to `max_batch - 1` others waiting
for the same model (any stage: a stage is only a different time token in the prompt), left-pads
their prompts, runs one prefill and then decodes step by step with the KV cache, handing every row
its new text as soon as it is decoded. Rows end on an end-of-turn token, a stop string, their own
max_tokens or their client going away; requests that arrive meanwhile wait for the next round
(static batches formed dynamically from the queue, not continuous batching).

A row alone in its batch is computed exactly as `model.generate` computes it, so greedy answers equal
`persllm chat`'s; padded rows continue like the same prompt alone (position ids from the mask), as
in model/generate.generate_batch.

Events handed to a request's `emit`: ("text", str), then ("done", finish_reason, prompt_tokens,
completion_tokens) or ("error", message).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from persllm_cli.model.chat_format import PLAIN_STOP, has_chat_template
from persllm_cli.model.generate import Sampling

Emit = Callable[[tuple], None]


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry later."""


class Closed(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Job:
    key: str                      # which loaded model
    prompt: list[int]
    sampling: Sampling
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, models: dict[str, tuple[Any, Any]], *, max_batch: int = 8, max_queue: int = 64) -> None:
        self.models = models
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._accepting = True
        self._finish_all = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="persllm-serve-scheduler", daemon=True)
        self.batches: list[int] = []  # sizes of the batches run so far (tests, benchmark)

    def start(self) -> None:
        self._thread.start()

    # -------------------------------------------------------------------------------- requests

    def submit(self, key: str, prompt: list[int], sampling: Sampling, emit: Emit) -> Job:
        job = Job(key, prompt, sampling, emit)
        with self._cond:
            if not self._accepting:
                raise Closed()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()
        return job

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def finish_all(self) -> None:
        """End every request now: running rows finish with what they have, waiting ones get nothing."""
        self.stop_accepting()
        self._finish_all.set()
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for job in waiting:
            self._end(job, ("done", "stop", len(job.prompt), 0))

    def close(self) -> None:
        self.finish_all()
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting:
                    return
                first = self._waiting.popleft()
                batch = [first]
                rest = collections.deque()
                while self._waiting:
                    job = self._waiting.popleft()
                    if job.key == first.key and len(batch) < self.max_batch:
                        batch.append(job)
                    else:
                        rest.append(job)
                self._waiting.extendleft(reversed(rest))
            batch = [j for j in batch if not j.cancelled.is_set()]
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                with torch.inference_mode():
                    self._run(batch)
            except Exception as e:  # noqa: BLE001 - every request of the batch hears of it
                for job in batch:
                    self._end(job, ("error", f"generation failed: {type(e).__name__}: {e}"))

    @staticmethod
    def _end(job: Job, event: tuple) -> None:
        if not job.ended:
            job.ended = True
            job.emit(event)

    def _run(self, jobs: list[Job]) -> None:
        import torch

        model, tok = self.models[jobs[0].key]
        eos = {i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
               if isinstance(i, int) and i != tok.unk_token_id}
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
        plain_stop = () if has_chat_template(tok) else (PLAIN_STOP,)
        device = getattr(model, "device", None) or next(model.parameters()).device
        n = len(jobs)
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt):] = torch.tensor(j.prompt, dtype=torch.long)
            mask[i, width - len(j.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        rows = [_Row(j, tok, tuple(j.sampling.stop) + plain_stop, device) for j in jobs]
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        new_api = "cache" in getattr(out, "__dataclass_fields__", {})  # transformers renamed past_key_values
        past = out.cache if new_api else out.past_key_values
        logits = out.logits[:, -1, :]
        last_pos = pos[:, -1]
        steps = max(j.sampling.max_new_tokens for j in jobs)
        for _ in range(steps):
            nxt = torch.full((n,), pad, dtype=torch.long, device=device)
            for i, row in enumerate(rows):
                if row.done:
                    continue
                if self._finish_all.is_set() or row.job.cancelled.is_set():
                    row.finish("stop", emit_rest=not row.job.cancelled.is_set())
                    continue
                t = row.pick(logits[i])
                nxt[i] = t
                row.add(t, eos)
            if all(r.done for r in rows):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            cache_arg = {"cache": past} if new_api else {"past_key_values": past}
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                        use_cache=True, **cache_arg)
            past = out.cache if new_api else out.past_key_values
            logits = out.logits[:, -1, :]
        for row in rows:
            if not row.done:
                row.finish("length")


class _Row:
    """One request inside a batch: its tokens so far, the text already sent, when it ends."""

    def __init__(self, job: Job, tok: Any, stops: tuple[str, ...], device: Any) -> None:
        import torch

        self.job, self.tok, self.stops = job, tok, tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.sent = 0          # characters of the (left-stripped) answer already emitted
        self.done = False
        self.text = ""
        s = job.sampling
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed if s.seed is not None else int(time.time_ns() % (2**63)))

    def pick(self, logits: Any) -> int:
        import torch

        s = self.job.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        scores = logits.float() / s.temperature
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, dim=-1) >= s.top_p  # keep the first token always
            sorted_scores[drop] = float("-inf")
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def add(self, token: int, eos: set[int]) -> None:
        if token in eos:
            self.finish("stop")
            return
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True).lstrip()
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            self.text = text[:min(cuts)]
            self.finish("stop")
            return
        self.text = text
        if len(self.tokens) >= self.job.sampling.max_new_tokens:
            self.finish("length")
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # half of a character: wait for the rest of its bytes
            safe = len(text.rstrip("\ufffd"))
        keep = max((len(s) - 1 for s in self.stops), default=0)
        safe = min(safe, len(text) - keep) if keep else safe
        if safe > self.sent:
            self.job.emit(("text", text[self.sent:safe]))
            self.sent = safe

    def finish(self, reason: str, emit_rest: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if emit_rest and len(self.text) > self.sent:
            self.job.emit(("text", self.text[self.sent:]))
            self.sent = len(self.text)
        Scheduler._end(self.job, ("done", reason, len(self.job.prompt), len(self.tokens)))
