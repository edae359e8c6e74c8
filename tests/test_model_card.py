"""The card's base model: a Hub id as given, or for a local folder the Hub id it names itself (the full card of a
demo run is read in test_cli.py, the merged model's in test_lora.py)."""

import json

from model_card import base_model_id


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
