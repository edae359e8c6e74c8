"""The model card: its base model (a Hub id as given, or for a local folder the Hub id it names itself), its Hub
metadata and its results table (the full card of a demo run is read in test_cli.py, the merged model's in
test_lora.py)."""

import json

from test_cli import DEMO_CONFIG

from diversity_simpo.model_card import base_model_id


def test_a_hub_id_is_its_own_base():
    assert base_model_id("elyza/Llama-3-ELYZA-JP-8B") == "elyza/Llama-3-ELYZA-JP-8B"


def test_a_local_folder_names_the_hub_id_its_own_card_gives(tmp_path):
    (tmp_path / "README.md").write_text("---\nbase_model: elyza/Llama-3-ELYZA-JP-8B\n---\n# sft\n", encoding="utf-8")
    assert base_model_id(str(tmp_path)) == "elyza/Llama-3-ELYZA-JP-8B"


def test_an_adapter_folder_names_its_base_and_a_bare_local_folder_names_none(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}), "utf-8")
    assert base_model_id(str(adapter)) == "org/base"
    (tmp_path / "bare").mkdir()
    assert base_model_id(str(tmp_path / "bare")) is None


def card_of_a_run(folder, *, model_name_or_path, dataset_name, log_history=()):
    """The card write_model_card writes into `folder` for a run with the demo's settings (nothing is downloaded: a Hub
    id is only recorded)."""
    from huggingface_hub import ModelCard

    from diversity_simpo.model_card import write_model_card
    from train_diversity_simpo import parse_args

    _, args, _ = parse_args(["--config", str(DEMO_CONFIG), "--output_dir", str(folder)])
    write_model_card(folder, model_name_or_path=model_name_or_path, dataset_name=dataset_name, args=args,
                     log_history=list(log_history), record={}, adapter=False)  # fmt: skip
    card = ModelCard.load(folder / "README.md")
    card.validate = None
    return card


def test_the_card_of_a_hub_model_trained_on_a_hub_dataset_names_both_in_its_hub_metadata(tmp_path):
    """README: the Hub metadata carries `base_model` (the Hub id) and, for a Hub dataset, `datasets`."""
    card = card_of_a_run(tmp_path, model_name_or_path="elyza/Llama-3-ELYZA-JP-8B", dataset_name="org/ja-preferences")
    metadata = card.data.to_dict()
    assert metadata["base_model"] == "elyza/Llama-3-ELYZA-JP-8B"
    assert metadata["datasets"] == ["org/ja-preferences"]
    assert "[elyza/Llama-3-ELYZA-JP-8B](https://huggingface.co/elyza/Llama-3-ELYZA-JP-8B)" in card.text


def test_the_cards_results_are_the_last_train_log_and_the_last_evaluation(tmp_path):
    """README: the card shows the final train and eval figures, not the first ones logged."""
    history = []
    for step, (accuracy, margin, loss) in enumerate([(0.25, 0.11, 1.91), (0.5, 0.22, 1.52), (0.875, 0.33, 1.13)], 1):
        history.append({"loss": loss, "rewards/accuracies": accuracy, "rewards/margins": margin,
                        "diversity/entropy": 2.0 - 0.1 * step, "diversity/kl": 0.01 * step, "step": step})  # fmt: skip
        if step > 1:  # two evaluations, at steps 2 and 3
            history.append({"eval_loss": loss + 0.5, "eval_rewards/accuracies": accuracy - 0.125,
                            "eval_rewards/margins": margin / 2, "eval_diversity/entropy": 1.5 - 0.1 * step,
                            "eval_diversity/kl": 0.02 * step, "step": step})  # fmt: skip
    history.append({"train_loss": 1.5, "train_runtime": 12.0, "step": 3})  # the Trainer's summary, not a log of figures
    text = card_of_a_run(tmp_path, model_name_or_path="org/base", dataset_name="org/data", log_history=history).text
    assert "| preference accuracy | 0.875 | 0.75 |" in text
    assert "| reward margin | 0.33 | 0.165 |" in text
    assert "| token entropy of chosen replies (nats) | 1.7 | 1.2 |" in text
    assert "| SimPO + diversity loss | 1.13 | 1.63 |" in text


def test_the_card_says_how_each_pair_rule_chose_and_how_many_pairs_each_made():
    from diversity_simpo.model_card import _pair_selection

    text = _pair_selection({"pairs_by_rule": {"given": 3, "rarest_vs_worst": 2}, "scored_rows": 4})
    assert text == (
        " Pairs chosen from 4 rows of scored candidates by `given` (the prompt's own pair): 3; `rarest_vs_worst` "
        "(The rarest candidate that meets DivPO's quality bar against the lowest-scored one): 2 pairs."
    )
    assert _pair_selection({"kept": 5}) == ""  # preference pairs: no rule chose them
    from diversity_simpo.settings import CHOICES

    every = _pair_selection({"pairs_by_rule": dict.fromkeys(CHOICES["pair_selection"], 1), "scored_rows": 4})
    assert every.count("` (") == len(CHOICES["pair_selection"])  # each rule a setting takes says how it chose
