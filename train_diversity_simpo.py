"""Fine-tune a causal language model with SimPO plus a diversity term.

    deepspeed --num_gpus=4 train_diversity_simpo.py    # configs/config_diversity_simpo.yaml, ZeRO-2 (its deepspeed)
    python train_diversity_simpo.py --use_peft true --deepspeed "" --gradient_accumulation_steps 64    # one GPU: LoRA
    python train_diversity_simpo.py --config configs/demo.yaml --max_steps 10    # the offline demo, on the CPU

Every field of the YAML can be overridden on the command line (`--diversity_weight 0.1`). Mistakes in the config, the
paths or the data end the run with a one-line `error:` and exit status 2, before anything is written
(diversity_simpo/settings.py, diversity_simpo/data.py).
"""

import json
import netrc
import os
import shutil
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from diversity_simpo import run_record, settings
from diversity_simpo.curves import plot_training_curves
from diversity_simpo.data import DataError, load_preference_data
from diversity_simpo.health import SimPOHealthWarnings
from diversity_simpo.pair_selection import check_rules
from diversity_simpo.rows import is_conversation
from diversity_simpo.settings import (
    DEMO_HINT,
    ConfigError,
    check_deepspeed_against_settings,
    check_optimizer_and_schedule,
    check_paths,
    first_line,
    is_adapter_folder,
    resume_target,
    save_resolved_config,
)


def parse_args(argv):
    """(ScriptArguments, DiversitySimPOConfig, ModelConfig) from the YAML and the flags, every value checked
    (diversity_simpo/settings.py); the trainer's config is imported here, when a run starts, not by the package."""
    from diversity_simpo_trainer import DiversitySimPOConfig

    return settings.parse_args(argv, DiversitySimPOConfig)


def preflight(argv, counts=None):
    """Everything the user controls, read and checked, and nothing written: the settings and the normalised data
    (`counts`, a dict if given, receives each split's rows read, kept and skipped)."""
    script_args, training_args, model_args = parse_args(argv)
    check_paths(script_args, training_args, model_args)
    check_optimizer_and_schedule(training_args)
    train_dataset, eval_dataset = load_preference_data(script_args, training_args.seed, counts)
    if (  # rules the user named, in the YAML or as a flag, on data they cannot apply to
        "candidates" not in train_dataset.column_names
        and "pair_selection" in settings.given_settings(argv, settings.DEFAULT_CONFIG)
        and training_args.process_index == 0
    ):
        data = script_args.dataset_name
        loop_data = json.dumps({"dataset_name": data}, ensure_ascii=False)
        print(f"note: pair_selection {script_args.pair_selection} chooses among scored candidates, and {data} holds "
              "preference pairs, which train as they are: pair_selection does nothing here. For more varied replies "
              f"from these pairs: python train_reward_model.py --dataset_name {data}, then python train_on_policy.py "
              f"--candidates '{loop_data}' (README.md: Diverse replies from your pairs)", file=sys.stderr)  # fmt: skip
    if "candidates" not in train_dataset.column_names:  # scored candidates: once their pairs are chosen (train)
        check_deepspeed_against_settings(training_args, len(train_dataset))
    else:
        check_rules(train_dataset, script_args.pair_selection, f"{script_args.dataset_name} [train]")
    if script_args.eval_only and eval_dataset is None:
        raise ConfigError(
            f"--eval_only needs an eval split: the dataset has no {script_args.dataset_test_split!r} "
            "split; set dataset_test_fraction"
        )
    if not script_args.eval_only and training_args.eval_strategy != "no" and eval_dataset is None:
        raise ConfigError(
            f"eval_strategy is {training_args.eval_strategy.value!r} but the dataset has no "
            f"{script_args.dataset_test_split!r} split; set dataset_test_fraction (e.g. 0.05) or eval_strategy: no"
        )
    return script_args, training_args, model_args, train_dataset, eval_dataset


def main(argv=None):
    argv, counts = sys.argv[1:] if argv is None else argv, {}
    script_args, training_args, model_args, train_dataset, eval_dataset = preflight(argv, counts)
    output_dir = Path(training_args.output_dir)
    created = not output_dir.exists()
    try:
        return train(script_args, training_args, model_args, train_dataset, eval_dataset, argv, counts)
    except (ConfigError, DataError):
        if created and output_dir.is_dir() and not any(p.is_file() for p in output_dir.rglob("*")):
            shutil.rmtree(output_dir)  # a mistake found late (while loading the model, say) leaves no empty folder
        raise


def train(script_args, training_args, model_args, train_dataset, eval_dataset, argv=(), counts=None):
    from trl import get_peft_config

    from diversity_simpo.pair_selection import keep_pairs, select_pairs, stored_logps_apply
    from diversity_simpo.rarity import candidate_logps
    from diversity_simpo.reply_diversity import DiversityEvalCallback
    from diversity_simpo_trainer import DiversitySimPOTrainer

    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        # ZeRO-3 partitions the weights while they load, through DeepSpeed's own comm layer; accelerate sets that up
        # itself on GPUs only, so on CPU ranks (gloo) it adopts the process group here.
        deepspeed.init_distributed()
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    counts, splits = {} if counts is None else counts, {"train": train_dataset, "eval": eval_dataset}
    choice = {
        "pair_selection": script_args.pair_selection,
        "divpo_rho": script_args.divpo_rho,
        "allow_cut_replies": script_args.allow_cut_replies,
        "model_name_or_path": model_args.model_name_or_path,
    }
    kept = []  # scored candidates: each rule's pairs, chosen once (DivPO's by rarity under this model) and kept
    scored = "candidates" in train_dataset.column_names
    for split, data in splits.items():
        if data is not None and "candidates" in data.column_names:
            stored = "logps" in data.column_names and stored_logps_apply(
                script_args.dataset_name, choice["model_name_or_path"]
            )
            splits[split], keep = select_pairs(
                data, split, {**choice, "stored_logps": stored},
                lambda rows: candidate_logps(model, tokenizer, rows, training_args.device,
                                             training_args.per_device_eval_batch_size),
                counts.setdefault(split, {}), f"{script_args.dataset_name} [{split}]", training_args.output_dir,
                resuming=bool(training_args.resume_from_checkpoint),
            )  # fmt: skip
            kept += [keep] if keep else []
    train_dataset, eval_dataset = splits.values()
    if scored:  # the schedule's length comes from the pairs' count, known now (preflight checked the rest)
        check_deepspeed_against_settings(training_args, len(train_dataset))
    if is_conversation(train_dataset[0]["prompt"]) and tokenizer.chat_template is None:
        raise ConfigError(
            f"the data is conversational but the tokenizer of {model_args.model_name_or_path} has no chat template"
        )
    if script_args.eval_only:
        train_dataset = eval_dataset  # TRL requires a train set; nothing is trained
    use_wandb_offline_without_login(training_args)
    peft_config = get_peft_config(model_args)
    base = adapter_base(model_args.model_name_or_path)
    if base:
        peft_config = None  # the loaded adapter is the one trained; a second one would stack on it
        if training_args.process_index == 0:
            print(
                f"model_name_or_path {model_args.model_name_or_path} is an adapter of {base}: training that adapter "
                "further with its own settings"
                + (" (the lora_* settings are not used)" if model_args.use_peft else ""),
                file=sys.stderr,
            )

    sigterm = StopOnSigterm()
    try:
        trainer = DiversitySimPOTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[sigterm],
        )
    except ValueError as e:  # TRL's and ours: bad settings or data found while tokenizing
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    sigterm.accelerator = trainer.accelerator
    diversity_eval = {
        **eval_prompts(eval_dataset, script_args.diversity_eval_prompts),
        "num_samples": script_args.diversity_eval_samples,
        "temperature": script_args.diversity_eval_temperature,
        "max_new_tokens": script_args.diversity_eval_max_new_tokens,
        "batch_size": script_args.diversity_eval_batch_size,
        "gather_weights": script_args.diversity_eval_gather_weights,
        "embedding_model": script_args.diversity_eval_embedding_model,
        "equivalence_threshold": script_args.diversity_eval_equivalence_threshold,
    }
    if script_args.eval_only:
        return evaluate_only(trainer, diversity_eval, Path(training_args.output_dir))
    if diversity_eval["prompts"]:
        trainer.add_callback(DiversityEvalCallback(trainer, **diversity_eval))
    trainer.add_callback(SimPOHealthWarnings(training_args.beta))
    record = trainer.is_world_process_zero()  # output_dir/run_record.json: one writer
    if record:  # the settings and the record before the first step: a run killed outright still has both
        save_resolved_config(Path(training_args.output_dir) / "resolved_config.yaml", script_args, model_args,
                             training_args)  # fmt: skip
        run_record.start(training_args.output_dir, argv, training_args, script_args.dataset_name, counts or {})
        for pairs in kept:  # beside the checkpoints: a resumed run trains these
            keep_pairs(training_args.output_dir, pairs)
    try:
        trainer.train(resume_from_checkpoint=resume_target(training_args.resume_from_checkpoint))
    except BaseException as e:  # recorded, then raised as before (a NaN loss: one line; our bugs: a traceback)
        if record:
            run_record.end(training_args.output_dir, "failed", trainer.state.global_step, f"{type(e).__name__}: {e}")
        raise
    if sigterm.received:
        if record:
            run_record.end(training_args.output_dir, "stopped", trainer.state.global_step, "SIGTERM; checkpoint saved")
        trainer.accelerator.print(
            f"Stopped by SIGTERM at step {trainer.state.global_step}; a checkpoint is in {training_args.output_dir}. "
            "Continue with --resume_from_checkpoint latest"
        )
        sys.exit(143)
    # _internal_call: transformers' own flag for "save, do not push yet": with push_to_hub the upload waits until this
    # tool's model card, the curves and the record are beside the model (below), so the Hub gets them too
    trainer.save_model(training_args.output_dir, _internal_call=True)
    trainer.save_state()  # trainer_state.json: the whole log history, next to the model
    curves = False
    if trainer.is_world_process_zero():  # the global rank 0: one writer, also across nodes
        output_dir = Path(training_args.output_dir)
        curves = plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        if script_args.merge_adapter:
            merge_adapter(output_dir, trainer.processing_class, training_args.trust_remote_code)
        run_record.end(output_dir, "finished", trainer.state.global_step)
        write_model_cards(output_dir, script_args, model_args, training_args, trainer.state.log_history)
    if training_args.push_to_hub:  # every rank calls it (it saves once more); the global rank 0 uploads the folder
        trainer.push_to_hub()
    trainer.accelerator.print(
        f"Saved the model, tokenizer, model card, resolved_config.yaml, run_record.json"
        f"{' and training_curves.png' if curves else ''} to {training_args.output_dir}"
        + (
            f", and the adapter merged into its base model to {training_args.output_dir}/merged"
            if script_args.merge_adapter
            else ""
        )
    )
    trainer.end()


def load_model_and_tokenizer(model_args, training_args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    name = model_args.model_name_or_path  # set: check_paths ran in preflight
    base = adapter_base(name)  # a LoRA run's output folder: its base model, with that adapter trained further
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    zero3 = training_args.deepspeed_plugin is not None and training_args.deepspeed_plugin.zero_stage == 3
    # straight to this rank's accelerator, not first into host memory (4 ranks x 16 GB for an 8B model at once); k-bit
    # weights must be placed at load time; ZeRO-3 partitions the weights as they load instead
    on_accelerator = training_args.device.type != "cpu" and not zero3
    device_map = {"": training_args.device} if on_accelerator or quantization_config is not None else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            base or name,
            revision=None if base else model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=dtype,
            quantization_config=quantization_config,
            device_map=device_map,
        )
        if base:
            from peft import PeftModel

            # as TRL does for a new adapter: under ZeRO-3 keep the adapter in the base model's dtype
            model = PeftModel.from_pretrained(model, name, is_trainable=True, autocast_adapter_dtype=not zero3)
    except (OSError, ValueError) as e:
        if base:
            raise ConfigError(
                f"could not load the base model {base} of the adapter in {name} (base_model_name_or_path in its "
                f"adapter_config.json): {first_line(e)}"
            ) from None
        if Path(name).exists():
            raise ConfigError(f"could not load the model in {name}: {first_line(e)}") from None
        raise ConfigError(
            f"could not load model {name!r}: it is not a local folder and the Hugging Face Hub could not provide it "
            f"(offline, or a wrong id?{DEMO_HINT}): {first_line(e)}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def write_model_cards(output_dir, script_args, model_args, training_args, log_history):
    """README.md beside the model (and beside the merged model, with the curves): this tool's card, not TRL's."""
    from diversity_simpo.model_card import write_model_card

    card = {
        "model_name_or_path": model_args.model_name_or_path,
        "dataset_name": script_args.dataset_name,
        "args": training_args,
        "log_history": log_history,
        "record": json.loads((output_dir / run_record.RECORD).read_text(encoding="utf-8")),
    }
    write_model_card(output_dir, adapter=(output_dir / "adapter_config.json").is_file(), **card)
    if script_args.merge_adapter:
        if (output_dir / "training_curves.png").is_file():
            shutil.copy(output_dir / "training_curves.png", output_dir / "merged" / "training_curves.png")
        write_model_card(output_dir / "merged", adapter=False, merged=True, **card)


def merge_adapter(output_dir, tokenizer, trust_remote_code):
    """PEFT's own merge of the adapter just saved in output_dir into a fresh copy of its base model, in the base
    model's dtype, saved with the tokenizer to output_dir/merged. It reads the saved (under ZeRO-3: already gathered)
    adapter, so the training engine's sharding plays no part; it runs once, on the global rank 0, on the CPU."""
    from peft import AutoPeftModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: a ZeRO-3 run must not partition this one-process copy
    model = AutoPeftModelForCausalLM.from_pretrained(output_dir, dtype="auto", trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir / "merged")
    tokenizer.save_pretrained(output_dir / "merged")


def adapter_base(name):
    """The base model of a PEFT adapter folder (a LoRA run's output), or None for a model folder or a Hub id."""
    if not is_adapter_folder(name):
        return None
    config = Path(name).expanduser() / "adapter_config.json"
    return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]  # checked in preflight


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


def eval_prompts(dataset, count):
    """The first `count` distinct prompts of the (normalised) eval set, and their references if the data has them: a
    row of scored candidates gives a pair per rule, side by side, and each prompt is sampled once."""
    if dataset is None or count == 0:
        return {"prompts": []}
    first = {}
    for index, prompt in enumerate(dataset["prompt"]):
        first.setdefault(json.dumps(prompt, ensure_ascii=False), index)
        if len(first) == count:
            break
    rows = dataset.select(list(first.values()))
    return {"prompts": rows["prompt"], "references": rows["reference"] if "reference" in rows.column_names else None}


def evaluate_only(trainer, diversity_eval, output_dir):
    """Preference accuracy and the rest of TRL's eval metrics, plus the diversity of sampled replies if asked for."""
    from diversity_simpo.reply_diversity import run_diversity_eval, sentence_embedder

    results = trainer.evaluate()
    if diversity_eval["prompts"]:
        embedder = sentence_embedder(diversity_eval.pop("embedding_model"))
        report = run_diversity_eval(trainer, embedder, **diversity_eval)
        results |= {f"diversity_eval/{k}": v for k, v in report.items()}
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "eval_results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2), "utf-8")
        print(json.dumps(results, ensure_ascii=False, indent=2))
        print(f"Wrote {output_dir / 'eval_results.json'}")
    trainer.end()


if __name__ == "__main__":
    from diversity_simpo_trainer import NonFiniteLossError

    try:
        main()
    except (ConfigError, DataError) as e:
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
