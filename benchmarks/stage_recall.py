"""The stage's own material recalled into the prompt, measured (a prototype: the tool answers from the
trained weights and the time token only, as the method describes).

Question it answers: stage accuracy stays near 1.4x chance on the example persona because the test
questions come from paragraphs held out of training, so the 135M model has learnt nothing about
them at any stage. If the persona is shown what it would remember by the stage asked (the training
split's source paragraphs most like the question, from that stage and the ones before it, never a
later one and never a test paragraph), does it answer as that stage?

For each --split-seeds N, on examples/harry as `benchmarks/stage_fidelity.py` prepares it:

  (c)    stage rows at the row rate (today's defaults), trained --steps, asked as `persllm eval` asks;
  (c+r)  the same run, with a system message holding the --top paragraphs recalled up to the stage
         asked;
  (c+r=) the same, recalled from the stage asked only;
  (a+r)  the untrained embedded model, told who and when it is (eval's prompted baseline,
         templates/eval/baseline_system.txt) and given the same paragraphs as (c+r).

Recall: TF-IDF over character 3-5-grams within word bounds (any language), cosine similarity to the
question. Every system answers the test questions and eval's swapped questions greedily (the
decoding of `persllm eval`), scored with eval's judge-free figures (eval/fidelity.py). The last
table pools the test sets, with a 95% interval and p against chance.

    python benchmarks/stage_recall.py --split-seeds 0,1,2,3 [--steps 100] [--top 2] [--work DIR] [--json F]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from string import Template

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from stage_fidelity import make_project, persllm  # noqa: E402
from stage_guidance import decode  # noqa: E402
from stage_prompt import answer_record, figures_of, print_tables, run_seeds, seed_parser  # noqa: E402

SYSTEMS = ("(c)", "(c+r)", "(c+r=)", "(a+r)")
RECALL = "What you remember, in your own words:\n\n{paragraphs}\n\nAnswer from what you remember."


def source_text(record: dict) -> str:
    """The seed paragraph a record was written from ("" when it names none)."""
    return ((record.get("source") or {}).get("text") or "").strip()


class Recall:
    """The training split's source paragraphs, by stage; `top(question, stages, k)` the k most like
    the question among those of `stages`."""

    def __init__(self, train: Path, held_out: set[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        from persllm_cli.data import store

        seen: dict[str, str] = {}
        for r in store.read_records(train, what="training records"):
            text = source_text(r)
            if text and text not in held_out:
                seen.setdefault(text, r["stage"])
        self.texts, self.stages = list(seen), list(seen.values())
        self.vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)
        self.matrix = self.vec.fit_transform(self.texts)

    def top(self, question: str, stages: set[str], k: int) -> list[str]:
        sims = (self.matrix @ self.vec.transform([question]).T).toarray().ravel()
        ranked = sorted((i for i, s in enumerate(self.stages) if s in stages), key=lambda i: -sims[i])
        return [self.texts[i] for i in ranked[:k]]


def one_seed(work: Path, seed: int, steps: int, lr: float, k: int, max_new_tokens: int) -> dict:
    from persllm_cli.core.project import load_project
    from persllm_cli.data import store
    from persllm_cli.eval import fidelity
    from persllm_cli.eval.command import read_test, stage_order
    from persllm_cli.eval.items import System
    from persllm_cli.model.bases import load_base, resolve_base
    from persllm_cli.model.chat_format import load_tokenizer, prompt_ids
    from persllm_cli.model.load import load_run

    (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    root = make_project(work / f"seed{seed}", seed)
    project = load_project(root)
    labels = {s.id: s.label for s in project.stages}
    seconds = {}
    t0 = time.perf_counter()
    persllm("train", "--method", "sft", "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "1",
            "--learning-rate", str(lr), "--output", "runs/c", cwd=root)
    seconds["train (c)"] = round(time.perf_counter() - t0, 1)

    items = read_test(root / "build" / "test.jsonl", None)
    test_sources = {source_text(r) for r in store.read_records(root / "build" / "test.jsonl", what="test records")}
    recall = Recall(root / "build" / "train.jsonl", test_sources)
    order = stage_order(project, [], items)
    swaps = fidelity.swap_items(order, items, 20, 0)   # eval's default --swap-questions and --seed
    baseline = Template((REPO / "templates" / "eval" / "baseline_system.txt").read_text(encoding="utf-8"))

    def recalled(item, only_own: bool) -> str:
        upto = {item.stage} if only_own else set(order[:order.index(item.stage) + 1])
        return RECALL.format(paragraphs="\n\n".join(recall.top(item.question, upto, k)))

    answers: dict[str, dict] = {}
    shown: dict[str, str] = {}
    model, tok, info = load_run(root / "runs" / "c")
    for name in SYSTEMS:
        if name == "(a+r)":   # the last system: the untrained model takes the run's place
            base = resolve_base("smollm2-135m")
            model, tok, info = load_base(base).eval(), load_tokenizer(base), None
        t0 = time.perf_counter()
        answers[name] = {}
        for item in items + swaps:
            msgs = [{"role": "user", "content": item.question}]
            if name == "(a+r)":
                who = baseline.safe_substitute(persona=project.name, description=project.description,
                                               stage_label=labels[item.stage])
                msgs.insert(0, {"role": "system", "content": who + "\n\n" + recalled(item, False)})
                token = None
            else:
                if name != "(c)":
                    msgs.insert(0, {"role": "system", "content": recalled(item, name == "(c+r=)")})
                token = info.stage_token(item.stage)[1]
            if name == "(c+r)":
                shown[item.id] = msgs[0]["content"]
            text = decode(model, tok, [prompt_ids(tok, msgs, token)], 0.0, 0.1, max_new_tokens)
            answers[name][item.id] = answer_record(item, text)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"seed {seed} {name}: {len(items) + len(swaps)} answers in {seconds[name]} s", file=sys.stderr, flush=True)
    systems = [System(name=n, kind="run", model="c", persona=project.name, labels=labels, dir=root / "build" / "eval")
               for n in SYSTEMS]
    basis, per, _ = fidelity.score(project, root / "build" / "train.jsonl", order, systems, items, answers)
    return {"seed": seed, "figures": figures_of(per, answers), "references": basis["references"]["stage_accuracy"]["accuracy"],
            "seconds": seconds, "answers": answers, "recalled": shown}


def main() -> int:
    ap = seed_parser(__doc__, 100)
    ap.add_argument("--top", type=int, default=2, help="paragraphs recalled per question")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="persllm-stage-recall-"))
    out = run_seeds(args, work, {"top": args.top, "recall": RECALL},
                    lambda seed: one_seed(work, seed, args.steps, args.learning_rate, args.top, args.max_new_tokens))
    print_tables(out, SYSTEMS, future_terms=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
