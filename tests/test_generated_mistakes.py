"""Generated mistakes: hundreds of bad configs, flags, paths and data files per run, each through the CLI's real
argument parsing and data checks (`preflight`: everything before the model loads). Every one must be refused with a
one-line `ConfigError`/`DataError` (the CLI prints it as `error: ...` and exits 2) and write nothing; a sample also
goes through the real CLI. A seeded generator (not a fixed list) mixes the categories below with random fields,
values, positions and file formats; MISTAKES_SEED=N replays or explores another set (the summary prints it).
"""

import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import DEMO_DATA, DEMO_MODEL, ROOT
from test_cli import DEMO_CONFIG, run_cli

from diversity_simpo.data import DataError
from diversity_simpo.settings import ConfigError
from train_diversity_simpo import preflight

CASES = 320
SEED = int(os.environ.get("MISTAKES_SEED", "0"))  # fixed, so CI is reproducible; set it to explore other cases

# field: values that are out of its range (some only in context: eval_steps with eval_strategy steps)
OUT_OF_RANGE = {
    "per_device_train_batch_size": [0, -1, -8],
    "per_device_eval_batch_size": [0, -2],
    "gradient_accumulation_steps": [0, -4],
    "learning_rate": [-1, 0, -1e-6],
    "beta": [0, -2.5],
    "diversity_weight": [-0.05, -1],
    "diversity_alpha": [1.5, -0.1, 2],
    "diversity_chunk_elements": [0, -1],
    "max_length": [0, 1, -128],
    "seed": [-1, 2**40],
    "dataset_test_fraction": [1.0, -0.1, 3],
    "warmup_steps": [-1, -0.5],
    "logging_steps": [0, -5],
    "save_steps": [0, -20],
    "eval_steps": [-1, -10],  # 0 is allowed: transformers reads it as logging_steps
    "weight_decay": [-0.1],
    "max_grad_norm": [-1.0],
    "label_smoothing": [0.9, -0.2],
    "diversity_eval_temperature": [0, -1.0],
    "diversity_eval_samples": [0, -3],
    "diversity_eval_batch_size": [0],
    "diversity_eval_max_new_tokens": [0, -64],
    "adam_beta1": [1.5, -0.5],
    "adam_beta2": [1.0001, -1],
    "adam_epsilon": [-1e-8],
    "cpo_alpha": [-1],
    "dataloader_num_workers": [-1],
}
NUMERIC = {
    "per_device_train_batch_size": int,
    "learning_rate": float,
    "beta": float,
    "simpo_gamma": float,
    "diversity_weight": float,
    "diversity_alpha": float,
    "max_length": int,
    "max_steps": int,
    "warmup_steps": float,
    "gradient_accumulation_steps": int,
    "seed": int,
    "logging_steps": float,
    "diversity_eval_prompts": int,
}
KEYS = ["diversity_weight", "learning_rate", "per_device_train_batch_size", "simpo_gamma", "model_name_or_path"]
KEYS += ["dataset_name", "gradient_accumulation_steps", "diversity_alpha", "max_length", "output_dir"]


def demo_rows():
    return [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()][:8]


class Case:
    """One generated mistake: a YAML config (the demo's, changed), extra flags, and files written before the run."""

    def __init__(self, workspace, rng):
        self.workspace, self.rng = workspace, rng
        self.config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
        self.config.update(output_dir=str(workspace / "out"), eval_strategy="no", report_to="none")
        self.config.update(model_name_or_path=str(DEMO_MODEL), dataset_name=str(DEMO_DATA))
        self.flags, self.config_path = [], workspace / "config.yaml"
        # through the real CLI in a process of its own: preflight would set up DeepSpeed's process group in this one
        self.own_process = False

    def set(self, key, value, text=None):
        """Through the YAML, or as a flag (the string `text`, or the value written as a flag would be)."""
        if self.rng.random() < 0.5:
            self.config[key] = value
        else:
            self.flags += [
                f"--{key}",
                text if text is not None else json.dumps(value) if not isinstance(value, str) else value,
            ]

    def data(self, rows, suffix=".jsonl"):
        path = self.workspace / f"pairs{suffix}"
        write(path, rows)
        self.config["dataset_name"] = str(path)
        return path

    def argv(self):
        if self.config is not None:
            self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True), encoding="utf-8")
        return ["--config", str(self.config_path), *map(str, self.flags)]


def write(path, rows):
    import pandas as pd

    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else path.open("w", encoding="utf-8") as f:
            f.write(text)


# --- the categories -------------------------------------------------------------------------------------------------


def value_out_of_range(case, rng):
    key = rng.choice(sorted(OUT_OF_RANGE))
    if key == "eval_steps":
        case.config.update(eval_strategy="steps")
    if key == "dataset_test_fraction":
        case.config.update(dataset_name=str(ROOT / "demo" / "data" / "train.jsonl"))
    case.set(key, rng.choice(OUT_OF_RANGE[key]))  # negative values as flags too: `--learning_rate -1e-06`
    return key, (key, "out of range")


def value_wrong_type(case, rng):
    key, kind = rng.choice(sorted(NUMERIC.items()))
    bad = [("abc", "abc"), ([1, 2], "[1, 2]"), ({"a": 1}, "{a: 1}"), ("", "")]
    if kind is int:
        bad.append((2.5, "2.5"))
    value, text = rng.choice(bad)
    if rng.random() < 0.5 or value == "":
        case.config[key] = value
    else:
        case.flags += [f"--{key}", text]
    return key, (key,)


def non_finite(case, rng):
    key = rng.choice([k for k, kind in NUMERIC.items() if kind is float])
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    case.set(key, value, text=str(value))
    return key, (key, "finite")


def unknown_key(case, rng):
    key = rng.choice(KEYS)
    i = rng.randrange(len(key))
    mutated = rng.choice(
        [key[:i] + key[i + 1 :], key[:i] + key[i] * 2 + key[i + 1 :], key + "s", key.replace("_", "-", 1) + "x"]
    )
    if rng.random() < 0.5:
        case.config[mutated] = case.config.get(key, 1)
    else:
        case.flags += [f"--{mutated}", "1"]
    return ("yaml key" if mutated in case.config else "flag"), (mutated,)


def bad_path(case, rng):
    """A bad path, or a file that is there but wrong; blamed: the path, or the setting that names it."""
    w = case.workspace
    (w / "a_folder").mkdir()
    (w / "a_file.txt").write_text("not a model", encoding="utf-8")
    choice = rng.choice(
        [
            "config-missing", "config-folder", "config-invalid-yaml", "config-not-mapping", "dataset-missing",
            "dataset-empty-folder", "dataset-wrong-suffix", "model-missing", "model-file", "model-folder-no-config",
            "model-adapter-without-base", "model-adapter-of-missing-base", "deepspeed-missing", "deepspeed-invalid",
            "deepspeed-not-object", "deepspeed-contradicts-settings", "deepspeed-rejects-key", "output-dir-is-file",
            "output-dir-under-file", "output-dir-unwritable", "resume-nothing", "resume-not-a-checkpoint",
            "resume-incomplete-checkpoint",
        ]
    )  # fmt: skip
    blame = None
    if choice == "config-missing":
        case.config, case.config_path = None, w / "missing.yaml"
    elif choice == "config-folder":
        case.config, case.config_path = None, w / "a_folder"
    elif choice == "config-invalid-yaml":
        case.config = None
        case.config_path.write_text(rng.choice(["beta: [2.5\n", "a: b: c\n", "key: 'open\n", "\t- x: 1\n"]), "utf-8")
    elif choice == "config-not-mapping":
        case.config = None
        case.config_path.write_text(rng.choice(["- beta\n- 2\n", "just text\n", "42\n"]), encoding="utf-8")
    elif choice == "dataset-missing":
        blame = w / rng.choice(["nope.jsonl", "data/train.parquet", "x.csv"])
        case.set("dataset_name", str(blame))
    elif choice == "dataset-empty-folder":
        case.set("dataset_name", str(blame := w / "a_folder"))
    elif choice == "dataset-wrong-suffix":
        case.set("dataset_name", str(blame := w / "a_file.txt"))
    elif choice == "model-missing":
        case.set("model_name_or_path", str(blame := w / "no-model"))
    elif choice == "model-file":
        case.set("model_name_or_path", str(blame := w / "a_file.txt"))
    elif choice == "model-folder-no-config":
        case.set("model_name_or_path", str(blame := w / "a_folder"))
    elif choice.startswith("model-adapter"):  # a LoRA run's output folder whose base model cannot be found
        adapter = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
        if choice == "model-adapter-of-missing-base":
            adapter["base_model_name_or_path"] = str(w / "gone" / "base-model")
        (w / "a_folder" / "adapter_config.json").write_text(json.dumps(adapter), encoding="utf-8")
        case.set("model_name_or_path", str(w / "a_folder"))
        blame = "base_model_name_or_path"
    elif choice.startswith("deepspeed"):
        ds = w / "ds.json"
        config = json.loads((ROOT / "configs" / "ds_config.json").read_text(encoding="utf-8"))
        if choice == "deepspeed-invalid":
            ds.write_text(rng.choice(['{"zero_optimization": ', "{'stage': 2}", "{,}"]), encoding="utf-8")
        elif choice == "deepspeed-not-object":
            ds.write_text(rng.choice(["[1, 2]", "3", '"zero"']), encoding="utf-8")
        elif choice == "deepspeed-contradicts-settings":  # a fixed value in the JSON that the YAML contradicts
            blame, value = rng.choice(
                [
                    ("train_micro_batch_size_per_gpu", 3),
                    ("gradient_accumulation_steps", 5),
                    ("train_batch_size", 7),
                    ("gradient_clipping", 0.25),
                ]
            )
            config[blame] = value
        elif choice == "deepspeed-rejects-key":  # what only DeepSpeed's own config check knows
            blame = rng.choice(["overlap_com", "stage3_prefetch_bucket", "offload_optimiser"])
            config["zero_optimization"][blame] = 1
        if choice in ("deepspeed-contradicts-settings", "deepspeed-rejects-key"):
            ds.write_text(json.dumps(config), encoding="utf-8")
            case.own_process = True
        case.set("deepspeed", str(ds))
        blame = blame or ds
    elif choice == "output-dir-is-file":
        case.set("output_dir", str(w / "a_file.txt"))
    elif choice == "output-dir-under-file":
        case.set("output_dir", str(w / "a_file.txt" / "run"))
    elif choice == "output-dir-unwritable":  # where nothing can be created, whatever the permission bits say
        case.set("output_dir", "/proc/sys/diversity-simpo-run")
    elif choice == "resume-nothing":
        case.set("resume_from_checkpoint", rng.choice(["latest", "true"]))
        blame = "resume_from_checkpoint latest"
    elif choice == "resume-not-a-checkpoint":
        case.set("resume_from_checkpoint", str(w / rng.choice(["a_folder", "checkpoint-7"])))
    elif choice == "resume-incomplete-checkpoint":  # a kill during its write: the weights cut short
        checkpoint = w / "out" / "checkpoint-7"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text('{"global_step": 7}', encoding="utf-8")
        whole = (DEMO_MODEL / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(whole[: rng.randrange(10, len(whole) - 1)])
        case.set("resume_from_checkpoint", rng.choice([str(checkpoint), "latest"]))
        blame = "incomplete"
    if blame is None:
        blame = {"config": case.config_path, "output": "output_dir", "resume": "resume_from_checkpoint"}[
            choice.split("-")[0]
        ]
    return choice, (str(blame),)


def bad_data_file(case, rng):
    """A data file that cannot be read as it is: blamed by its path (and, for an encoding, the encoding it has)."""
    rows = demo_rows()
    choice = rng.choice(
        [
            "cut-line",
            "garbled-line",
            "non-object-line",
            "empty",
            "blank",
            "not-gzip",
            "not-utf8",
            "array-of-non-objects",
            "shift-jis",
            "euc-jp",
        ]
    )
    blame = ()
    if choice in ("shift-jis", "euc-jp"):  # Excel on Japanese Windows saves CSV in Shift_JIS (cp932)
        path = case.workspace / f"pairs{rng.choice(['.csv', '.jsonl'])}"
        write(path, [{k: r[k][-1]["content"] for k in ("prompt", "chosen", "rejected")} for r in rows])
        encoding = {"shift-jis": "cp932", "euc-jp": "euc_jp"}[choice]
        path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))
        case.config["dataset_name"] = str(path)
        case.config["wrap_text_as_chat"] = True
        return choice, (str(path), "not UTF-8", {"shift-jis": "Shift_JIS", "euc-jp": "EUC-JP"}[choice])
    path = case.data(rows, ".jsonl.gz" if choice == "not-gzip" else ".json" if choice.startswith("array") else ".jsonl")
    lines = path.read_text(encoding="utf-8").splitlines() if choice != "not-gzip" else []
    at = rng.randrange(len(rows))
    if choice == "cut-line":
        lines[at] = lines[at][: rng.randrange(1, len(lines[at]) - 1)]
    elif choice == "garbled-line":
        lines[at] = lines[at].replace('"', "", rng.randrange(1, 4))
    elif choice == "non-object-line":
        lines[at] = rng.choice(["[1, 2, 3]", "42", '"text"', "null"])
    if choice in ("cut-line", "garbled-line", "non-object-line"):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        blame = (f"line {at + 1}",)
    elif choice == "empty":
        path.write_text("", encoding="utf-8")
    elif choice == "blank":
        path.write_text("\n  \n\n", encoding="utf-8")
    elif choice == "not-gzip":
        path.write_bytes(b"this is not gzip data")
    elif choice == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00garbage\x80\x81\n")
    elif choice == "array-of-non-objects":
        path.write_text(json.dumps([1, "two", [3]]), encoding="utf-8")
    return choice, (str(path), *blame)


def bad_rows(case, rng):
    rows = [
        {
            "prompt": r["prompt"][0]["content"],
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in demo_rows()
    ]
    conversational = rng.random() < 0.5
    if conversational:
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in demo_rows()]
    at, side = rng.randrange(len(rows)), rng.choice(["chosen", "rejected", "prompt"])
    choice = rng.choice(
        [
            "null",
            "number",
            "bool",
            "list-of-numbers",
            "empty",
            "blank",
            "object-without-text",
            "no-assistant-reply",
            "unknown-role",
            "missing-column",
            "identical-everywhere",
            "ranking-layout",
            "scored-layout",
            "mapping-to-missing-column",
            "mapping-unknown-key",
        ]
    )
    if choice in ("null", "number", "bool", "list-of-numbers", "empty", "blank", "object-without-text"):
        bad = {
            "null": None,
            "number": rng.choice([0, 7, -3.5]),
            "bool": True,
            "list-of-numbers": [1, 2],
            "empty": "",
            "blank": "  \n",
            "object-without-text": {"x": 1},
        }[choice]
        if conversational and side != "prompt" and choice not in ("null", "number", "bool"):
            rows[at][side] = [{"role": "assistant", "content": bad}]
        else:
            rows[at][side] = bad
    elif choice == "no-assistant-reply":
        conversational = True
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in demo_rows()]
        rows[at]["chosen" if side == "prompt" else side] = rows[at]["prompt"]
    elif choice == "unknown-role":
        conversational = True
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in demo_rows()]
        rows[at]["prompt"] = [{"role": rng.choice(["robot", "bot", "narrator"]), "content": "質問"}]
    elif choice == "missing-column":
        for row in rows:
            row.pop(rng.choice(["chosen", "rejected"]) if side == "prompt" else side)
    elif choice == "identical-everywhere":
        for row in rows:
            row["rejected"] = row["chosen"]
    elif choice == "ranking-layout":
        rows = [{"model_a": "a", "model_b": "b", "winner": "model_a", "conversation_a": r["prompt"]} for r in rows]
    elif choice == "scored-layout":
        rows = [
            {"messages": r["prompt"], "response1": r["chosen"], "response2": r["rejected"], "preference": 0.5}
            for r in rows
        ]
    elif choice == "mapping-to-missing-column":
        case.config["dataset_columns"] = {"prompt": rng.choice(["input", "question", "instruction"])}
    elif choice == "mapping-unknown-key":
        case.config["dataset_columns"] = {rng.choice(["query", "answer", "context"]): "prompt"}
    if len({type(r.get("prompt")) for r in rows}) > 1 or choice in (
        "number",
        "bool",
        "list-of-numbers",
        "object-without-text",
    ):
        suffix = ".jsonl"  # arrow columns need one type: mixed-type rows only in JSON lines, read row by row
    else:
        suffix = rng.choice(
            [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv"] if not conversational else [".jsonl", ".parquet"]
        )
    if suffix == ".json":
        path = case.workspace / "pairs.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        case.config["dataset_name"] = str(path)
    else:
        case.data(rows, suffix)
    return choice, ("dataset_columns",) if choice.startswith("mapping") else (case.config["dataset_name"],)


CATEGORIES = {
    "value out of range": value_out_of_range,
    "value of the wrong type": value_wrong_type,
    "non-finite number": non_finite,
    "unknown key or flag": unknown_key,
    "bad path (config, data, model, DeepSpeed, output_dir, resume)": bad_path,
    "bad data file": bad_data_file,
    "bad rows or layout": bad_rows,
}


def generate(tmp_path, count, seed):
    rng = random.Random(seed)
    for number in range(count):
        category = rng.choice(sorted(CATEGORIES))
        workspace = tmp_path / f"case{number}"
        workspace.mkdir()
        case = Case(workspace, rng)
        detail, blame = CATEGORIES[category](case, rng)
        yield number, category, detail, blame, case.argv(), workspace, case.own_process


def files_under(path):
    return {p for p in Path(path).rglob("*")}


def test_generated_mistakes_are_refused_in_one_line_and_write_nothing(tmp_path, record_summary):
    seen, problems = Counter(), []
    for number, category, detail, blame, argv, workspace, own_process in generate(tmp_path, CASES, SEED):
        before = files_under(workspace)
        try:
            if own_process:
                result = run_cli(*argv)
                errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
                if result.returncode != 2 or len(errors) != 1 or "Traceback" in result.stderr:
                    raise AssertionError(f"exit {result.returncode}: {result.stderr[-2000:]}")
                raise ConfigError(errors[0].removeprefix("error: "))
            preflight(argv)
        except (ConfigError, DataError) as e:
            message = str(e)
            if not message or "\n" in message:
                problems.append(f"case {number} ({category}: {detail}): not one line: {message!r}")
            missing = [name for name in blame if name not in message]
            if missing:  # refused, but for something else than the mistake made (or without naming it)
                problems.append(f"case {number} ({category}: {detail}): does not name {missing}: {message!r}")
        except Exception as e:
            problems.append(f"case {number} ({category}: {detail}): {type(e).__name__}: {e}")
        else:
            problems.append(f"case {number} ({category}: {detail}): accepted {argv}")
        if files_under(workspace) != before:
            problems.append(f"case {number} ({category}: {detail}): wrote {sorted(files_under(workspace) - before)}")
        seen[category] += 1
        seen[f"  {category}: {detail}"] += 1
    record_summary(
        f"generated mistakes (seed {SEED}): {CASES} cases, " + ", ".join(f"{c} {seen[c]}" for c in sorted(CATEGORIES))
    )
    assert sum(seen[c] for c in CATEGORIES) >= 300 and all(seen[c] for c in CATEGORIES)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("number", range(6))
def test_a_sample_of_generated_mistakes_through_the_real_cli_exits_2_with_one_error_line(tmp_path, number):
    rng = random.Random(SEED + 1000 + number)
    category = sorted(CATEGORIES)[number % len(CATEGORIES)]
    case = Case(tmp_path, rng)
    detail, blame = CATEGORIES[category](case, rng)
    argv = case.argv()
    before = files_under(tmp_path)
    result = run_cli(*argv)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, f"{category}: {detail}\n{result.stderr[-3000:]}"
    assert all(name in errors[0] for name in blame), (blame, errors[0])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert files_under(tmp_path) == before, f"{category}: {detail}"


def test_the_demo_config_itself_passes_the_same_checks(tmp_path):
    """The generator's starting point is valid: each case is refused for its one mistake, not for the base."""
    *_, train, evaluation = preflight(
        ["--config", DEMO_CONFIG, "--output_dir", tmp_path / "out", "--model_name_or_path", DEMO_MODEL]
    )
    lines = {s: len((DEMO_DATA / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()) for s in ("train", "test")}
    assert len(train) == lines["train"] and len(evaluation) == lines["test"] and not (tmp_path / "out").exists()
