"""`persllm train`: a LoRA/QLoRA adapter by SFT (transformers Trainer), DPO (TRL), or SFT then DPO.

Reads the directory `persllm tokenize` wrote and writes runs/NAME/ (layout in runs.py):
adapter/, tokenizer/, checkpoints/, metrics.jsonl, loss.png, run.json, README.md, then runs/latest.

- CUDA: 4-bit NF4 base with bf16 compute (QLoRA) or a bf16 base (--no-qlora). CPU: float32 LoRA.
- LoRA on every linear layer, plus the time-token rows of the input embedding through PEFT's
  `trainable_token_indices` (only those rows are saved, so the adapter stays small).
- `--gpus N|all` and `--nproc N` relaunch this command under torchrun (python -m
  torch.distributed.run), one process per GPU (each with its own 4-bit copy) or per CPU share
  (gloo). A process started by torchrun or accelerate (LOCAL_RANK/WORLD_SIZE set) trains as one
  rank and never relaunches. Only rank 0 writes the run directory.
- `sft+dpo`: SFT, then DPO starting from the SFT adapter (the reference is a frozen copy of it).
  `--max-steps` and `--epochs` apply to each phase.
- Checkpoints every --save-steps into checkpoints/<phase>/; `--resume` continues from the last
  one with the same batches in the same order (the sampler depends only on seed and epoch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from persllm_cli.core import console
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.core.errors import PersllmError
from persllm_cli.data import store
from persllm_cli.model.runs import is_complete
from persllm_cli.train.settings import TrainSettings, check_reporter, launched_by_torchrun, read_data


# ----------------------------------------------------------------------------------- checks


def _gpu_count(gpus: str) -> int:
    import torch

    n = None
    if gpus != "all":
        try:
            n = int(gpus)
        except ValueError:
            n = 0
        if n < 1:
            raise PersllmError(f"--gpus must be a number of at least 1 or 'all', not {gpus!r}")
    if not torch.cuda.is_available():
        raise PersllmError(f"--gpus {gpus} asks for CUDA, but no CUDA device is visible "
                           "(check the driver and CUDA_VISIBLE_DEVICES, or train on CPU with --nproc N)")
    visible = torch.cuda.device_count()
    if n is None:
        return visible
    if n > visible:
        raise PersllmError(f"--gpus {n} is more than the {visible} visible GPU(s)")
    return n


def _pick_run_dir(project: Project, s: TrainSettings) -> Path:
    runs = project.root / "runs"
    if s.output is None and s.resume:
        candidates = [d for d in runs.iterdir() if d.is_dir() and not d.is_symlink() and (d / _progress(s)).is_dir()
                      and not is_complete(d)] if runs.is_dir() else []
        if not candidates:
            raise PersllmError(f"--resume: no unfinished run with checkpoints in {runs}; name one with --output runs/NAME")
        return max(candidates, key=lambda d: d.stat().st_mtime)
    if s.output is None:
        return runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{s.method.replace('+', '-')}"
    return Path(s.output)


def _progress(s: TrainSettings) -> str:
    """The folder in which a stopped run keeps what `--resume` continues from."""
    return "stages" if s.adapter_per_stage else "checkpoints"


def validate(project: Project, s: TrainSettings) -> tuple[dict, Path]:
    # Ranges and choices of the settings are checked where they resolve (config.setting); torch
    # and peft would otherwise fail mid-run with a traceback.
    if s.gpus is not None and s.nproc is not None:
        raise PersllmError("use --gpus (CUDA) or --nproc (CPU), not both")
    check_reporter(s.report_to)
    meta = read_data(s.data)
    if "dpo" in s.method and not (meta.get("files") or {}).get("dpo"):
        raise PersllmError(f"--method {s.method} needs preference pairs, but {s.data} has none "
                           "(run `persllm dpo`, then `persllm tokenize` again)")
    data_stages = [st["id"] for st in meta.get("stages", [])]
    if data_stages != [st.id for st in project.stages]:
        raise PersllmError(f"{s.data} was tokenized for stages {data_stages}, but the project has "
                           f"{[st.id for st in project.stages]}; run `persllm tokenize` again")
    if launched_by_torchrun() and s.output is None:
        raise PersllmError("under torchrun/accelerate launch, name the run with --output runs/NAME "
                           "(every process must write to the same run)")
    run_dir = _pick_run_dir(project, s)
    if run_dir.exists() and not run_dir.is_dir():
        raise PersllmError(f"{run_dir} exists and is not a directory; choose another --output")
    first_rank = os.environ.get("RANK", "0") == "0"  # other ranks may see the directory rank 0 just made
    if first_rank and not s.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise PersllmError(f"{run_dir} already exists; continue it with --resume or choose another --output")
    if s.resume:
        if not (run_dir / _progress(s)).is_dir():
            raise PersllmError(f"--resume: {run_dir} has no checkpoints to continue from")
        if is_complete(run_dir):
            raise PersllmError(f"--resume: {run_dir} already finished")
    return meta, run_dir


# ------------------------------------------------------------------------------------ entry

def run(project: Project, settings: TrainSettings) -> int:
    """Validate, then train here or relaunch under torchrun."""
    meta, run_dir = validate(project, settings)
    if launched_by_torchrun():  # a rank: the process that started torchrun holds the lock
        return _run(project, settings, meta, run_dir)
    from persllm_cli.data.lock import hold

    # One run per run folder: a second one exits 1 (or waits with --wait). Checked again under the
    # lock, since the folder may have changed while this one waited.
    settings = dataclasses.replace(settings, output=run_dir)  # the run folder this run writes
    with hold(run_dir):
        meta, run_dir = validate(project, settings)
        if settings.adapter_per_stage:
            from persllm_cli.train import per_stage

            return per_stage.run(project, settings, meta, run_dir, lambda one: _run(project, one, *validate(project, one)))
        return _run(project, settings, meta, run_dir)


def _run(project: Project, settings: TrainSettings, meta: dict, run_dir: Path) -> int:
    from persllm_cli.model.bases import resolve_base

    resolve_base(settings.base or meta["base"])  # fail early on a missing base
    n = 1
    if settings.gpus is not None:
        n = _gpu_count(settings.gpus)
    elif settings.nproc:
        n = settings.nproc
    existed = run_dir.exists()
    had_files = existed and any(run_dir.iterdir())
    try:
        if n > 1 and not launched_by_torchrun():
            return _relaunch(project, settings, n)
        from persllm_cli.train.rank import train_rank

        try:
            return train_rank(project, settings, meta, run_dir)
        except Exception as e:  # disk full, a size limit, a permission while saving
            err = store.os_error(e)
            if err is None or err.errno not in store.WRITE_ERRORS:
                raise
            raise store.write_failed(Path(err.filename or run_dir), err,
                                       "checkpoints saved before it are kept; make room and rerun with --resume") from None
    except BaseException:  # a bug too: its traceback stays, but no half-made run blocks the rerun
        _drop_if_empty(run_dir, existed, had_files)
        raise


def _drop_if_empty(run_dir: Path, existed: bool, had_files: bool) -> None:
    """A run that failed before its first checkpoint leaves nothing behind (there is nothing to resume).
    A directory that held files before (a resumed run) is never touched; one that was empty stays, empty."""
    if had_files or os.environ.get("RANK", "0") != "0" or not run_dir.is_dir():
        return
    if not any((run_dir / "checkpoints").glob("*/checkpoint-*")):
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        if existed:
            run_dir.mkdir()


def _relaunch(project: Project, settings: TrainSettings, n: int) -> int:
    """Run this training under torchrun with `n` processes on this machine."""
    run_dir = Path(settings.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"project": str(project.root), "settings": public_settings(settings)}
    fd, spec_path = tempfile.mkstemp(prefix=".launch-", suffix=".json", dir=run_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "persllm_cli.train.launch", spec_path]
    kind = "one per GPU, NCCL" if settings.gpus is not None else "CPU, gloo"
    console.info(f"Launching {n} processes under torchrun (DDP, {kind})...")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    try:
        proc = _run_group(cmd, env)
    finally:
        Path(spec_path).unlink(missing_ok=True)
    if proc.returncode in (130, -2):
        raise KeyboardInterrupt
    if proc.returncode != 0:
        raise PersllmError(f"training failed in a worker process (exit code {proc.returncode}); see the messages above")
    return 0


def _run_group(cmd: list[str], env: dict[str, str], grace: float = 30.0) -> subprocess.Popen:
    """Run torchrun in its own process group and wait. Interrupted (Ctrl-C, SIGTERM), the whole group
    (torchrun and every rank) gets SIGTERM, and SIGKILL after `grace` seconds: no rank outlives us.
    Killing torchrun alone would leave its ranks training."""
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(proc.pid, signal.SIGKILL)  # ranks that did not stop (or outlived torchrun)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return proc
