"""On-policy rounds (train_on_policy.py): each round samples from the model the last round trained and trains from
it, on its own slice of the prompts; a killed loop continues to the uninterrupted loop's figures; every stage runs
under the launcher the loop runs under; mistakes in either stage's settings are one line before anything is written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DEMO_MODEL, ROOT, two_rank_launcher

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# two rounds at toy sizes: 12 prompts (6 per round), 3 replies of up to 12 tokens, 3 training steps per round
CANDIDATES = {"max_prompts": 12, "num_candidates": 3, "max_new_tokens": 12, "shard_size": 4, "batch_size": 4}
TRAIN = {
    "max_steps": 3,
    "save_steps": 2,
    "save_total_limit": 2,
    "eval_strategy": "no",
    "report_to": "none",
    "diversity_eval_prompts": 0,
}
TRAIN |= {"pair_selection": ["best_vs_worst", "divpo"], "dataset_test_fraction": 0.0, "logging_steps": 1}


def loop_command(output, launch=(sys.executable,)):
    command = [*map(str, launch), "train_on_policy.py", "--config", "configs/demo_on_policy.yaml"]
    return [*command, "--candidates", json.dumps(CANDIDATES), "--train", json.dumps(TRAIN), "--output_dir", str(output)]


def loop(output, *extra, launch=(sys.executable,), timeout=900, **kwargs):
    return subprocess.run([*loop_command(output, launch), *map(str, extra)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kwargs)  # fmt: skip


def manifest(folder):
    return yaml.safe_load((Path(folder) / "candidates.yaml").read_text(encoding="utf-8"))


def prompts(folder):
    rows = [json.loads(line) for shard in sorted(Path(folder).glob("train-*.jsonl")) for line in shard.open()]
    return [json.dumps(row["prompt"], ensure_ascii=False) for row in rows]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    output = tmp_path_factory.mktemp("on-policy") / "out"
    result = loop(output)
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def test_each_round_samples_from_and_trains_from_the_model_of_the_round_before(two_rounds):
    start, first = str(DEMO_MODEL.relative_to(ROOT)), str(two_rounds / "round-1" / "model")
    assert manifest(two_rounds / "round-1" / "candidates")["settings"]["model_name_or_path"] == start
    assert manifest(two_rounds / "round-2" / "candidates")["settings"]["model_name_or_path"] == first
    for r, model in ((1, start), (2, first)):
        resolved = yaml.safe_load((two_rounds / f"round-{r}" / "model" / "resolved_config.yaml").read_text())
        assert resolved["model_name_or_path"] == model
        assert resolved["dataset_name"] == str(two_rounds / f"round-{r}" / "candidates")
        record = json.loads((two_rounds / f"round-{r}" / "model" / "run_record.json").read_text())
        assert record["status"] == "finished" and record["global_step"] == 3
        assert set(record["data"]["rows"]["train"]["pairs_by_rule"]) == {"best_vs_worst", "divpo"}
    assert manifest(two_rounds / "final-samples")["settings"]["model_name_or_path"] == str(
        two_rounds / "round-2" / "model"
    )


def test_fresh_prompts_take_one_slice_per_round_and_the_final_samples_repeat_round_one(two_rounds):
    first, second = prompts(two_rounds / "round-1" / "candidates"), prompts(two_rounds / "round-2" / "candidates")
    assert len(first) == len(second) == 6 and not set(first) & set(second)  # the 12 prompts, each once
    final = manifest(two_rounds / "final-samples")
    assert prompts(two_rounds / "final-samples") == first  # the same prompts with the same draws: comparable
    assert final["settings"]["seed"] == manifest(two_rounds / "round-1" / "candidates")["settings"]["seed"]
    assert manifest(two_rounds / "round-2" / "candidates")["settings"]["seed"] == final["settings"]["seed"] + 1


def test_the_figures_of_every_round_are_those_of_its_samples(two_rounds):
    summary = json.loads((two_rounds / "rounds.json").read_text(encoding="utf-8"))
    assert [row["round"] for row in summary["rounds"]] == [1, 2, "final"]
    for row, folder in zip(
        summary["rounds"], ("round-1/candidates", "round-2/candidates", "final-samples"), strict=True
    ):
        rows = [
            json.loads(line) for shard in sorted((two_rounds / folder).glob("train-*.jsonl")) for line in shard.open()
        ]
        scores = [sum(r["all_rm_scores"]) / len(r["all_rm_scores"]) for r in rows]
        assert row["mean_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-12)
        good = [len({json.dumps(t) for t, s in zip(r["all_generated_responses"], r["all_rm_scores"], strict=True)
                     if s >= summary["quality_bar"]}) / 3 for r in rows]  # fmt: skip
        assert row["good_unique_rate"] == pytest.approx(sum(good) / len(good), rel=1e-12)
    table = (two_rounds / "rounds.md").read_text(encoding="utf-8")
    assert "| final | model of round 2 | 6 |" in table and (two_rounds / "rounds.png").is_file()


def assert_same_figures(ours, theirs):
    """The same rounds, samples and pairs; the scores to float32 rounding (a reward model's sum can differ in its last
    bit from one process to another)."""
    ours, theirs = (json.loads((folder / "rounds.json").read_text(encoding="utf-8")) for folder in (ours, theirs))
    assert len(ours["rounds"]) == len(theirs["rounds"]) and ours["quality_bar"] == pytest.approx(theirs["quality_bar"])
    for mine, other in zip(ours["rounds"], theirs["rounds"], strict=True):
        numbers = {k for k, v in other.items() if isinstance(v, float)}
        assert mine.keys() == other.keys() and all(mine[k] == other[k] for k in other.keys() - numbers)
        assert {k: mine[k] for k in numbers} == pytest.approx({k: other[k] for k in numbers}, rel=1e-6)


def test_a_killed_loop_continues_to_the_figures_of_the_uninterrupted_loop(tmp_path, two_rounds):
    """A real SIGKILL of the loop and its stage once round 2 has begun to sample: the same command again passes over
    round 1 and ends where the uninterrupted loop ended. Then round 2's training cut back to its checkpoint-2 (what a
    kill during it leaves): the loop resumes it from there, to the same end."""
    output = tmp_path / "out"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(loop_command(output), cwd=ROOT, env=ENV, start_new_session=True, **quiet)
    deadline = time.time() + 600
    while not (output / "round-2" / "candidates" / "candidates.yaml").is_file():
        assert process.poll() is None and time.time() < deadline, "the loop ended before round 2 began"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    round_one = (output / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns
    resumed = loop(output)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "round 1: training: done" in resumed.stderr
    assert (output / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns == round_one
    assert_same_figures(output, two_rounds)

    # what a kill during round 2's training leaves: its checkpoint-2 (of 3 steps), no model, no final samples
    for path in [*(output / "round-2" / "model").iterdir(), output / "final-samples"]:
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = loop(output)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "--resume_from_checkpoint latest" in resumed.stderr
    record = json.loads((output / "round-2" / "model" / "run_record.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2") and record["global_step"] == 3
    assert_same_figures(output, two_rounds)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_every_stage_runs_on_the_ranks_of_the_launcher_the_loop_runs_under(tmp_path, launcher):
    """Three stages (candidates, training, final samples), each a rendezvous of its own on the same two ranks."""
    result = loop(tmp_path / "out", "--rounds", "1", launch=two_rank_launcher(launcher), start_new_session=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # the candidates stage: 12 prompts in 3 shards, shard k sampled by rank k mod 2
    assert "rank 0: sampled 2 of the 3 shards to write" in result.stderr
    assert "rank 1: sampled 1 of the 3 shards to write" in result.stderr
    record = json.loads((tmp_path / "out" / "round-1" / "model" / "run_record.json").read_text())
    assert record["command"]["world_size"] == 2 and record["status"] == "finished"
    assert manifest(tmp_path / "out" / "final-samples")["prompts"] == 12


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train", '{"learning_rat": 1e-4}'], "configs/demo.yaml: unknown option --learning_rat; did you mean"),
        (["--candidates", '{"num_candidates": 1}'], "num_candidates=1 is out of range"),
        (["--train", '{"eval_strategy": "steps", "dataset_test_fraction": 0}'], "candidates have no test split"),
        (["--rounds", "0"], "rounds=0 is out of range"),
        (["--learning_rate", "1e-6"], "--learning_rate; it is a setting of the train stage: give it --train '{"),
        (["--num_candidates", "8"], "it is a setting of the candidates stage: give it --candidates '{"),
        (["--round_prompts", "new"], "round_prompts='new' is not one of fresh, same"),
        (["--model_name_or_path", "./demo/no-such-model"], "model folder ./demo/no-such-model not found"),
        (["--train_config", "configs/nothing.yaml"], "config file configs/nothing.yaml not found"),
    ],
)
def test_a_mistake_in_the_loop_or_in_either_stage_is_one_line_before_anything_is_written(tmp_path, flags, message):
    result = loop(tmp_path / "out", *flags, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
