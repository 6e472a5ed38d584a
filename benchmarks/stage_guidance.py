"""Stage guidance at decoding, measured (a prototype: the tool itself does not decode this way).

Each answer at stage s is decoded greedily under every stage's time token at once: the same
continuation, one row per stage, stepped together. The next token is the argmax of

    lp_s + g * (lp_s - mean of lp_t over the other stages t)        (log-probabilities)

among the tokens whose probability under stage s is at least --alpha times the top one's, as
classifier-free guidance amplifies a prompt. g = 0 is plain greedy and gives `persllm eval`'s
answers. The answers (the run's test questions and eval's swapped questions) are scored with
eval's judge-free figures (eval/fidelity.py), one system per g.

Run it on a project and run that `benchmarks/stage_fidelity.py --work DIR` kept:

    python benchmarks/stage_fidelity.py --steps 20 --learning-rate 1e-3 --skip-base --systems c --work /tmp/fw0
    python benchmarks/stage_guidance.py /tmp/fw0/harry c20 --gammas 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def decode(model, tok, rows: list[list[int]], g: float = 0.0, alpha: float = 0.1, max_new_tokens: int = 48) -> str:
    """The answer continuing rows[0], guided away from rows[1:] (the same prompt under the other
    stages' tokens) with strength g; g = 0 (or one row) is plain greedy, as `persllm eval` decodes."""
    import torch

    from persllm_cli.model.chat_format import end_ids, end_texts

    if len({len(r) for r in rows}) != 1:
        raise SystemExit("the stages' prompts differ in length: each time token must be one token")
    eos, stops = set(end_ids(tok)), end_texts(tok)
    floor = torch.log(torch.tensor(alpha))
    cur, past, out = torch.tensor(rows), None, []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            o = model(input_ids=cur, cache=past, use_cache=True)
            past = o.cache
            lp = torch.log_softmax(o.logits[:, -1].float(), -1)
            score = lp[0]
            if g and len(rows) > 1:
                score = lp[0] + g * (lp[0] - lp[1:].mean(0))
                score = score.masked_fill(lp[0] < lp[0].max() + floor, float("-inf"))
            nxt = int(score.argmax())
            if nxt in eos:
                break
            out.append(nxt)
            if any(s in tok.decode(out, skip_special_tokens=True) for s in stops):
                break
            cur = torch.full((len(rows), 1), nxt)
    text = tok.decode(out, skip_special_tokens=True)
    for s in stops:
        text = text.split(s)[0]
    return text.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project", type=Path, help="the project directory (holds build/test.jsonl and runs/)")
    ap.add_argument("run", help="the run's name under runs/")
    ap.add_argument("--gammas", default="0,1,2", help="guidance strengths g, comma-separated")
    ap.add_argument("--alpha", type=float, default=0.1, help="keep tokens with p >= alpha * top p under the stage asked")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None, help="write the figures and every answer here")
    args = ap.parse_args()

    from persllm_cli.core.project import load_project
    from persllm_cli.eval import fidelity
    from persllm_cli.eval.command import read_test, stage_order
    from persllm_cli.eval.items import System
    from persllm_cli.model.chat_format import prompt_ids
    from persllm_cli.model.load import load_run

    root = args.project
    model, tok, info = load_run(root / "runs" / args.run)
    project = load_project(root)
    items = read_test(root / "build" / "test.jsonl", None)
    order = stage_order(project, [], items)
    swaps = fidelity.swap_items(order, items, 20, 0)   # eval's default --swap-questions and --seed
    tokens = {s: info.stage_token(s)[1] for s in order}

    def guided(question: str, stage: str, g: float) -> str:
        rows = [prompt_ids(tok, [{"role": "user", "content": question}], tokens[st])
                for st in [stage, *(s for s in order if s != stage)]]
        return decode(model, tok, rows, g, args.alpha, args.max_new_tokens)

    answers: dict[str, dict] = {}
    systems, seconds = [], {}
    for g in [float(x) for x in args.gammas.split(",") if x.strip()]:
        name = f"g={g:g}"
        t0 = time.perf_counter()
        answers[name] = {}
        for item in items + swaps:
            text = guided(item.question, item.stage, g)
            answers[name][item.id] = {"id": item.id, "status": "ok" if text else "failed", "messages": [
                {"role": "user", "content": item.question}, {"role": "assistant", "content": text}]}
        seconds[name] = round(time.perf_counter() - t0, 1)
        systems.append(System(name=name, kind="run", model=args.run, persona=project.name,
                              labels={s.id: s.label for s in project.stages}, dir=root / "build" / "eval"))
        print(f"{name}: {len(items) + len(swaps)} answers in {seconds[name]} s", file=sys.stderr, flush=True)
    _, per, _ = fidelity.score(project, root / "build" / "train.jsonl", order, systems, items, answers)
    figures = {}
    print("g | stage acc % | x chance | swap differ % | swap recognised % | empty | seconds")
    for name, f in per.items():
        acc, sw = f["stage_accuracy"], f["swap"]
        empty = sum(1 for r in answers[name].values() if r["status"] != "ok")
        figures[name] = {"stage_accuracy": acc["accuracy"], "chance": acc["chance"], "differ": sw.get("differ"),
                         "recognised": sw.get("recognised"), "empty": empty, "seconds": seconds[name]}
        print(f"{name[2:]} | {acc['accuracy']:.1f} | {acc['accuracy'] / acc['chance']:.2f}x | {sw.get('differ', 0):.1f} | "
              f"{sw.get('recognised', 0):.1f} | {empty} | {seconds[name]}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(root / "runs" / args.run), "alpha": args.alpha,
                                         "figures": figures, "answers": answers}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
