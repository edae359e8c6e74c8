"""Fine-tune a causal language model with SimPO plus a diversity term.

    python train_diversity_simpo.py                                    # configs/config_diversity_simpo.yaml
    python train_diversity_simpo.py --config configs/demo.yaml --max_steps 10
    deepspeed --num_gpus=4 train_diversity_simpo.py --config configs/config_diversity_simpo.yaml \
        --deepspeed configs/ds_config.json

Every field of the YAML can be overridden on the command line (`--diversity_weight 0.1`). Mistakes in the config or
the data end the run with a one-line `error:` and exit status 2, before anything is written.
"""

import difflib
import json
import netrc
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "config_diversity_simpo.yaml"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MODEL_FILES = ("config.json", "adapter_config.json")
DEMO_HINT = " To try the tool offline: python train_diversity_simpo.py --config configs/demo.yaml"


class ConfigError(Exception):
    """A mistake in the user's config, command line or data: reported in one line, without a traceback."""


@dataclass
class ScriptArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet/.csv file or folder."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, if the dataset has it."})
    dataset_test_fraction: float = field(
        default=0.0, metadata={"help": "Without a test split, hold out this fraction of the train split for eval."}
    )
    wrap_text_as_chat: bool = field(
        default=False,
        metadata={
            "help": "Turn plain-text rows into one user turn and one assistant reply, so that the tokenizer's chat "
            "template is applied as for conversational data (what an instruct model expects)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing over a finished model already in output_dir."}
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
    diversity_eval_gather_weights: bool = field(
        default=True,
        metadata={
            "help": "Under ZeRO-3, gather the whole model on each GPU once for the diversity eval's generation "
            "(fast); false keeps it sharded and generates in lockstep (slow, for models too big to gather)."
        },
    )


def make_parser():
    from trl import ModelConfig, TrlParser

    from diversity_simpo_trainer import DiversitySimPOConfig

    class Parser(TrlParser):
        def error(self, message):  # argparse would print the whole usage (hundreds of options) and exit
            raise ConfigError(f"{message} (see --help)")

    return Parser((ScriptArguments, DiversitySimPOConfig, ModelConfig))


def parse_args(argv):
    """YAML config (`--config`, default DEFAULT_CONFIG) overridden by command-line flags."""
    import yaml

    argv = list(argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    position = argv.index("--config") + 1
    if position == len(argv):
        raise ConfigError("--config needs a file path")
    config_path = Path(argv[position])
    if not config_path.is_file():
        raise ConfigError(f"config file {config_path} not found; pass --config FILE (e.g. configs/demo.yaml)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{config_path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must be a YAML mapping of `field: value` lines")

    parser = make_parser()
    fields = {action.dest for action in parser._actions} - {"help"}
    for key in config:
        if key != "env" and key not in fields:
            raise ConfigError(f"{config_path}: unknown key {key!r}{_closest(key, fields)}")
    options = set(parser._option_string_actions)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag != "--config" and flag not in options:
            raise ConfigError(f"unknown option {flag}{_closest(flag[2:], fields)}")
    deepspeed = argv[argv.index("--deepspeed") + 1] if "--deepspeed" in argv[:-1] else config.get("deepspeed")
    check_deepspeed_config(deepspeed)
    if deepspeed:  # only once everything else checked out: this sets process-wide environment variables
        single_process_deepspeed_env()
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_deepspeed_config(path):
    if not path or not isinstance(path, str) or path.lstrip().startswith("{"):
        return  # not set, or an inline JSON dict that TrainingArguments parses itself
    if not Path(path).is_file():
        raise ConfigError(f"DeepSpeed config {path} not found; check --deepspeed (e.g. configs/ds_config.json)")
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None


def _closest(name, candidates):
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def load_preference_data(args: ScriptArguments, seed: int):
    """(train, eval or None) from a Hub id or a local file/folder, checked row by row."""
    from datasets import load_dataset

    name = args.dataset_name
    if not name:
        raise ConfigError("dataset_name is not set: give a Hub dataset id or a local .jsonl/.json/.parquet/.csv path")
    path = Path(name)
    try:
        if path.is_file():
            if path.suffix not in DATA_FILE_BUILDERS:
                raise ConfigError(f"dataset file {path} must end in one of {', '.join(DATA_FILE_BUILDERS)}")
            dataset = load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files={args.dataset_train_split: str(path)})
        elif path.is_dir():
            dataset = load_dataset(str(path), name=args.dataset_config)
        elif path.suffix in DATA_FILE_BUILDERS or name.startswith((".", "/", "~")):
            raise ConfigError(f"dataset file {name} not found; check dataset_name")
        else:
            dataset = load_dataset(name, name=args.dataset_config)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the message, not the stack
        hint = (
            ""
            if path.exists()
            else f" (not a local path, and the Hugging Face Hub could not provide it: offline?{DEMO_HINT})"
        )
        raise ConfigError(f"could not load dataset {name!r}{hint}: {_first_line(e)}") from None

    if args.dataset_train_split not in dataset:
        raise ConfigError(f"dataset {name!r} has no split {args.dataset_train_split!r}; it has {list(dataset)}")
    # row_id: the row's index in its split, so that errors (a NaN loss, say) can name the rows of a batch
    dataset = dataset.map(lambda _, i: {"row_id": i}, with_indices=True)
    train = dataset[args.dataset_train_split]
    if args.dataset_test_split in dataset:
        evaluation = dataset[args.dataset_test_split]
    elif args.dataset_test_fraction > 0:
        split = train.train_test_split(test_size=args.dataset_test_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = None
    train = check_rows(train, f"{name} [{args.dataset_train_split}]")
    if evaluation is not None:
        evaluation = check_rows(evaluation, f"{name} [eval]")
    if args.wrap_text_as_chat and isinstance(train[0]["chosen"], str):
        train = train.map(_as_chat)
        evaluation = evaluation.map(_as_chat) if evaluation is not None else None
    return train, evaluation


def _as_chat(row):
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def check_rows(dataset, source):
    """Refuse data TRL would choke on deep inside (missing columns, no rows, empty prompts or completions), and drop
    pairs whose chosen and rejected are identical (they carry no preference), with a count."""
    if len(dataset) == 0:
        raise ConfigError(f"{source} has no rows")
    required = ["chosen", "rejected"] + ([] if _is_conversation(dataset[0].get("chosen")) else ["prompt"])
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{source} lacks column(s) {missing}; it has {dataset.column_names}. "
            "Preference data needs `prompt`, `chosen` and `rejected`."
        )
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    for i, row in enumerate(dataset.select_columns(columns)):
        for column in columns:
            if not _has_text(row[column]):
                raise ConfigError(f"{source}: row {i} has an empty {column!r}; fill it in or remove the row")
    distinct = dataset.filter(lambda row: row["chosen"] != row["rejected"])
    if len(distinct) == 0:
        raise ConfigError(f"{source}: every row has chosen identical to rejected; there is no preference to learn")
    if len(distinct) < len(dataset):
        print(
            f"warning: {source}: skipped {len(dataset) - len(distinct)} of {len(dataset)} rows whose chosen "
            "and rejected are identical",
            file=sys.stderr,
        )
    return distinct


def _is_conversation(value):
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _has_text(value):
    if isinstance(value, str):
        return bool(value.strip())
    return _is_conversation(value) and bool(value) and all(str(m["content"] or "").strip() for m in value)


def load_model_and_tokenizer(model_args, training_args):
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    name = model_args.model_name_or_path
    if not name:
        raise ConfigError("model_name_or_path is not set: give a Hub model id or a local model folder")
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=dtype,
            quantization_config=quantization_config,
            # k-bit weights are placed on this process's device at load time
            device_map={"": PartialState().local_process_index} if quantization_config is not None else None,
        )
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise ConfigError(f"could not load the model in {name}: {_first_line(e)}") from None
        raise ConfigError(
            f"could not load model {name!r}: it is not a local folder and the Hugging Face Hub could not provide it "
            f"(offline, or a wrong id?{DEMO_HINT}): {_first_line(e)}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_output_dir(script_args, training_args):
    """Never write over a finished model, or the checkpoints of an unfinished run, by accident."""
    output_dir = Path(training_args.output_dir)
    if script_args.overwrite_output_dir or resume_target(training_args.resume_from_checkpoint):
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


def resume_target(value):
    """`latest` (or `true`) resumes from the newest checkpoint in output_dir; a path resumes from that checkpoint."""
    if value is None or value.lower() in ("false", "none", ""):
        return None
    return True if value.lower() in ("latest", "true") else value


class StopOnSigterm(TrainerCallback):
    """SIGTERM (what a cluster scheduler sends before killing a job): save a checkpoint at the end of the current step,
    then stop. Every process must agree to stop at the same step, so the flag is reduced across processes."""

    def __init__(self):
        self.received = False
        self.accelerator = None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        flag = torch.tensor(float(self.received), device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            self.received = True
            control.should_save = control.should_training_stop = True


def use_wandb_offline_without_login(training_args):
    """No wandb credentials: log offline (sync later with `wandb sync`) instead of failing at the first step."""
    if "wandb" not in (training_args.report_to or []) or "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ:
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no login found, logging offline to ./wandb (upload later with `wandb sync`)", file=sys.stderr)


def save_resolved_config(path, *configs):
    import yaml

    resolved = {}
    for config in configs:
        resolved.update(config.to_dict() if hasattr(config, "to_dict") else asdict(config))
    resolved = {k: v for k, v in resolved.items() if "token" not in k and "api_key" not in k}
    path.write_text(yaml.safe_dump(resolved, allow_unicode=True, sort_keys=True), encoding="utf-8")


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


def eval_prompts(dataset, count):
    """The first `count` prompts of the eval set (for conversations without a prompt column: all but the reply)."""
    if dataset is None or count == 0:
        return []
    return [row.get("prompt") or row["chosen"][:-1] for row in dataset.select(range(min(count, len(dataset))))]


def evaluate_only(trainer, diversity_eval, output_dir):
    """Preference accuracy and the rest of TRL's eval metrics, plus the diversity of sampled replies if asked for."""
    from diversity_eval import run_diversity_eval, sentence_embedder

    results = trainer.evaluate()
    if diversity_eval["prompts"]:
        report = run_diversity_eval(trainer, sentence_embedder(), **diversity_eval)
        results |= {f"diversity_eval/{k}": v for k, v in report.items()}
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "eval_results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2), "utf-8")
        print(json.dumps(results, ensure_ascii=False, indent=2))
        print(f"Wrote {output_dir / 'eval_results.json'}")
    trainer.end()


def main(argv=None):
    script_args, training_args, model_args = parse_args(sys.argv[1:] if argv is None else argv)

    from trl import get_peft_config

    from diversity_eval import DiversityEvalCallback
    from diversity_simpo_trainer import DiversitySimPOTrainer

    if not script_args.eval_only:
        check_output_dir(script_args, training_args)
    train_dataset, eval_dataset = load_preference_data(script_args, training_args.seed)
    if script_args.eval_only and eval_dataset is None:
        raise ConfigError(
            f"--eval_only needs an eval split: the dataset has no {script_args.dataset_test_split!r} "
            "split; set dataset_test_fraction"
        )
    if script_args.eval_only:
        train_dataset = eval_dataset  # TRL requires a train set; nothing is trained
    elif training_args.eval_strategy != "no" and eval_dataset is None:
        raise ConfigError(
            f"eval_strategy is {training_args.eval_strategy.value!r} but the dataset has no "
            f"{script_args.dataset_test_split!r} split; set dataset_test_fraction (e.g. 0.05) or eval_strategy: no"
        )
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        # ZeRO-3 partitions the weights while they load, through DeepSpeed's own comm layer; accelerate sets that up
        # itself on GPUs only, so on CPU ranks (gloo) it adopts the process group here.
        deepspeed.init_distributed()
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    if _is_conversation(train_dataset[0]["chosen"]) and tokenizer.chat_template is None:
        raise ConfigError(
            f"the data is conversational but the tokenizer of {model_args.model_name_or_path} has no chat template"
        )
    use_wandb_offline_without_login(training_args)

    sigterm = StopOnSigterm()
    try:
        trainer = DiversitySimPOTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[sigterm],
        )
    except ValueError as e:  # TRL's and ours: bad settings or data found while tokenizing
        raise ConfigError(str(e)) from None
    sigterm.accelerator = trainer.accelerator
    diversity_eval = dict(
        prompts=eval_prompts(eval_dataset, script_args.diversity_eval_prompts),
        num_samples=script_args.diversity_eval_samples,
        temperature=script_args.diversity_eval_temperature,
        max_new_tokens=script_args.diversity_eval_max_new_tokens,
        batch_size=script_args.diversity_eval_batch_size,
        gather_weights=script_args.diversity_eval_gather_weights,
    )
    if script_args.eval_only:
        return evaluate_only(trainer, diversity_eval, Path(training_args.output_dir))
    if diversity_eval["prompts"]:
        trainer.add_callback(DiversityEvalCallback(trainer, **diversity_eval))
    trainer.train(resume_from_checkpoint=resume_target(training_args.resume_from_checkpoint))
    if sigterm.received:
        trainer.accelerator.print(
            f"Stopped by SIGTERM at step {trainer.state.global_step}; a checkpoint is in {training_args.output_dir}. "
            "Continue with --resume_from_checkpoint latest"
        )
        sys.exit(143)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the whole log history, next to the model
    if trainer.is_world_process_zero():
        save_resolved_config(
            Path(training_args.output_dir) / "resolved_config.yaml", script_args, model_args, training_args
        )
    trainer.accelerator.print(f"Saved the model, tokenizer and resolved_config.yaml to {training_args.output_dir}")
    trainer.end()


if __name__ == "__main__":
    from diversity_simpo_trainer import NonFiniteLossError

    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved and the trackers are finished. Skip interpreter shutdown: with several processes, gloo's
        # worker threads can free an async collective while Python tears down and abort with "terminate called
        # without an active exception" (exit 250) after a successful run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
