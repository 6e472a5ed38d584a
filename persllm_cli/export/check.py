"""The export's proof: load it the way a consumer would, and compare with the run itself.

The run is loaded as `persllm chat` loads it (model/load.py) and prompted with model/chat_format.py;
the export is loaded with plain transformers (`AutoModelForCausalLM`, or transformers' own GGUF
reader for a GGUF file) and prompted through the exported chat template. For every stage and a few
prompts: the prompt token ids must be equal, greedy answers must be equal (hf, gguf f16; q8_0 reports
how many answer tokens agree), the largest logit difference is reported, a prompt without a stage
must get the default stage, and different stages must give different logits. An export in 16 bits
is compared twice: with the run as trained (float32; how far the rounding moves it), then, exactly,
with the run's weights rounded the same way (`round_like_export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.export.template import stop_ids
from persllm_cli.model import chat_format, runs

PROMPTS = ("Who are you?", "What do you remember most about this time of your life?")


@dataclass
class Report:
    rows: list[list[object]] = field(default_factory=list)  # stage, prompt, same answer, agreement, logit diff
    max_logit_diff: float = 0.0
    agree: int = 0
    total: int = 0
    exact: int = 0
    answers: int = 0
    near_ties: int = 0

    @property
    def agreement(self) -> float:
        return self.agree / self.total if self.total else 1.0

    def merge(self, other: "Report") -> None:
        """Add another comparison's rows and counts to this one."""
        self.rows += other.rows
        self.max_logit_diff = max(self.max_logit_diff, other.max_logit_diff)
        self.agree += other.agree
        self.total += other.total
        self.exact += other.exact
        self.answers += other.answers
        self.near_ties += other.near_ties


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def greedy(model: Any, ids: list[int], eos: list[int], max_new_tokens: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(ids):].tolist()


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def compare(reference: tuple[Any, Any, runs.RunInfo], exported: tuple[Any, Any], *, default_stage: str,
            exact: bool, max_new_tokens: int, what: str, skip_ids: list[int] | None = None) -> Report:
    """Compare the exported (model, tokenizer) with the run's; raise PersllmError on a failure.
    `skip_ids`: vocabulary entries whose logits the logit difference leaves out."""
    ref_model, ref_tok, info = reference
    model, tok = exported
    eos = stop_ids(ref_tok)
    report = Report()
    last_logits = {}
    for s in info.stages:
        for n, prompt in enumerate(PROMPTS, 1):
            messages = [{"role": "user", "content": prompt}]
            want = chat_format.prompt_ids(ref_tok, messages, s["token"])
            got = _ids(tok.apply_chat_template(messages, add_generation_prompt=True, stage=s["id"]))
            if got != want:
                raise PersllmError(f"export check failed ({what}): the exported chat template gives other tokens "
                                   f"than training for stage {s['id']} ({len(got)} vs {len(want)} tokens)")
            if s["id"] == default_stage and n == 1:
                plain = _ids(tok.apply_chat_template(messages, add_generation_prompt=True))
                if plain != want:
                    raise PersllmError(f"export check failed ({what}): a prompt without a stage does not get "
                                       f"the default stage {default_stage}")
            ref_answer = greedy(ref_model, want, eos, max_new_tokens)
            answer = greedy(model, got, eos, max_new_tokens)
            # Teacher-forced: the export's next-token choice along the run's own answer.
            seq = want + ref_answer
            a, b = _logits(ref_model, seq), _logits(model, seq)
            gap = (a - b).abs()
            if skip_ids:
                gap[:, skip_ids] = 0.0
            diff = float(gap.max())
            start = len(want) - 1
            picks = b[start:len(seq) - 1].argmax(-1).tolist()
            agree = sum(int(p == t) for p, t in zip(picks, ref_answer))
            report.max_logit_diff = max(report.max_logit_diff, diff)
            report.agree += agree
            report.total += len(ref_answer)
            report.answers += 1
            same = answer == ref_answer
            report.exact += int(same)
            tie = False
            if not same:
                tie = _near_tie(a, b, start, picks, ref_answer)
                report.near_ties += int(tie)
            if n == 1:
                last_logits[s["id"]] = b[start]
            report.rows.append([s["id"], n, "yes" if same else ("near tie" if tie else "no"),
                                f"{agree}/{len(ref_answer)}", f"{diff:.2e}"])
            if exact and not same and not tie:
                raise PersllmError(
                    f"export check failed ({what}): stage {s['id']}, prompt {n}: the greedy answer differs from "
                    f"the run's ({ref_tok.decode(answer)[:60]!r} vs {ref_tok.decode(ref_answer)[:60]!r})")
    if len(last_logits) > 1:
        values = list(last_logits.values())
        if all(float((values[0] - v).abs().max()) == 0.0 for v in values[1:]):
            raise PersllmError(f"export check failed ({what}): every stage gives the same output; the stage "
                               "token does not reach the model")
    return report


def _near_tie(a: Any, b: Any, start: int, picks: list[int], ref_answer: list[int]) -> bool:
    """Whether the first token the export chose differently was a near tie for the run itself: its top
    two logits closer than twice the export's rounding error there (f16 weights may then go either way).
    Beyond the first difference the two answers continue different texts, so only that one counts."""
    for j, (p, t) in enumerate(zip(picks, ref_answer)):
        if p != t:
            row = start + j
            top = a[row].topk(2).values
            return float(top[0] - top[1]) <= 2 * float((a[row] - b[row]).abs().max())
    # Teacher-forced picks all agree: the answers differ only after a stop token or in length.
    return True


def round_like_export(model: Any, dtype: Any, *, vectors: bool) -> None:
    """Round the run's weights, in place, the way the export stores them: matrices in `dtype`, and
    vectors (norms, biases) too when `vectors` (an hf export in float16 keeps nothing in float32; a GGUF
    keeps vectors in F32). The export must then give the same greedy answers as this reference: a
    difference could only come from the conversion, not from the rounding every f16 export has."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 or vectors:
                p.copy_(p.to(dtype).to(p.dtype))


def load_hf(out: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


def load_gguf(path: Path) -> tuple[Any, Any]:
    import torch

    from persllm_cli.model import gguf_load

    model, tok = gguf_load.load(path, dtype=torch.float32)
    return model.eval(), tok


# Conversations the template is rendered with in llama.cpp's engine: the check's prompts, and one with
# a system turn and an earlier exchange (the turns a base template treats differently).
def _conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in PROMPTS] + [[
        {"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": "Someone you have met before."}, {"role": "user", "content": PROMPTS[1]}]]


def template_in_llama_cpp(tok: Any, stages: list[dict[str, str]], setting: Path | None, what: str) -> str:
    """Render the exported chat template with llama.cpp's own Jinja engine for every stage, the default
    (no stage) and an unknown stage, and require transformers' rendering byte for byte (the unknown
    stage: an error in both). Returns the line to print: how many agreed, or that llama.cpp was not
    found (nothing is checked then)."""
    from persllm_cli.core import console
    from persllm_cli.export import engine

    source = engine.find_source(setting)
    if source is None:
        return f"llama.cpp's template engine: not checked, no llama.cpp source found ({engine.HOW})"
    try:
        if not engine.renderer_path(source).is_file():
            console.info(f"Building llama.cpp's template engine from {engine.describe(source)} (once; under a "
                         "minute on 2 cores)...")
        binary = engine.renderer(source)
    except engine.Unavailable as e:
        return f"llama.cpp's template engine: not checked, {e}"
    template = tok.chat_template
    cases = [{"messages": m, "add_generation_prompt": gen, "kwargs": {} if stage is None else {"stage": stage}}
             for m in _conversations() for gen in (True, False) for stage in [s["id"] for s in stages] + [None]]
    unknown = {"messages": _conversations()[0], "add_generation_prompt": True, "kwargs": {"stage": "no-such-stage"}}
    rendering = engine.render(binary, template, cases + [unknown], bos_token=tok.bos_token, eos_token=tok.eos_token)
    if rendering.error:
        raise PersllmError(f"export check failed ({what}): llama.cpp's template engine cannot use the exported "
                           f"template: {_last_line(rendering.error)}")
    for case, got in zip(cases, rendering.results):
        want = tok.apply_chat_template(case["messages"], tokenize=False,
                                       add_generation_prompt=case["add_generation_prompt"], **case["kwargs"])
        if got.get("text") != want:
            stage = case["kwargs"].get("stage", "default")
            seen = repr(got["text"][:80]) if "text" in got else _last_line(got.get("error", ""))
            raise PersllmError(f"export check failed ({what}): llama.cpp's template engine renders stage {stage} "
                               f"otherwise than transformers ({seen} vs {want[:80]!r})")
    if "error" not in rendering.results[-1]:
        raise PersllmError(f"export check failed ({what}): llama.cpp's template engine accepts an unknown stage")
    return (f"llama.cpp's template engine ({engine.describe(source)}): {len(cases)}/{len(cases)} renders identical "
            "to transformers, an unknown stage refused")


def _last_line(error: str) -> str:
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
