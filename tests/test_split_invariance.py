"""One optimizer step is a function of the pairs in it, not of how they are split into micro-batches.

The Trainer averages micro-batch losses over gradient accumulation (and DDP averages ranks), so a loss that is a mean
over the pairs of its micro-batch gives the same update for every split into equal-sized micro-batches. SimPO's loss
is such a mean; the diversity term must be one too. Plain SGD without clipping makes the update the gradient itself,
so any difference in the gradient shows in the weights. The two-rank version is in test_deepspeed.py.
"""

import pytest
import torch
from precision import assert_tensors_close, relative_norm_difference
from test_trainer import make_trainer

STEP = dict(
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_grad_norm=0.0,  # no clipping: the update is -lr * gradient
    weight_decay=0.0,
    max_steps=2,
    rows=8,  # 2 steps x 4 pairs
    diversity_alpha=0.35,
)


def weight_update(tmp_path, batch, accumulation, **overrides):
    trainer = make_trainer(
        tmp_path / f"{batch}x{accumulation}",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        **(STEP | overrides),
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before, strict=True)])


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_batch_4x1_2x2_and_1x4_give_the_same_update_with_the_diversity_term(tmp_path, fused):
    reference = weight_update(tmp_path, 4, 1, diversity_weight=0.3, fused_lm_head=fused)
    assert reference.norm() > 0
    for batch, accumulation in ((2, 2), (1, 4)):
        update = weight_update(tmp_path, batch, accumulation, diversity_weight=0.3, fused_lm_head=fused)
        assert_tensors_close(update, reference, f"{batch} x {accumulation}")  # the same sums in another order


def test_the_term_is_a_visible_part_of_that_update(tmp_path):
    """The equality above would hold trivially if the term's gradient were negligible next to SimPO's."""
    with_term = weight_update(tmp_path, 4, 1, diversity_weight=0.3)
    without = weight_update(tmp_path / "off", 4, 1, diversity_weight=0.0)
    assert relative_norm_difference(with_term, without) > 1e-2
