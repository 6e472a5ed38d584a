"""Generating from a loaded model (model/load.py): streaming one answer, or answering a batch.

The prompt is rendered by model/chat_format.py, the way training rendered conversations.

    model, tokenizer, info = load_run(Path("runs/latest"))
    stage_id, token = info.stage_token("early")
    for piece in stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], token, 64, 0.0):
        print(piece, end="")
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from persllm_cli.model.chat_format import PLAIN_STOP, Message, has_chat_template, prompt_ids


def sampling(temperature: float) -> dict[str, Any]:
    """generate() settings: greedy at 0, else nucleus sampling (top-p 0.95) at that temperature."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=0.95, top_k=0)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def stream_reply(model: Any, tokenizer: Any, messages: list[Message], stage_token: str,
                 max_new_tokens: int = 256, temperature: float = 0.7) -> Iterator[str]:
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
    eos = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
           if isinstance(i, int) and i != tokenizer.unk_token_id]
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopFlag()]),
        eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0],
    )
    kwargs.update(sampling(temperature))
    if not has_chat_template(tokenizer):
        kwargs.update(stop_strings=[PLAIN_STOP], tokenizer=tokenizer)

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
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


def generate_batch(model: Any, tokenizer: Any, conversations: list[list[Message]], *, stage_token: str,
                   max_new_tokens: int = 256, temperature: float = 0.0) -> list[str]:
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
    eos = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
           if isinstance(i, int) and i != tokenizer.unk_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    width = max(len(r) for r in rows)
    device = getattr(model, "device", None) or next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    kwargs: dict[str, Any] = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad)
    kwargs.update(sampling(temperature))
    plain = not has_chat_template(tokenizer)
    if plain:
        kwargs.update(stop_strings=[PLAIN_STOP], tokenizer=tokenizer)
    out = _generate_in_thread(model, kwargs)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    if plain:  # a row that stopped on the next "User:" keeps it in its text
        texts = [t.split(PLAIN_STOP)[0] for t in texts]
    return [t.strip() for t in texts]


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
