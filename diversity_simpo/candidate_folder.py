"""The format of a candidates folder (what generate_candidates.py writes and training reads): shards
`train-00000-of-0000K.jsonl` of whole rows, and `candidates.yaml`, the manifest that names every shard with the
settings that decided them and the prompts' fingerprint. Every file is written whole (a temporary file beside it,
renamed into place), so a folder holds finished shards and, after a kill, at most a temporary file to remove; a
shard the manifest names and the folder lacks is one still to write.
"""

import hashlib
import json
import os
from pathlib import Path

import yaml

from diversity_simpo.settings import ConfigError

MANIFEST = "candidates.yaml"


def shard_name(index, count):
    """`train-…`: `datasets` reads the split from a file's name, and training reads `dataset_train_split: train`."""
    return f"train-{index:05d}-of-{count:05d}.jsonl"


def manifest_for(settings, prompts, shard_size):
    """The manifest of a folder of `prompts` ({"prompt", "replies"?, ...} rows) in shards of `shard_size`, made with
    `settings` (the values that decide what is written); the fingerprint covers the prompts and any given replies
    (replies to score, or a preference set's own pairs)."""
    items = [_fingerprinted(p) for p in prompts]
    fingerprint = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
    count = -(-len(prompts) // shard_size)
    shards = [shard_name(k, count) for k in range(count)]
    return {"settings": settings, "prompts": len(prompts), "prompts_sha256": fingerprint, "shards": shards}


def _fingerprinted(prompt):
    """A prompt, with what its row gives besides (replies to score, or its own pairs) when it gives any."""
    extra = next((prompt[k] for k in ("replies", "given_pairs") if k in prompt), None)
    return prompt["prompt"] if extra is None else [prompt["prompt"], extra]


def read_manifest(folder):
    """The manifest of a candidates folder, or None (no manifest, or a file of that name that is not ours)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    ours = isinstance(manifest, dict) and isinstance(manifest.get("shards"), list) and "prompts_sha256" in manifest
    return manifest if ours else None


def missing_shards(folder):
    """(shards missing, shards in all) of a candidates folder; (0, 0) for any other folder."""
    manifest = read_manifest(folder)
    if manifest is None:
        return 0, 0
    return sum(not (Path(folder) / name).is_file() for name in manifest["shards"]), len(manifest["shards"])


def is_temporary(path):
    """A file `write_whole` had not finished (a killed run's): `.NAME.PID.tmp`."""
    parts = path.name.split(".")
    return path.name.startswith(".") and len(parts) >= 4 and parts[-1] == "tmp" and parts[-2].isdigit()


def shards_to_write(folder, manifest, overwrite):
    """Indices of the shards still to write, after checking that `folder` may be written: empty, or holding the
    candidates of these same settings (a run to continue), or `overwrite`. Nothing is deleted here."""
    folder = Path(folder)
    if not folder.exists() or all(is_temporary(p) for p in folder.iterdir()):
        return list(range(len(manifest["shards"])))
    found = read_manifest(folder)
    if found is None:  # never deleted, not even with --overwrite: they are not ours
        raise ConfigError(
            f"output_dir {folder} already holds files that are not candidates of this tool; choose a new or empty "
            "output_dir"
        )
    if overwrite:
        return list(range(len(manifest["shards"])))
    key, why = differing_setting(found, manifest["settings"], folder), None
    if key is not None:
        theirs = found["settings"] if isinstance(found.get("settings"), dict) else {}
        why = f"{key}={theirs.get(key, '(unset)')!r}, not {manifest['settings'].get(key, '(unset)')!r}"
    elif found.get("prompts_sha256") != manifest["prompts_sha256"]:
        why = "other prompts (the dataset changed)"
    if why:
        raise ConfigError(
            f"output_dir {folder} holds candidates made with {why}: choose another output_dir, or pass "
            "--overwrite true to start again"
        )
    return [k for k, name in enumerate(manifest["shards"]) if not (folder / name).is_file()]


def differing_setting(found, settings, folder):
    """The first setting that differs between `found`, the manifest in `folder`, and `settings`, or None; a setting
    either side lacks differs too. An absolute path that names the same place relative to the folder is the same:
    a folder moved with the models it names (a loop's whole output_dir, whose rounds name the model of the round
    before) is still the folder those settings made."""
    theirs = found.get("settings") if isinstance(found.get("settings"), dict) else {}
    written_in = found.get("folder")
    for key in [*settings, *theirs]:
        was, now = theirs.get(key, "(unset)"), settings.get(key, "(unset)")
        if was != now and not same_place(was, written_in, now, folder):
            return key
    return None


def same_place(was, written_in, now, folder):
    """Whether absolute path `was`, given to a folder written in `written_in` (None: not known), and absolute path
    `now`, given to that folder where it is now, name the same place relative to it."""
    if not (written_in and all(isinstance(p, str) and os.path.isabs(p) for p in (was, now))):
        return False
    return os.path.relpath(was, written_in) == os.path.relpath(now, Path(folder).resolve())


def start_folder(folder, manifest, overwrite):
    """Make `folder` ready for the shards of `manifest` (the first write of a run, once everything checked out):
    with `overwrite`, exactly the files of the old manifest are deleted; a killed run's temporary files are removed;
    the manifest is written."""
    folder = Path(folder)
    old = read_manifest(folder) if folder.exists() else None
    if overwrite and old is not None:
        for name in [*old["shards"], MANIFEST]:
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in filter(is_temporary, folder.iterdir()):
        stale.unlink()
    manifest = manifest | {"folder": str(folder.resolve())}  # where its absolute paths were given (differing_setting)
    write_whole(folder / MANIFEST, yaml.safe_dump(manifest, allow_unicode=True, sort_keys=False))


def write_shard(folder, manifest, index, rows):
    """Shard `index` of `manifest`: `rows` as JSON lines, written whole."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_whole(Path(folder) / manifest["shards"][index], text)


def write_whole(path, text):
    """`text` to `path` complete or not at all: a temporary file beside it, flushed to disk, renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
