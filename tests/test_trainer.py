"""DiversitySimPOTrainer inside real TRL: the same SimPO loss as the parent, plus exactly the specified term."""

import pytest
import torch
from conftest import DEMO_DATA, DEMO_MODEL, ON_CPU
from datasets import load_dataset
from precision import assert_grads_close, assert_loss_close, assert_metrics_close
from reference import diversity_reference, reply_logit_reference
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.cpo import CPOConfig, CPOTrainer

import diversity_simpo_trainer
from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer

SIMPO = dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0)


def make_trainer(
    tmp_path,
    trainer_class=DiversitySimPOTrainer,
    config_class=DiversitySimPOConfig,
    dtype=None,
    rows=16,
    model=None,
    peft_config=None,
    **overrides,
):
    """A trainer on the demo data and tokenizer; the demo model unless `model` is given."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_length=64,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        activation_checkpointing=False,
        remove_unused_columns=False,
        use_cpu=ON_CPU,
        disable_tqdm=True,
        seed=0,
        **SIMPO,
    )
    settings.update(overrides)
    data = load_dataset(str(DEMO_DATA))
    model = model or AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tokenizer.pad_token = tokenizer.eos_token
    return trainer_class(
        model=model,
        args=config_class(**settings),
        train_dataset=data["train"].select(range(rows)),
        eval_dataset=data["test"].select(range(8)),
        processing_class=tokenizer,
        **({"peft_config": peft_config} if peft_config else {}),
    )


def first_batch(trainer, size=4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(size)]))


def test_config_defaults_are_simpo_with_the_users_diversity_settings(tmp_path):
    config = DiversitySimPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (config.loss_type, config.cpo_alpha, config.simpo_gamma) == ("simpo", 0.0, 0.7)
    assert (config.diversity_weight, config.diversity_alpha) == (0.05, 0.1)
    assert config.diversity_chunk_elements == 2**21
    assert (config.fused_lm_head, config.prefix_sharing, config.padding_free) == (False, False, False)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("diversity_weight", -0.1, ">= 0"),
        ("diversity_alpha", 1.5, "[0, 1]"),
        ("diversity_alpha", -0.01, "[0, 1]"),
        ("diversity_chunk_elements", 0, ">= 1"),
    ],
)
def test_out_of_range_fields_raise_naming_field_value_and_range(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as error:
        DiversitySimPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})
    assert field in str(error.value) and repr(value) in str(error.value) and allowed in str(error.value)


def test_weight_zero_gives_exactly_the_parents_loss_and_metrics_and_skips_the_term(tmp_path, monkeypatch):
    """Every metric is TRL's but `logits/*`: TRL averages the logits over every position of its padded rows, prompt
    and padding included, so its figure changes with the batch's layout; ours is each reply's mean logit over its
    response positions, then the mean over replies (test_logits_metrics_are_per_reply_over_response_positions)."""
    ours = make_trainer(tmp_path, diversity_weight=0.0)
    parent = make_trainer(tmp_path, trainer_class=CPOTrainer, config_class=CPOConfig)
    parent.model.load_state_dict(ours.model.state_dict())
    calls = []
    monkeypatch.setattr(diversity_simpo_trainer, "entropy_and_kl", lambda *a, **k: calls.append(1))  # a spy
    batch = first_batch(ours)
    with torch.no_grad():
        loss, metrics = ours.get_batch_loss_metrics(ours.model, batch)
        parent_loss, parent_metrics = parent.get_batch_loss_metrics(parent.model, batch)
    assert torch.equal(loss, parent_loss)
    assert metrics.keys() == parent_metrics.keys()
    assert {k: v for k, v in metrics.items() if not k.startswith("logits/")} == {
        k: v for k, v in parent_metrics.items() if not k.startswith("logits/")
    }
    assert calls == []


def test_weight_zero_gives_exactly_the_parents_gradients(tmp_path):
    """README: with diversity_weight 0 the gradients are TRL's too (the same graph: not even a zero term added)."""
    ours = make_trainer(tmp_path, diversity_weight=0.0)
    parent = make_trainer(tmp_path, trainer_class=CPOTrainer, config_class=CPOConfig)
    parent.model.load_state_dict(ours.model.state_dict())
    batch = first_batch(ours)
    for trainer in (ours, parent):
        trainer.get_batch_loss_metrics(trainer.model, batch)[0].backward()
    theirs = dict(parent.model.named_parameters())
    for name, parameter in ours.model.named_parameters():
        assert torch.equal(parameter.grad, theirs[name].grad), name


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_logits_metrics_are_per_reply_over_response_positions(tmp_path, fused):
    trainer = make_trainer(tmp_path, fused_lm_head=fused)
    batch = first_batch(trainer)
    with torch.no_grad():
        _, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        inputs = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
        ids, mask = inputs["concatenated_input_ids"], inputs["concatenated_attention_mask"]
        assert (mask == 0).any()  # padded rows: TRL's figure would differ
        chosen, rejected = reply_logit_reference(
            trainer.model(ids, attention_mask=mask).logits, inputs["concatenated_labels"]
        )
    assert_metrics_close(metrics, {"logits/chosen": chosen, "logits/rejected": rejected})  # float32 means of them


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_loss_and_gradients_equal_simpo_plus_weighted_reference_term(tmp_path, fused):
    weight, alpha = 0.3, 0.25
    ours = make_trainer(
        tmp_path, diversity_weight=weight, diversity_alpha=alpha, diversity_chunk_elements=3000, fused_lm_head=fused
    )
    batch = first_batch(ours)
    loss, metrics = ours.get_batch_loss_metrics(ours.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.model.named_parameters()}

    # Reference: the parent's SimPO loss plus the float64 term, from a separate forward of the same model and batch.
    ours.model.zero_grad()
    parent = make_trainer(tmp_path, trainer_class=CPOTrainer, config_class=CPOConfig)
    parent.model = ours.model
    simpo_loss, _ = parent.get_batch_loss_metrics(ours.model, batch)
    inputs = parent.concatenated_inputs(batch, padding_value=parent.pad_token_id)
    logits = ours.model(inputs["concatenated_input_ids"], attention_mask=inputs["concatenated_attention_mask"]).logits
    entropy, kl = diversity_reference(logits, inputs["concatenated_labels"])
    reference_loss = simpo_loss.double() + weight * (-alpha * entropy + (1 - alpha) * kl)
    reference_loss.backward()

    # float32 against float64, within float32 rounding of what each value is made of (tests/precision.py)
    term = {"diversity/entropy": entropy.item(), "diversity/kl": kl.item()}
    term["diversity/loss"] = (-alpha * entropy + (1 - alpha) * kl).item()
    assert_metrics_close(metrics, term | {"logits/scale": logits.detach().abs().max().item()}, keys=term)
    assert_loss_close(loss, reference_loss, metrics)
    assert_grads_close(grads, {name: parameter.grad for name, parameter in ours.model.named_parameters()})


def test_one_model_forward_per_training_step_and_metrics_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    trainer.train()
    assert len(forwards) == 3
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"diversity/loss", "diversity/entropy", "diversity/kl", "rewards/margins", "logps/chosen"} <= logged
    evaluation = trainer.evaluate()
    assert {"eval_diversity/loss", "eval_diversity/entropy", "eval_diversity/kl"} <= set(evaluation)


def test_bfloat16_model_trains_with_finite_loss(tmp_path):
    trainer = make_trainer(tmp_path, dtype=torch.bfloat16, max_steps=2)
    before = next(trainer.model.parameters()).detach().clone()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, next(trainer.model.parameters()).detach())


def test_nan_loss_raises_naming_the_step_and_the_batch_rows(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_dataset = trainer.train_dataset.map(lambda _, i: {"row_id": 100 + i}, with_indices=True)
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[5, 0] = float("nan")
    with pytest.raises(
        diversity_simpo_trainer.NonFiniteLossError, match=r"loss is nan at step 1 .*\[100, 101, 102, 103\]"
    ):
        trainer.get_batch_loss_metrics(trainer.model, first_batch(trainer))
