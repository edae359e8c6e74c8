"""train_diversity_simpo.py as a user meets it: YAML plus overrides, clear errors, and the offline demo end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import DEMO_DATA, ROOT, refusal

from train_diversity_simpo import ConfigError, main, parse_args

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "train_diversity_simpo.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def write_yaml(path, **fields):
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    config.update(fields)
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def assert_clean_error(result, *phrases):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


@pytest.mark.parametrize(
    "script, mistake, line",
    [
        ("train_diversity_simpo.py", ["--beta", "-1"], "error: beta=-1.0 is out of range"),
        ("generate_candidates.py", ["--num_candidates", "1"], "error: num_candidates=1 is out of range"),
        ("train_on_policy.py", ["--rounds", "0"], "error: rounds=0 is out of range"),
        ("train_reward_model.py", ["--max_length", "0"], "error: max_length=0 is out of range"),
    ],
)
def test_cli_wrappers_print_one_error_line_and_exit_2(tmp_path, script, mistake, line):
    """Each command, run as a user runs it, turns the refusal its main raises into one `error:` line on stderr, no
    traceback, exit status 2 and nothing written; the other tests of mistakes call main in their own process."""
    command = [sys.executable, script, *mistake, "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(line), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_yaml_values_are_loaded_and_command_line_overrides_them():
    script, training, model = parse_args(["--config", str(DEMO_CONFIG), "--diversity_weight", "0.2", "--beta", "3"])
    assert (training.diversity_weight, training.beta) == (0.2, 3.0)
    assert training.diversity_alpha == 0.1 and training.simpo_gamma == 0.7
    assert model.model_name_or_path == "demo/tiny-llama-ja" and script.dataset_name == "demo/data"


def test_without_config_flag_the_real_config_is_used():
    # no GPU here for the real config's bf16; no DeepSpeed in this process (it would set up a process group)
    script, training, model = parse_args(["--bf16", "false", "--deepspeed", ""])
    assert model.model_name_or_path == "elyza/Llama-3-ELYZA-JP-8B"
    assert training.output_dir == "output/diversity-simpo-trained-model"
    assert (training.loss_type, training.cpo_alpha, training.simpo_gamma) == ("simpo", 0.0, 0.7)
    # the term off, entropy only if turned on; varied replies from the pair rules (benchmarks/DIVERSITY.md)
    assert (training.diversity_weight, training.diversity_alpha) == (0.0, 1.0)
    assert script.pair_selection == ["best_vs_worst", "rarest_vs_worst"]
    real = yaml.safe_load((ROOT / "configs" / "config_diversity_simpo.yaml").read_text(encoding="utf-8"))
    assert real["deepspeed"] == "configs/ds_config.json"  # `deepspeed --num_gpus=4 train_diversity_simpo.py`: ZeRO-2


def test_misspelled_yaml_key_names_the_key_and_the_closest_field(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", diversty_weight=0.1)
    with pytest.raises(ConfigError, match=r"unknown key 'diversty_weight'.*did you mean 'diversity_weight'"):
        parse_args(["--config", str(config)])


def test_misspelled_command_line_flag_names_the_closest_field():
    with pytest.raises(ConfigError, match=r"unknown option --diversity_alpah.*did you mean 'diversity_alpha'"):
        parse_args(["--config", str(DEMO_CONFIG), "--diversity_alpah", "0.5"])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--report_to", "[]"], {"report_to": []}),  # none: argparse alone reads "[]" as a name
        (["--report_to=[wandb, tensorboard]"], {"report_to": ["wandb", "tensorboard"]}),
        (["--lora_target_modules", "q_proj", "v_proj"], {"lora_target_modules": ["q_proj", "v_proj"]}),  # argparse's
        (["--lora_target_modules", "[q_proj, v_proj]"], {"lora_target_modules": ["q_proj", "v_proj"]}),
        (
            ["--pair_selection", "[best_vs_worst, rarest_vs_worst]"],
            {"pair_selection": ["best_vs_worst", "rarest_vs_worst"]},
        ),
    ],
)
def test_a_list_setting_on_the_command_line_arrives_as_the_list_written(flags, expected):
    settings = {}
    for instance in parse_args(["--config", str(DEMO_CONFIG), *flags]):
        settings |= vars(instance)
    assert {key: settings[key] for key in expected} == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pair_selection", "[best_vs_worst, rarest]"], "pair_selection='rarest' is not one of"),
        (["--report_to", "[wandb"], "--report_to=[wandb is not a list: write it as [a, b] (or [] for none)"),
        (
            ["--report_to", "[wandb, [tensorboard]]"],
            "report_to=['wandb', ['tensorboard']] must be empty (null) or a string or a list (each a string)",
        ),
    ],
)
def test_a_list_setting_that_is_not_a_list_of_its_type_is_one_line(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--config", str(DEMO_CONFIG), *flags])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--diversity_weight", "-1", "diversity_weight=-1.0 is out of range: it must be a number >= 0"),
        ("--diversity_alpha", "2", "diversity_alpha=2.0 is out of range: it must be a number in [0, 1]"),
        ("--diversity_weight", "abc", "invalid float value: 'abc'"),
    ],
)
def test_out_of_range_or_mistyped_values_are_config_errors(flag, value, message):
    with pytest.raises(ConfigError) as error:
        parse_args(["--config", str(DEMO_CONFIG), flag, value])
    assert message in str(error.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*missing.yaml not found"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_dataset_missing_a_column_is_refused_naming_file_and_column(tmp_path):
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in rows))
    config = write_yaml(tmp_path / "c.yaml", dataset_name=str(data), eval_strategy="no", output_dir=str(tmp_path / "o"))
    refused = refusal(main, "--config", config)
    assert "pairs.jsonl" in refused and "lacks column(s) ['rejected']" in refused, refused


def test_dataset_with_an_empty_completion_is_refused_naming_the_row(tmp_path):
    rows = [{"prompt": "質問です。", "chosen": "答えです。", "rejected": "いいえ。"}] * 3
    rows[1] = {**rows[1], "chosen": "  "}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = write_yaml(tmp_path / "c.yaml", dataset_name=str(data), eval_strategy="no", output_dir=str(tmp_path / "o"))
    refused = refusal(main, "--config", config)
    assert "pairs.jsonl" in refused and "row 1: 'chosen' is empty" in refused, refused


def test_real_config_offline_says_the_hub_is_unreachable_and_points_to_the_demo(tmp_path):
    result = run_cli(
        "--output_dir", tmp_path / "o", "--bf16", "false", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    )
    assert_clean_error(result, "Hugging Face Hub could not provide it", "configs/demo.yaml")


def test_existing_finished_model_in_output_dir_is_refused_and_left_untouched(tmp_path):
    output = tmp_path / "o"
    output.mkdir()
    (output / "config.json").write_text("{}")
    refused = refusal(main, "--config", DEMO_CONFIG, "--output_dir", output)
    assert "already holds a trained model" in refused and "--overwrite_output_dir" in refused, refused
    assert [p.name for p in output.iterdir()] == ["config.json"] and (output / "config.json").read_text() == "{}"


def test_demo_trains_evaluates_logs_diversity_and_saves_a_model_that_generates(tmp_path):
    output = tmp_path / "demo"
    result = run_cli(
        "--config",
        DEMO_CONFIG,
        "--output_dir",
        output,
        "--max_steps",
        6,
        "--eval_steps",
        3,
        "--save_steps",
        3,
        "--logging_steps",
        1,
        "--diversity_eval_prompts",
        2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"training_curves.png to {output}" in result.stdout + result.stderr

    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")  # this tool's card, with Hub metadata the Hub accepts
    card.validate = None
    metadata = card.data.to_dict()
    assert metadata.get("base_model") is None  # a local model folder whose card and config name no Hub id
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"simpo", "diversity-simpo", "trl"} <= set(metadata["tags"]) and "datasets" not in metadata
    text = card.text
    assert "None" not in text.replace("`None`", "") and "CPO" not in text.replace("CPOTrainer", "")
    assert "the local model `demo/tiny-llama-ja`" in text and "`demo/data`: 216 training pairs used of 216" in text
    assert "layout: conversational (explicit prompt)" in text and "54 held-out pairs" in text
    assert "beta =\n2.5" in text.replace(" \n", "\n") or "beta = 2.5" in text
    for setting in (
        "simpo_gamma = 0.7",
        "diversity_weight = 0.05",
        "diversity_alpha = 0.1",
        "arxiv.org/abs/2405.14734",
    ):
        assert setting in text.replace("\n", " "), setting
    assert "![training curves](training_curves.png)" in text and "apply_chat_template" in text
    assert f'AutoModelForCausalLM.from_pretrained("{output}")' in text and "日本の四季" in text
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    final_eval = [e for e in history if "eval_rewards/accuracies" in e][-1]
    assert "| preference accuracy | " in text and f"{final_eval['eval_rewards/accuracies']:.4g} |" in text
    assert "| distinct_2 |" in text and "torch 2.13.0" in text and "x cpu" in text
    png = (output / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000  # a real picture, not an empty file
    from PIL import Image

    with Image.open(output / "training_curves.png") as image:
        image.verify()
        assert image.size[0] > 500 and image.size[1] > 200

    state = json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())
    logged = {key for entry in state["log_history"] for key in entry}
    assert {"diversity/loss", "diversity/entropy", "diversity/kl", "eval_diversity/loss", "rewards/margins"} <= logged
    assert {"diversity_eval/distinct_2", "diversity_eval/self_bleu", "diversity_eval/token_entropy"} <= logged
    resolved = yaml.safe_load((output / "resolved_config.yaml").read_text(encoding="utf-8"))
    assert resolved["diversity_weight"] == 0.05 and resolved["max_steps"] == 6
    assert "hub_token" not in resolved and resolved["diversity_eval_max_new_tokens"] == 48  # a setting, not a secret
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb should have logged offline"

    import hashlib

    import torch

    record = json.loads((output / "run_record.json").read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["global_step"] == 6 and record["seed"] == 42
    assert record["command"] == {"argv": ["train_diversity_simpo.py", *record["command"]["argv"][1:]],
                                 "launcher": "python", "world_size": 1}  # fmt: skip
    assert "--max_steps" in record["command"]["argv"] and record["settings"] == "resolved_config.yaml"
    assert record["environment"]["packages"]["torch"] == torch.__version__
    assert record["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["environment"]["accelerator"]["type"] == "cpu" and record["environment"]["accelerator"]["count"] >= 1
    assert record["project"]["version"] and len(record["project"]["git_commit"] or "x" * 40) == 40
    files = {Path(f["path"]).name: f["sha256"] for f in record["data"]["files"]}
    assert files == {n: hashlib.sha256((DEMO_DATA / n).read_bytes()).hexdigest() for n in ("test.jsonl", "train.jsonl")}
    layout = "conversational (explicit prompt)"
    assert record["data"]["rows"]["train"] == {"read": 216, "kept": 216, "skipped_identical": 0,
                                               "skipped_diverging": 0, "layout": layout}  # fmt: skip
    assert record["data"]["rows"]["eval"]["kept"] == 54
    assert record["started"] <= record["ended"]

    sys.path.insert(0, str(ROOT / "demo"))
    from generate import generate

    reply = generate(output, "富士山について教えてください。", max_new_tokens=8)
    assert isinstance(reply, str) and reply


def test_resolved_config_keeps_every_setting_and_no_secret(tmp_path):
    """README: resolved_config.yaml holds every setting of the run (settings whose names contain 'token', such as
    diversity_eval_max_new_tokens, included), and never a secret (the Hub token)."""
    from train_diversity_simpo import save_resolved_config

    argv = ["--config", str(DEMO_CONFIG), "--hub_token", "hf_SECRET", "--diversity_eval_max_new_tokens", "17"]
    settings = parse_args(argv)
    save_resolved_config(tmp_path / "resolved_config.yaml", *settings)
    text = (tmp_path / "resolved_config.yaml").read_text(encoding="utf-8")
    resolved = yaml.safe_load(text)
    assert "hf_SECRET" not in text and "hub_token" not in resolved
    assert resolved["diversity_eval_max_new_tokens"] == 17
    expected = {
        name for config in settings for name in (vars(config) if not hasattr(config, "to_dict") else config.to_dict())
    }
    assert set(resolved) == expected - {"hub_token"}


def test_push_to_hub_uploads_the_folder_after_this_tools_card_and_record_are_written(tmp_path, monkeypatch):
    """With push_to_hub the Hub must get what the folder ends with: this tool's model card, the run record (finished)
    and the curves beside the model. The Hub is unreachable here, so the Trainer's two Hub calls are replaced by
    stand-ins that record what the folder holds at the moment of the upload."""
    from transformers import Trainer

    import train_diversity_simpo

    uploads = []

    def push_to_hub(self, *args, **kwargs):
        folder = Path(self.args.output_dir)
        card = folder / "README.md"
        record = folder / "run_record.json"
        uploads.append(
            {
                "card": card.read_text(encoding="utf-8") if card.exists() else "",
                "status": json.loads(record.read_text(encoding="utf-8"))["status"] if record.exists() else None,
                "curves": (folder / "training_curves.png").exists(),
                "model": (folder / "model.safetensors").exists(),
            }
        )

    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, *a, **k: setattr(self, "hub_model_id", "user/demo"))
    monkeypatch.setattr(Trainer, "push_to_hub", push_to_hub)
    output = tmp_path / "out"
    argv = ["--config", str(DEMO_CONFIG), "--output_dir", str(output), "--max_steps", "2", "--report_to", "none"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--diversity_eval_prompts", "0"]
    train_diversity_simpo.main([*argv, "--push_to_hub", "true", "--hub_model_id", "user/demo"])
    assert len(uploads) == 1, uploads
    (upload,) = uploads
    assert "diversity_weight" in upload["card"] and upload["status"] == "finished" and upload["curves"]
    assert upload["model"]


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (
            ["--lr_scheduler_type", "cosine_with_min_lr"],
            "the learning-rate schedule (lr_scheduler_type=cosine_with_min_lr",
        ),
        (["--optim", "adamw_torch", "--optim_args", "nonsense"], "the optimizer settings (optim=adamw_torch"),
    ],
    ids=["schedule-without-min-lr", "unparsable-optim-args"],
)
def test_optimizer_and_schedule_settings_torch_would_reject_are_refused_before_anything_is_written(
    tmp_path, flags, phrase
):
    """README: the optimizer and the schedule are built on a dummy parameter in preflight, so a setting torch or
    transformers rejects at the first step is one error line, exit 2, and no output folder."""
    refused = refusal(main, "--config", DEMO_CONFIG, "--output_dir", tmp_path / "out", *flags)
    assert phrase in refused and ("is rejected" if "schedule" in phrase else "are rejected") in refused, refused
    assert not (tmp_path / "out").exists()


def test_overwrite_output_dir_retrains_over_a_finished_model(tmp_path):
    """README: a finished model is never overwritten unless --overwrite_output_dir true; with it the run trains and
    replaces the model (what `make demo` does on every rerun)."""
    output = tmp_path / "out"
    common = ["--config", DEMO_CONFIG, "--output_dir", output, "--max_steps", 1, "--eval_strategy", "no"]
    common += ["--report_to", "none", "--diversity_eval_prompts", 0, "--save_strategy", "no", "--warmup_steps", 0]
    assert run_cli(*common).returncode == 0
    first = (output / "model.safetensors").read_bytes()
    again = run_cli(*common, "--learning_rate", "1e-3", "--overwrite_output_dir", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (output / "model.safetensors").read_bytes() != first


@pytest.mark.parametrize(
    "yaml_lines, flags, noted",
    [
        ("", [], False),
        ("", ["--pair_selection", "best_vs_worst"], True),
        ("", ["--pair_selection=rarest_vs_worst"], True),
        ("pair_selection: best_vs_worst\n", [], True),
        ("pair_selection: [best_vs_worst, rarest_vs_worst]\n", [], True),
    ],
)
def test_pair_rules_given_for_pairs_data_say_in_one_line_that_they_do_nothing_there(
    tmp_path, capsys, yaml_lines, flags, noted
):
    """The demo's data are prompt/chosen/rejected pairs: a pair rule named in the config or on the command line, even
    the default one, chooses nothing there, and one line says so and gives the two commands that do train varied
    replies from those pairs; without one, nothing is said."""
    from train_diversity_simpo import preflight

    config = tmp_path / "config.yaml"
    config.write_text(DEMO_CONFIG.read_text(encoding="utf-8") + yaml_lines, encoding="utf-8")
    preflight(["--config", str(config), "--output_dir", str(tmp_path / "out"), *flags])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: pair_selection")]
    assert len(notes) == noted
    if noted:
        assert "pair_selection does nothing here" in notes[0]
        assert (
            "python train_reward_model.py --dataset_name demo/data, then python train_on_policy.py "
            """--candidates '{"dataset_name": "demo/data"}'""" in notes[0]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("deepspeed, placed", [("", {"": "cuda:0"}), ("configs/ds_config_zero3.json", None)])
def test_the_model_loads_straight_to_the_training_device_unless_zero3_partitions_it(
    tmp_path, monkeypatch, deepspeed, placed
):
    """On a GPU each rank loads the weights onto its own device, not first into host memory; under ZeRO-3 they are
    partitioned as they load instead. No GPU exists here: the training device is mocked as cuda:0, and the load is
    stopped where it starts, with the placement it was asked for."""
    import torch
    from transformers import AutoModelForCausalLM

    import train_diversity_simpo
    from diversity_simpo_trainer import DiversitySimPOConfig

    class Asked(Exception):
        pass

    def record(name, **kwargs):
        raise Asked(kwargs["device_map"])

    monkeypatch.setattr(DiversitySimPOConfig, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    _, training, model = parse_args(["--config", str(DEMO_CONFIG), "--output_dir", str(tmp_path / "out")])
    if deepspeed:  # what accelerate's plugin says of a ZeRO-3 config
        monkeypatch.setattr(training, "deepspeed_plugin", SimpleNamespace(zero_stage=3), raising=False)
    with pytest.raises(Asked) as asked:
        train_diversity_simpo.load_model_and_tokenizer(model, training)
    device_map = asked.value.args[0]
    assert (None if device_map is None else {k: str(v) for k, v in device_map.items()}) == placed
