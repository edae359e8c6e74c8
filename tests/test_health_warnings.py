"""SimPO health warnings: each failure signature warns once, naming what to change, and healthy metrics stay silent.
Synthetic logs pin each threshold from both sides; the demo pins them on real runs (a far too high learning rate
warns, the shipped settings do not)."""

import re
import sys
from types import SimpleNamespace

import pytest
from test_cli import DEMO_CONFIG, run_cli

from diversity_simpo.health import SimPOHealthWarnings

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


@pytest.mark.parametrize(
    "chosen, margins, warned",
    [
        # 3.0 in all, 1.0 a log: beta=2.5 counts from the first
        pytest.param([-2.5, -3.5, -4.5, -5.5], [0.3, 0.6, 0.9, 1.2], True, id="gradual-fall-past-beta"),
        # 3.0 since the previous log, only 1.0 since the first
        pytest.param([-2.5, -0.5, -3.5], [0.3, 0.5, 0.8], False, id="fall-past-beta-only-since-previous"),
        # the margin fell since the previous log, rose since the first
        pytest.param([-2.5, -3.0, -5.5], [0.3, 2.0, 1.5], True, id="margin-up-since-first-down-since-previous"),
    ],
)
def test_the_chosen_reward_fall_and_the_margin_rise_are_counted_from_the_first_log(chosen, margins, warned):
    """README: rewards/chosen below its first logged value by more than beta while rewards/margins rose."""
    logs = [train_log(i, chosen=c, margin=m) for i, (c, m) in enumerate(zip(chosen, margins, strict=True))]
    assert warnings_for(logs, beta=2.5) == (["chosen reward falling"] if warned else [])


@pytest.mark.parametrize(
    "entropies, warned",
    [
        # 20% of the first, but never below 50% of the previous log
        pytest.param([2.0, 1.6, 1.2, 0.8, 0.4], True, id="gradual-fall-below-a-quarter"),
        # below 25% of the previous log, 90% of the first
        pytest.param([2.0, 8.0, 1.8], False, id="below-a-quarter-only-of-previous"),
    ],
)
def test_entropy_collapse_is_measured_against_the_first_logged_entropy(entropies, warned):
    """README: diversity/entropy below 25% of its first logged value."""
    logs = [train_log(i, entropy=e) for i, e in enumerate(entropies)]
    assert warnings_for(logs) == (["entropy collapse"] if warned else [])


@pytest.mark.parametrize("self_bleu, warned", [(0.6, True), (0.5999, False)])
def test_a_self_bleu_of_exactly_0_6_is_repetitive(self_bleu, warned):
    """README: diversity_eval/self_bleu >= 0.6 is the repetitive-replies threshold, 0.6 included."""
    assert warnings_for([{"diversity_eval/self_bleu": self_bleu}]) == (["repetitive replies"] if warned else [])


@pytest.mark.parametrize("rank_zero", [True, False])
def test_only_the_global_rank_0_prints_the_warning_and_sends_the_wandb_alert(rank_zero, capsys, monkeypatch):
    """Module docstring: each warning is given by the global rank 0 only (Trainer's state.is_world_process_zero)."""
    alerts = []  # offline wandb sends no alert a test could see: a stand-in module records them instead
    fake_wandb = SimpleNamespace(run=SimpleNamespace(alert=lambda **alert: alerts.append(alert)),
                                 AlertLevel=SimpleNamespace(WARN="WARN"))  # fmt: skip
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    callback, args = SimPOHealthWarnings(beta=2.5), SimpleNamespace(report_to=["wandb"])
    for step, entry in enumerate([train_log(0, entropy=2.0), train_log(1, entropy=0.1)], 1):
        callback.on_log(args, SimpleNamespace(global_step=step, is_world_process_zero=rank_zero), None, logs=entry)
    lines = health_lines(capsys.readouterr().err)
    if rank_zero:
        assert len(lines) == 1 and "(entropy collapse)" in lines[0]
        assert [alert["title"] for alert in alerts] == ["SimPO health: entropy collapse"]
    else:
        assert lines == [] and alerts == []


def health_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning: SimPO health")]


def test_a_far_too_high_learning_rate_on_the_demo_warns_about_the_chosen_reward_and_repetition(tmp_path):
    """README: at 5e-3 (25x the demo's rate) the run warns within its first 10 steps that rewards/chosen fell by more
    than beta (2.5) while the margin rose, and at the first evaluation (step 20) that the sampled replies are
    repetitive (self-BLEU >= 0.6). The figures are read back from the warning lines. Logged to W&B offline: the
    alert path runs too."""
    result = run_cli("--config", DEMO_CONFIG, "--output_dir", tmp_path, "--learning_rate", "5e-3",
                     "--logging_steps", "2", "--diversity_eval_prompts", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = health_lines(result.stderr)
    (falling,) = [line for line in lines if "(chosen reward falling)" in line]
    step, chosen_then, chosen_now, margin_then, margin_now = re.search(
        r"step (\d+): rewards/chosen fell from (\S+) to (\S+) .* rewards/margins rose from (\S+) to (\S+?):", falling
    ).groups()
    assert int(step) <= 10 and float(chosen_then) - float(chosen_now) > 2.5 and float(margin_now) > float(margin_then)
    assert "Raise beta or lower learning_rate" in falling
    (repetitive,) = [line for line in lines if "(repetitive replies)" in line]
    step, self_bleu = re.search(r"step (\d+): .*self_bleu (\S+),", repetitive).groups()
    assert int(step) == 20 and float(self_bleu) >= 0.6 and "Lower learning_rate" in repetitive, repetitive
    assert "could not send the W&B alert" not in result.stderr
