"""The stage named in words as well as by its time token, measured (a prototype: the tool trains and
prompts with the time token only, as the method describes).

For each --split-seeds N, on examples/harry as `benchmarks/stage_fidelity.py` prepares it:

  (c)  stage rows at the row rate (today's defaults), trained --steps, asked with no system message
       (the model's own default system prompt, as `persllm eval` asks);
  (c') the same run, asked with a system message naming the persona and the stage
       ("You are Harry Potter, first year at Hogwarts.", --system);
  (e)  a run trained on the same records with that system message in every staged example (general
       records unchanged), asked with it;
  (e') (e) asked without it: what its time token alone carries.

Every system answers the test questions and eval's swapped questions greedily (the same decoding
as `persllm eval`; (c) repeats eval's figures), scored with eval's judge-free figures. The last table
pools the test sets: one stage accuracy over every test answer, with its 95% interval and p against
chance, so the noise of 12 questions per set shrinks.

    python benchmarks/stage_prompt.py --split-seeds 0,1,2,3 [--steps 20] [--learning-rate 1e-3] [--work DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from stage_fidelity import make_project, persllm, tokenize  # noqa: E402
from stage_guidance import decode  # noqa: E402

SYSTEM = "You are {persona}, {label}."
SYSTEMS = ("(c)", "(c')", "(e)", "(e')")


def named(src: Path, dst: Path, persona: str, labels: dict[str, str]) -> None:
    """src's records with a system message naming the persona and the record's stage put first."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            r = json.loads(line)
            r["messages"] = [{"role": "system", "content": SYSTEM.format(persona=persona, label=labels[r["stage"]])},
                             *r["messages"]]
            out.write(json.dumps(r, ensure_ascii=False) + "\n")


def answer_record(item, text: str) -> dict:
    """A greedy answer to a test or swapped item, as eval's answers.jsonl holds it (empty: failed)."""
    return {"id": item.id, "status": "ok" if text else "failed",
            "messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": text}]}


def figures_of(per: dict[str, dict], answers: dict[str, dict]) -> dict[str, dict]:
    """What the tables print, per system, from eval's judge-free figures (fidelity.score)."""
    figures = {}
    for name, f in per.items():
        acc, sw, leak = f["stage_accuracy"], f["swap"], f.get("leak") or {}
        figures[name] = {"correct": acc["correct"], "answers": acc["answers"], "accuracy": acc["accuracy"],
                         "chance": acc["chance"], "differ": sw.get("differ"), "recognised": sw.get("recognised"),
                         "swap_answers": sw.get("answers"), "future_terms": leak.get("rate"),
                         "empty": sum(1 for r in answers[name].values() if r["status"] != "ok")}
    return figures


def one_seed(work: Path, seed: int, steps: int, lr: float, max_new_tokens: int) -> dict:
    from persllm_cli.core.project import load_project
    from persllm_cli.eval import fidelity
    from persllm_cli.eval.command import read_test, stage_order
    from persllm_cli.eval.items import System
    from persllm_cli.model.chat_format import prompt_ids
    from persllm_cli.model.load import load_run

    (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    root = make_project(work / f"seed{seed}", seed)
    project = load_project(root)
    labels = {s.id: s.label for s in project.stages}
    train = ["--method", "sft", "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "1", "--learning-rate", str(lr)]
    seconds = {}
    t0 = time.perf_counter()
    persllm("train", *train, "--output", "runs/c", cwd=root)
    seconds["train (c)"] = round(time.perf_counter() - t0, 1)
    named(root / "build" / "train.jsonl", root / "build" / "train.named.jsonl", project.name, labels)
    tokenize(root, "--train", "build/train.named.jsonl", "-o", "build/tokenized.named")
    t0 = time.perf_counter()
    persllm("train", *train, "--data", "build/tokenized.named", "--output", "runs/e", cwd=root)
    seconds["train (e)"] = round(time.perf_counter() - t0, 1)

    items = read_test(root / "build" / "test.jsonl", None)
    order = stage_order(project, [], items)
    swaps = fidelity.swap_items(order, items, 20, 0)   # eval's default --swap-questions and --seed
    answers: dict[str, dict] = {}
    systems, loaded = [], {}
    for run, with_system, name in (("c", False, "(c)"), ("c", True, "(c')"), ("e", True, "(e)"), ("e", False, "(e')")):
        if run not in loaded:
            loaded = {run: load_run(root / "runs" / run)}   # one model in memory at a time
        model, tok, info = loaded[run]
        t0 = time.perf_counter()
        answers[name] = {}
        for item in items + swaps:
            msgs = [{"role": "user", "content": item.question}]
            if with_system:
                msgs.insert(0, {"role": "system", "content": SYSTEM.format(persona=project.name, label=labels[item.stage])})
            text = decode(model, tok, [prompt_ids(tok, msgs, info.stage_token(item.stage)[1])], 0.0, 0.1, max_new_tokens)
            answers[name][item.id] = answer_record(item, text)
        seconds[name] = round(time.perf_counter() - t0, 1)
        systems.append(System(name=name, kind="run", model=run, persona=project.name, labels=labels,
                              dir=root / "build" / "eval"))
        print(f"seed {seed} {name}: {len(items) + len(swaps)} answers in {seconds[name]} s", file=sys.stderr, flush=True)
    basis, per, _ = fidelity.score(project, root / "build" / "train.jsonl", order, systems, items, answers)
    return {"seed": seed, "figures": figures_of(per, answers), "references": basis["references"]["stage_accuracy"]["accuracy"],
            "seconds": seconds, "answers": answers}


def run_seeds(args: argparse.Namespace, work: Path, settings: dict, one: Callable[[int], dict]) -> dict:
    """`one(seed)` for each of --split-seeds, with the settings, machine load and seconds; written to
    --json after each test set, so a run cut short keeps what it has."""
    work.mkdir(parents=True, exist_ok=True)
    out = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(), "steps": args.steps,
           "learning_rate": args.learning_rate, **settings, "seeds": []}
    t0 = time.perf_counter()
    for seed in [int(x) for x in args.split_seeds.split(",") if x.strip()]:
        out["seeds"].append(one(seed))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    out["load_end"], out["seconds"] = os.getloadavg(), round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return out


def print_tables(out: dict, systems: tuple[str, ...], future_terms: bool = False) -> None:
    """Each test set's figures per system, the references' own stage accuracy, then one stage
    accuracy per system over every test set's answers, with its 95% interval, p against chance, the
    swap share placed at the stage asked, and the answers left empty."""
    from persllm_cli.eval.fidelity import above_chance, wilson

    seeds = out["seeds"]
    print("stage accuracy % / swap differ % / swap recognised %" + (" / future terms %" if future_terms else "")
          + ", per test set (split seed)")
    print("system | " + " | ".join(f"seed {s['seed']}" for s in seeds))
    for name in systems:
        cells = []
        for f in (s["figures"][name] for s in seeds):
            cells.append(f"{f['accuracy']:.1f} / {f['differ']:.0f} / {f['recognised']:.1f}" + (
                "" if not future_terms else " / -" if f["future_terms"] is None else f" / {f['future_terms']:.1f}"))
        print(f"{name} | " + " | ".join(cells))
    print("references' own stage accuracy: " + ", ".join(f"{s['references']:.1f}" for s in seeds))
    print("\npooled over the test sets: system | right / answers | stage acc % | 95% interval | p (chance) | recognised % | empty")
    stages = round(100.0 / seeds[0]["figures"][systems[0]]["chance"])
    for name in systems:
        figs = [s["figures"][name] for s in seeds]
        k, n = sum(f["correct"] for f in figs), sum(f["answers"] for f in figs)
        rec = sum(f["recognised"] * f["swap_answers"] for f in figs) / max(1, sum(f["swap_answers"] for f in figs))
        lo, hi = wilson(k, n)
        print(f"{name} | {k}/{n} | {100 * k / n:.1f} | {lo:.1f}-{hi:.1f} | {above_chance(k, n, stages):.2g} | {rec:.1f}"
              f" | {sum(f['empty'] for f in figs)}")
    print(f"load average {out['load_start'][0]:.1f} -> {out['load_end'][0]:.1f}; {out['seconds']:.0f} s")


def seed_parser(doc: str, steps: int, steps_help: str | None = None) -> argparse.ArgumentParser:
    """The options every script that runs one_seed per --split-seeds shares (the caller adds its own)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--split-seeds", default="0,1,2,3", help="split's --seed for each test set, comma-separated")
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--learning-rate", type=float, default=1e-3, help="the LoRA rate (the demo's)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--work", type=Path, default=None, help="keep the projects here [default: a temp dir]")
    ap.add_argument("--json", type=Path, default=None, help="write every figure and answer here (after each test set)")
    return ap


def main() -> int:
    args = seed_parser(__doc__, 20).parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="persllm-stage-prompt-"))
    out = run_seeds(args, work, {"system": SYSTEM},
                    lambda seed: one_seed(work, seed, args.steps, args.learning_rate, args.max_new_tokens))
    print_tables(out, SYSTEMS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
