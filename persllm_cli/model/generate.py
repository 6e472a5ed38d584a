"""Generating from a loaded model (model/load.py): streaming one answer, or answering a batch.

The prompt is rendered by model/chat_format.py, the way training rendered conversations.

    model, tokenizer, info = load_run(Path("runs/latest"))
    stage_id, token = info.stage_token("early")
    for piece in stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], token,
                              Sampling(max_new_tokens=64, temperature=0)):
        print(piece, end="")

Greedy answers (temperature 0) are the same whether streamed, batched or asked alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

from persllm_cli.data.records import Message
from persllm_cli.model.chat_format import end_ids, end_texts, prompt_ids


@dataclass(frozen=True)
class Sampling:
    """How to pick the answer's tokens: greedy at temperature 0, else nucleus sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None          # a fixed seed makes a sampled answer repeatable
    stop: tuple[str, ...] = ()       # the answer ends before the first of these strings
    # OpenAI's sampling extras; serve's scheduler (serve/batcher.py) applies them, 0 is off.
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False         # vLLM's extra: the model's end token does not end the answer
    # Local generation (chat, converse): never complete a run of this many tokens that the prompt or
    # the answer already holds (transformers' no_repeat_ngram_size, which sees the prompt too); 0 is off.
    no_repeat_ngram: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        block = dict(no_repeat_ngram_size=self.no_repeat_ngram) if self.no_repeat_ngram > 0 else {}
        if self.temperature > 0:
            return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), **block)
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None, **block)


def _seed(sampling: Sampling) -> None:
    if sampling.seed is not None and sampling.temperature > 0:
        import torch

        torch.manual_seed(sampling.seed)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def stream_reply(model: Any, tokenizer: Any, messages: list[Message], stage_token: str | None,
                 sampling: Sampling | None = None) -> Iterator[str]:
    """Generate the assistant's answer, yielding text pieces as they come (greedy when temperature is 0).

    Generation runs in a thread; closing the iterator early (or Ctrl-C while waiting on it) stops
    the thread at the next token.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class _StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001 - transformers' signature
            return stop.is_set()

    ids = prompt_ids(tokenizer, messages, stage_token)
    device = getattr(model, "device", None) or next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    eos = end_ids(tokenizer)
    s = sampling or Sampling()
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=s.max_new_tokens,
        streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopFlag()]),
        eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0],
    )
    kwargs.update(s.generate_kwargs())
    stops = tuple(s.stop) + end_texts(tokenizer)
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    _seed(s)

    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread below
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, name="persllm-generate", daemon=True)
    thread.start()
    held = ""  # text that may be the start of a stop string, kept back until it is known not to be
    try:
        for piece in streamer:
            if not piece:
                continue
            if not stops:
                yield piece
                continue
            text, stopped = _cut_at_stop(held + piece, stops)
            if stopped:
                if text:
                    yield text
                break
            keep = max((len(x) - 1 for x in stops), default=0)
            held = text[len(text) - keep:] if keep else ""
            if text[:len(text) - len(held)]:
                yield text[:len(text) - len(held)]
        else:
            if held:
                yield held
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


def generate_batch(model: Any, tokenizer: Any, conversations: list[list[Message]], *, stage_token: str | None,
                   sampling: Sampling | None = None) -> list[str]:
    """One answer per conversation, all at the same stage, generated together (greedy when
    temperature is 0).

    The prompts are the ones `chat` sends (`prompt_ids`), left-padded to a common length so every
    row's answer starts at the same column; the attention mask hides the padding, and the model
    derives position ids from it, so a padded row continues like the same prompt alone.
    """
    if not conversations:
        return []
    import torch

    rows = [prompt_ids(tokenizer, conv, stage_token) for conv in conversations]
    eos = end_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    width = max(len(r) for r in rows)
    device = getattr(model, "device", None) or next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    s = sampling or Sampling(temperature=0.0)
    kwargs: dict[str, Any] = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=s.max_new_tokens, eos_token_id=eos or None, pad_token_id=pad)
    kwargs.update(s.generate_kwargs())
    stops = tuple(s.stop) + end_texts(tokenizer)
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    _seed(s)
    out = _generate_in_thread(model, kwargs)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    # A row that stopped on a stop string keeps it in its text.
    return [_cut_at_stop(t, stops)[0].strip() for t in texts]


def _generate_in_thread(model: Any, kwargs: dict[str, Any]) -> Any:
    """`model.generate(**kwargs)` in a worker thread, as `stream_reply` does: Ctrl-C stops it at
    the next token instead of after the whole batch, and on a busy CPU it runs several times
    faster there than on the main thread (measured on the shared 2-core box: 4 answers x 8 tokens
    took 12-13 s on the main thread, 2 s in a worker)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop = threading.Event()

    class _StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):  # noqa: ANN001 - transformers' signature
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    result: list[Any] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                result.append(model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([_StopFlag()])))
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread below
            failure.append(e)

    thread = threading.Thread(target=work, name="persllm-generate-batch", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]
    return result[0]
