"""`persllm train --adapter-per-stage`: one LoRA adapter per stage, each trained only on its own
stage's examples (and the general ones), on one base; generation picks the adapter of the stage asked.

With one adapter for every stage, the time token alone must switch the model between stages, and on
small models it barely does (benchmarks/RESULTS.md, "one adapter per stage"); an adapter that only
ever saw one stage needs no token to know when it is.

Layout: runs/NAME/ holds run.json (with "stage_runs": {stage id: "stages/<id>"}), README.md and
stages/<id>/, each an ordinary complete run (adapter/, tokenizer/, run.json ...) that `chat`, `eval`
or `export` also take on its own. Each stage trains as `train` would, on a copy of the tokenized
data holding that stage's persona examples and every general example (runs/NAME/.data/<id>/, removed
once every stage is done). `--max-steps N` gives each stage N times its share of the examples (so each
example is seen about as often as in one adapter trained N steps); `--epochs` applies to each stage.
`--resume` skips the stages already complete and continues the one that stopped. With `--gpus N` or
`--nproc N` each stage is launched under torchrun in turn (train's own relaunch).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from persllm_cli.core import console
from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data import store
from persllm_cli.model import runs
from persllm_cli.train.settings import TrainSettings

STAGES_DIR = "stages"
DATA_DIR = ".data"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclasses.dataclass
class Tokenized:
    """A tokenized directory's lines, read and parsed once: each SFT example as (its stage, whether it
    is general, the line), each preference pair as (its stage, the line)."""

    path: Path
    examples: list[tuple[str | None, bool, str]]
    pairs: list[tuple[str | None, str]]

    @classmethod
    def read(cls, data: Path) -> "Tokenized":
        examples = []
        for line in _lines(data / "sft.jsonl"):
            r = json.loads(line)
            examples.append((r.get("stage"), r.get("source") == "general", line))
        return cls(data, examples, [(json.loads(line).get("stage"), line) for line in _lines(data / "dpo.jsonl")])

    def own(self, stage_id: str) -> int:
        """The stage's persona examples."""
        return sum(1 for stage, general, _ in self.examples if not general and stage == stage_id)

    def general(self) -> int:
        return sum(1 for _, general, _ in self.examples if general)

    def pairs_at(self, stage_id: str) -> list[str]:
        return [line for stage, line in self.pairs if stage == stage_id]


def stage_data(data: Tokenized, meta: dict, stage_id: str, target: Path) -> int:
    """A tokenized directory at `target` holding `data`'s examples of `stage_id` and its general
    ones (and the stage's preference pairs); returns how many SFT examples it holds."""
    sft = [line for stage, general, line in data.examples if general or stage == stage_id]
    pairs = data.pairs_at(stage_id)
    files = dict(meta.get("files") or {})
    files["dpo"] = "dpo.jsonl" if pairs else None
    with store.replace_dir(target) as tmp:
        (tmp / "sft.jsonl").write_text("".join(line + "\n" for line in sft), encoding="utf-8")
        if pairs:
            (tmp / "dpo.jsonl").write_text("".join(line + "\n" for line in pairs), encoding="utf-8")
        shutil.copytree(data.path / "tokenizer", tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files, "only_stage": stage_id}, indent=2,
                                                  ensure_ascii=False) + "\n", encoding="utf-8")
    return len(sft)


def run(project: Project, settings: TrainSettings, meta: dict, run_dir: Path,
        train_one: Callable[[TrainSettings], int]) -> int:
    """Train every stage's adapter into run_dir/stages/<id>/ with `train_one` (train's own path for
    one run, given settings naming the stage's data and folder), then write the run that routes
    between them. `run_dir` is checked by train's `validate` and held by its lock already."""
    existed = run_dir.exists()
    try:
        return _train_stages(project, settings, meta, run_dir, train_one)
    except BaseException:   # nothing trained yet: leave nothing behind, as a one-adapter run does
        kept = [d for d in (run_dir / STAGES_DIR).glob("*")
                if runs.is_complete(d) or any(d.glob("checkpoints/*/checkpoint-*"))]
        if not existed and not kept:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_stages(project: Project, settings: TrainSettings, meta: dict, run_dir: Path,
                  train_one: Callable[[TrainSettings], int]) -> int:
    data = Tokenized.read(Path(settings.data))
    persona = {st["id"]: data.own(st["id"]) for st in meta["stages"]}
    general = data.general()
    empty = [sid for sid, n in persona.items() if n == 0]
    if empty:
        raise PersllmError(f"--adapter-per-stage: {data.path} has no training examples at stage(s) {', '.join(empty)}; "
                           "every stage needs its own (annotate and tokenize them, or train one adapter)")
    if "dpo" in settings.method:
        lacking = [sid for sid in persona if not data.pairs_at(sid)]
        if lacking:
            raise PersllmError(f"--adapter-per-stage with --method {settings.method}: {data.path} has no preference "
                               f"pairs at stage(s) {', '.join(lacking)}")
    stage_runs = {st["id"]: f"{STAGES_DIR}/{st['id']}" for st in meta["stages"]}
    info = {"persona": project.name, "base": settings.base or meta["base"], "base_path": meta.get("base_path"),
            "stages": [{"id": st["id"], "label": st["label"], "token": st["token"]} for st in meta["stages"]],
            "method": settings.method, "settings": public_settings(settings), "run_name": f"runs/{run_dir.name}",
            "stage_runs": stage_runs, "complete": False}
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / runs.RUN_FILE).is_file():
        runs.write_run_json(run_dir, {**info, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    t0 = time.monotonic()
    steps: dict[str, int | None] = {}
    for st in meta["stages"]:
        sid = st["id"]
        sub = run_dir / stage_runs[sid]
        mine = persona[sid] + general
        steps[sid] = max(1, round(settings.max_steps * mine / len(data.examples))) if settings.max_steps else None
        if runs.is_complete(sub):
            console.info(f"Stage {sid}: already trained in {sub}")
            continue
        where = run_dir / DATA_DIR / sid
        stage_data(data, meta, sid, where)
        resume = settings.resume and (sub / "checkpoints").is_dir()
        console.info(f"Stage {sid}: {persona[sid]} of its own examples and {general} general ones"
                     + (f", {steps[sid]} steps" if steps[sid] else ""))
        sub_settings = dataclasses.replace(settings, data=where, output=sub, resume=resume, max_steps=steps[sid],
                                           adapter_per_stage=False)
        train_one(sub_settings)
    shutil.rmtree(run_dir / DATA_DIR, ignore_errors=True)
    done = {sid: json.loads((run_dir / rel / runs.RUN_FILE).read_text(encoding="utf-8")) for sid, rel in stage_runs.items()}
    info.update(steps={sid: d.get("steps") for sid, d in done.items()}, seconds=round(time.monotonic() - t0, 1),
                adapter_bytes=sum(int(d.get("adapter_bytes") or 0) for d in done.values()), complete=True)
    (run_dir / "README.md").write_text(_card(info), encoding="utf-8")
    runs.write_run_json(run_dir, info)
    runs.update_latest(run_dir)
    console.table(f"Trained {run_dir}, one adapter per stage", ["stage", "steps", "final loss", "seconds"],
                  [[sid, d.get("steps"), round(d["final_loss"], 4) if d.get("final_loss") is not None else None,
                    d.get("seconds")] for sid, d in done.items()])
    return 0


def _card(info: dict) -> str:
    rows = "\n".join(f"| {s['id']} | {s['label']} | `{info['stage_runs'][s['id']]}/` | {info['steps'].get(s['id'])} |"
                     for s in info["stages"])
    return f"""# {info['persona']} — PersLLM, one adapter per stage

One LoRA adapter for **{info['base']}** per stage of {info['persona']}'s life, each trained ({info['method'].upper()})
only on that stage's examples and the general ones. `chat`, `eval`, `serve` and `converse` load the
base once and answer each request with the adapter of the stage asked (and its time token).

| stage | label | run | steps |
|---|---|---|---|
{rows}

## Use

    persllm chat {info['run_name']} --stage {info['stages'][-1]['id']}

Each stage's folder is a complete run of its own: `persllm export {info['run_name']}/{STAGES_DIR}/ID`
exports that stage's model.
"""
