"""LoRA runs: an adapter folder as the model keeps training that adapter; `merge_adapter` writes the adapter merged
into its base as a standalone model (PEFT's own merge), with the logits of base plus adapter."""

import json

import torch
from conftest import DEMO_MODEL, refusal
from safetensors.torch import load_file
from test_cli import DEMO_CONFIG, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

SHORT = ["--max_steps", "2", "--eval_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", "0"]


def assert_merged_model_has_the_logits_of_base_plus_adapter(output):
    """output/merged loads with plain transformers (no PEFT), in the base model's dtype, and computes what the base
    model with the saved adapter computes; the adapter changed something."""
    from peft import PeftModel

    merged_dir = output / "merged"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    assert merged.dtype == base.dtype and type(merged) is type(base)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)  # the tokenizer is saved beside it
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "富士山について教えてください。"}], return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        plain = base(**ids).logits
        adapted = PeftModel.from_pretrained(base, output).eval()(**ids).logits
        ours = merged(**ids).logits
    torch.testing.assert_close(ours, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain, rtol=0, atol=1e-6)


def test_merge_adapter_writes_a_standalone_model_with_the_logits_of_base_plus_adapter(tmp_path):
    result = run_cli("--config", DEMO_CONFIG, *SHORT, "--use_peft", "true", "--lora_r", "4", "--merge_adapter", "true",
                     "--learning_rate", "2e-3", "--output_dir", tmp_path / "out")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"merged into its base model to {tmp_path / 'out'}/merged" in result.stdout
    assert_merged_model_has_the_logits_of_base_plus_adapter(tmp_path / "out")
    from huggingface_hub import ModelCard

    adapter_card, merged_card = (ModelCard.load(tmp_path / "out" / f / "README.md") for f in ("", "merged"))
    assert adapter_card.data.library_name == "peft" and "AutoPeftModelForCausalLM" in adapter_card.text
    assert merged_card.data.library_name == "transformers" and "The merged LoRA fine-tune of" in merged_card.text
    assert (tmp_path / "out" / "merged" / "training_curves.png").is_file()  # the card's picture travels with it


def test_merge_adapter_without_an_adapter_is_refused_in_one_line(tmp_path):
    from train_diversity_simpo import main

    refused = refusal(
        main, "--config", DEMO_CONFIG, *SHORT, "--merge_adapter", "true", "--output_dir", tmp_path / "out"
    )
    assert "merge_adapter: true needs an adapter to merge: set use_peft: true" in refused, refused
    assert not (tmp_path / "out").exists()


def test_a_lora_runs_output_folder_as_the_model_trains_that_adapter_further(tmp_path):
    """How SFT-with-LoRA chains into preference training: the adapter folder is loaded on its base and that adapter
    keeps training (a mark put into its weights is still there after two more steps), with no traceback."""
    from safetensors.torch import save_file

    short = SHORT
    first = run_cli("--config", DEMO_CONFIG, *short, "--use_peft", "true", "--output_dir", tmp_path / "sft")
    assert first.returncode == 0, first.stderr[-3000:]
    adapter_file = tmp_path / "sft" / "adapter_model.safetensors"
    marked = {k: v + 0.05 if "lora_B" in k else v for k, v in load_file(adapter_file).items()}
    save_file(marked, adapter_file)

    second = run_cli("--config", DEMO_CONFIG, *short, "--model_name_or_path", tmp_path / "sft", "--output_dir",
                     tmp_path / "simpo")  # fmt: skip
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"{tmp_path / 'sft'} is an adapter of demo/tiny-llama-ja: training that adapter further" in second.stderr
    trained = load_file(tmp_path / "simpo" / "adapter_model.safetensors")
    assert trained.keys() == marked.keys()
    for name, value in marked.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-3)  # 2 Adam steps of lr 2e-4 from the mark
    assert any(not torch.equal(trained[name], marked[name]) for name in marked)  # and it did train


def test_merge_adapter_keeps_a_bfloat16_base_in_bfloat16(tmp_path):
    """README: the merged model is saved in the base model's dtype (here bfloat16; the demo base is float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_diversity_simpo import merge_adapter

    config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype="auto")
    assert base.dtype == torch.bfloat16
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "out")  # an adapter that changes the weights

    merge_adapter(tmp_path / "out", AutoTokenizer.from_pretrained(DEMO_MODEL), trust_remote_code=False)
    merged = tmp_path / "out" / "merged"
    saved = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    weights = load_file(merged / "model.safetensors")
    assert {name: w.dtype for name, w in weights.items() if w.dtype != torch.bfloat16} == {}
    assert AutoModelForCausalLM.from_pretrained(merged, dtype="auto").dtype == torch.bfloat16
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q_proj], load_file(tmp_path / "base" / "model.safetensors")[q_proj])  # merged in
