"""Continuous batching: one scheduler thread owns the loaded models and decodes every running request
of a model together, one token per step, while requests come and go between steps.

Each loop the scheduler admits waiting requests (oldest first) to their model's running batch, up to
`max_batch` rows per model, prefills the newcomers, then runs one decode step for every model that
has rows. Newcomers are prefilled in small groups of similar prompt lengths, shortest first (at most
a quarter plus 8 tokens of padding: a long prompt is never padded onto a short one, and a short
question's first token does not wait behind a long prompt of the same round); each row's first
token is picked and sent at once, and the group's KV cache is merged into the running batch's: both
are left-padded to the longer of the two, the attention mask hides the padding and every row keeps
its own position ids. Rows end on an end-of-turn token, a stop string, their own max_tokens or their
client going away, and leave the batch at once (their cache rows are dropped, and columns that only
padding still fills are cut away, so a long prompt that has finished stops costing anything).

A row alone in its batch is computed exactly as `model.generate` computes it (a prefill of the prompt
alone, unpadded, then one token at a time), so greedy answers equal `persllm chat`'s; a row beside others
continues like the same prompt alone (left padding masked, position ids its own), as in
model/generate.generate_batch.

Merging caches needs every layer of the cache to be a plain `DynamicLayer` (transformers 5's
cache_utils); a model whose cache is anything else (sliding-window layers) runs one request at a time.

Events handed to a request's `emit`: ("text", str), then ("done", finish_reason, prompt_tokens,
completion_tokens) or ("error", message), or ("gone",) for a request that never started because the
server is stopping. A row cut short by `finish_all` (the shutdown grace is over) ends with
finish_reason "length": its answer is incomplete, as when max_tokens ends it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from persllm_cli.model.chat_format import end_ids, end_texts
from persllm_cli.model.generate import Sampling
from persllm_cli.serve.sampling import pick

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
    def __init__(self, models: dict[str, tuple[Any, Any]], *, max_batch: int = 8, max_queue: int = 64,
                 adapters: dict[str, str] | None = None) -> None:
        self.models = models
        self.adapters = adapters or {}   # key -> adapter name to activate on a shared PeftModel
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._accepting = True
        self._finish_all = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="persllm-serve-scheduler", daemon=True)
        self._batches: dict[str, _Batch] = {}
        self._limits: dict[str, int] = {}
        self._new_api: dict[str, bool] = {}
        self.largest_batch = 0   # the most rows decoded together so far (health, tests, benchmark)
        self.steps = 0           # decode steps run so far

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
        """End every request now: running rows finish with what they have ("length"), waiting ones
        hear that they never started ("gone")."""
        self.stop_accepting()
        self._finish_all.set()
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for job in waiting:
            self._end(job, ("gone",))

    def close(self, timeout: float = 30) -> None:
        self.finish_all()
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in list(self._batches.values()))

    # --------------------------------------------------------------------------------- the loop

    def _limit(self, key: str) -> int:
        if key not in self._limits:
            self._limits[key] = self.max_batch if _mergeable(self.models[key][0]) else 1
        return self._limits[key]

    def _admit(self) -> tuple[list[Job], list[Job]]:
        """Waiting jobs that fit in their model's batch, oldest first, and those whose client has gone
        (called holding the lock)."""
        taken: list[Job] = []
        gone: list[Job] = []
        counts = {k: len(b.rows) for k, b in self._batches.items()}
        rest: collections.deque[Job] = collections.deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                gone.append(job)
            elif counts.get(job.key, 0) < self._limit(job.key):
                counts[job.key] = counts.get(job.key, 0) + 1
                taken.append(job)
            else:
                rest.append(job)
        self._waiting = rest
        return taken, gone

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._waiting and not self._batches and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not self._batches:
                    return
                newcomers, gone = self._admit()
            for job in gone:
                self._end(job, ("done", "stop", len(job.prompt), 0))
            with torch.inference_mode():
                for group in _groups(newcomers):
                    try:
                        self._prefill(group)
                    except Exception as e:  # noqa: BLE001 - these requests hear of it
                        for job in group:
                            self._end(job, ("error", f"generation failed: {type(e).__name__}: {e}"))
                for key, batch in list(self._batches.items()):
                    try:
                        self._step(key, batch)
                    except Exception as e:  # noqa: BLE001 - every request of the batch hears of it
                        for row in batch.rows:
                            self._end(row.job, ("error", f"generation failed: {type(e).__name__}: {e}"))
                        batch.rows = []
                    if not batch.rows:
                        del self._batches[key]

    @staticmethod
    def _end(job: Job, event: tuple) -> None:
        if not job.ended:
            job.ended = True
            job.emit(event)

    def _forward(self, key: str, cache: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        """One forward pass of `key`'s model: (logits of the last position, the cache)."""
        model = self.models[key][0]
        adapter = self.adapters.get(key)
        if adapter is not None and getattr(model, "active_adapter", None) != adapter:
            model.set_adapter(adapter)
        if cache is not None:
            kwargs["cache" if self._new_api.get(key) else "past_key_values"] = cache
        out = model(use_cache=True, **kwargs)
        new_api = "cache" in getattr(out, "__dataclass_fields__", {})  # transformers renamed past_key_values
        self._new_api[key] = new_api
        return out.logits[:, -1, :], (out.cache if new_api else out.past_key_values)

    def _prefill(self, jobs: list[Job]) -> None:
        """The prompts (one model's, of similar lengths) through the model together, left-padded,
        each row's first token picked and sent, their cache merged into the running batch (or
        starting one). A prompt alone is not padded at all."""
        import torch

        if self._finish_all.is_set():
            for job in jobs:
                self._end(job, ("gone",))
            return
        key = jobs[0].key
        model, tok = self.models[key]
        device = getattr(model, "device", None) or next(model.parameters()).device
        width = max(len(j.prompt) for j in jobs)
        ids = torch.zeros((len(jobs), width), dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt):] = torch.tensor(j.prompt, dtype=torch.long)
            mask[i, width - len(j.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits, cache = self._forward(key, input_ids=ids, attention_mask=mask, position_ids=pos)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(tok)
        group = _Batch(tok)
        group.cache, group.mask = cache, mask
        for i, job in enumerate(jobs):
            row = _Row(job, tok, batch, device)
            row.next_pos = len(job.prompt)
            t = row.pick(logits[i])
            row.add(t)
            row.pending = t
            group.rows.append(row)
        group.drop_done()
        if group.rows:
            batch.join(group)
            self.largest_batch = max(self.largest_batch, len(batch.rows))
        elif not batch.rows:
            del self._batches[key]

    def _step(self, key: str, batch: "_Batch") -> None:
        """One token for every row of the batch; rows that end leave it at once."""
        import torch

        for row in batch.rows:
            if row.job.cancelled.is_set():   # its client has gone: nobody reads the rest
                row.finish("stop", emit_rest=False)
            elif self._finish_all.is_set():  # the shutdown grace is over: cut short, as by max_tokens
                row.finish("length")
        batch.drop_done()
        if not batch.rows:
            return
        device = batch.mask.device
        n = len(batch.rows)
        nxt = torch.tensor([[r.pending] for r in batch.rows], dtype=torch.long, device=device)
        pos = torch.tensor([[r.next_pos] for r in batch.rows], dtype=torch.long, device=device)
        mask = torch.cat([batch.mask, torch.ones((n, 1), dtype=batch.mask.dtype, device=device)], dim=1)
        logits, batch.cache = self._forward(key, input_ids=nxt, attention_mask=mask, position_ids=pos,
                                            cache=batch.cache)
        batch.mask = mask
        self.steps += 1
        for i, row in enumerate(batch.rows):
            row.next_pos += 1
            t = row.pick(logits[i])
            row.add(t)
            row.pending = t
        batch.drop_done()


def _mergeable(model: Any) -> bool:
    """Whether this model's KV cache is made of plain DynamicLayers, whose rows can be merged and dropped."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=model.config)
        return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)
    except Exception:  # noqa: BLE001 - an unknown cache: one request at a time is always right
        return False


def _groups(jobs: list[Job], most: int = 8) -> list[list[Job]]:
    """Newcomers in prefill groups: one model's, shortest prompts first (a long prompt should not
    delay a short question's first token), and prompts of similar length only (at most a quarter
    plus 8 tokens longer than the group's shortest), so little is spent on padding."""
    groups: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: (j.key, len(j.prompt))):
        g = groups[-1] if groups else None
        if (g is not None and g[0].key == job.key and len(g) < most
                and len(job.prompt) <= len(g[0].prompt) * 1.25 + 8):
            g.append(job)
        else:
            groups.append([job])
    groups.sort(key=lambda g: len(g[0].prompt))
    return groups


class _Batch:
    """The running rows of one model and their KV cache, left-padded to a common length (`mask` marks
    the real positions of each row)."""

    def __init__(self, tok: Any) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None
        self.eos = set(end_ids(tok))
        self.plain_stop = end_texts(tok)

    def join(self, other: "_Batch") -> None:
        """Take in the rows of `other` (just prefilled), their cache and the batch's left-padded to the longer."""
        import torch
        import torch.nn.functional as F

        if not self.rows:
            self.rows, self.cache, self.mask = list(other.rows), other.cache, other.mask
            return
        have, new = self.mask.shape[1], other.mask.shape[1]
        width = max(have, new)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, width - have, 0)),
                                   F.pad(theirs.keys, (0, 0, width - new, 0))], dim=0)
            mine.values = torch.cat([F.pad(mine.values, (0, 0, width - have, 0)),
                                     F.pad(theirs.values, (0, 0, width - new, 0))], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (width - have, 0)), F.pad(other.mask, (width - new, 0))], dim=0)
        self.rows.extend(other.rows)

    def drop_done(self) -> None:
        """Remove the rows that have ended, and the leading columns that are padding in every row left."""
        import torch

        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        real = self.mask.any(dim=0).nonzero()
        cut = int(real[0]) if len(real) else 0
        self.mask = self.mask[:, cut:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:, :]
            layer.values = layer.values.index_select(0, index)[:, :, cut:, :]


class _Row:
    """One request inside a batch: its tokens so far, the text already sent, when it ends."""

    def __init__(self, job: Job, tok: Any, batch: _Batch, device: Any) -> None:
        import torch

        self.job, self.tok = job, tok
        s = job.sampling
        # The answer ends at the model's end tokens and end texts (none under ignore_eos) or a stop string.
        self.eos: set[int] = set() if s.ignore_eos else batch.eos
        self.stops = tuple(x for x in tuple(s.stop) + (() if s.ignore_eos else batch.plain_stop) if x)
        self.tokens: list[int] = []
        self.sent = 0          # characters of the (left-stripped) answer already emitted
        self.done = False
        self.text = ""
        self.pending = 0       # the token picked last, fed to the model at the next step
        self.next_pos = 0      # its position id
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed if s.seed is not None else int(time.time_ns() % (2**63)))

    def pick(self, logits: Any) -> int:
        return pick(logits, self.job.sampling, self.tokens, self.generator)

    def add(self, token: int) -> None:
        if token in self.eos:
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
