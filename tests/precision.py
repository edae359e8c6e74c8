"""How closely two computations of the same number can agree: tolerances from float32's rounding, not from one CPU.

float32 keeps 24 significant bits: every operation's result is within eps/2 (eps = 2^-23 ~ 1.19e-7) of the exact one,
*relative to the operands*. Two paths that compute the same quantity in another order (a tiled LM head against a full
log-softmax, a packed row against padded rows, 1 micro-batch against 4, float32 against a float64 reference) differ
by those roundings, so the difference is bounded in ulps of the magnitudes a value is *made of*, not of the value:

- a difference of large quantities carries their rounding: `rewards/margins` (-0.08) is the mean of `rewards/chosen`
  minus `rewards/rejected` (both near -17), so its rounding is ~17 eps, 200 eps of the margin itself;
- an entropy is E[logsumexp(z) - z] over a token's logits z: each term is rounded at the logits' size, so a peaked
  distribution's small entropy (0.07, say) carries the rounding of logits near 10, when the caller gives their size
  (`logits/scale`, the largest |logit|);
- a KL is a sum of p (log p - log q) whose terms cancel when the two distributions are near each other: its rounding
  follows the log-probabilities' size, which the entropy measures (E[-log p]);
- the loss is softplus(gamma - margin) (slope <= 1) plus cpo_alpha * NLL plus weight * (entropy, KL terms): its
  rounding is at most theirs plus its own;
- a tensor (log-probabilities per position, a gradient) is compared elementwise with an absolute floor at its own
  largest entry: an entry near zero is the sum of contributions as large as the tensor's big entries, and carries
  their rounding (an embedding row's gradient, a weight's update).

ULPS = 2^9: each compared number passes through the stacked reductions of the demo model (4 layers, hidden size 256,
a 2,048-token vocabulary): per layer a norm, the attention's matmuls and softmax and the MLP's three matmuls, ~8
reductions each way, ~32 for the 4 layers, then the LM head, a log-sum-exp over the vocabulary and the means over
positions and pairs: ~40 reductions, each a blocked sum whose rounding grows with log2 of its length (<= 11 here);
~40 x 11 ulps rounds up to 512. Seen: up to ~20 ulps on AVX-512 Intel and AMD CPUs, up to ~215 on an AVX2 AMD EPYC
(the gradients of the second layer, through the attention's softmax). A real bug (a position off by one, a pair
mismatched, a term dropped) moves a number by a sizeable fraction of its scale, hundreds of times this tolerance.
"""

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
ULPS = 512

# metric -> the metrics whose magnitudes it is computed from (its own magnitude always counts)
MADE_OF = {
    "rewards/margins": ("rewards/chosen", "rewards/rejected"),
    "diversity/entropy": ("logits/scale",),
    "diversity/kl": ("diversity/entropy",),
    "diversity/loss": ("diversity/entropy", "diversity/kl"),
    "loss": ("rewards/chosen", "rewards/rejected", "nll_loss", "diversity/entropy", "diversity/kl"),
}


def tolerance(scale, ulps=ULPS):
    return ulps * EPS32 * scale


def assert_close_at_scale(actual, expected, scale, what="", ulps=ULPS):
    """|actual - expected| <= ulps * eps32 * scale, where `scale` is the magnitude of what the value is made of."""
    actual, expected, scale = (x.detach().item() if torch.is_tensor(x) else float(x) for x in (actual, expected, scale))
    allowed = tolerance(abs(expected) + abs(scale), ulps)
    assert math.isfinite(actual) and abs(actual - expected) <= allowed, (
        f"{what}: {actual!r} against {expected!r}, difference {abs(actual - expected):.3g} > {allowed:.3g} "
        f"({ulps} float32 ulps of the scale {abs(expected) + abs(scale):.3g})"
    )


def metric_scale(key, metrics):
    """The magnitudes a logged metric is made of (beside its own), looked up in the same metrics dict."""
    prefix = "eval_" if key.startswith("eval_") else ""
    parts = MADE_OF.get(key.removeprefix(prefix), ())
    return sum(abs(metrics[prefix + part]) for part in parts if prefix + part in metrics)


def assert_metrics_close(actual, expected, keys=None, ulps=ULPS):
    """Every metric in `keys` (default: all of `expected`) at its scale; accuracies are counts of pairs: exact."""
    keys = expected.keys() if keys is None else keys
    for key in keys:
        if key.endswith("rewards/accuracies"):
            assert actual[key] == expected[key], key
        else:
            assert_close_at_scale(actual[key], expected[key], metric_scale(key, expected), key, ulps)


def assert_loss_close(actual, expected, metrics, ulps=ULPS):
    """The loss at the scale of the rewards, the NLL and the diversity term it is made of (from `metrics`)."""
    assert_close_at_scale(actual, expected, metric_scale("loss", metrics), "loss", ulps)


def assert_tensors_close(actual, expected, what="", ulps=ULPS):
    """Elementwise |a - e| <= ulps * eps32 * (|e| + max |e|): relative where entries are large, with an absolute floor
    at the tensor's own largest entry where they are near zero."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    floor = expected.abs().max().item() if expected.numel() else 0.0
    excess = (actual - expected).abs() - tolerance(expected.abs() + floor, ulps)
    worst = excess.argmax().item() if excess.numel() else 0
    assert excess.numel() == 0 or excess.flatten()[worst] <= 0, (
        f"{what}: entry {worst}: {actual.flatten()[worst].item()!r} against {expected.flatten()[worst].item()!r} "
        f"(allowed {ulps} float32 ulps of |entry| + max|tensor| = {floor:.3g})"
    )


def assert_grads_close(actual, expected, ulps=ULPS):
    """Two {name: gradient} dicts: the same names, every tensor close by assert_tensors_close."""
    assert actual.keys() == expected.keys() and expected
    for name, reference in expected.items():
        assert_tensors_close(actual[name], reference, name, ulps)


def relative_norm_difference(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
