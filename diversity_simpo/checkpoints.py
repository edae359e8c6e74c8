"""Which checkpoint a run can resume from: the newest one that was written to the end.

A kill while a checkpoint is being written (a preemption during the minutes an 8B model and its optimizer state take)
leaves a newer `checkpoint-N` half-written beside an intact older one. The rule for "complete", which holds for the HF
Trainer's plain checkpoints and for DeepSpeed's:

  1. `trainer_state.json` parses and names step N. The Trainer writes it last, after the weights, the optimizer and
     scheduler (or DeepSpeed's engine checkpoint) and the RNG states.
  2. The weights are there: `model.safetensors`, a sharded index and every shard it names, an adapter,
     `pytorch_model.bin`, or FSDP's sharded folder.
  3. Every file the writers produce is whole: a safetensors file is exactly as long as its header says; a torch.save
     file (`.pt`, `.pth`, `.bin`) is a zip archive whose central directory, written last, is readable.
  4. With DeepSpeed: the `latest` file (which the engine writes once every rank has saved) names a folder that holds
     the model states and each rank's optimizer shard.

Nothing is deleted: an incomplete checkpoint stays for the user to look at (the resumed run writes over it when it
reaches that step again).
"""

import json
import re
import struct
import zipfile
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model_fsdp_0",  # accelerate's FSDP, sharded state dict (a folder)
)


def checkpoint_problem(folder):
    """None if `folder` is a complete checkpoint (module docstring), else what is wrong with it, in a few words."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json: its write did not finish"
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "trainer_state.json is cut short"
    match = CHECKPOINT.match(folder.name)
    if match and step != int(match.group(1)):
        return f"trainer_state.json names step {step}"
    if not any((folder / name).exists() for name in WEIGHTS):
        return "no model weights"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            return f"{index.name} is cut short"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"weight shard {missing[0]} is missing"
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        engine = folder / tag
        if not engine.is_dir() or not list(engine.glob("*model_states.pt")):
            return f"DeepSpeed's {tag} holds no model states"
    elif any(folder.glob("global_step*")):
        return "DeepSpeed's `latest` file is missing: its engine checkpoint did not finish"
    for path in sorted(folder.rglob("*")):
        problem = _file_problem(path)
        if problem:
            return f"{path.relative_to(folder)} {problem}"
    return None


def _file_problem(path):
    if path.suffix == ".safetensors":
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "is cut short"
            header_size = struct.unpack("<Q", head)[0]
            try:
                header = json.loads(f.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "is cut short"
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if size != 8 + header_size + max(ends, default=0):
            return "is cut short"
    elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
        return "is cut short"
    return None


def newest_complete_checkpoint(output_dir):
    """(the newest complete `checkpoint-N` in output_dir or None, [(newer incomplete folder, its problem), ...])."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT.match(p.name)]
    passed_over = []
    for folder in sorted(folders, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, passed_over
        passed_over.append((folder, problem))
    return None, passed_over
