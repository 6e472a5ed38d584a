"""One adapter per stage against one adapter with time tokens, measured (a ceiling, not the method:
the tool trains one adapter whose time token chooses the stage).

Question it answers: with the same questions answered at every stage (--instructions), the time
token still places held-out answers at their stage about as often as chance on the embedded 135M
model. Is that the token (one adapter must learn to switch on a single embedding row), or what the
model can learn from this data at all? An adapter that only ever sees one stage needs no token to
know when it is; if it too writes answers the classifier cannot place, the limit is the model and
the data, not the token.

For each --split-seeds N, on examples/harry with the 36 instructions, as
`benchmarks/stage_fidelity.py --instructions` prepares it:

  (c)  one adapter for every stage, the time token first (today's defaults), SFT --steps at batch 2;
  (e)  the same on data tokenized with --time-token-at answer (the token right before each answer,
       out of the attention sink that the first position is on SmolLM2);
  (s)  one adapter per stage, each trained by SFT only on its stage's training records (tokenized with
       the same general records and --repeat), for --steps scaled by its share of the tokenized
       examples, so that each record is seen about as often as in (c); every question is answered by
       the adapter of the stage asked, with that stage's token.

A project, run or system's answers (build/apart/) already in --work is used as it is, so a stopped
run resumes and a (c) trained elsewhere on the same project can be placed at runs/c. Every system answers the test questions and
eval's swapped questions greedily (the decoding of `persllm eval`), scored with eval's judge-free
figures (eval/fidelity.py); a last table splits stage accuracy and "recognised" between the
instructions (the same question trained at the other stages) and the other questions.

    python benchmarks/stage_apart.py --split-seeds 0,1,2,3 [--steps 70] [--work DIR] [--json F]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from stage_fidelity import make_project, persllm, tokenize  # noqa: E402
from stage_guidance import decode  # noqa: E402
from stage_prompt import answer_record, figures_of, print_tables, run_seeds, seed_parser  # noqa: E402

SYSTEMS = ("(c)", "(e)", "(s)")
TRAIN = ["--method", "sft", "--batch-size", "2", "--grad-accum", "1"]


def lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def trained(root: Path, name: str, steps: int, lr: float, data: str) -> float:
    """Seconds to train runs/<name> on build/<data> (0 when a complete run is there already)."""
    from persllm_cli.model.runs import is_complete

    if is_complete(root / "runs" / name):
        return 0.0
    t0 = time.perf_counter()
    persllm("train", *TRAIN, "--max-steps", str(steps), "--learning-rate", str(lr), "--data", f"build/{data}",
            "--output", f"runs/{name}", cwd=root)
    return round(time.perf_counter() - t0, 1)


def by_kind(clf, items, swaps, answers: dict[str, dict]) -> dict[str, dict]:
    """Stage accuracy and "recognised" (the answers to each swapped question, at its own stage and the
    others, placed at the stage asked, as eval counts it) on the instructions and on the other questions."""
    from persllm_cli.eval.fidelity import swapped_from

    out = {}
    for kind in ("instruction", "other"):
        ids = {i.id for i in items if (i.pattern == "instruction") == (kind == "instruction")}
        test = [(i.stage, answers[i.id]) for i in items if i.id in ids]
        asked = {swapped_from(s.id) for s in swaps} & ids
        swap = [(i.stage, answers[i.id]) for i in items if i.id in asked]
        swap += [(s.stage, answers[s.id]) for s in swaps if swapped_from(s.id) in asked]
        test = [(st, r["messages"][-1]["content"]) for st, r in test if r["status"] == "ok"]
        swap = [(st, r["messages"][-1]["content"]) for st, r in swap if r["status"] == "ok"]
        right = sum(st == p for (st, _), p in zip(test, clf.predict([a for _, a in test]) if test else []))
        placed = sum(st == p for (st, _), p in zip(swap, clf.predict([a for _, a in swap]) if swap else []))
        out[kind] = {"correct": right, "answers": len(test), "recognised": placed, "swap_answers": len(swap)}
    return out


def one_seed(work: Path, seed: int, steps: int, lr: float, max_new_tokens: int) -> dict:
    from persllm_cli.core.project import load_project
    from persllm_cli.eval import fidelity
    from persllm_cli.eval.command import read_test, stage_order
    from persllm_cli.eval.items import System
    from persllm_cli.model.chat_format import prompt_ids
    from persllm_cli.model.load import load_run

    root = work / f"seed{seed}" / "harry"
    if not (root / "build" / "tokenized" / "sft.jsonl").exists():
        (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        root = make_project(work / f"seed{seed}", seed, instructions=True)
    project = load_project(root)
    labels = {s.id: s.label for s in project.stages}
    seconds = {"train (c)": trained(root, "c", steps, lr, "tokenized")}
    if not (root / "build" / "tokenized.answer" / "sft.jsonl").exists():
        tokenize(root, "--time-token-at", "answer", "-o", "build/tokenized.answer")
    seconds["train (e)"] = trained(root, "e", steps, lr, "tokenized.answer")
    everything = lines(root / "build" / "tokenized" / "sft.jsonl")
    stage_steps = {}
    by_stage: dict[str, list[str]] = {stage: [] for stage in labels}
    for line in (root / "build" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            by_stage[json.loads(line)["stage"]].append(line)
    for stage, records in by_stage.items():
        (root / "build" / f"train.{stage}.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
        if not (root / "build" / f"tokenized.{stage}" / "sft.jsonl").exists():
            tokenize(root, "--train", f"build/train.{stage}.jsonl", "-o", f"build/tokenized.{stage}")
        mine = lines(root / "build" / f"tokenized.{stage}" / "sft.jsonl")
        stage_steps[stage] = {"records": len(records), "examples": mine, "steps": max(1, round(steps * mine / everything))}
        seconds[f"train (s) {stage}"] = trained(root, f"s-{stage}", stage_steps[stage]["steps"], lr, f"tokenized.{stage}")
        print(f"seed {seed} (s) {stage}: {len(records)} records, {stage_steps[stage]['steps']} steps", file=sys.stderr, flush=True)

    items = read_test(root / "build" / "test.jsonl", None)
    order = stage_order(project, [], items)
    swaps = fidelity.swap_items(order, items, 20, 0)   # eval's default --swap-questions and --seed
    answers: dict[str, dict] = {name: {} for name in SYSTEMS}
    (root / "build" / "apart").mkdir(exist_ok=True)
    for name, runs in (("(c)", {s: "c" for s in labels}), ("(e)", {s: "e" for s in labels}),
                       ("(s)", {s: f"s-{s}" for s in labels})):
        kept = root / "build" / "apart" / f"answers.{name.strip('()')}.json"
        if kept.exists():
            answers[name] = json.loads(kept.read_text(encoding="utf-8"))
            continue
        t0 = time.perf_counter()
        for run in dict.fromkeys(runs.values()):   # one model in memory at a time
            model, tok, info = load_run(root / "runs" / run)
            for item in items + swaps:
                if runs[item.stage] == run:
                    msgs = [{"role": "user", "content": item.question}]
                    text = decode(model, tok, [prompt_ids(tok, msgs, info.stage_token(item.stage)[1])], 0.0, 0.1, max_new_tokens)
                    answers[name][item.id] = answer_record(item, text)
            del model
        kept.write_text(json.dumps(answers[name], ensure_ascii=False), encoding="utf-8")
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"seed {seed} {name}: {len(items) + len(swaps)} answers in {seconds[name]} s", file=sys.stderr, flush=True)
    systems = [System(name=n, kind="run", model=n, persona=project.name, labels=labels, dir=root / "build" / "eval")
               for n in SYSTEMS]
    basis, per, _ = fidelity.score(project, root / "build" / "train.jsonl", order, systems, items, answers)
    texts, stages, _ = fidelity.training_texts(root / "build" / "train.jsonl", order, project)
    clf = fidelity.StageClassifier().fit(texts, stages)
    kinds = {name: by_kind(clf, items, swaps, answers[name]) for name in SYSTEMS}
    questions = {i.id: {"id": i.id, "status": "ok", "messages": [{"role": "assistant", "content": i.question}]}
                 for i in items}
    kinds["questions alone"] = by_kind(clf, items, [], questions)
    return {"seed": seed, "figures": figures_of(per, answers), "references": basis["references"]["stage_accuracy"]["accuracy"],
            "kinds": kinds, "stage_steps": stage_steps, "seconds": seconds, "answers": answers}


def print_kinds(out: dict) -> None:
    from persllm_cli.eval.fidelity import above_chance

    print("\npooled, by kind of question: system | instructions: stage acc (p) / recognised | other questions: the same")
    for name in (*SYSTEMS, "questions alone"):
        cells = []
        for kind in ("instruction", "other"):
            k = [s["kinds"][name][kind] for s in out["seeds"]]
            right, n = sum(x["correct"] for x in k), sum(x["answers"] for x in k)
            placed, m = sum(x["recognised"] for x in k), sum(x["swap_answers"] for x in k)
            cell = f"{right}/{n} = {100 * right / max(n, 1):.1f}% (p {above_chance(right, n, 3):.2g})"
            if m:
                cell += f" / {placed}/{m} = {100 * placed / m:.1f}% (p {above_chance(placed, m, 3):.2g})"
            cells.append(cell)
        print(f"{name} | " + " | ".join(cells))


def main() -> int:
    args = seed_parser(__doc__, 70, "(c)'s and (e)'s SFT steps; (s) scales them by each stage's share").parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="persllm-stage-apart-"))
    out = run_seeds(args, work, {}, lambda seed: one_seed(work, seed, args.steps, args.learning_rate, args.max_new_tokens))
    print_tables(out, SYSTEMS, future_terms=True)
    print_kinds(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
