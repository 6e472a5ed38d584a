"""Does the stage token choose the stage's own opening? Scored without decoding, on `--marked` runs.

In `benchmarks/stage_fidelity.py --marked` every answer opens with its stage's phrase (MARKS). For
each test question asked at each stage, this scores the three phrases as the answer's opening under
the run's own prompt (teacher-forced log-likelihood, the stage token where the run's tokenizer puts
it) and counts how often the stage's own phrase is the likeliest: 100% when the token decides the
opening, and the same choice at every stage (a third, with three stages) when only the question
does. Greedy answers (stage_fidelity's "own/other mark") show the same less directly: there the
model may open with no phrase at all.

    python benchmarks/stage_fidelity.py --marked --steps 100 --learning-rate 1e-3 --skip-base --systems c,e --work /tmp/mk
    python benchmarks/stage_marks.py /tmp/mk/harry c100 e100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from stage_fidelity import MARKS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project", type=Path, help="a project stage_fidelity.py --marked made (its build/test.jsonl is marked)")
    ap.add_argument("runs", nargs="+", help="run names under runs/")
    args = ap.parse_args()

    import torch

    from persllm_cli.core.project import load_project
    from persllm_cli.model.chat_format import prompt_ids, time_token_at
    from persllm_cli.model.load import load_run

    project = load_project(args.project)
    order = [s.id for s in project.stages]
    test = [json.loads(x) for x in (args.project / "build" / "test.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    print("run | token at | own phrase likeliest | mean margin (nats) | chosen, by stage asked (rows) and phrase (columns)")
    for name in args.runs:
        model, tok, info = load_run(args.project / "runs" / name)
        marks = {s: tok(MARKS[s].strip(), add_special_tokens=False)["input_ids"] for s in order}
        matrix = [[0] * len(order) for _ in order]
        margins = []
        with torch.inference_mode():
            for r in test:
                question = [{"role": "user", "content": r["messages"][0]["content"]}]
                for si, s in enumerate(order):
                    p = prompt_ids(tok, question, info.stage_token(s)[1])
                    scores = []
                    for t in order:
                        lp = torch.log_softmax(model(input_ids=torch.tensor([p + marks[t]])).logits[0, len(p) - 1:-1].float(), -1)
                        scores.append(float(sum(lp[k, marks[t][k]] for k in range(len(marks[t])))))
                    matrix[si][max(range(len(order)), key=scores.__getitem__)] += 1
                    margins.append(scores[si] - max(scores[k] for k in range(len(order)) if k != si))
        own = sum(matrix[k][k] for k in range(len(order)))
        print(f"{name} | {time_token_at(tok)} | {own}/{len(margins)} ({100 * own / len(margins):.1f}%) | "
              f"{sum(margins) / len(margins):.2f} | {matrix}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
