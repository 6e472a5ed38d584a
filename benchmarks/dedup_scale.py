"""Benchmark: blocked greedy dedup at 10k and 100k questions vs the plain loop.

Data: synthetic questions built from word lists (question frames x verbs x subjects x fillers), with
10 % planted near duplicates (a copy of an earlier question, as is or with one small edit).
Embeddings: TF-IDF (the default embedder), the same vectors for every method.

Methods (all give the same kept set, which is checked):
- blocked: persllm_cli.data.neardup.greedy_keep, what `persllm dedup` runs.
- per-row loop (the baseline, at 10k): for each record in order, ONE sparse matrix-vector product
  of the whole TF-IDF matrix with its row (CSR @ dense vector), then "is any similarity at a kept
  row >= threshold". Vectorised within a row, a Python loop over rows. Its work is O(n x nnz).
- pair loop (with --pair-baseline, at 10k, minutes): the rule as written, a Python loop over the kept
  records with one float64 dot product per (record, kept record) pair (neardup.greedy_keep_loop).
- cli: `persllm dedup` end to end on a JSONL file of such records (read, embed, dedup, write),
  run as a subprocess.

Each size runs in its own subprocess; peak memory is that process's maximum resident set size
(resource.getrusage), so it includes Python, NumPy, scikit-learn and the embedding, not only dedup.

    python benchmarks/dedup_scale.py [--sizes 10000 100000] [--pair-baseline]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

THRESHOLD = 0.95

SUBJECTS = ("Hogwarts Dumbledore Snape Hermione Ron Hagrid Voldemort quidditch Gryffindor Slytherin Azkaban "
            "Sirius Lupin Dobby Hogsmeade patronus Neville Luna Ginny Fred George Malfoy Umbridge McGonagall "
            "Flitwick Sprout Trelawney Myrtle Fawkes Buckbeak Hedwig Dudley Petunia Vernon Gringotts Nagini "
            "Bellatrix Wormtail Crouch Moody Cedric Cho Krum Fleur Bill Charlie Percy Arthur Molly Kingsley "
            "Tonks butterbeer horcruxes basilisk prefects exams Occlumency potions transfiguration charms "
            "divination herbology astronomy the-wand the-cloak the-stone the-locket the-diadem the-cup "
            "the-map the-hat the-forest the-lake the-tower the-library the-burrow the-ministry the-order "
            "the-tournament the-chamber the-room the-hall the-train the-cupboard the-scar the-prophecy").split()
VERBS = ("think feel remember say believe fear hope trust doubt regret admire hate love miss imagine learn "
         "teach protect lose find hide break defend forgive explain describe").split()
FRAMES = ("What do you {v} about {a} and {b}?", "How did you {v} {a} when {b} happened?",
          "Why would you {v} {a} after {b}?", "Do you still {v} {a}, given {b}?",
          "When did you first {v} {a} near {b}?", "Can you tell me how you {v} {a} with {b}?",
          "Is it true that you {v} {a} because of {b}?", "Who taught you to {v} {a} at {b}?",
          "Would you ever {v} {a} without {b}?", "What made you {v} {a} during {b}?")
FILLERS = "really honestly now then today still ever truly secretly openly always".split()
TAILS = ("Tell me honestly.", "Explain briefly.", "Be specific about {c}.", "And what about {c}?", "")


def make_questions(n: int, seed: int = 0, dup_share: float = 0.1) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < dup_share:
            words = rng.choice(out).split()
            if rng.random() < 0.5:  # one small edit; else an exact copy
                words.insert(rng.randrange(len(words) + 1), rng.choice(["so", "please", "really"]))
            out.append(" ".join(words))
            continue
        q = rng.choice(FRAMES).format(v=rng.choice(VERBS), a=rng.choice(SUBJECTS), b=rng.choice(SUBJECTS))
        words = q.split()
        if rng.random() < 0.7:
            words.insert(rng.randrange(1, len(words)), rng.choice(FILLERS))
        tail = rng.choice(TAILS).format(c=rng.choice(SUBJECTS))
        out.append(" ".join(words + ([tail] if tail else [])))
    return out


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def per_row_loop(X, threshold: float):
    """The baseline: a Python loop over records, one CSR @ vector product per record."""
    import numpy as np

    X = X.tocsr()
    n = X.shape[0]
    kept = np.zeros(n, dtype=bool)
    for i in range(n):
        row = X[i].toarray().ravel().astype(np.float64)
        sims = X @ row
        kept[i] = not (sims[kept] >= threshold).any()
    return kept


def child(n: int, baseline: bool, pair_baseline: bool) -> dict:
    import numpy as np

    from persllm_cli.data.embedding import get_embedder
    from persllm_cli.data.neardup import greedy_keep, greedy_keep_loop

    qs = make_questions(n)
    embedder = get_embedder("tfidf")  # imports scikit-learn outside the timing
    t = time.perf_counter()
    X = embedder.fit(qs).transform(qs)
    out = {"n": n, "embed_s": time.perf_counter() - t, "features": X.shape[1], "nnz": int(X.nnz),
           "rss_after_embed_mib": maxrss_mib()}
    t = time.perf_counter()
    kept = greedy_keep(X, THRESHOLD)
    out["blocked_s"] = time.perf_counter() - t
    out["kept"] = int(kept.sum())
    out["peak_rss_mib"] = maxrss_mib()
    if baseline:
        t = time.perf_counter()
        ref = per_row_loop(X, THRESHOLD)
        out["per_row_s"] = time.perf_counter() - t
        out["per_row_identical"] = bool(np.array_equal(ref, kept))
    if pair_baseline:
        t = time.perf_counter()
        ref = greedy_keep_loop(X, THRESHOLD)
        out["pair_s"] = time.perf_counter() - t
        out["pair_identical"] = bool(np.array_equal(ref, kept))
    return out


def cli_run(n: int) -> dict:
    """`persllm dedup` end to end on n records, in a subprocess; time and that process's peak RSS."""
    from persllm_cli.data.store import dumps

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        env = {"PYTHONPATH": str(REPO), "PERSLLM_HOME": str(root / "home"), "PATH": "/usr/bin:/bin", "CI": "1"}
        subprocess.run([sys.executable, "-m", "persllm_cli", "init", str(root / "p"), "--name", "Bench",
                        "--stage", "a", "--stage", "b"], env=env, check=True, capture_output=True)
        ann = root / "p" / "build" / "annotations.jsonl"
        ann.parent.mkdir(parents=True)
        with open(ann, "w", encoding="utf-8") as f:
            for i, q in enumerate(make_questions(n)):
                f.write(dumps({"id": f"r{i}", "persona": "Bench", "stage": "ab"[i % 2], "pattern": "ordinary",
                               "source": {"file": "x", "line": i, "text": ""},
                               "messages": [{"role": "user", "content": q},
                                            {"role": "assistant", "content": f"answer {i}"}],
                               "status": "ok", "error": None}) + "\n")
        code = ("import resource, runpy, sys; sys.argv = ['persllm', '-C', sys.argv[1], 'dedup'];\n"
                "try:\n    runpy.run_module('persllm_cli', run_name='__main__')\n"
                "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, str(root / "p")], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        rss = int(proc.stderr.split("MAXRSS")[-1].split()[0]) / 1024
        kept = sum(1 for _ in open(root / "p" / "build" / "dedup.jsonl", encoding="utf-8"))
        return {"cli_s": seconds, "cli_rss_mib": rss, "cli_kept": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--baseline-max", type=int, default=10_000, help="run the per-row baseline up to this size")
    ap.add_argument("--pair-baseline", action="store_true", help="also run the pair-by-pair loop (slow: minutes at 10k)")
    ap.add_argument("--no-cli", action="store_true", help="skip the end-to-end `persllm dedup` runs")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.child_baseline, args.pair_baseline)))
        return

    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n)]
        if n <= args.baseline_max:
            cmd.append("--child-baseline")
            if args.pair_baseline:
                cmd.append("--pair-baseline")
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        if not args.no_cli:
            r.update(cli_run(n))
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)

    def cell(r: dict, key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[key]) if key in r else "-"

    head = ["records", "kept", "embed s", "blocked s", "peak RSS MiB", "per-row loop s", "ratio", "same",
            "pair loop s", "ratio", "same", "cli s", "cli RSS MiB"]
    lines = []
    for r in rows:
        lines.append([f"{r['n']:,}", f"{r['kept']:,}", cell(r, "embed_s"), cell(r, "blocked_s", "{:.3f}"),
                      cell(r, "peak_rss_mib", "{:.0f}"), cell(r, "per_row_s"),
                      f"{r['per_row_s'] / r['blocked_s']:.0f}x" if "per_row_s" in r else "-",
                      str(r.get("per_row_identical", "-")), cell(r, "pair_s", "{:.1f}"),
                      f"{r['pair_s'] / r['blocked_s']:.0f}x" if "pair_s" in r else "-",
                      str(r.get("pair_identical", "-")), cell(r, "cli_s"), cell(r, "cli_rss_mib", "{:.0f}")])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print(f"dedup, TF-IDF, threshold {THRESHOLD} (ratio = baseline seconds / blocked seconds)")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for l in lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))


if __name__ == "__main__":
    main()
