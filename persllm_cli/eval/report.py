"""Scores and reports of `persllm eval`: the metrics per system, the stderr table, `--json`,
eval.md, eval.json and the eval.png bar chart (systems side by side, one colour per system)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.data import metrics
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.core.settings import public_settings
from persllm_cli.eval.protocols import PROTOCOLS
from persllm_cli.eval import fidelity

# (label, path in a system's result)
ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("BLEU intra (same stage)", ("distinction", "intra")),
    ("BLEU cross-stage", ("distinction", "cross_stage")),
    ("BLEU cross-persona", ("distinction", "cross_persona")),
    ("BLEU vs reference", ("reference", "bleu")),
    ("ROUGE-L vs reference", ("reference", "rouge_l")),
]
# The judge's rows, each protocol's in the order of the table (eval/protocols.py).
JUDGE_ROWS: list[tuple[str, tuple[str, ...]]] = [(r.label, ("judge", r.key)) for p in PROTOCOLS for r in p.rows]


def _charted(panel: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.label, ("judge", r.key)) for p in PROTOCOLS for r in p.rows if r.chart == panel]


def score(systems, items, answers: dict[str, dict[str, records.Record]], pools: dict[str, list[str]], s) -> dict[str, Any]:
    """Distinction and reference overlap for every system (see metrics.py for the definitions)."""
    ok = {name: {i: r for i, r in got.items() if r.get("status") == "ok"} for name, got in answers.items()}
    texts = [i.reference for i in items] + [records.answer(r) for got in ok.values() for r in got.values()]
    texts += [a for answers_ in pools.values() for a in answers_]
    tok_name = metrics.choose_tokenize(texts) if s.tokenize == "auto" else s.tokenize
    tok = metrics.tokenizer(tok_name)
    cache: dict[str, list[str]] = {}

    def toks(text: str) -> list[str]:
        if text not in cache:
            cache[text] = tok(text)
        return cache[text]

    def by_stage(system) -> dict[str, list[list[str]]]:
        out: dict[str, list[list[str]]] = defaultdict(list)
        for i in items:
            r = ok[system.name].get(i.id)
            if r:
                out[i.stage].append(toks(records.answer(r)))
        order = list(system.labels)
        return {st: out[st] for st in sorted(out, key=lambda x: order.index(x) if x in order else len(order))}

    result: dict[str, Any] = {
        "test": str(s.test), "items": len(items), "tokenize": tok_name, "max_pairs": s.max_pairs, "seed": s.seed,
        "pools": {p: len(a) for p, a in pools.items()}, "systems": {}, "judge": None,
    }
    for system in systems:
        others: dict[str, list[list[str]]] = defaultdict(list)
        for persona, answers_ in pools.items():
            if persona != system.persona:
                others[persona].extend(toks(a) for a in answers_)
        for other in systems:
            if other.persona != system.persona:
                others[other.persona].extend(toks(records.answer(r)) for r in ok[other.name].values())
        hyps, refs, stage_pairs = [], [], defaultdict(lambda: ([], []))
        for i in items:
            r = ok[system.name].get(i.id)
            if r:
                h, ref = toks(records.answer(r)), toks(i.reference)
                hyps.append(h)
                refs.append(ref)
                stage_pairs[i.stage][0].append(h)
                stage_pairs[i.stage][1].append(ref)
        reference = metrics.reference_overlap(hyps, refs)
        reference["by_stage"] = {st: metrics.reference_overlap(h, r) for st, (h, r) in stage_pairs.items()}
        result["systems"][system.name] = {
            "kind": system.kind, "model": system.model, "persona": system.persona,
            "answers": str(system.answers_path),
            "answered": len(ok[system.name]), "unanswered": len(items) - len(ok[system.name]),
            "distinction": metrics.distinction(by_stage(system), dict(others), cap=s.max_pairs, seed=s.seed),
            "reference": reference,
            "judge": None,
        }
    return result


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def rows(result: dict[str, Any]) -> list[list[str]]:
    systems = result["systems"]
    out = [["answered"] + [f"{v['answered']}/{result['items']}" for v in systems.values()]]
    wanted = ROWS + (fidelity.ROWS if _fidelity_measured(result) else []) + (JUDGE_ROWS if result.get("judge") else [])
    for label, path in wanted:
        out.append([label] + [_fmt(_get(v, path)) for v in systems.values()])
    return out


def _fidelity_measured(result: dict[str, Any]) -> bool:
    return bool(result.get("fidelity")) and not result["fidelity"].get("skipped")


def markdown(result: dict[str, Any]) -> str:
    names = list(result["systems"])
    lines = ["# persllm eval", "",
             f"Test set: `{result['test']}` ({result['items']} questions). BLEU tokenizer: `{result['tokenize']}`. "
             f"Pairs per group: at most {result['max_pairs']} (seed {result['seed']}).", ""]
    if result["pools"]:
        lines += ["Other personas from --pool: " + ", ".join(f"{p} ({n} answers)" for p, n in result["pools"].items()), ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    lines += ["", "![metrics](eval.png)", "", *fidelity.markdown(result), "## Reference overlap by stage", "",
              "| system | stage | items | BLEU | ROUGE-L |", "|---|---|---:|---:|---:|"]
    for name, v in result["systems"].items():
        for st, ov in v["reference"]["by_stage"].items():
            lines.append(f"| {name} | {st} | {ov['items']} | {_fmt(ov['bleu'])} | {_fmt(ov['rouge_l'])} |")
    lines += ["", "## How to read this", "",
              "- Distinction (sentence BLEU between two answers of the same system, mean of both directions):"
              " *intra* pairs answers of one stage, *cross-stage* answers of two different stages, *cross-persona*"
              " this system's answers with another persona's (other runs or `--pool` files). Each is the mean over"
              " its groups (stages, stage pairs, personas). A persona that stays itself and in its time has"
              " intra > cross-stage > cross-persona.",
              "- Reference overlap: corpus BLEU and mean ROUGE-L F1 (0-100) of the answers against the test set's answers."]
    if _fidelity_measured(result):
        lines.append(fidelity.HOW_TO_READ)
    if result.get("judge"):
        j = result["judge"]
        leak_rows = [(name, st, v["judge"]["leak_by_stage"][st]) for name, v in result["systems"].items()
                     if v.get("judge") for st in v["judge"].get("leak_by_stage") or {}]
        if leak_rows:
            insert = ["## Time leakage by stage", "",
                      "Questions about later stages, asked at the stage shown; the share of answers that reveal the later knowledge.", "",
                      "| system | asked at stage | questions | leaked | leak % |", "|---|---|---:|---:|---:|"]
            insert += [f"| {name} | {st} | {v['items']} | {v['leaked']} | {_fmt(float(v['rate']))} |" for name, st, v in leak_rows]
            at = lines.index("## How to read this")
            lines[at:at] = insert + [""]
        bare_rows = [(name, st, v["judge"]["leak_by_stage"].get(st), b) for name, v in result["systems"].items()
                     if v.get("judge") for st, b in (v["judge"].get("leak_notoken_by_stage") or {}).items()]
        if bare_rows:
            insert = ["## Time tokens against no token", "",
                      "The same questions about later stages, answered by the trained run with the stage's token"
                      " and with no stage token at all, each judged against the stage shown. Lower with the token"
                      " than without means the tokens keep the future out.", "",
                      "| system | asked at stage | questions | leak % with token | leak % no token | difference |",
                      "|---|---|---:|---:|---:|---:|"]
            for name, st, w, b in bare_rows:
                with_rate = None if w is None else float(w["rate"])
                diff = None if with_rate is None else float(b["rate"]) - with_rate
                insert.append(f"| {name} | {st} | {b['items']} | {_fmt(with_rate)} | {_fmt(float(b['rate']))} |"
                              f" {'-' if diff is None else f'{diff:+.2f}'} |")
            at = lines.index("## How to read this")
            lines[at:at] = insert + [""]
        classes = j.get("classes") or {}
        cost = "unknown price" if j["cost_usd"] is None else f"${j['cost_usd']:.4f}"
        lines += ["- Judge: each answer was compared with the reference twice, in both orders; a win needs both"
                  " orders to prefer the system's answer. Preference 50 means on a par with the references.",
                  "- Knowledge and attitude (the PersLLM paper's protocols): the judge sorted the test items into"
                  f" knowledge ({classes.get('knowledge', 0)}), attitude ({classes.get('attitude', 0)}) and neither"
                  f" ({classes.get('neither', 0)}). Knowledge answers get a 0-5 score of how much of the reference's"
                  " knowledge they carry. Attitude answers of all systems are ranked together on attitude and"
                  " speaking style, shown in a shuffled order per item (ties share a rank; 1 is best; needs two or"
                  f" more systems; {j.get('ranked_items', 0)} item(s) ranked).",
                  f"- Time leakage: {j.get('leak_questions', 0)} question(s) from later stages' test items were asked"
                  " at an earlier stage; the judge says whether the answer reveals the later knowledge. Lower is"
                  " better: the time tokens keep the future out."
                  + (f" A trained run also answered {j['leak_notoken_questions']} of these question(s) with no stage"
                     " token, judged against the same stages: the leak rate the tokens are compared with"
                     " (difference = no token - with token; positive means the tokens help)."
                     if j.get("leak_notoken_questions") else ""),
                  "- False premise rejected: the share of `error`-pattern items whose answer rejected the premise.",
                  f"- Judge `{j['model']}`: {j['requests']} requests, {j['prompt_tokens']} prompt and"
                  f" {j['completion_tokens']} completion tokens, {cost}."]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: distinction BLEU on the left, overlap and judge shares (0-100) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["systems"])
    panels = [("Distinction (BLEU)", ROWS[:3]),
              ("Against the references (0-100)", ROWS[3:] + (_charted("share") if result.get("judge") else []))]
    if _fidelity_measured(result):
        panels.append(("Stage fidelity (%)", fidelity.ROWS))
    if result.get("judge"):
        panels.append(("Judge scores", _charted("score")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    width = 0.8 / max(1, len(names))
    for ax, (title, wanted) in zip(axes, panels):
        for k, name in enumerate(names):
            vals = [_get(result["systems"][name], p) or 0.0 for _, p in wanted]
            xs = [x + (k - (len(names) - 1) / 2) * width for x in range(len(wanted))]
            raw = [_get(result["systems"][name], p) for _, p in wanted]
            bars = ax.bar(xs, vals, width, label=name)
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.1f}" for v in raw], fontsize=7, padding=2)
        ax.set_xticks(range(len(wanted)), [label.replace(" vs reference", "").replace(" (same stage)", "")
                                           for label, _ in wanted], rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".eval.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        store.plain_modes(Path(tmp))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write(report_dir: Path, result: dict[str, Any], s) -> None:
    """The table on stderr, eval.json / eval.md / eval.png in `report_dir`, JSON on stdout with --json."""
    store.make_dirs(report_dir)
    result["report"] = str(report_dir)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    store.write_text_atomic(report_dir / "eval.json", text + "\n")
    store.write_text_atomic(report_dir / "eval.md", markdown(result))
    chart(result, report_dir / "eval.png")
    sidecars.write_meta(report_dir / "eval.json", command="eval", settings=public_settings(s), inputs=[s.test, s.train, *s.pool],
                       counts={"items": result["items"], "systems": len(result["systems"])}, seconds=result.get("seconds"))
    console.table("persllm eval", ["metric", *result["systems"]], rows(result))
    if _fidelity_measured(result):
        console.note(fidelity.bounds(result["fidelity"]))
    console.note(f"report: {report_dir / 'eval.md'}")
    if s.json_output:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
