"""What it takes to reproduce a run, in one file: `output_dir/run_record.json`.

Written by the global rank 0 when training starts (status `running`) and completed when it ends: `finished`, or
`stopped` (SIGTERM) or `failed` (a non-finite loss, an error), with the reason and the step. A run killed outright
(SIGKILL, a node lost) leaves `running`. Beside it, `resolved_config.yaml` holds every setting.

    project      this tool's version and git commit (with "dirty" when the tree had uncommitted changes)
    command      the command line, the launcher (python, torchrun, deepspeed, accelerate) and the world size
    environment  Python, the platform, the pinned packages' versions, the accelerator and how many
    data         the dataset (Hub id or files with their SHA-256), and per split the rows read, kept and skipped
    seed, settings (the file that holds them), started, ended, status, reason, global_step
    results      what the run measured at its end (train_reward_model.py: the held-out pairs' accuracy and loss)
    earlier      in a resumed run: the start, end, status and step of each run it continues, oldest first
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.6.0"
RECORD = "run_record.json"
PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed", "wandb", "tokenizers")
ROOT = Path(__file__).resolve().parent.parent  # the repository: its git commit is the tool's


def start(output_dir, argv, training_args, dataset_name, counts):
    record = {
        "status": "running",
        "started": _now(),
        "project": {"name": "diversity-simpo", "version": VERSION, **_git()},
        "command": {
            "argv": [Path(sys.argv[0]).name, *map(str, argv)],
            "launcher": _launcher(),
            "world_size": training_args.world_size,
        },
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": {name: _version(name) for name in PACKAGES},
            "accelerator": _accelerator(),
        },
        "seed": training_args.seed,
        "resumed_from": training_args.resume_from_checkpoint,
        "data": {"dataset_name": str(dataset_name), "files": _fingerprints(dataset_name), "rows": counts},
        "settings": "resolved_config.yaml",
    }
    path = Path(output_dir) / RECORD
    if path.is_file() and training_args.resume_from_checkpoint:  # the runs this one continues, oldest first
        before = json.loads(path.read_text(encoding="utf-8"))
        earlier = before.pop("earlier", [])
        keys = ("started", "ended", "status", "reason", "global_step", "resumed_from", "command")
        record["earlier"] = [*earlier, {k: before[k] for k in keys if k in before}]
    _write(output_dir, record)


def end(output_dir, status, global_step, reason=None, results=None):
    path = Path(output_dir) / RECORD
    if not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    record.update(status=status, ended=_now(), global_step=global_step)
    if reason:
        record["reason"] = reason
    if results:
        record["results"] = results
    _write(output_dir, record)


def _write(output_dir, record):
    path = Path(output_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(temporary, path)  # a kill mid-write leaves the previous record, never half of one


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git():
    def git(*args):
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"git_commit": commit, "git_dirty": dirty}


def _launcher():
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ or any(k.startswith("ACCELERATE_USE_") for k in os.environ):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ or "DS_LAUNCHER" in os.environ or "LOCAL_SIZE" in os.environ:
        return "deepspeed"
    return "python"


def _accelerator():
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}


def _fingerprints(dataset_name):
    """SHA-256 and size of each local data file; a Hub dataset is named by its id (and revision, in the settings)."""
    from diversity_simpo.data import data_files

    path = Path(str(dataset_name)).expanduser()
    files = [path] if path.is_file() else data_files(path) if path.is_dir() else []
    fingerprints = []
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        fingerprints.append({"path": str(file), "bytes": file.stat().st_size, "sha256": digest.hexdigest()})
    return fingerprints
