"""SimPO health warnings: each failure signature warns once, naming what to change, and healthy metrics stay silent.
Synthetic logs pin each threshold from both sides; the demo pins them on real runs (a far too high learning rate
warns, the shipped settings do not)."""

from types import SimpleNamespace

import pytest
from test_cli import DEMO_CONFIG, run_cli

from health_warnings import SimPOHealthWarnings

ARGS = SimpleNamespace(report_to=["none"])


def train_log(step, loss=1.0, chosen=-2.5, margin=0.3, accuracy=0.8, entropy=1.7):
    return {"loss": loss, "rewards/chosen": chosen, "rewards/margins": margin, "rewards/accuracies": accuracy,
            "diversity/entropy": entropy, "step": step}  # fmt: skip


def warnings_for(logs, beta=2.5):
    callback, given = SimPOHealthWarnings(beta), []
    callback.warn = lambda args, name, message: given.append(name)
    for step, entry in enumerate(logs, 1):
        callback.on_log(ARGS, SimpleNamespace(global_step=step, is_world_process_zero=True), None, logs=entry)
    return given


def test_healthy_training_gives_no_warning():
    logs = [train_log(i, loss=1.5 - 0.1 * i, chosen=-2.5 - 0.05 * i, margin=0.3 + 0.4 * i, accuracy=0.6 + 0.04 * i)
            for i in range(10)]  # fmt: skip
    logs.append({"diversity_eval/self_bleu": 0.40, "diversity_eval/distinct_2": 0.66})
    logs.append({"diversity_eval/self_bleu": 0.45, "diversity_eval/distinct_2": 0.50})
    assert warnings_for(logs) == []


@pytest.mark.parametrize("fall, margin_rises, warned", [(2.6, True, True), (2.4, True, False), (5.0, False, False)])
def test_chosen_reward_falling_by_more_than_beta_while_the_margin_rises(fall, margin_rises, warned):
    logs = [train_log(0), train_log(1, chosen=-2.5 - fall, margin=0.3 + (1 if margin_rises else -0.1))]
    assert warnings_for(logs, beta=2.5) == (["chosen reward falling"] if warned else [])


@pytest.mark.parametrize("ratio, warned", [(0.24, True), (0.26, False)])
def test_entropy_below_a_quarter_of_its_start_is_a_collapse(ratio, warned):
    logs = [train_log(0, entropy=2.0), train_log(1, entropy=2.0 * ratio)]
    assert warnings_for(logs) == (["entropy collapse"] if warned else [])


@pytest.mark.parametrize(
    "evals, warned",
    [
        ([(0.61, 0.60)], True),  # self-BLEU past 0.6
        ([(0.59, 0.60)], False),
        ([(0.40, 0.66), (0.45, 0.32)], True),  # distinct-2 under half its first value
        ([(0.40, 0.66), (0.45, 0.34)], False),
    ],
)
def test_repetitive_sampled_replies(evals, warned):
    logs = [{"diversity_eval/self_bleu": b, "diversity_eval/distinct_2": d} for b, d in evals]
    assert warnings_for(logs) == (["repetitive replies"] if warned else [])


@pytest.mark.parametrize(
    "late_loss, accuracy, warned", [(1.0, 0.5, True), (0.9, 0.5, False), (1.0, 0.7, False), (1.1, 0.36, True)]
)
def test_a_loss_that_does_not_fall_with_accuracy_near_half_is_not_learning(late_loss, accuracy, warned):
    logs = [train_log(i, loss=1.0, accuracy=0.5) for i in range(4)]
    logs += [train_log(4 + i, loss=late_loss, accuracy=accuracy) for i in range(4)]
    assert warnings_for(logs) == (["not learning"] if warned else [])
    assert warnings_for(logs[:-1]) == []  # 7 logs: too few to tell


def test_each_warning_is_given_once():
    logs = [train_log(0, entropy=2.0)] + [train_log(i, entropy=0.1) for i in range(1, 5)]
    assert warnings_for(logs) == ["entropy collapse"]


def health_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning: SimPO health")]


def test_a_far_too_high_learning_rate_on_the_demo_warns_about_the_chosen_reward_and_repetition(tmp_path):
    """Measured at 5e-3 (25x the demo's): rewards/chosen -0.5 -> -19 while the margin rises to 7, and the sampled
    replies' self-BLEU 0.82 at the first evaluation (0.43 at the demo's rate). Logged to W&B offline: the alert path
    runs too."""
    result = run_cli("--config", DEMO_CONFIG, "--output_dir", tmp_path, "--learning_rate", "5e-3",
                     "--logging_steps", "2", "--diversity_eval_prompts", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = health_lines(result.stderr)
    assert any("(chosen reward falling)" in line and "Raise beta or lower learning_rate" in line for line in lines)
    assert any("(repetitive replies)" in line and "Lower learning_rate" in line for line in lines), lines
    assert "could not send the W&B alert" not in result.stderr
