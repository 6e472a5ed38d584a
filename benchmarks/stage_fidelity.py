"""Stage fidelity on the example persona: does the model answer as Harry was *at the stage asked*?

One run, on examples/harry's 66 hand-written records (dedup, split --seed 0 or --split-seed, dpo, tokenize as
`make demo` does, without the local annotation), measures with `persllm eval`'s judge-free
figures (eval/fidelity.py: stage accuracy of a classifier against chance, the stage-swap share of
questions answered differently at different stages, and how often those answers are placed at the
stage asked):

  (a) base+prompt  the untrained embedded model told who and when it is (eval's prompted baseline,
                   templates/eval/baseline_system.txt), answering through the local backend;
  (b) mean rows    training as before this change: every time-token row starts as the shared mean
                   and learns at the LoRA rate (--time-token-init mean --time-token-learning-rate LR);
  (c) stage rows   the new start (each stage's meaning) and the rows' own rate (the defaults, or
                   --row-lr);
  (d) + contrast   (c) with the stage contrast (--stage-contrast WEIGHT), with --contrast WEIGHT;
  (e) at answer    (c) on data tokenized with --time-token-at answer (the stage token right before
                   each answer instead of first), with --systems ...,e;

(b), (c), (d) and (e) at equal steps, at each of --steps; --sweep adds (c) with other row rates at
--sweep-steps (how the default was chosen); --split-seed N draws another test set (a replicate
on the same records); --marked is a control in which every answer opens with its stage's phrase;
--instructions adds the example's 36 instructions answered at every stage (instructions.sample.jsonl,
kept by dedup --within-stage), questions whose stage only the time token can tell.
Every system answers the same test questions and swapped questions greedily (temperature 0),
--max-new-tokens each. Prints a table, and with --json writes every figure (rewritten after each
system, so a run cut short keeps what it has).

    python benchmarks/stage_fidelity.py [--steps 10,20,40] [--method sft] [--contrast 5] [--sweep 2e-3,5e-2 --sweep-steps 20] [--split-seed 1] [--marked]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL_ACCURACY = 2.0   # x chance
GOAL_DIFFER = 80.0    # % of swapped questions answered differently


def persllm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "persllm_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode not in (0, 3):
        raise SystemExit(f"persllm {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


# --marked: every answer opens with its stage's phrase, in the training and the test records alike. A
# control, not the persona: a difference between stages that a 135M model can learn in a few steps,
# so it shows whether the time token can carry a stage at all when the content cannot.
MARKS = {"early": "Gosh! ", "middle": "Honestly? ", "late": "Looking back: "}
MARKED = "marked.txt"   # in build/: this project is the control


def mark(path: Path) -> None:
    """Open each record's answers with its stage's phrase (MARKS), in place."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        for m in r["messages"]:
            if m["role"] == "assistant":
                m["content"] = MARKS[r["stage"]] + m["content"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_project(work: Path, split_seed: int = 0, marked: bool = False, instructions: bool = False,
                 base: str = "smollm2-135m") -> Path:
    root = work / "harry"
    persllm("init", str(root), "--example", "harry", cwd=work)
    (root / "build").mkdir()
    sample = (root / "annotations.sample.jsonl").read_bytes()
    if instructions:   # the 36 instructions answered at every stage, as annotate --instructions writes them
        sample += (root / "instructions.sample.jsonl").read_bytes()
    (root / "build" / "annotations.jsonl").write_bytes(sample)
    persllm("dedup", *(["--within-stage"] if instructions else []), cwd=root)
    persllm("split", "--test-size", "0.2", "--seed", str(split_seed), cwd=root)
    if marked:
        mark(root / "build" / "train.jsonl")
        mark(root / "build" / "test.jsonl")
        (root / "build" / MARKED).write_text("every answer opens with its stage's phrase (MARKS)\n")
    persllm("dpo", "--skip", "1", cwd=root)
    tokenize(root, base=base)
    return root


def tokenize(root: Path, *extra: str, base: str = "smollm2-135m") -> None:
    """`persllm tokenize` as `make demo` runs it (the general records, --repeat 2), plus `extra`."""
    persllm("tokenize", "--base", base, "--time-tokens", "3", "--general", "general.jsonl", "--repeat", "2",
            "--max-length", "512", *extra, cwd=root)


def base_with_prompt(root: Path, max_new_tokens: int, base: str = "smollm2-135m") -> dict:
    """(a): the untrained model, prompted as eval's --api-model baseline is, scored like a run."""
    from persllm_cli.core.project import load_project
    from persllm_cli.eval import fidelity
    from persllm_cli.eval.command import read_test, stage_order
    from persllm_cli.eval.items import System
    from persllm_cli.llm.registry import make_backend
    from persllm_cli.model.generate import Sampling
    from persllm_cli.persona.api import ApiSpeaker

    project = load_project(root)
    items = read_test(root / "build" / "test.jsonl", None)
    order = stage_order(project, [], items)
    swaps = fidelity.swap_items(order, items, 20, 0)   # eval's default --swap-questions and --seed
    speaker = ApiSpeaker(make_backend("local", base), project.name, project.description,
                         [(s.id, s.label) for s in project.stages], Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    t0 = time.perf_counter()
    answers = {}
    for item in items + swaps:
        text = speaker.answer_batch([[{"role": "user", "content": item.question}]], item.stage)[0]
        answers[item.id] = {"id": item.id, "status": "ok" if text else "failed",
                            "messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": text or ""}]}
    system = System(name="base+prompt", kind="api", model=base, persona=project.name,
                    labels={s.id: s.label for s in project.stages}, dir=root / "build" / "eval")
    basis, per, _ = fidelity.score(project, root / "build" / "train.jsonl", order, [system], items, {system.name: answers})
    return {"fidelity": per[system.name], "references": basis["references"], "questions": basis["questions"],
            "answered": sum(1 for a in answers.values() if a["status"] == "ok"), "asked": len(answers),
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def trained(root: Path, name: str, steps: int, method: str, max_new_tokens: int, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    persllm("train", "--method", method, "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "1",
            "--output", f"runs/{name}", *extra, cwd=root)
    t1 = time.perf_counter()
    r = persllm("eval", f"runs/{name}", "--max-new-tokens", str(max_new_tokens), "--json", cwd=root)
    data = json.loads(r.stdout)
    system = data["systems"][name]
    asked = system["answered"] + system["unanswered"]
    return {"fidelity": system.get("fidelity"), "references": data["fidelity"].get("references"),
            "questions": data["fidelity"].get("questions"),
            "answered": system["answered"], "asked": asked, "train_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1), "settings": extra,
            "marks": marks_right(root / "runs" / name / "eval" / "answers.jsonl") if (root / "build" / MARKED).exists() else None}


def marks_right(answers: Path) -> dict:
    """--marked: how many answers (test and swapped) open with the phrase of the stage they were asked at,
    and how many with another stage's."""
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines() if line.strip()]
    opens = [next((st for st, m in MARKS.items() if r["messages"][-1]["content"].startswith(m.strip())), None) for r in rows]
    return {"answers": len(rows), "own": sum(1 for r, o in zip(rows, opens) if o == r["stage"]),
            "other": sum(1 for r, o in zip(rows, opens) if o is not None and o != r["stage"])}


def row(label: str, steps: int | str, res: dict) -> list[str]:
    f = res.get("fidelity") or {}
    acc = (f.get("stage_accuracy") or {})
    sw = f.get("swap") or {}
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    ratio = acc.get("accuracy") / acc["chance"] if acc.get("accuracy") is not None and acc.get("chance") else None
    p = acc.get("p_chance")
    return [label, str(steps), fmt(acc.get("accuracy")), fmt(acc.get("chance")), "-" if ratio is None else f"{ratio:.2f}x",
            "-" if p is None else f"{p:.2g}",
            fmt(sw.get("differ")), fmt(sw.get("recognised")), fmt((f.get("leak") or {}).get("rate")),
            f"{res['marks']['own']}/{res['marks']['other']}/{res['marks']['answers']}" if res.get("marks") else "-",
            f"{res.get('answered')}/{res.get('asked')}", str(res.get("train_seconds", "-"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="10,20,40", help="step counts for (b) and (c), comma-separated")
    ap.add_argument("--method", default="sft", choices=("sft", "sft+dpo"))
    ap.add_argument("--row-lr", type=float, default=None, help="(c)'s row rate [default: the setting's default]")
    ap.add_argument("--learning-rate", type=float, default=2e-4,
                    help="the LoRA rate of (b) and (c); (b)'s rows learn at it too, as before")
    ap.add_argument("--contrast", type=float, default=0.0, help="add (d): (c) with --stage-contrast WEIGHT [default: leave it out]")
    ap.add_argument("--sweep", default="", help="more row rates for (c), at --sweep-steps")
    ap.add_argument("--sweep-steps", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--split-seed", type=int, default=0,
                    help="split's --seed: another test set and training set from the same records (a replicate)")
    ap.add_argument("--marked", action="store_true", help="a control: every answer opens with its stage's phrase "
                    "(MARKS), so the stages differ in a way a small model can learn")
    ap.add_argument("--instructions", action="store_true", help="add examples/harry/instructions.sample.jsonl: the same 36 "
                    "instructions answered at every stage, so the question no longer tells the stage (dedup --within-stage)")
    ap.add_argument("--base", default="smollm2-135m", help="the base model, as tokenize --base takes it: for a GPU run, a "
                    "local model directory (the commands run offline) [default: the embedded smollm2-135m]")
    ap.add_argument("--skip-base", action="store_true", help="leave out (a)")
    ap.add_argument("--systems", default="b,c,d", help="which of the trained systems (b), (c), (d), (e) to run at each of "
                    "--steps [default: b,c,d; (d) only with --contrast]")
    ap.add_argument("--work", type=Path, default=None, help="keep the project here [default: a temp dir]")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from persllm_cli.train.settings import TrainSettings

    row_lr = args.row_lr or TrainSettings.__dataclass_fields__["time_token_learning_rate"].default
    work = args.work or Path(tempfile.mkdtemp(prefix="persllm-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(), "method": args.method,
                 "max_new_tokens": args.max_new_tokens, "row_lr": row_lr, "contrast": args.contrast, "learning_rate": args.learning_rate,
                 "split_seed": args.split_seed, "marked": args.marked, "instructions": args.instructions, "base": args.base,
                 "results": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")

    t0 = time.perf_counter()
    systems = {x.strip() for x in args.systems.split(",") if x.strip()}
    root = make_project(work, args.split_seed, args.marked, args.instructions, args.base)
    if "e" in systems:
        tokenize(root, "--time-token-at", "answer", "-o", "build/tokenized.answer", base=args.base)
    print(f"project: {root}", file=sys.stderr)
    plan: list[tuple[str, int | str, object]] = []
    lora = ["--learning-rate", str(args.learning_rate)]
    if not args.skip_base:
        plan.append(("(a) base+prompt", "-", lambda: base_with_prompt(root, args.max_new_tokens, args.base)))
    for n in [int(x) for x in args.steps.split(",") if x.strip()]:
        if "b" in systems:
            plan.append(("(b) mean rows, LoRA rate", n, lambda n=n: trained(
                root, f"b{n}", n, args.method, args.max_new_tokens,
                [*lora, "--time-token-init", "mean", "--time-token-learning-rate", str(args.learning_rate)])))
        if "c" in systems:
            plan.append((f"(c) stage rows, row rate {row_lr:g}", n, lambda n=n: trained(
                root, f"c{n}", n, args.method, args.max_new_tokens, [*lora, "--time-token-learning-rate", str(row_lr)])))
        if "e" in systems:
            plan.append(("(e) (c), token at the answer", n, lambda n=n: trained(
                root, f"e{n}", n, args.method, args.max_new_tokens,
                [*lora, "--time-token-learning-rate", str(row_lr), "--data", "build/tokenized.answer"])))
        if args.contrast > 0 and "d" in systems:
            plan.append((f"(d) (c) + stage contrast {args.contrast:g}", n, lambda n=n: trained(
                root, f"d{n}", n, args.method, args.max_new_tokens,
                [*lora, "--time-token-learning-rate", str(row_lr), "--stage-contrast", str(args.contrast)])))
    for lr in [float(x) for x in args.sweep.split(",") if x.strip()]:
        plan.append((f"(c) stage rows, row rate {lr:g}", args.sweep_steps, lambda lr=lr: trained(
            root, f"c{args.sweep_steps}-lr{lr:g}", args.sweep_steps, args.method, args.max_new_tokens,
            [*lora, "--time-token-learning-rate", str(lr)])))
    table = []
    for label, steps, job in plan:
        print(f"... {label} at {steps} steps (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        res = job()
        out["results"].append({"system": label, "steps": steps, **res})
        table.append(row(label, steps, res))
        save()
    out["load_end"] = os.getloadavg()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    save()

    head = ["system", "steps", "stage acc %", "chance %", "x chance", "p (chance)", "swap differ %", "swap recognised %",
            "future terms %", "own/other mark", "answered", "train s"]
    widths = [max(len(h), *(len(r[k]) for r in table)) for k, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    ref = next((r["references"] for r in out["results"] if r.get("references")), None)
    if ref:
        print(f"references (the test set's own answers): stage accuracy {ref['stage_accuracy']['accuracy']:.1f}%, "
              f"future terms {(ref.get('leak') or {}).get('rate', 0):.1f}%")
    questions = next((r["questions"] for r in out["results"] if r.get("questions")), None)
    if questions:
        print(f"questions (what answers that only repeat them would score): stage accuracy "
              f"{questions['stage_accuracy']['accuracy']:.1f}%")
    print(f"goal: (c) >= {GOAL_ACCURACY:g}x chance and >= {GOAL_DIFFER:g}% of swapped questions answered differently, "
          f"where (b) is at chance. load average {out['load_start'][0]:.1f} -> {out['load_end'][0]:.1f}; {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
