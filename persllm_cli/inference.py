"""Loading a trained run and generating from it: what `chat` (and anything else that talks to a
run) uses.

A run is a base model plus a PEFT adapter plus the tokenizer that knows the time tokens
(see runs.py). The prompt is rendered the way training rendered conversations: the stage's time
token first, then the chat template of the tokenizer (a plain `User:`/`Assistant:` layout when the
tokenizer has none), ending with the assistant's turn opened.

    model, tokenizer, info = load_run(Path("runs/latest"))
    stage_id, token = info.stage_token("early")
    for piece in stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], token, 64, 0.0):
        print(piece, end="")
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

from persllm_cli import merged, models, runs
from persllm_cli.errors import PersllmError

Message = dict[str, str]

# Said when the tokenizer has no chat template; `tokenize` renders the same layout.
_PLAIN_STOP = "\nUser:"


def load_run(run_dir: Path, *, merge: bool | None = None) -> tuple[Any, Any, runs.RunInfo]:
    """(model, tokenizer, info) for a complete run directory, ready to generate (eval mode).

    The base is the one run.json names; on CUDA it loads in 4-bit NF4 as in training, on CPU in
    float32. Its embeddings are resized to the run's tokenizer before the adapter (LoRA weights and
    the trained time-token rows) goes on top. `merge` (default: on CPU only) folds the adapter into
    the float32 weights, which makes CPU generation about three times faster for the cost of a
    second; merging into 4-bit weights would lose precision, so on CUDA the adapter stays apart.
    A CPU merge is cached (see merged.py): later loads of the same run skip PEFT and the merge.
    """
    info = runs.read_run(Path(run_dir))
    run = info.path
    base = models.resolve_base(info.base)

    import logging

    # bitsandbytes (imported by peft) warns about an optional CPU kernel package on every start.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a chat screen is no place for loader chatter
    hf_logging.disable_progress_bar()

    try:
        tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    except (OSError, ValueError) as e:
        raise PersllmError(f"the tokenizer in {run / 'tokenizer'} could not be loaded: {_first_line(e)}") from None
    vocab = tokenizer.get_vocab()
    missing = [s["token"] for s in info.stages if s["token"] not in vocab]
    if missing:
        raise PersllmError(f"the tokenizer in {run / 'tokenizer'} lacks the time token(s) {', '.join(missing)}")

    merging = merge if merge is not None else not torch.cuda.is_available()
    cached_at = merged.cache_dir(run, base, len(tokenizer)) if merging and not torch.cuda.is_available() else None
    model = merged.load(cached_at)
    if model is not None:
        model.eval()
        return model, tokenizer, info

    kwargs: dict[str, Any] = {}
    qlora = bool(info.data.get("settings", {}).get("qlora", True))
    if torch.cuda.is_available() and not qlora:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["dtype"] = torch.bfloat16
    elif torch.cuda.is_available():
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as e:
        raise PersllmError(f"base model {info.base} could not be loaded: {_first_line(e)}") from None
    # The trained input rows come from the adapter; an untied output head's new rows are not
    # trained, so they must be built exactly as training built them.
    models.resize_embeddings(model, len(tokenizer))
    model = _attach_adapter(model, run, info.base)
    if merging:
        model = model.merge_and_unload()
        merged.store(model, cached_at)
    model.eval()
    return model, tokenizer, info


def _attach_adapter(model: Any, run: Path, base_name: str) -> Any:
    from peft import PeftModel

    where = run / "adapter"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(model, where)
        except (RuntimeError, ValueError, KeyError) as e:
            # e.g. "size mismatch for ...lora_A.weight": trained on another base.
            raise PersllmError(f"adapter in {run} does not fit base {base_name}: {_first_line(e, 300)}") from None
    for w in caught:
        text = str(w.message)
        if "missing adapter keys" in text:
            raise PersllmError(f"adapter in {run} does not fit base {base_name}: {text[:300]}")
    return model


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, messages: list[Message], stage_token: str) -> str:
    """The text the model continues: the conversation rendered exactly as `tokenize` rendered it
    for training (stage token first, after a real BOS), ending with the assistant's turn opened."""
    from persllm_cli.tokenization import render, with_stage

    return with_stage(tokenizer, render(tokenizer, messages, add_generation_prompt=True), stage_token)


def prompt_ids(tokenizer: Any, messages: list[Message], stage_token: str) -> list[int]:
    # The template writes its own special tokens; adding a BOS again would differ from training.
    return tokenizer(build_prompt(tokenizer, messages, stage_token), add_special_tokens=False)["input_ids"]


def context_size(model: Any) -> int:
    """How many tokens the model attends over (prompt plus answer)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def fit_messages(tokenizer: Any, messages: list[Message], stage_token: str, budget: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (never the system message or the last user message) until the prompt
    takes at most `budget` tokens. Returns (kept messages, number of messages dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while len(prompt_ids(tokenizer, system + rest, stage_token)) > budget:
        if len(rest) <= 1:
            raise PersllmError(f"the message is too long for the model's context ({budget} tokens left for the "
                               "prompt); shorten it or lower --max-new-tokens")
        # Drop a whole exchange (user + assistant) so the conversation still starts with the user.
        cut = 2 if len(rest) > 2 and rest[0]["role"] == "user" and rest[1]["role"] == "assistant" else 1
        rest = rest[cut:]
        dropped += cut
    return system + rest, dropped


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
        kwargs.update(stop_strings=[_PLAIN_STOP], tokenizer=tokenizer)

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
        kwargs.update(stop_strings=[_PLAIN_STOP], tokenizer=tokenizer)
    out = _generate_in_thread(model, kwargs)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    if plain:  # a row that stopped on the next "User:" keeps it in its text
        texts = [t.split(_PLAIN_STOP)[0] for t in texts]
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
