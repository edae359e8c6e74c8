"""Train a reward model (a scorer) on your preference pairs with TRL's RewardTrainer, for generate_candidates.py.

    python train_reward_model.py --dataset_name data/pairs.jsonl    # configs/reward_model.yaml: one GPU, LoRA
    deepspeed --num_gpus=4 train_reward_model.py --use_peft false --deepspeed configs/ds_config.json    # all weights
    python train_reward_model.py --config configs/demo_reward_model.yaml    # the offline demo, on the CPU

The pairs are read as train_diversity_simpo.py reads them (every layout of docs/data.md, the same system_prompt and
held-out split), and each pair is scored as generate_candidates.py scores a reply: the whole conversation in the chat
template (a text row as one user turn and the reply). Training stops early when the held-out loss (or the metric set
in metric_for_best_model) stops improving, and the best checkpoint is saved: a sequence-classification model with one
score (a LoRA run's adapter merged in), ready to be given as `reward_model:`. Mistakes in the config, the paths or
the data end the run with a one-line `error:` and exit status 2, before anything is written.
"""

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from diversity_simpo import run_record, settings
from diversity_simpo.data import DataError, load_preference_data
from diversity_simpo.rows import as_chat, is_conversation
from diversity_simpo.settings import (
    DEMO_HINT,
    ConfigError,
    ScriptArguments,
    check_deepspeed_against_settings,
    check_optimizer_and_schedule,
    check_paths,
    first_line,
    is_adapter_folder,
    resume_target,
    save_resolved_config,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "reward_model.yaml"
ADAPTER = "adapter"  # a LoRA run: the adapter beside the merged model, in output_dir/adapter


def _as_in_training(name):
    """The training CLI's own field's default and help (`field(**...)`): the data settings mean the same here."""
    (original,) = [f for f in dataclasses.fields(ScriptArguments) if f.name == name]
    if original.default_factory is not dataclasses.MISSING:
        return {"default_factory": original.default_factory, "metadata": original.metadata}
    return {"default": original.default, "metadata": original.metadata}


@dataclass
class RewardModelArguments:
    dataset_name: str | None = field(**_as_in_training("dataset_name"))
    dataset_config: str | None = field(**_as_in_training("dataset_config"))
    dataset_train_split: str = field(**_as_in_training("dataset_train_split"))
    dataset_test_split: str = field(**_as_in_training("dataset_test_split"))
    dataset_test_fraction: float = field(**_as_in_training("dataset_test_fraction"))
    dataset_columns: dict | str | None = field(**_as_in_training("dataset_columns"))
    system_prompt: str | None = field(**_as_in_training("system_prompt"))
    wrap_text_as_chat: bool = field(**_as_in_training("wrap_text_as_chat"))
    overwrite_output_dir: bool = field(**_as_in_training("overwrite_output_dir"))
    early_stopping_patience: int = field(
        default=3,
        metadata={
            "help": "Stop when metric_for_best_model has not improved for this many evaluations in a row on the "
            "held-out pairs (transformers' EarlyStoppingCallback); the best checkpoint is what is saved. 0: no early "
            "stopping (the best checkpoint is still saved if load_best_model_at_end)."
        },
    )

    def __post_init__(self):
        self.dataset_columns = settings.json_mapping("dataset_columns", self.dataset_columns)

    # what data.py reads besides these (scored candidates are refused before it matters)
    candidate_score = "overall_score"
    eval_only = False


def parse_args(argv):
    """(RewardModelArguments, RewardConfig, ModelConfig) from the YAML and the flags, every value checked as the
    training CLI checks its own (diversity_simpo/settings.py), then what only this tool's settings can contradict."""
    from trl import ModelConfig, RewardConfig

    script, training, model = settings.read_settings(
        argv, (RewardModelArguments, RewardConfig, ModelConfig), DEFAULT_CONFIG
    )
    if script.early_stopping_patience < 0:
        raise ConfigError(
            f"early_stopping_patience={script.early_stopping_patience} is out of range: it must be an integer >= 0 "
            "(0: no early stopping)"
        )
    if training.max_steps <= 0 and training.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs is 0 and max_steps is not set: nothing would be trained; set either")
    if script.early_stopping_patience and not (training.load_best_model_at_end and training.metric_for_best_model):
        raise ConfigError(
            "early_stopping_patience needs load_best_model_at_end: true and metric_for_best_model (e.g. loss or "
            "accuracy) to keep the best checkpoint; set them, or early_stopping_patience: 0"
        )
    if is_adapter_folder(model.model_name_or_path):
        raise ConfigError(
            f"model_name_or_path {model.model_name_or_path} is a LoRA adapter; give a whole model (a base model, or a "
            "reward model to train further): a LoRA reward model's output_dir holds its merged model"
        )
    model.lora_task_type = "SEQ_CLS"  # PEFT then trains and saves the score head too (modules_to_save: score)
    return script, training, model


def preflight(argv, counts=None):
    """Everything the user controls, read and checked, and nothing written: the settings, the tokenizer and the
    pairs, as conversations."""
    script_args, training_args, model_args = parse_args(argv)
    check_paths(script_args, training_args, model_args)
    check_optimizer_and_schedule(training_args)
    train_dataset, eval_dataset = load_preference_data(script_args, training_args.seed, counts)
    if "candidates" in train_dataset.column_names:
        raise DataError(
            f"{script_args.dataset_name} holds scored candidates, which a reward model has scored already; "
            "train_reward_model.py learns from preference pairs (prompt, chosen, rejected: docs/data.md)"
        )
    if training_args.eval_strategy != "no" and eval_dataset is None:
        raise ConfigError(
            f"eval_strategy is {training_args.eval_strategy.value!r} (held-out accuracy, early stopping) but the "
            f"dataset has no {script_args.dataset_test_split!r} split; set dataset_test_fraction (e.g. 0.05), or "
            "eval_strategy: no, early_stopping_patience: 0 and load_best_model_at_end: false"
        )
    check_deepspeed_against_settings(training_args, len(train_dataset))
    tokenizer = load_tokenizer(model_args, training_args)
    if tokenizer.chat_template is None and training_args.chat_template_path is None:
        raise ConfigError(
            f"the tokenizer of {model_args.model_name_or_path} has no chat template: the reward model reads each "
            "pair as generate_candidates.py scores a reply, as a conversation in the chat template; give a model "
            "with one, or set chat_template_path"
        )
    train_dataset, eval_dataset = (as_conversations(d) for d in (train_dataset, eval_dataset))
    return script_args, training_args, model_args, tokenizer, train_dataset, eval_dataset


def as_conversations(dataset):
    """Text pairs as conversations (the prompt one user turn, each reply an assistant message): a reward model scores
    a conversation (diversity_simpo/candidates.py: score); conversational pairs stay as they are."""
    if dataset is None or is_conversation(dataset[0]["prompt"]):
        return dataset
    return dataset.map(as_chat, desc="pairs as conversations")


def main(argv=None):
    argv, counts = sys.argv[1:] if argv is None else argv, {}
    script_args, training_args, model_args, tokenizer, train_dataset, eval_dataset = preflight(argv, counts)
    output_dir = Path(training_args.output_dir)
    created = not output_dir.exists()
    try:
        return train(script_args, training_args, model_args, tokenizer, train_dataset, eval_dataset, argv, counts)
    except (ConfigError, DataError):
        if created and output_dir.is_dir() and not any(p.is_file() for p in output_dir.rglob("*")):
            shutil.rmtree(output_dir)  # a mistake found late (while loading the model, say) leaves no empty folder
        raise


def train(script_args, training_args, model_args, tokenizer, train_dataset, eval_dataset, argv=(), counts=None):
    from transformers import EarlyStoppingCallback
    from trl import RewardTrainer, get_peft_config

    from train_diversity_simpo import StopOnSigterm, use_wandb_offline_without_login

    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed()  # as the training CLI: ZeRO-3 partitions the weights while they load
    model = load_model(model_args, training_args)
    use_wandb_offline_without_login(training_args)
    sigterm = StopOnSigterm()
    callbacks = [sigterm]
    if script_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=script_args.early_stopping_patience))
    try:
        trainer = exact_accuracy(RewardTrainer)(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=callbacks,
        )
    except ValueError as e:  # TRL's: bad settings or data found while tokenizing
        raise ConfigError(first_line(e)) from None
    sigterm.accelerator = trainer.accelerator
    counts = {} if counts is None else counts
    for split, before, after in (("train", train_dataset, trainer.train_dataset),
                                 ("eval", eval_dataset, trainer.eval_dataset)):  # fmt: skip
        if before is not None:  # TRL leaves out pairs longer than max_length
            counts[split]["longer_than_max_length"] = len(before) - len(after)
            if len(after) == 0:
                raise DataError(
                    f"{script_args.dataset_name} [{split}]: every pair is longer than max_length="
                    f"{training_args.max_length} tokens (prompt and reply in the chat template); raise max_length"
                )
            if len(after) < len(before) and training_args.process_index == 0:
                left_out = f"left out {len(before) - len(after)} of {len(before)} pairs"
                print(f"warning: {script_args.dataset_name} [{split}]: {left_out} longer than max_length="
                      f"{training_args.max_length}", file=sys.stderr)  # fmt: skip
    output_dir = Path(training_args.output_dir)
    record = trainer.is_world_process_zero()
    if record:
        save_resolved_config(output_dir / "resolved_config.yaml", script_args, model_args, training_args)
        run_record.start(output_dir, argv, training_args, script_args.dataset_name, counts)
    try:
        trainer.train(resume_from_checkpoint=resume_target(training_args.resume_from_checkpoint))
    except BaseException as e:
        if record:
            run_record.end(output_dir, "failed", trainer.state.global_step, f"{type(e).__name__}: {e}")
        raise
    if sigterm.received:
        if record:
            run_record.end(output_dir, "stopped", trainer.state.global_step, "SIGTERM; checkpoint saved")
        trainer.accelerator.print(
            f"Stopped by SIGTERM at step {trainer.state.global_step}; a checkpoint is in {output_dir}. Continue with "
            "--resume_from_checkpoint latest"
        )
        sys.exit(143)
    results = held_out_results(trainer) if eval_dataset is not None else {}
    peft = model_args.use_peft
    trainer.save_model(str(output_dir / ADAPTER) if peft else str(output_dir), _internal_call=True)
    trainer.save_state()
    if trainer.is_world_process_zero():
        if peft:  # (a whole model's tokenizer was saved beside it by save_model)
            merge_adapter(output_dir, model_args, training_args, tokenizer)
        run_record.end(output_dir, "finished", trainer.state.global_step, results=results)
        from diversity_simpo.model_card import write_reward_model_card

        write_reward_model_card(
            output_dir,
            model_name_or_path=model_args.model_name_or_path,
            dataset_name=script_args.dataset_name,
            args=training_args,
            record=json.loads((output_dir / run_record.RECORD).read_text(encoding="utf-8")),
            lora=peft,
        )
    if training_args.push_to_hub:
        trainer.push_to_hub()
    said = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items())
    trainer.accelerator.print(
        f"Saved the reward model (give it as reward_model: {output_dir}), its tokenizer, model card, "
        f"resolved_config.yaml and run_record.json to {output_dir}" + (f"; held out: {said}" if said else "")
    )
    trainer.end()


def held_out_results(trainer):
    """The saved (best) model's figures on the held-out pairs: their count, the fraction scored chosen over rejected,
    the mean Bradley-Terry loss and margin; and where early stopping stopped."""
    metrics = trainer.evaluate()
    state = trainer.state
    return {
        "held_out_pairs": len(trainer.eval_dataset),
        "held_out_accuracy": metrics["eval_accuracy"],
        "held_out_loss": metrics["eval_loss"],
        "held_out_margin": metrics["eval_margin"],
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "stopped_early": state.global_step < state.max_steps,
    }


def exact_accuracy(trainer_class):
    """TRL's RewardTrainer, whose eval `accuracy` and `margin` are means of each eval batch's (a short last batch
    counts as much as a full one), with `accuracy` the fraction of all held-out pairs whose chosen reply scores above
    the rejected one (ties count as wrong, as TRL counts them) and `margin` the mean of chosen minus rejected over all
    of them, gathered over processes without the padding repeats."""
    import torch

    class Trainer(trainer_class):
        _pairs = (0, 0, 0.0)  # held-out pairs seen, scored right, their margins' sum (since the last log)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if not self.model.training:
                chosen, rejected = torch.chunk(outputs.logits.detach().float().squeeze(-1), chunks=2)
                margins = self.accelerator.gather_for_metrics(chosen - rejected)
                seen, right, total = self._pairs
                self._pairs = (seen + margins.numel(), right + int((margins > 0).sum()), total + margins.sum().item())
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            seen, right, total = self._pairs
            if not self.model.training and seen:
                self._metrics["eval"]["accuracy"], self._metrics["eval"]["margin"] = [right / seen], [total / seen]
                self._pairs = (0, 0, 0.0)
            super().log(logs, start_time)

    Trainer.__name__ = Trainer.__qualname__ = trainer_class.__name__
    return Trainer


def load_tokenizer(model_args, training_args):
    from transformers import AutoTokenizer

    name = model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise ConfigError(f"could not load the tokenizer in {name}: {first_line(e)}") from None
        raise ConfigError(
            f"could not load model {name!r}: it is not a local folder and the Hugging Face Hub could not provide it "
            f"(offline, or a wrong id?{DEMO_HINT}): {first_line(e)}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args, training_args):
    """The model with one score head (a base model's head is new, seeded by `seed` as TRL seeds it), loaded as the
    training CLI loads its model: straight to this rank's accelerator, unless ZeRO-3 partitions it as it loads."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import get_quantization_config
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    name = model_args.model_name_or_path
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    zero3 = training_args.deepspeed_plugin is not None and training_args.deepspeed_plugin.zero_stage == 3
    on_accelerator = training_args.device.type != "cpu" and not zero3
    device_map = {"": training_args.device} if on_accelerator or quantization_config is not None else None
    set_seed(training_args.seed)
    try:
        with suppress_seqcls_warning():  # TRL's: a causal LM's new score head and its unused lm_head are expected
            return AutoModelForSequenceClassification.from_pretrained(
                name,
                num_labels=1,
                revision=model_args.model_revision,
                trust_remote_code=training_args.trust_remote_code,
                attn_implementation=model_args.attn_implementation,
                dtype=dtype,
                quantization_config=quantization_config,
                device_map=device_map,
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"could not load {name} as a reward model (one score): {first_line(e)}") from None


def merge_adapter(output_dir, model_args, training_args, tokenizer):
    """The saved adapter (its score head included) merged into a fresh copy of the base model with one score, saved
    with the tokenizer to output_dir: a whole reward model, as generate_candidates.py loads one. It reads the saved
    (under ZeRO-3: already gathered) adapter, once, on the global rank 0, on the CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    unset_hf_deepspeed_config()
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    with suppress_seqcls_warning():
        base = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=1,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            dtype=dtype,
        )
    merged = PeftModel.from_pretrained(base, output_dir / ADAPTER).merge_and_unload()
    merged.config.pad_token_id = tokenizer.pad_token_id  # where the score is read (as TRL set it for training)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # as the training CLI: skip gloo's teardown after a finished run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
