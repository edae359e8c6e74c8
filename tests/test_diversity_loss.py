"""The chunked entropy/KL term against the float64 reference: values, gradients, masking, edge cases.

float32 against float64, or float32 in two layouts: within float32 rounding of what each value is made of
(tests/precision.py); the KL at the entropy's scale, since its terms p (log p - log q) cancel.
"""

import pytest
import torch
from precision import assert_close_at_scale, assert_tensors_close
from reference import diversity_reference, random_batch

from diversity_simpo_trainer import entropy_and_kl


def chunked_value_and_grad(logits, labels, chunk_elements, upstream, w_entropy, w_kl):
    logits = logits.clone().requires_grad_()
    passed, entropy, kl = entropy_and_kl(logits, labels, chunk_elements)
    loss = (passed * upstream).sum() + w_entropy * entropy + w_kl * kl
    (grad,) = torch.autograd.grad(loss, logits)
    return entropy.item(), kl.item(), grad


def reference_value_and_grad(logits, labels, upstream, w_entropy, w_kl):
    logits = logits.double().requires_grad_()
    entropy, kl = diversity_reference(logits, labels)
    loss = (logits * upstream.double()).sum() + w_entropy * entropy + w_kl * kl
    (grad,) = torch.autograd.grad(loss, logits)
    return entropy.item(), kl.item(), grad


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 1000])  # 3 and 4 do not divide the number of response positions
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_reference_in_value_and_gradient(chunk_rows, seed):
    logits, labels = random_batch(pairs=3, length=11, vocab=17, seed=seed)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 100)).to(logits.device)
    w_entropy, w_kl = -0.3, 0.7
    entropy, kl, grad = chunked_value_and_grad(logits, labels, chunk_rows * 17, upstream, w_entropy, w_kl)
    ref_entropy, ref_kl, ref_grad = reference_value_and_grad(logits, labels, upstream, w_entropy, w_kl)
    assert_close_at_scale(entropy, ref_entropy, 0, "entropy")
    assert_close_at_scale(kl, ref_kl, ref_entropy, "kl")
    assert_tensors_close(grad, ref_grad, "gradient")


def test_gradient_of_the_term_alone_matches_reference():
    """With no gradient arriving through the passed-through logits, only the term's own gradient comes back."""
    logits, labels = random_batch(seed=5)
    logits = logits.requires_grad_()
    _, entropy, kl = entropy_and_kl(logits, labels, 2 * logits.shape[-1])
    (grad,) = torch.autograd.grad(-0.1 * entropy + 0.9 * kl, logits)
    ref_logits = logits.detach().double().requires_grad_()
    ref_entropy, ref_kl = diversity_reference(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad(-0.1 * ref_entropy + 0.9 * ref_kl, ref_logits)
    assert_tensors_close(grad, ref_grad, "gradient")


def assert_same_term(batch, other_batch):
    _, entropy, kl = entropy_and_kl(*batch)
    _, other_entropy, other_kl = entropy_and_kl(*other_batch)
    assert_close_at_scale(other_entropy, entropy, 0, "entropy")
    assert_close_at_scale(other_kl, kl, entropy, "kl")


def test_appending_padding_does_not_change_the_term():
    logits, labels = random_batch(seed=3)
    extra = torch.randn(logits.shape[0], 4, logits.shape[-1], device=logits.device) * 5
    padded_logits = torch.cat([logits, extra], dim=1)
    padded_labels = torch.cat([labels, labels.new_full((labels.shape[0], 4), -100)], dim=1)
    assert_same_term((logits, labels), (padded_logits, padded_labels))


def test_prompt_and_padding_logits_do_not_change_the_term():
    logits, labels = random_batch(seed=4)
    response = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    response[:, :-1] = labels[:, 1:] != -100
    scrambled = torch.where(response.unsqueeze(-1), logits, torch.randn_like(logits) * 10)
    assert_same_term((logits, labels), (scrambled, labels))


def test_labels_shorter_than_logits_are_padded_with_ignore_index():
    logits, labels = random_batch(seed=6)
    _, entropy, kl = entropy_and_kl(logits, labels[:, :-2])
    ref_entropy, ref_kl = diversity_reference(logits, labels[:, :-2])
    assert_close_at_scale(entropy, ref_entropy, 0, "entropy")
    assert_close_at_scale(kl, ref_kl, ref_entropy, "kl")


def test_pairs_without_common_response_positions_give_zero_kl_not_nan():
    logits, labels = random_batch(pairs=2, length=10, seed=7)
    labels[:2, :] = -100
    labels[:2, 1:4] = 3  # chosen responses predicted at positions 0..2
    labels[2:, :] = -100
    labels[2:, 6:9] = 5  # rejected responses predicted at positions 5..7: no overlap
    logits = logits.requires_grad_()
    _, entropy, kl = entropy_and_kl(logits, labels)
    (grad,) = torch.autograd.grad(entropy + kl, logits)
    assert kl.item() == 0.0
    assert torch.isfinite(entropy) and entropy.item() > 0
    assert torch.isfinite(grad).all()


def test_batch_without_any_response_position_gives_zeros():
    logits, labels = random_batch(seed=8)
    labels[:] = -100
    logits = logits.requires_grad_()
    _, entropy, kl = entropy_and_kl(logits, labels)
    (grad,) = torch.autograd.grad(entropy + kl, logits)
    assert entropy.item() == 0.0 and kl.item() == 0.0
    assert (grad == 0).all()


def test_bfloat16_logits_are_computed_in_float32():
    logits, labels = random_batch(pairs=2, length=12, vocab=50, seed=9)
    bf16 = logits.bfloat16().requires_grad_()
    passed, entropy, kl = entropy_and_kl(bf16, labels)
    (passed.float().sum() + entropy + kl).backward()
    ref_entropy, ref_kl = diversity_reference(bf16.detach(), labels)  # same rounded inputs, float64 math
    assert entropy.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16
    assert_close_at_scale(entropy, ref_entropy, 0, "entropy")  # float32 math on the same bf16-rounded logits
    assert_close_at_scale(kl, ref_kl, ref_entropy, "kl")
    assert torch.isfinite(bf16.grad.float()).all()


def test_passed_through_logits_are_the_same_storage():
    """The term must not copy the [B, L, V] logits; the rest of the loss reads the very same tensor."""
    logits, labels = random_batch(seed=10)
    logits = logits.requires_grad_()
    passed, _, _ = entropy_and_kl(logits, labels)
    assert passed.data_ptr() == logits.data_ptr()
    assert torch.equal(passed, logits)
