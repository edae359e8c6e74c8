"""The model card (`README.md` beside the model, what `push_to_hub` publishes), written by this tool from the run.

It replaces TRL's generic card (which names no data, no settings and no result) with: the base model, the data (name,
rows used, layout), the method with its settings, the final train and eval figures, the training curves, a quick
start that asks a Japanese question through the chat template, and the hardware and package versions. The Hub's
metadata (`base_model`, `datasets`, `tags`, `library_name`, `pipeline_tag`) goes through huggingface_hub's
`ModelCardData`, which writes it as the Hub expects.
"""

import json
from pathlib import Path

from diversity_simpo.pair_selection import GIVEN, RAREST_VS_GIVEN, RULES

SIMPO_PAPER = "https://arxiv.org/abs/2405.14734"
QUESTION = "日本の四季の魅力を三つ、簡潔に教えてください。"
FIGURES = (  # (label, train key, eval key)
    ("preference accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
    ("reward margin", "rewards/margins", "eval_rewards/margins"),
    ("token entropy of chosen replies (nats)", "diversity/entropy", "eval_diversity/entropy"),
    ("KL(rejected \\|\\| chosen)", "diversity/kl", "eval_diversity/kl"),  # a bare | would end the table cell
    ("SimPO + diversity loss", "loss", "eval_loss"),
)
SAMPLED = ("distinct_1", "distinct_2", "self_bleu", "token_entropy", "embedding_distance", "reference_rate")


def base_model_id(name):
    """The Hub id the model was trained from: `name` itself when it is an id; for a local folder, the id its own card
    (`base_model`) or adapter config names, when it names one; else None."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    card = path / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        base = ModelCard.load(card).data.to_dict().get("base_model")
        if isinstance(base, str) and not Path(base).exists():
            return base
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        return base_model_id(base) if base else None
    return None


def write_model_card(folder, *, model_name_or_path, dataset_name, args, log_history, record, adapter, merged=False):
    """README.md in `folder`: `args` the run's DiversitySimPOConfig, `record` its run_record.json (a dict), `adapter`
    whether `folder` holds a PEFT adapter (not a whole model)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    base = base_model_id(str(model_name_or_path))
    on_hub = not Path(str(dataset_name)).expanduser().exists()
    data = ModelCardData(
        base_model=base,
        datasets=[str(dataset_name)] if on_hub else None,
        tags=["trl", "simpo", "diversity-simpo", "preference-optimization"] + (["lora"] if adapter else []),
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        language=["ja"],
    )
    rows = record.get("data", {}).get("rows", {})
    train_rows = rows.get("train", {})
    if base and base == str(model_name_or_path):
        base_text = f"[{base}](https://huggingface.co/{base})"
    else:
        base_text = f"the local model `{model_name_or_path}`"
        base_text += f" (itself fine-tuned from [{base}](https://huggingface.co/{base}))" if base else ""
    where = args.hub_model_id or str(folder)
    kind = "A LoRA adapter for" if adapter else ("The merged LoRA fine-tune of" if merged else "A fine-tune of")
    train_last = next((e for e in reversed(log_history) if "loss" in e and "rewards/accuracies" in e), {})
    eval_last = next((e for e in reversed(log_history) if "eval_rewards/accuracies" in e), {})
    sampled_last = next((e for e in reversed(log_history) if "diversity_eval/distinct_2" in e), {})
    table = ["| metric | train (last log) | eval (last evaluation) |", "|---|---|---|"]
    table += [f"| {label} | {_figure(train_last.get(t))} | {_figure(eval_last.get(e))} |" for label, t, e in FIGURES]
    sampled = [f"| {k} | {_figure(sampled_last.get(f'diversity_eval/{k}'))} |" for k in SAMPLED]
    sampled = ["| score of sampled replies | value |", "|---|---|", *sampled] if sampled_last else ["(not run)"]
    packages = record.get("environment", {}).get("packages", {})
    accelerator = record.get("environment", {}).get("accelerator", {})
    project = record.get("project", {})
    load = (
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")\n'
        if adapter
        else "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
    )
    text = f"""---
{data.to_yaml()}
---

# {folder.name}

{kind} {base_text}, trained with [SimPO]({SIMPO_PAPER}) plus a diversity term by diversity-simpo
{project.get("version", "")} (commit `{project.get("git_commit")}`), on TRL's `CPOTrainer`.

## Quick start

```python
{load}tokenizer = AutoTokenizer.from_pretrained("{where}")
messages = [{{"role": "user", "content": "{QUESTION}"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=256, do_sample=True, temperature=0.7)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Data

`{dataset_name}`: {train_rows.get("kept", "?")} training pairs used of {train_rows.get("read", "?")} read
(layout: {train_rows.get("layout", "?")}){_eval_rows(rows)}.{_pair_selection(train_rows)}

## Method

SimPO ([Meng et al., 2024]({SIMPO_PAPER})) with a diversity term on the same forward pass:
`loss = -log sigmoid(beta * (avg_logp(chosen) - avg_logp(rejected)) - simpo_gamma) + diversity_weight *
(-diversity_alpha * entropy + (1 - diversity_alpha) * KL(rejected || chosen))`, where `entropy` is each chosen reply's
mean token entropy and `KL` each pair's mean KL over shared positions, both averaged over pairs. Settings: beta =
{args.beta:g}, simpo_gamma = {args.simpo_gamma:g}, diversity_weight = {args.diversity_weight:g}, diversity_alpha =
{args.diversity_alpha:g}, cpo_alpha = {args.cpo_alpha:g}, learning_rate = {args.learning_rate:g},
{record.get("global_step", "?")} steps of {args.per_device_train_batch_size} pairs x
{args.gradient_accumulation_steps} accumulation x {record.get("command", {}).get("world_size", "?")} processes, seed
{args.seed}. Every setting is in
`resolved_config.yaml`, and what it takes to reproduce the run in `run_record.json`.

## Results

{chr(10).join(table)}

{chr(10).join(sampled)}

{"![training curves](training_curves.png)" if (folder / "training_curves.png").is_file() else ""}

## Training environment

{accelerator.get("count", "?")} x {accelerator.get("type", "?")} ({accelerator.get("name", "?")}), Python
{record.get("environment", {}).get("python", "?")}; {", ".join(f"{k} {v}" for k, v in packages.items() if v)}.
"""
    ModelCard(text).save(folder / "README.md")


def _figure(value):
    return "n/a" if value is None else f"{value:.4g}"


def _pair_selection(train_rows):
    """For scored candidates: each rule that chose pairs (its docstring's first line says how), and how many it made."""
    made = train_rows.get("pairs_by_rule")
    if not made:
        return ""
    how = {name: rule.__doc__.split(":")[0] for name, rule in RULES.items()}
    how |= {
        GIVEN: "the prompt's own pair",
        RAREST_VS_GIVEN: "the rarest good candidate against the prompt's own rejected reply",
    }
    rules = "; ".join(f"`{name}` ({how[name]}): {count}" for name, count in made.items())
    return f" Pairs chosen from {train_rows.get('scored_rows', '?')} rows of scored candidates by {rules} pairs."


def _eval_rows(rows):
    evaluation = rows.get("eval")
    return f"; {evaluation['kept']} held-out pairs for evaluation" if evaluation else ""


def write_reward_model_card(folder, *, model_name_or_path, dataset_name, args, record, lora):
    """README.md beside a reward model that train_reward_model.py trained: `args` its RewardConfig, `record` its
    run_record.json (a dict, with the held-out figures under `results`), `lora` whether an adapter was merged in."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    base = base_model_id(str(model_name_or_path))
    on_hub = not Path(str(dataset_name)).expanduser().exists()
    data = ModelCardData(
        base_model=base,
        datasets=[str(dataset_name)] if on_hub else None,
        tags=["trl", "reward-model", "diversity-simpo"] + (["lora"] if lora else []),
        library_name="transformers",
        pipeline_tag="text-classification",
        language=["ja"],
    )
    rows, results = record.get("data", {}).get("rows", {}), record.get("results", {})
    train_rows = rows.get("train", {})
    project = record.get("project", {})
    base_text = f"[{base}](https://huggingface.co/{base})" if base and base == str(model_name_or_path) else (
        f"the local model `{model_name_or_path}`")  # fmt: skip
    where = args.hub_model_id or str(folder)
    held_out = (
        f"Held-out accuracy {_figure(results.get('held_out_accuracy'))} on {results['held_out_pairs']} pairs (the "
        f"fraction whose chosen reply scores above the rejected one; mean loss {_figure(results.get('held_out_loss'))}"
        f", mean margin {_figure(results.get('held_out_margin'))}), kept from "
        f"{results.get('best_checkpoint') or 'the last step'}"
        if "held_out_pairs" in results
        else "no held-out pairs (not evaluated)"
    )
    text = f"""---
{data.to_yaml()}
---

# {folder.name}

A reward model (one score per conversation) fine-tuned from {base_text}{" with LoRA (merged)" if lora else ""} on
preference pairs with TRL's `RewardTrainer` (Bradley-Terry loss) by diversity-simpo {project.get("version", "")}
(commit `{project.get("git_commit")}`). Give it to `generate_candidates.py` as `reward_model: {where}`.

## Data

`{dataset_name}`: {train_rows.get("kept", "?")} training pairs used of {train_rows.get("read", "?")} read
(layout: {train_rows.get("layout", "?")}){_eval_rows(rows)}.

## Results

{held_out}; {record.get("global_step", "?")} steps of {args.per_device_train_batch_size} pairs x
{args.gradient_accumulation_steps} accumulation x {record.get("command", {}).get("world_size", "?")} processes,
learning_rate = {args.learning_rate:g}, seed {args.seed}. Every setting is in `resolved_config.yaml`, and what it
takes to reproduce the run in `run_record.json`.

## Quick start

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
messages = [{{"role": "user", "content": "{QUESTION}"}}, {{"role": "assistant", "content": "..."}}]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
print(model(**inputs).logits[0, 0].item())
```
"""
    ModelCard(text).save(folder / "README.md")
