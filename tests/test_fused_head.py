"""The fused LM head (`fused_lm_head: true`): the numbers of the unfused path, without the [2B, L, V] logits.

Function level: against the float64 reference written from the math (tests/reference.py), on random inputs with
prompt and padding masks, with vocabulary and row tiling forced small so every tiling path runs. Trainer level: the
loss, every logged metric and every gradient equal the unfused trainer's on a random tiny Llama.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ON_CPU, ROOT
from precision import (
    assert_close_at_scale,
    assert_grads_close,
    assert_loss_close,
    assert_metrics_close,
    assert_tensors_close,
)
from reference import diversity_reference, label_logprob_reference, random_batch
from test_trainer import make_trainer as trainer_on_demo_data
from transformers import LlamaConfig, LlamaForCausalLM

from diversity_simpo import fused_head
from diversity_simpo.fused_head import fused_head_refusal, preference_head
from diversity_simpo_trainer import mean_of_row_means


@pytest.fixture
def small_vocab_tiles(monkeypatch):
    """Vocabulary tiles of 7 logits: every online-softmax rescaling path runs even on a tiny vocabulary."""
    monkeypatch.setattr(fused_head, "VOCAB_TILE", 7)


def random_head_inputs(pairs=3, length=10, hidden_size=6, vocab=23, seed=0, bias=True):
    _, labels = random_batch(pairs, length, vocab, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=generator).to(labels.device)
    weight = torch.randn(vocab, hidden_size, generator=generator).to(labels.device)
    b = torch.randn(vocab, generator=generator).to(labels.device) if bias else None
    return hidden, weight, b, labels


@pytest.mark.parametrize("tile_elements", [1, 30, 10**6], ids=["rows-of-2", "rows-of-4", "one-tile"])
@pytest.mark.parametrize("bias", [True, False])
def test_head_matches_the_float64_reference_in_value_and_gradient(small_vocab_tiles, tile_elements, bias):
    hidden, weight, b, labels = random_head_inputs(bias=bias)
    pairs = hidden.shape[0] // 2
    upstream = torch.randn(hidden.shape[:2], generator=torch.Generator().manual_seed(5)).to(hidden.device)
    w_entropy, w_kl = 0.7, -1.3

    def loss_and_grads(log_probs, entropy, kl, leaves):
        loss = (log_probs * upstream).sum() + w_entropy * entropy + w_kl * kl
        return loss, torch.autograd.grad(loss, leaves)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    out = preference_head(leaves[0], leaves[1], leaves[2] if bias else None, labels, pairs, tile_elements)
    chosen = out.label_mask[:pairs]
    entropy, kl = mean_of_row_means(out.entropy[:pairs], chosen), mean_of_row_means(out.kl, out.pair_mask)
    loss, grads = loss_and_grads(out.log_probs, entropy, kl, leaves)

    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    logits = ref_leaves[0] @ ref_leaves[1].t() + (ref_leaves[2] if bias else 0)
    ref_entropy, ref_kl = diversity_reference(logits, labels)
    ref_log_probs = label_logprob_reference(logits, labels)
    ref_loss, ref_grads = loss_and_grads(ref_log_probs, ref_entropy, ref_kl, ref_leaves)

    # float32 against float64: within float32 rounding of what each value is made of (tests/precision.py)
    assert_tensors_close(out.log_probs, ref_log_probs, "log_probs")
    assert_close_at_scale(entropy, ref_entropy, 0, "entropy")
    assert_close_at_scale(kl, ref_kl, ref_entropy, "kl")  # its terms cancel at the log-probabilities' size
    scale = (ref_log_probs * upstream.double()).abs().sum() + abs(w_entropy * ref_entropy) + abs(w_kl * ref_entropy)
    assert_close_at_scale(loss, ref_loss, scale, "loss")
    assert_tensors_close(out.mean_logits, logits.detach().mean(-1), "mean_logits")
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert_tensors_close(grad, ref, name)


def test_positions_outside_responses_are_zero_and_get_no_gradient(small_vocab_tiles):
    hidden, weight, b, labels = random_head_inputs(seed=1)
    hidden = hidden.requires_grad_()
    out = preference_head(hidden, weight, b, labels, hidden.shape[0] // 2, 50)
    assert (out.log_probs[~out.label_mask] == 0).all() and (out.entropy[~out.label_mask] == 0).all()
    assert (out.kl[~out.pair_mask] == 0).all()
    (grad,) = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum() + out.kl.sum(), hidden)
    predicts_nothing = ~out.label_mask  # hidden state at t only feeds the prediction of label t + 1
    assert (grad[predicts_nothing] == 0).all() and (grad[out.label_mask].abs().sum(-1) > 0).all()


def test_batch_without_any_pair_position_gives_zero_kl_not_nan():
    hidden, weight, b, labels = random_head_inputs(pairs=2, length=10, seed=2)
    labels[:] = -100
    labels[:2, 1:4] = 3  # chosen responses predicted at positions 0..2
    labels[2:, 6:9] = 5  # rejected responses predicted at positions 5..7: no overlap
    out = preference_head(hidden.requires_grad_(), weight, b, labels, 2, 100)
    assert out.pair_mask.sum() == 0 and torch.isfinite(out.log_probs).all()
    (grad,) = torch.autograd.grad(out.log_probs.sum() + out.kl.sum(), hidden)
    assert torch.isfinite(grad).all()


def test_bfloat16_inputs_are_projected_in_bf16_and_folded_in_float32():
    hidden, weight, _, labels = random_head_inputs(pairs=2, length=12, vocab=40, seed=3)
    hidden, weight = hidden.bfloat16().requires_grad_(), weight.bfloat16()
    out = preference_head(hidden, weight, None, labels, 2, 100)
    logits = (hidden.detach() @ weight.t()).double()  # the bf16 logits an unfused bf16 head would produce
    assert_tensors_close(out.log_probs, label_logprob_reference(logits, labels), "log_probs")  # float32 folds of them
    (grad,) = torch.autograd.grad(out.log_probs.sum(), hidden)
    assert out.log_probs.dtype == torch.float32 and grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


# --- the trainer: fused against unfused on a random tiny Llama -------------------------------------------------


def random_llama(dtype=torch.float32, seed=0):
    """A random Llama with the demo tokenizer's vocabulary; a wide init gives O(1) entropies and KLs, so that float32
    relative comparisons are meaningful."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def make_trainer(tmp_path, model, fused, peft_config=None, **overrides):
    """test_trainer's trainer on a random Llama; tiles of a few rows, so that the row tiling runs too."""
    settings = {"max_steps": 2, "rows": 8, "diversity_chunk_elements": 1500, "fused_lm_head": fused, **overrides}
    return trainer_on_demo_data(tmp_path, model=model, peft_config=peft_config, **settings)


def loss_metrics_grads(trainer):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    lengths = {len(trainer.train_dataset[i][k]) for i in range(4) for k in ("chosen_input_ids", "rejected_input_ids")}
    assert len(lengths) > 3, "the batch must hold pairs of unequal lengths (padding)"
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), metrics, grads


def assert_same(result, reference):
    """Two float32 computations of the same step in another order (tiles, layouts): the loss, every metric and every
    gradient within float32 rounding of the magnitudes they are made of (tests/precision.py)."""
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = result, reference
    assert metrics.keys() == ref_metrics.keys()
    assert_loss_close(loss, ref_loss, ref_metrics)
    assert_metrics_close(metrics, ref_metrics)
    assert_grads_close(grads, ref_grads)


SETTINGS = [
    dict(diversity_weight=0.0, cpo_alpha=0.0),
    dict(diversity_weight=0.0, cpo_alpha=0.5),
    *(
        dict(diversity_weight=0.3, diversity_alpha=alpha, cpo_alpha=cpo_alpha)
        for alpha in (0.0, 0.1, 1.0)
        for cpo_alpha in (0.0, 0.5)
    ),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_fused_loss_metrics_and_gradients_equal_the_unfused_path(tmp_path, small_vocab_tiles, settings):
    results = [loss_metrics_grads(make_trainer(tmp_path, random_llama(), fused, **settings)) for fused in (True, False)]
    expected = {"rewards/margins", "logps/chosen", "logits/chosen", "logits/rejected", "nll_loss"}
    if settings["diversity_weight"] > 0:
        expected |= {"diversity/entropy", "diversity/kl", "diversity/loss"}
    assert expected <= results[0][1].keys()
    assert_same(*results)


def test_bf16_model_fused_is_within_bf16_tolerance_and_at_least_as_accurate_as_the_unfused_path(tmp_path):
    """A bf16 model against the float32 computation on the same (bf16-rounded) weights. TRL's unfused path takes the
    log-softmax of bf16 logits in bf16, so its SimPO loss is a few percent off; the fused path folds the same bf16
    logits in float32. So the fused loss must be at least as close as TRL's and within 1%, the float32-computed
    entropy and KL of both paths agree within 1e-3, and the fused gradients are as close to float32's as TRL's."""

    def run(dtype, fused):  # random_llama is seeded: the same bf16 weights each time, cast to `dtype`
        model = random_llama(torch.bfloat16).to(dtype)
        return loss_metrics_grads(make_trainer(tmp_path, model, fused, diversity_weight=0.3))

    fused, fused_metrics, fused_grads = run(torch.bfloat16, True)
    unfused, unfused_metrics, unfused_grads = run(torch.bfloat16, False)
    reference, reference_metrics, reference_grads = run(torch.float32, False)
    assert abs(fused - reference) <= max(abs(unfused - reference), 0.01 * abs(reference))
    for key in ("diversity/entropy", "diversity/kl"):
        assert fused_metrics[key] == pytest.approx(unfused_metrics[key], rel=1e-3)
        assert fused_metrics[key] == pytest.approx(reference_metrics[key], rel=1e-2)
    for name, grad in reference_grads.items():  # a bf16 backbone alone is a few percent off float32
        fused_error = ((fused_grads[name] - grad).norm() / grad.norm()).item()
        unfused_error = ((unfused_grads[name] - grad).norm() / grad.norm()).item()
        assert fused_error < 0.1 and fused_error <= 1.1 * unfused_error, (name, fused_error, unfused_error)


@pytest.mark.parametrize("peft, checkpointing", [(True, False), (False, True), (True, True)])
def test_fused_path_equals_unfused_with_lora_and_activation_checkpointing(tmp_path, peft, checkpointing):
    from peft import LoraConfig

    def trainer(fused):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if peft else None
        return make_trainer(tmp_path, random_llama(), fused, peft_config=config, activation_checkpointing=checkpointing)

    fused, unfused = trainer(True), trainer(False)
    if peft:
        unfused.model.load_state_dict(fused.model.state_dict())  # the same random adapter initialisation
    results = [loss_metrics_grads(t) for t in (fused, unfused)]
    assert all("lora" in name for name in results[0][2]) == peft
    assert_same(*results)


def test_fused_trainer_trains_evaluates_and_runs_one_forward_per_step(tmp_path):
    trainer = make_trainer(tmp_path, random_llama(), True, max_steps=3, diversity_weight=0.3)
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert len(forwards) == 3 and not torch.equal(before, trainer.model.lm_head.weight)
    evaluation = trainer.evaluate()
    assert {"eval_diversity/kl", "eval_rewards/accuracies", "eval_logits/chosen"} <= set(evaluation)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in evaluation.items() if k.startswith("eval_"))
    assert trainer.model(torch.tensor([[1, 2, 3]], device=trainer.model.device)).logits.shape == (
        1,
        3,
        2048,
    )  # plain calls keep their logits


def test_models_the_fused_head_cannot_serve_are_refused_in_one_line(tmp_path):
    from peft import LoraConfig
    from transformers import Gemma2Config, Gemma2ForCausalLM, T5Config, T5ForConditionalGeneration

    assert fused_head_refusal(random_llama()) is None
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=8, d_ff=16, num_layers=1, num_heads=1, d_kv=8))
    assert "decoder-only" in fused_head_refusal(t5)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    )
    assert "final_logit_softcapping" in fused_head_refusal(gemma)
    with pytest.raises(ValueError, match=r"plain linear layer.*lora_target_modules") as error:
        make_trainer(tmp_path, random_llama(), True, peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "\n" not in str(error.value)


# --- the GPU path's Triton kernels, run on the CPU by Triton's interpreter --------------------------------------

TRITON = ROOT / ".triton"  # triton from PyPI, which `make setup` installs here only (the CPU venv has none)
FUNCTION_LEVEL = "head_matches or outside_responses or pair_position or bfloat16_inputs or triton_kernels_in_use"


def test_triton_kernels_in_use_when_interpreting():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs inside test_triton_kernels_pass_the_function_level_tests")
    assert fused_head._use_triton(torch.device("cpu"))


@pytest.mark.skipif(not ON_CPU, reason="on a GPU the function-level tests above run the kernels for real")
def test_triton_kernels_pass_the_function_level_tests():
    """On a GPU the tiles fold in Triton kernels (`_fold_kernel`, `_grad_kernel`); with TRITON_INTERPRET=1 Triton runs
    them on the CPU, so the function-level tests above (float64 reference, masks, bf16) check them here too."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TRITON), str(ROOT)])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", FUNCTION_LEVEL]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "10 passed" in result.stdout, result.stdout[-2000:]
