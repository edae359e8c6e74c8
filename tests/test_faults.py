"""Faults in the middle of a run: a NaN loss, SIGKILL then resume, SIGTERM from a scheduler."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from safetensors.torch import load_file
from test_cli import DEMO_CONFIG, run_cli


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


def test_sigkill_mid_run_then_resume_reaches_the_same_final_step_and_loss(tmp_path):
    common = [
        "--config",
        DEMO_CONFIG,
        "--max_steps",
        30,
        "--save_steps",
        5,
        "--save_total_limit",
        10,
        "--eval_strategy",
        "no",
        "--logging_steps",
        1,
    ]
    reference = run_cli(*common, "--output_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    process = start_cli(*common, "--output_dir", interrupted, stderr_file=tmp_path / "stderr.log")
    wait_for(interrupted / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model.safetensors").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in interrupted.glob("checkpoint-*"))
    assert killed_at < 30

    resumed = run_cli(*common, "--output_dir", interrupted, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, expected = log_history(interrupted / "checkpoint-30"), log_history(tmp_path / "reference" / "checkpoint-30")
    losses = [(e["step"], e["loss"]) for e in final if "loss" in e]
    assert [step for step, _ in losses] == list(range(1, 31))  # continues from the checkpoint, no gap, no repeat
    assert [loss for _, loss in losses] == pytest.approx([e["loss"] for e in expected if "loss" in e], rel=1e-4)


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
    assert not (tmp_path / "model.safetensors").exists()

    # Resume for a few more steps only (a shorter run keeps the test quick; the schedule is not what is tested).
    resumed = run_cli(*common, "--resume_from_checkpoint", "latest", "--max_steps", stopped_at + 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "model.safetensors").exists()
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][-3:] == [
        stopped_at + 1,
        stopped_at + 2,
        stopped_at + 3,
    ]
