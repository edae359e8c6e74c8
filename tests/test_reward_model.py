"""train_reward_model.py, the scorer step: a reward model trained on preference pairs with TRL's RewardTrainer.

- the held-out accuracy it reports is the fraction of held-out pairs that the saved model, loaded anew, scores chosen
  above rejected (each conversation scored alone, in the chat template, with the run's system prompt);
- early stopping stops once the held-out loss has not improved for `early_stopping_patience` evaluations, and the
  model saved is the best checkpoint's, not the last step's;
- a run stopped after a checkpoint and resumed with `--resume_from_checkpoint latest` evaluates and stops as the
  uninterrupted run does;
- a LoRA run saves a whole scorer: the adapter and its trained score head merged into the base;
- generate_candidates.py takes the folder as its reward_model and scores as the run evaluated;
- each mistake is refused in one line, exit status 2, before anything is written.

One tiny run (a fresh two-layer Llama on 72 of the demo's pairs as text rows) serves most tests.
"""

import json
import runpy
import shutil
import sys

import pytest
import torch
from conftest import DEMO_DATA, DEMO_MODEL, ROOT

import train_reward_model
from diversity_simpo.data import DataError
from diversity_simpo.settings import ConfigError

SYSTEM = "あなたは誠実なアシスタントです。"
FLAGS = ["--config", str(ROOT / "configs" / "demo_reward_model.yaml"), "--dataset_test_fraction", "0.25",
         "--learning_rate", "3e-3", "--max_steps", "40", "--per_device_train_batch_size",
         "8", "--per_device_eval_batch_size", "8", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "2",
         "--early_stopping_patience", "2", "--save_total_limit", "3"]  # fmt: skip
# 18 held-out pairs in eval batches of 8, 8 and 2: a mean of the batches' accuracies is not the pairs' accuracy


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """72 demo pairs as plain-text rows (the run wraps them as chat, with the system prompt), and a fresh tiny causal
    Llama with the demo's tokenizer as the base (the run gives it a new score head)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("pairs")
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()][::3]
    rows = [{k: row[k][0]["content"] for k in ("prompt", "chosen", "rejected")} for row in rows]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    return {"file": path, "rows": rows, "base": folder / "base", "root": folder}


def flags(pairs, out, *more):
    return [*FLAGS, "--dataset_name", str(pairs["file"]), "--model_name_or_path", str(pairs["base"]),
            "--output_dir", str(out), *map(str, more)]  # fmt: skip


def held_out(pairs):
    """The held-out rows by the split rule itself: a test_size fraction of the rows, drawn with the run's seed."""
    from datasets import Dataset

    return list(Dataset.from_list(pairs["rows"]).train_test_split(test_size=0.25, seed=42)["test"])


def scores(folder, rows, system=SYSTEM):
    """(chosen, rejected) score of each row by the model saved in `folder`, loaded anew: each conversation alone, the
    system prompt (if any), the user's prompt and the reply in the tokenizer's chat template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for row in rows:
        pair = []
        for side in ("chosen", "rejected"):
            turns = [{"role": "system", "content": system}] * bool(system)
            turns += [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
            inputs = tokenizer.apply_chat_template(turns, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                pair.append(model(**inputs).logits[0, 0].item())
        out.append(pair)
    return out


def figures(pair_scores):
    """(accuracy, mean Bradley-Terry loss, mean margin) over the pairs, from their definitions."""
    margins = torch.tensor([c - r for c, r in pair_scores], dtype=torch.float64)
    accuracy = (margins > 0).sum().item() / len(margins)
    return accuracy, torch.nn.functional.softplus(-margins).mean().item(), margins.mean().item()


def record(out):
    return json.loads((out / "run_record.json").read_text(encoding="utf-8"))


def history(out):
    return json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]


def evaluations(out):
    """{step: eval_loss} of the evaluations made while training (not the final one of the saved model)."""
    found = {}
    for entry in history(out):
        if "eval_loss" in entry:
            found.setdefault(entry["step"], entry["eval_loss"])
    return found


@pytest.fixture(scope="module")
def run(pairs):
    out = pairs["root"] / "run"
    train_reward_model.main(flags(pairs, out, "--system_prompt", SYSTEM))
    return out


@pytest.fixture(scope="module")
def run_scores(pairs, run):
    """The saved model's own scores of the held-out pairs (`scores`)."""
    return scores(run, held_out(pairs))


def test_the_reported_held_out_accuracy_is_the_saved_models_on_the_held_out_pairs(run, run_scores):
    results = record(run)["results"]
    accuracy, loss, margin = figures(run_scores)
    assert results["held_out_pairs"] == len(run_scores) == 18
    assert 0 < accuracy < 1, "a run that scores every pair alike cannot tell the pairs' accuracy from a batches' mean"
    assert results["held_out_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert results["held_out_loss"] == pytest.approx(loss, rel=1e-4)
    assert results["held_out_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-5)
    card = (run / "README.md").read_text(encoding="utf-8")
    assert f"Held-out accuracy {accuracy:.4g} on 18 pairs" in card and "pipeline_tag: text-classification" in card


def test_early_stopping_stops_when_the_held_out_loss_stops_improving_and_keeps_the_best_checkpoint(run, run_scores):
    state = json.loads((run / "trainer_state.json").read_text(encoding="utf-8"))
    losses = evaluations(run)
    steps = sorted(losses)
    best = min(steps, key=lambda s: (losses[s], s))
    assert state["global_step"] < 40 and steps[-1] == state["global_step"], (steps, state["global_step"])
    assert len([s for s in steps if s > best]) == 2  # patience 2: two evaluations without a lower loss, then stop
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}") and record(run)["results"]["stopped_early"]
    assert record(run)["results"]["best_checkpoint"] == f"checkpoint-{best}"
    _, loss, _ = figures(run_scores)
    assert loss == pytest.approx(losses[best], rel=1e-4) and loss != pytest.approx(losses[steps[-1]], rel=1e-3)


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_runs_evaluations(pairs, run):
    out = pairs["root"] / "resumed"
    train_reward_model.main(flags(pairs, out, "--system_prompt", SYSTEM, "--max_steps", 4))  # stopped after step 4
    train_reward_model.main(flags(pairs, out, "--system_prompt", SYSTEM, "--resume_from_checkpoint", "latest"))
    resumed, uninterrupted = evaluations(out), evaluations(run)
    assert sorted(resumed) == sorted(uninterrupted)
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([uninterrupted[s] for s in sorted(resumed)], rel=1e-6)
    assert record(out)["earlier"][0]["global_step"] == 4 and record(out)["resumed_from"].endswith("checkpoint-4")
    # and it did not start over: TRL counts the tokens its own process trained on, so the second process's count at a
    # step past 4 lacks steps 1 to 4 (a run started over would have the uninterrupted run's count)
    tokens = [
        {e["step"]: e["num_tokens"] for e in history(o) if "loss" in e and "eval_loss" not in e} for o in (out, run)
    ]
    step = min(s for s in tokens[0] if s > 4)
    assert 0 < tokens[0][step] < tokens[1][step], (step, tokens)


def test_a_lora_run_saves_a_whole_scorer_with_its_trained_score_head(pairs):
    """Without a system prompt the text rows stay text in the data, and the scorer still learns them as it will be
    given them: as a conversation in the chat template (a user turn and the reply)."""
    from safetensors import safe_open

    out = pairs["root"] / "lora"
    lora = ["--use_peft", "true", "--lora_r", 4, "--lora_alpha", 8, "--learning_rate", "2e-2", "--max_steps", 4]
    train_reward_model.main(flags(pairs, out, *lora, "--early_stopping_patience", 0))
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any("score" in key for key in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert not (out / "adapter_config.json").exists()  # the folder is a whole model, not an adapter
    results = record(out)["results"]
    _, loss, _ = figures(scores(out, held_out(pairs), system=None))
    assert results["held_out_loss"] == pytest.approx(loss, rel=1e-4)  # the merged model is the one evaluated
    assert abs(loss - 0.6931) > 0.01  # and it learned something: a fresh head scores every pair near log 2


def test_generate_candidates_takes_the_folder_as_its_reward_model_and_scores_as_the_run_evaluated(
    pairs, run, run_scores
):
    import generate_candidates

    rows = held_out(pairs)
    to_score = pairs["root"] / "to_score.jsonl"
    lines = [{"prompt": r["prompt"], "all_generated_responses": [r["chosen"], r["rejected"]]} for r in rows]
    to_score.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    out = pairs["root"] / "candidates"
    generate_candidates.main(["--config", str(ROOT / "configs" / "demo_candidates.yaml"), "--reward_model", str(run),
                              "--dataset_name", str(to_score), "--system_prompt", SYSTEM, "--num_candidates", "2",
                              "--output_dir", str(out)])  # fmt: skip
    written = [json.loads(line) for path in sorted(out.rglob("*.jsonl")) for line in path.open(encoding="utf-8")]
    by_prompt = {row["prompt"][-1]["content"]: row["all_rm_scores"] for row in written}
    assert [by_prompt[r["prompt"]] for r in rows] == [pytest.approx(pair, abs=1e-4) for pair in run_scores]
    assert figures([by_prompt[r["prompt"]] for r in rows])[0] == record(run)["results"]["held_out_accuracy"]


def _no_template(pairs):
    folder = pairs["root"] / "no-template"
    if not folder.exists():
        shutil.copytree(pairs["base"], folder)
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _scored(pairs):
    path = pairs["root"] / "scored.jsonl"
    row = {"prompt": "?", "all_generated_responses": ["a", "b"], "all_rm_scores": [1, 0]}
    path.write_text((json.dumps(row) + "\n") * 4, encoding="utf-8")
    return path


MISTAKES = [  # (the flags over the tiny run's, what the one line says)
    (lambda p: ["--early_stopping_patience", -1], "early_stopping_patience=-1 is out of range"),
    (lambda p: ["--early_stoping_patience", 2], "did you mean 'early_stopping_patience'"),
    (lambda p: ["--load_best_model_at_end", "false"], "early_stopping_patience needs load_best_model_at_end: true"),
    (lambda p: ["--dataset_test_fraction", 0], "the dataset has no 'test' split; set dataset_test_fraction"),
    (lambda p: ["--dataset_name", _scored(p)], "holds scored candidates"),
    (lambda p: ["--model_name_or_path", _no_template(p)], "has no chat template"),
    (lambda p: ["--model_name_or_path", p["root"] / "lora" / "adapter"], "is a LoRA adapter"),
    (lambda p: ["--max_length", 8], "every pair is longer than max_length=8"),
    (lambda p: ["--num_train_epochs", 0, "--max_steps", -1], "nothing would be trained"),
    (
        lambda p: ["--model_name_or_path", "no-such-org/no-such-model"],
        "could not load model 'no-such-org/no-such-model'",
    ),
]


@pytest.mark.parametrize(("more", "says"), MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_each_mistake_is_one_line_before_anything_is_written(pairs, more, says):
    if "adapter" in str(more(pairs)) and not (pairs["root"] / "lora" / "adapter").exists():
        pytest.skip("needs the LoRA run's adapter")
    out = pairs["root"] / "refused"
    with pytest.raises((ConfigError, DataError)) as refusal:
        train_reward_model.main(flags(pairs, out, *more(pairs)))
    message = str(refusal.value)
    assert says in message and "\n" not in message, message
    assert not out.exists()


def test_the_command_line_prints_a_mistake_as_one_error_line_and_exits_with_status_2(pairs, monkeypatch, capsys):
    out = pairs["root"] / "refused"
    monkeypatch.setattr(sys, "argv", ["train_reward_model.py", *flags(pairs, out, "--early_stopping_patience", -1)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "train_reward_model.py"), run_name="__main__")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: early_stopping_patience=-1 is out of range: it must be an integer >= 0 (0: no early stopping)"
    ]
    assert not out.exists()
