"""Prefix sharing and padding-free packing (`prefix_sharing`, `padding_free`): a different layout of the same pairs,
so the same numbers. The loss, every logged metric and every parameter's gradient equal TRL's two-row layout's, with
the fused head on and off, the NLL term on and off, the diversity term on and off, on pairs built to be awkward:
prompts and replies of very unequal lengths, a rejected prompt whose last token differs (TRL tokenises prompt + reply
per side), replies that begin with the same tokens, and a chosen reply that is a prefix of the rejected one.
"""

import json

import pytest
import torch
from conftest import DEVICE
from precision import assert_metrics_close, assert_tensors_close
from test_fused_head import assert_same, loss_metrics_grads, random_llama
from test_fused_head import make_trainer as trainer_on_random_llama
from test_split_invariance import weight_update
from trl.experimental.cpo import CPOTrainer

from diversity_simpo.layout import FLEX_BLOCK, layout_refusal, pack_pairs

LAYOUTS = {
    "prefix_sharing": dict(prefix_sharing=True),
    "padding_free": dict(padding_free=True),
    "both": dict(prefix_sharing=True, padding_free=True),
}
SETTINGS = {
    "simpo": dict(diversity_weight=0.0, cpo_alpha=0.0),
    "diversity-and-nll": dict(diversity_weight=0.3, diversity_alpha=0.1, cpo_alpha=0.5),
    "entropy-only": dict(diversity_weight=0.3, diversity_alpha=1.0, cpo_alpha=0.0),
}


def awkward_pairs(pad_token_id, vocab=2048, seed=0):
    """TRL's collated batch (right-padded chosen_* and rejected_* tensors, labels -100 on the prompt) of 4 pairs:
    (prompt, chosen, rejected) lengths (40, 3, 25), (4, 30, 2) with the rejected prompt's last token different,
    (12, 9, 7) with replies that share their first 3 tokens, and (6, 4, 10) with the chosen reply a prefix of the
    rejected reply."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(5, vocab, (n,), generator=generator).tolist()

    rows = {"chosen": [], "rejected": []}
    for prompt_length, chosen_length, rejected_length, kind in (
        (40, 3, 25, ""),
        (4, 30, 2, "boundary"),
        (12, 9, 7, "same start"),
        (6, 4, 10, "prefix"),
    ):
        prompt, chosen, rejected = tokens(prompt_length), tokens(chosen_length), tokens(rejected_length)
        rejected_prompt = [*prompt[:-1], (prompt[-1] + 1) % vocab] if kind == "boundary" else prompt
        if kind == "same start":
            rejected[:3] = chosen[:3]
        if kind == "prefix":
            rejected[: len(chosen)] = chosen
        rows["chosen"].append((prompt, chosen))
        rows["rejected"].append((rejected_prompt, rejected))
    batch = {}
    for side, pairs in rows.items():
        width = max(len(p) + len(r) for p, r in pairs)
        ids, mask, labels = [], [], []
        for prompt, reply in pairs:
            pad = width - len(prompt) - len(reply)
            ids.append(prompt + reply + [pad_token_id] * pad)
            mask.append([1] * (len(prompt) + len(reply)) + [0] * pad)
            labels.append([-100] * len(prompt) + reply + [-100] * pad)
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
            batch[f"{side}_{name}"] = torch.tensor(value, device=DEVICE)
    return batch


def loss_metrics_grads_on(trainer, batch):
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), metrics, grads


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_loss_metrics_and_gradients_equal_trls_layout(tmp_path, layout, settings, fused):
    def run(**fields):
        trainer = trainer_on_random_llama(tmp_path, random_llama(), fused, **settings, **fields)
        return loss_metrics_grads_on(trainer, awkward_pairs(trainer.pad_token_id))

    reference = run()
    expected = {"rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss"}
    assert expected <= reference[1].keys()
    assert_same(run(**layout), reference)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_demo_datas_tokenised_pairs_give_trls_numbers_too(tmp_path, layout):
    """Real tokenised pairs through TRL's own collator, on the eager attention (an additive float mask)."""

    def run(**fields):
        model = random_llama()
        model.config._attn_implementation = "eager"
        return loss_metrics_grads(trainer_on_random_llama(tmp_path, model, False, diversity_weight=0.3, **fields))

    assert_same(run(**layout), run())


def test_each_prompt_is_computed_once_and_no_padding_is_left():
    inputs = CPOTrainer.concatenated_inputs(awkward_pairs(pad_token_id=0), padding_value=0)
    ids, mask, labels = (inputs[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    real = int(mask.sum())
    assert ids.numel() > real  # TRL's layout pads
    shared = 40 + 3 + (12 + 3) + (6 + 4)  # the common token prefixes of the four pairs (awkward_pairs)
    packed = pack_pairs(ids, mask, labels, prefix_sharing=True, padding_free=True, pad_token_id=0)
    assert packed.input_ids.shape == (1, real - shared)
    padding_free = pack_pairs(ids, mask, labels, prefix_sharing=False, padding_free=True, pad_token_id=0)
    assert padding_free.input_ids.shape == (1, real)
    shared_rows = pack_pairs(ids, mask, labels, prefix_sharing=True, padding_free=False, pad_token_id=0)
    assert shared_rows.input_ids.shape == (4, max(43 + 65 - 40, 34 + 6 - 3, 21 + 19 - 15, 10 + 16 - 10))
    # The LM head projects each position that predicts a reply token once: of TRL's 90 (the replies' lengths), a pair's
    # two replies share the positions inside their common prefix: the prompt's last (pair 1), none (pair 2: the
    # prompts' last tokens differ), prompt end + 3 common tokens (pair 3), all 4 of the chosen reply's (pair 4)
    assert int(packed.response.sum()) == (3 + 25) + (30 + 2) + (9 + 7) + (4 + 10)
    assert int(packed.keep.sum()) == (3 + 25 - 1) + (30 + 2) + (9 + 7 - 4) + (4 + 10 - 4)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_update_stays_split_invariant_and_equal_to_trls_layout(tmp_path, layout):
    reference = weight_update(tmp_path / "trl", 4, 1, diversity_weight=0.3)
    for batch, accumulation in ((4, 1), (1, 4)):
        update = weight_update(tmp_path, batch, accumulation, diversity_weight=0.3, **layout)
        assert_tensors_close(update, reference, f"{batch} x {accumulation}")


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_lora_with_activation_checkpointing_gives_trls_numbers(tmp_path, fused):
    from peft import LoraConfig

    def run(**fields):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(1)  # the same random adapter each time
        trainer = trainer_on_random_llama(
            tmp_path, random_llama(), fused, peft_config=config, activation_checkpointing=True, **fields
        )
        trainer.model.train()
        return loss_metrics_grads_on(trainer, awkward_pairs(trainer.pad_token_id))

    result, reference = run(prefix_sharing=True, padding_free=True), run()
    assert all("lora" in name for name in reference[2])
    assert_same(result, reference)


def test_models_that_cannot_honour_the_mask_are_refused_in_one_line(tmp_path):
    model = random_llama()
    model.config._attn_implementation = "flash_attention_2"  # set by hand: flash-attn does not install on this CPU box
    assert layout_refusal(model, prefix_sharing=False, padding_free=False) is None
    refusal = layout_refusal(model, prefix_sharing=True, padding_free=False)
    assert "prefix_sharing" in refusal and "'flash_attention_2'" in refusal and "\n" not in refusal
    with pytest.raises(ValueError, match="padding_free needs an attention implementation"):
        trainer_on_random_llama(tmp_path, model, False, padding_free=True)


def test_a_cli_run_trains_evaluates_and_resumes_to_the_numbers_of_trls_layout(tmp_path):
    """The demo's data and model through the CLI: 4 steps, evaluations (and the sampled-reply diversity eval) at 2
    and 4, stopped at the checkpoint of step 2 and resumed, against one uninterrupted run in TRL's layout."""
    from test_cli import DEMO_CONFIG, run_cli

    common = ["--config", DEMO_CONFIG, "--report_to", "none", "--lr_scheduler_type", "constant", "--warmup_steps", 0]
    common += ["--eval_steps", 2, "--save_steps", 2, "--logging_steps", 1, "--diversity_eval_prompts", 2]
    common += ["--diversity_eval_samples", 2, "--diversity_eval_max_new_tokens", 8]
    reference = run_cli(*common, "--max_steps", 4, "--output_dir", tmp_path / "trl")
    assert reference.returncode == 0, reference.stderr[-3000:]
    shared = [*common, "--prefix_sharing", "true", "--padding_free", "true", "--output_dir", tmp_path / "shared"]
    first = run_cli(*shared, "--max_steps", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli(*shared, "--max_steps", 4, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def history(folder):
        log = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
        return {(entry["step"], key): value for entry in log for key, value in entry.items() if _compared(key)}

    ours, theirs = history(tmp_path / "shared"), history(tmp_path / "trl")
    assert {step for step, key in theirs if key == "eval_rewards/accuracies"} == {2, 4}
    assert any(key.startswith("diversity_eval/") for _, key in theirs)
    assert ours.keys() == theirs.keys()
    # 4 Adam steps in float32: the logged figures after them agree to ~1e-6 of their scale; Adam's normalisation can
    # turn a gradient's rounding into up to lr per step in a near-zero entry, so allow 2^10 ulps (1.2e-4), not 2^7
    for step in {step for step, _ in theirs}:
        at = {key: value for (s, key), value in theirs.items() if s == step}
        assert_metrics_close({key: value for (s, key), value in ours.items() if s == step}, at, ulps=1024)


def _compared(key):
    """Every logged figure but the clock's and `train_loss` (the mean over the steps this process ran)."""
    return key != "train_loss" and not any(timing in key for timing in ("runtime", "per_second", "flos"))


def test_flex_attentions_block_mask_gives_trls_logits():
    """FlexAttention (the GPU kernel for these layouts) with the BlockMask, forward only: PyTorch has no FlexAttention
    backward on the CPU, so training with it is checked by the GPU check; here its mask is checked (compiles ~30 s)."""
    model = random_llama().eval()
    batch = awkward_pairs(pad_token_id=0)
    inputs = CPOTrainer.concatenated_inputs(batch, padding_value=0)
    ids, mask, labels = (inputs[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    packed = pack_pairs(ids, mask, labels, True, True, pad_token_id=0, multiple_of=FLEX_BLOCK)
    assert packed.input_ids.shape[1] % FLEX_BLOCK == 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        model.config._attn_implementation = "flex_attention"
        kept = model(**packed.model_inputs("flex_attention"), logits_to_keep=packed.keep).logits
    logits = packed.logits_in_trl_layout(kept)
    assert_tensors_close(logits[packed.response], reference[packed.response], "logits")  # flex vs sdpa: float32 sums


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_token_keeps_the_position_id_it_has_in_trls_row(layout):
    """TRL's rows are right-padded and get position ids 0, 1, 2, ... from the model; in the packed layout the token
    at (row r, index t) of TRL's batch must have position id t: restarting per sequence, continuing from the prefix
    for a rejected reply. RoPE hides a constant shift in the equality tests above; this does not."""
    inputs = CPOTrainer.concatenated_inputs(awkward_pairs(pad_token_id=0), padding_value=0)
    ids, mask, labels = (inputs[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    packed = pack_pairs(ids, mask, labels, pad_token_id=0, **{"prefix_sharing": False, "padding_free": False} | layout)
    packed_ids, packed_positions = packed.input_ids.flatten(), packed.position_ids.flatten()
    for row, length in enumerate(mask.sum(-1).tolist()):
        where = packed.source[row, :length]
        assert packed_ids[where].tolist() == ids[row, :length].tolist(), row
        assert packed_positions[where].tolist() == list(range(length)), row


def random_gpt2(seed=0):
    """A random GPT-2: learned absolute position embeddings, so a wrong position id changes every number."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=2048, n_positions=128, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_model_with_absolute_position_embeddings_gets_trls_numbers_too(tmp_path, layout, fused):
    def run(**fields):
        trainer = trainer_on_random_llama(tmp_path, random_gpt2(), fused, **SETTINGS["diversity-and-nll"], **fields)
        return loss_metrics_grads_on(trainer, awkward_pairs(trainer.pad_token_id))

    assert_same(run(**layout), run())


def test_encoder_decoder_and_mixture_of_experts_models_are_refused_in_one_line():
    """README: the layouts refuse an encoder-decoder model and a mixture-of-experts auxiliary loss (they would compute
    something else), each in one line that says which setting to turn off."""
    from transformers import MixtralConfig, MixtralForCausalLM, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=8, d_ff=16, num_layers=1, num_heads=1, d_kv=8))
    t5.config._attn_implementation = "sdpa"
    moe = MixtralForCausalLM(
        MixtralConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_local_experts=2, output_router_logits=True)
    )  # fmt: skip
    moe.config._attn_implementation = "sdpa"
    for model, phrase in ((t5, "decoder-only"), (moe, "mixture-of-experts")):
        refusal = layout_refusal(model, prefix_sharing=True, padding_free=False)
        assert refusal and phrase in refusal and "prefix_sharing: false" in refusal and "\n" not in refusal
