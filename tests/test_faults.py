"""Faults in the middle of a run: a NaN loss, SIGKILL then resume, SIGTERM from a scheduler."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from test_cli import DEMO_CONFIG, run_cli

from diversity_simpo.checkpoints import checkpoint_problem


def log_history(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def start_cli(*args, stderr_file):
    """The CLI in the background; stdout (where the Trainer prints its logs) is a pipe, stderr goes to a file."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train_diversity_simpo.py"), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=open(stderr_file, "w"),
        text=True,
        env=os.environ.copy(),
    )


def wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_nan_loss_or_gradient_stops_naming_the_step_and_keeps_the_last_checkpoint_intact(tmp_path):
    # A huge learning rate makes the weights ~1e30 (finite) after an update; a few steps on, the logits overflow to NaN.
    result = run_cli(
        "--config",
        DEMO_CONFIG,
        "--output_dir",
        tmp_path,
        "--learning_rate",
        "1e30",
        "--warmup_steps",
        "0",
        "--save_steps",
        "1",
        "--eval_strategy",
        "no",
        "--max_steps",
        "5",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    match = re.search(r"error: the (?:loss is nan|gradient norm is (?:nan|inf)) at step (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    failed_step = int(match.group(1))
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert saved and max(saved) == failed_step - 1  # every step before the NaN was saved, the NaN step was not
    weights = load_file(tmp_path / f"checkpoint-{max(saved)}" / "model.safetensors")
    assert all(w.isfinite().all() for w in weights.values())
    assert not (tmp_path / "model.safetensors").exists()
    record = json.loads((tmp_path / "run_record.json").read_text(encoding="utf-8"))
    assert record["status"] == "failed" and record["global_step"] == failed_step - 1
    assert "NonFiniteLossError" in record["reason"] and f"at step {failed_step}" in record["reason"]


COMMON = ["--config", DEMO_CONFIG, "--max_steps", 30, "--save_steps", 10, "--save_total_limit", 10]
COMMON += ["--eval_strategy", "no", "--logging_steps", 1, "--report_to", "none", "--diversity_eval_prompts", 0]


def trained_steps(stdout):
    """How many steps this process itself trained: the Trainer prints one `{'loss': ...}` line per logged step."""
    return len(re.findall(r"^\{'loss'", stdout, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*COMMON, "--output_dir", output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained_steps(result.stdout) == 30
    return output


def assert_resumed_run_ends_where_the_uninterrupted_one_ends(output, uninterrupted):
    final, expected = log_history(output / "checkpoint-30"), log_history(uninterrupted / "checkpoint-30")
    losses = [(e["step"], e["loss"]) for e in final if "loss" in e]
    assert [step for step, _ in losses] == list(range(1, 31))  # continues from the checkpoint, no gap, no repeat
    # a resumed run repeats the uninterrupted run's float32 arithmetic step for step, but its first step after the
    # resume reloads the optimizer state from disk: 30 Adam steps (see test_deepspeed's ADAM_STEPS_PRECISION)
    assert [loss for _, loss in losses] == pytest.approx([e["loss"] for e in expected if "loss" in e], rel=1e-4)
    ours, theirs = load_file(output / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sigkill_between_checkpoints_then_resume_trains_only_the_rest_and_ends_like_an_uninterrupted_run(
    tmp_path, uninterrupted
):
    output = tmp_path / "interrupted"
    process = start_cli(*COMMON, "--output_dir", output, stderr_file=tmp_path / "stderr.log")
    wait_for(output / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "model.safetensors").exists()
    record = json.loads((output / "run_record.json").read_text(encoding="utf-8"))  # README: a killed run stays running
    assert record["status"] == "running" and "ended" not in record and "global_step" not in record
    killed_at = max(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if checkpoint_problem(p) is None)
    assert killed_at in (10, 20)

    resumed = run_cli(*COMMON, "--output_dir", output, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained_steps(resumed.stdout) == 30 - killed_at  # resumed: a restart would train all 30 again
    assert_resumed_run_ends_where_the_uninterrupted_one_ends(output, uninterrupted)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_newest_complete_checkpoint(tmp_path, uninterrupted):
    """The weights of checkpoint-20 are written slowly (tests/slow_checkpoint_write.py) and the process is killed in
    the middle of that write, beside an intact checkpoint-10."""
    output = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "slow_checkpoint_write.py"), *map(str, COMMON), "--output_dir", output],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.log", "w"),
        env={**os.environ, "SLOW_CHECKPOINT": "checkpoint-20"},
    )
    half_written = output / "checkpoint-20" / "model.safetensors"
    wait_for(half_written, process)
    while half_written.stat().st_size == 0:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    whole = (uninterrupted / "checkpoint-20" / "model.safetensors").stat().st_size
    assert 0 < half_written.stat().st_size < whole and not (output / "checkpoint-20" / "trainer_state.json").exists()
    assert checkpoint_problem(output / "checkpoint-10") is None

    named = run_cli(*COMMON, "--output_dir", output, "--resume_from_checkpoint", output / "checkpoint-20")
    assert named.returncode == 2 and "Traceback" not in named.stderr, named.stderr[-3000:]
    assert named.stderr.strip().splitlines()[-1].startswith(f"error: resume_from_checkpoint {output / 'checkpoint-20'}")
    assert "incomplete" in named.stderr

    resumed = run_cli(*COMMON, "--output_dir", output, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notice = [line for line in resumed.stderr.splitlines() if line.startswith("resume:")]
    assert len(notice) == 1 and "checkpoint-20 is incomplete" in notice[0], resumed.stderr[-3000:]
    assert notice[0].endswith(f"resuming from {output / 'checkpoint-10'}")
    assert trained_steps(resumed.stdout) == 20
    assert checkpoint_problem(output / "checkpoint-20") is None  # written again, whole, by the resumed run
    assert_resumed_run_ends_where_the_uninterrupted_one_ends(output, uninterrupted)


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_finishes(tmp_path):
    common = [
        "--config",
        DEMO_CONFIG,
        "--output_dir",
        tmp_path,
        "--max_steps",
        400,
        "--save_steps",
        1000,
        "--eval_strategy",
        "no",
        "--logging_steps",
        1,
    ]
    process = start_cli(*common, stderr_file=tmp_path / "stderr.log")
    while "'loss'" not in process.stdout.readline():  # the first logged step: training is under way
        assert process.poll() is None, "run ended before training started"
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 143, (tmp_path / "stderr.log").read_text()[-3000:]
    assert "Stopped by SIGTERM at step" in stdout
    checkpoints = list(tmp_path.glob("checkpoint-*"))
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert len(checkpoints) == 1 and stopped_at < 400 and f"at step {stopped_at};" in stdout
    record = json.loads((tmp_path / "run_record.json").read_text(encoding="utf-8"))
    assert (record["status"], record["global_step"]) == ("stopped", stopped_at) and "SIGTERM" in record["reason"]
    assert not (tmp_path / "model.safetensors").exists()

    # A mark in the checkpoint's weights: a resumed run carries it into the final model, a restart would not.
    checkpoint_weights = checkpoints[0] / "model.safetensors"
    marked = load_file(checkpoint_weights)
    marked["model.norm.weight"] += 1.0
    save_file(marked, checkpoint_weights, metadata={"format": "pt"})

    # Resume for a few more steps only (a shorter run keeps the test quick; the schedule is not what is tested).
    resumed = run_cli(*common, "--resume_from_checkpoint", "latest", "--max_steps", stopped_at + 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained_steps(resumed.stdout) == 3
    final = load_file(tmp_path / "model.safetensors")["model.norm.weight"]
    torch.testing.assert_close(final, marked["model.norm.weight"], rtol=0, atol=0.01)  # 3 Adam steps of lr 2e-4
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][-3:] == [
        stopped_at + 1,
        stopped_at + 2,
        stopped_at + 3,
    ]
