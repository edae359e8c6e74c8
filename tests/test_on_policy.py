"""On-policy rounds (train_on_policy.py): each round samples from the model the last round trained and trains from
it, on its own slice of the prompts; a killed loop continues to the uninterrupted loop's figures; every stage runs
under the launcher the loop runs under; mistakes in either stage's settings are one line before anything is written."""

import bisect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_MODEL, ROOT, refusal, two_rank_launcher
from precision import assert_close_at_scale, tolerance

from diversity_simpo.rounds import figures, samples_of

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
    from diversity_simpo.reply_diversity import equivalence_classes, sentence_embedder, utility_k

    summary, embedder = json.loads((two_rounds / "rounds.json").read_text(encoding="utf-8")), sentence_embedder()
    scores = [s for r in samples_of(two_rounds / "round-1" / "candidates") for s in r["all_rm_scores"]]
    assert summary["score_deciles"] == statistics.quantiles(scores, n=10)  # round 1's, for every round
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
        cut = [sum(r["all_cut"]) / 3 for r in rows]
        assert row["cut_rate"] == pytest.approx(sum(cut) / len(cut), rel=1e-12)
        classes = [equivalence_classes(r["all_generated_responses"], embedder, 0.85) for r in rows]
        assert row["distinct_k"] == pytest.approx(sum(len(set(c)) for c in classes) / len(rows), rel=1e-12)
        utilities = [[bisect.bisect_left(summary["score_deciles"], s) + 1 for s in r["all_rm_scores"]] for r in rows]
        utility = [utility_k(c, u, 0.8) for c, u in zip(classes, utilities, strict=True)]
        assert row["utility_k"] == pytest.approx(sum(utility) / len(utility), rel=1e-12)
    table = (two_rounds / "rounds.md").read_text(encoding="utf-8")
    assert "| final | model of round 2 | 6 |" in table and (two_rounds / "rounds.png").is_file()


def test_rounds_scored_by_their_own_implicit_reward_say_that_their_scores_do_not_compare_across_rounds(
    tmp_path, two_rounds
):
    """With implicit_reward_reference each round's model scores its own samples: rounds.md says so above the table."""
    from diversity_simpo.rounds import write_figures

    folder = shutil.copytree(two_rounds, tmp_path / "loop")
    settings = folder / "round-1" / "candidates.settings.yaml"
    assert "scored by the reward model;" in (folder / "rounds.md").read_text(encoding="utf-8")
    given = yaml.safe_load(settings.read_text(encoding="utf-8"))
    settings.write_text(yaml.safe_dump(given | {"implicit_reward_reference": "demo/tiny-llama-ja"}), encoding="utf-8")
    write_figures(folder, 2)
    head = (folder / "rounds.md").read_text(encoding="utf-8").splitlines()[0]
    assert "the implicit reward of the model that sampled them against demo/tiny-llama-ja" in head
    assert "not across rounds" in head


def test_the_classes_figures_of_a_round_by_hand():
    from diversity_simpo.reply_diversity import equivalence_classes

    """Short replies only (no embedding: distinct_k and utility_k as worked by hand). Score deciles 1..9: a score's
    utility is 1 + the number of deciles below it (9.5 -> 10, 3.2 -> 4, 0.5 -> 1; 5.0 -> 5, 7.0 -> 7, 2.0 -> 2).
    Prompt 1: 富士山です。 and 富士山！ are one class (4 >= 4 shared words), 北岳です。 another: distinct_k 2,
    utility (10 + 0.8^2 x 1) / (1 + 0.8 + 0.8^2) = 10.64 / 2.44 (富士山！ repeats a class: it earns nothing).
    Prompt 2: three classes: (5 + 0.8 x 7 + 0.8^2 x 2) / 2.44 = 11.88 / 2.44. Every reply is a distinct string."""
    rows = [
        {"all_generated_responses": ["富士山です。", "富士山！", "北岳です。"], "all_rm_scores": [9.5, 3.2, 0.5]},
        {"all_generated_responses": ["Mount Fuji", "Takao", "Kitadake"], "all_rm_scores": [5.0, 7.0, 2.0]},
    ]
    classes = [equivalence_classes(r["all_generated_responses"], object(), 0.85) for r in rows]  # no embedding
    assert classes == [[0, 0, 1], [0, 1, 2]]
    numbers = figures(rows, 5.0, list(range(1, 10)), classes, patience=0.8)
    assert numbers["unique_rate"] == 1.0 and numbers["distinct_k"] == 2.5
    assert numbers["utility_k"] == pytest.approx((10.64 + 11.88) / 2 / 2.44, rel=1e-12)


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
    kill during it leaves): the loop resumes it from there, to the same end. Then round 2's model left unrecorded
    (a kill as it was saved): trained again, to the same end."""
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
    assert (
        yaml.safe_load((output / "round-2" / "model.settings.yaml").read_text())["resume_from_checkpoint"] == "latest"
    )
    record = json.loads((output / "round-2" / "model" / "run_record.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2") and record["global_step"] == 3
    assert_same_figures(output, two_rounds)

    # what a kill between save_model and the end of the run record leaves: round 2's model beside a record still
    # `running`, no checkpoint: the loop does not refuse its own folder, it trains that round again (to the same
    # model) and passes over the final samples it already has
    folder = output / "round-2" / "model"
    (folder / "run_record.json").write_text(json.dumps(record | {"status": "running"}))
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    resumed = loop(output)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "round 2: training: python" in resumed.stderr and "final samples: done" in resumed.stderr
    assert json.loads((folder / "run_record.json").read_text())["status"] == "finished"
    assert_same_figures(output, two_rounds)


def test_a_loop_folder_moved_whole_is_passed_over_where_it_now_lies(tmp_path, two_rounds):
    """A finished loop's folder moved elsewhere (its rounds name the model of the round before by absolute path) is
    continued by the same command naming its new place: every stage passed over, no file written again; and round
    2's candidates still count as sampled by the model round 2 trains from, so their log-probabilities apply."""
    from diversity_simpo.pair_selection import stored_logps_apply

    moved = shutil.copytree(two_rounds, tmp_path / "elsewhere" / "loop")  # copy2: the files keep their times
    files = [p for p in moved.rglob("*") if p.suffix in (".safetensors", ".jsonl")]
    times = [p.stat().st_mtime_ns for p in files]
    result = loop(moved)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("round 1: candidates", "round 1: training", "round 2: candidates", "round 2: training"):
        assert f"{stage}: done" in result.stderr, stage
    assert "final samples: done" in result.stderr
    assert [p.stat().st_mtime_ns for p in files] == times
    assert stored_logps_apply(str(moved / "round-2" / "candidates"), str(moved / "round-1" / "model"))
    assert not stored_logps_apply(str(moved / "round-2" / "candidates"), str(moved / "round-2" / "model"))


def leave_as_a_kill_would(output, boundary):
    """A finished two-round loop's folder as a kill at `boundary` leaves it: what was written after it removed (the
    stages write in order: round-1/candidates, round-1/model, round-2/candidates, round-2/model, final-samples)."""
    order = ["round-1/candidates", "round-1/model", "round-2/candidates", "round-2/model", "final-samples"]
    stage, _, moment = boundary.partition(": ")
    later = order[order.index(stage) + (moment != "not begun") :] if stage in order else []
    for name in later:  # not begun: gone, with the settings file the loop writes as it starts a stage
        shutil.rmtree(output / name)
        (output / f"{name}.settings.yaml").unlink(missing_ok=True)
    folder = output / stage
    if moment == "a shard missing":  # a kill while sampling: the manifest and some shards written
        next(folder.glob("train-*.jsonl")).unlink()
    elif moment in ("before its first checkpoint", "after a checkpoint", "after saving the model"):
        record = json.loads((folder / "run_record.json").read_text(encoding="utf-8"))
        keep = {"run_record.json"} | ({"checkpoint-2"} if moment == "after a checkpoint" else set())
        if moment == "after saving the model":  # the model and its files saved, the record not yet ended
            keep |= {p.name for p in folder.iterdir() if not p.name.startswith("checkpoint-")}
        for path in folder.iterdir():
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        (folder / "run_record.json").write_text(json.dumps(record | {"status": "running"}), encoding="utf-8")


BOUNDARIES = {  # where a kill stops the loop: what the same command then does with each stage, in order
    "round-1/candidates: not begun": ["run", "run", "run", "run", "run"],
    "round-1/candidates: a shard missing": ["run", "run", "run", "run", "run"],
    "round-1/model: not begun": ["done", "run", "run", "run", "run"],
    "round-1/model: before its first checkpoint": ["done", "again", "run", "run", "run"],
    "round-1/model: after a checkpoint": ["done", "resume", "run", "run", "run"],
    "round-1/model: after saving the model": ["done", "again", "run", "run", "run"],
    "round-2/candidates: not begun": ["done", "done", "run", "run", "run"],
    "round-2/candidates: a shard missing": ["done", "done", "run", "run", "run"],
    "round-2/model: not begun": ["done", "done", "done", "run", "run"],
    "round-2/model: before its first checkpoint": ["done", "done", "done", "again", "run"],
    "round-2/model: after a checkpoint": ["done", "done", "done", "resume", "run"],
    "round-2/model: after saving the model": ["done", "done", "done", "again", "run"],
    "final-samples: not begun": ["done", "done", "done", "done", "run"],
    "final-samples: a shard missing": ["done", "done", "done", "done", "run"],
    "the end": ["done", "done", "done", "done", "done"],
}


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_after_a_kill_at_any_stage_boundary_the_same_command_passes_over_exactly_what_was_finished(
    tmp_path, two_rounds, boundary, monkeypatch
):
    """Every boundary between and within stages: each finished stage passed over, a training run resumed from its
    checkpoint or trained again over its own folder, and every later stage run (the kill test above runs three of
    these states to the uninterrupted loop's figures)."""
    from diversity_simpo import rounds, settings
    from diversity_simpo_trainer import DiversitySimPOConfig
    from train_on_policy import DEFAULT_CONFIG

    monkeypatch.chdir(ROOT)
    argv = loop_command(two_rounds)[2:]  # the fixture's own command, read as train_on_policy.py reads it
    (args,) = settings.read_settings(argv, (rounds.OnPolicyArguments,), DEFAULT_CONFIG)
    args = rounds.over_config(args, argv, DEFAULT_CONFIG)
    finished = shutil.copytree(two_rounds, tmp_path / "finished")  # the fixture's folder, put back afterwards
    try:
        leave_as_a_kill_would(two_rounds, boundary)
        stages = rounds.stages(args, *rounds.check(args, DiversitySimPOConfig))
        assert [stage.folder.relative_to(two_rounds).as_posix() for stage in stages] == [
            "round-1/candidates", "round-1/model", "round-2/candidates", "round-2/model", "final-samples"
        ]  # fmt: skip
        steps = [rounds.prepare(stage) for stage in stages]
        assert steps == BOUNDARIES[boundary]
        for stage, step in zip(stages, steps, strict=True):  # the settings file each stage then reads
            written = yaml.safe_load(stage.settings_file.read_text(encoding="utf-8"))
            assert written.get("resume_from_checkpoint") == ("latest" if step == "resume" else None)
            assert written.get("overwrite_output_dir", False) is (step == "again")
    finally:
        shutil.rmtree(two_rounds)
        shutil.copytree(finished, two_rounds)


LORA = {"use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 5e-3}


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_every_stage_runs_on_the_ranks_of_the_launcher_the_loop_runs_under(tmp_path, launcher):
    """Each stage a rendezvous of its own on the same two ranks. Under accelerate, the one-GPU recipe's LoRA over two
    rounds (its list of target modules arriving as a list): round 2 samples, scores its replies' rarity and trains
    from round 1's adapter, and ends with an adapter of the start model. Under DeepSpeed, one round of all weights."""
    rounds, train = (2, LORA) if launcher == "accelerate" else (1, {})
    out = tmp_path / "out"
    command = [
        *loop_command(out, two_rank_launcher(launcher)),
        "--rounds",
        str(rounds),
        "--train",
        json.dumps(TRAIN | train),
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, start_new_session=True
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # the candidates stage: 12 prompts in 3 shards (6 in 2 per round with two rounds), shard k sampled by rank k mod 2
    if rounds == 1:
        assert "rank 0: sampled 2 of the 3 shards to write" in result.stderr
        assert "rank 1: sampled 1 of the 3 shards to write" in result.stderr
    for r in range(1, rounds + 1):
        record = json.loads((out / f"round-{r}" / "model" / "run_record.json").read_text())
        assert record["command"]["world_size"] == 2 and record["status"] == "finished"
    assert manifest(out / "final-samples")["prompts"] == 12 // rounds
    if train:
        lora_rounds(out)


def lora_rounds(out):
    """Both rounds trained one adapter of the start model on q_proj and v_proj; round 2's replies and their stored
    rarity come from round 1's adapter (its base with it, in float64)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diversity_simpo.rarity import candidate_logps, tokenised_candidates

    for r in (1, 2):
        adapter = json.loads((out / f"round-{r}" / "model" / "adapter_config.json").read_text())
        assert Path(adapter["base_model_name_or_path"]).resolve() == DEMO_MODEL.resolve()
        assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    weights = load_file(out / "round-1" / "model" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # round 1's adapter changes the model
    assert manifest(out / "round-2" / "candidates")["settings"]["model_name_or_path"] == str(out / "round-1" / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), out / "round-1" / "model")
    model, tokenizer = model.double().eval(), AutoTokenizer.from_pretrained(DEMO_MODEL)
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).double().eval()
    moved = 0.0
    for row in map(json.loads, (out / "round-2" / "candidates" / "train-00000-of-00002.jsonl").open(encoding="utf-8")):
        candidates = [[{"role": "assistant", "content": reply}] for reply in row["all_generated_responses"]]
        alone = {"prompt": row["prompt"], "candidates": candidates}
        (expected,) = candidate_logps(model, tokenizer, [alone], torch.device("cpu"))
        (without,) = candidate_logps(base, tokenizer, [alone], torch.device("cpu"))
        for stored, value, other, (ids, _) in zip(row["all_mean_logps"], expected, without,
                                                  tokenised_candidates(tokenizer, alone), strict=True):  # fmt: skip
            with torch.no_grad():
                scale = model(torch.tensor([ids])).logits.abs().max()
            assert_close_at_scale(stored, value, scale, "round 2's stored rarity under round 1's adapter")
            moved = max(moved, abs(value - other) / tolerance(abs(value) + scale.item()))
    assert moved > 1, "round 1's adapter moves no log-probability beyond rounding: the test cannot tell base from it"


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--train", '{"learning_rat": 1e-4}'],
            "configs/demo.yaml with the loop's train: over it): unknown key "
            "'learning_rat'; did you mean 'learning_rate'?",
        ),
        (["--train", '{"dataset_name": "my/data"}'], "train: dataset_name is decided by the loop for every round"),
        (["--candidates", '{"model_name_or_path": "x"}'], "set model_name_or_path at the loop's top level"),
        (["--candidates", '{"max_prompts": 1}'], "each of the 2 rounds its own slice of the prompts, and"),
        (["--candidates", '{"num_candidates": 1}'], "num_candidates=1 is out of range"),
        (["--train", '{"eval_strategy": "steps", "dataset_test_fraction": 0}'], "candidates have no test split"),
        (["--rounds", "0"], "rounds=0 is out of range"),
        (["--candidates", '{"reward_funcs": "my_rewards.py"}'], "must be path/to/file.py:function_name"),
        (["--learning_rate", "1e-6"], "--learning_rate; it is a setting of the train stage: give it --train '{"),
        (["--num_candidates", "8"], "it is a setting of the candidates stage: give it --candidates '{"),
        (["--round_prompts", "new"], "round_prompts='new' is not one of fresh, same"),
        (["--model_name_or_path", "./demo/no-such-model"], "model folder ./demo/no-such-model not found"),
        (["--train_config", "configs/nothing.yaml"], "config file configs/nothing.yaml not found (train_config)"),
    ],
)
def test_a_mistake_in_the_loop_or_in_either_stage_is_one_line_before_anything_is_written(tmp_path, flags, message):
    import train_on_policy

    refused = refusal(train_on_policy.main, *loop_command(tmp_path / "out")[2:], *flags)
    assert message in refused and not (tmp_path / "out").exists(), refused


# --- each stage's settings: a file its own reader takes, every value as given ---------------------------------------


def loop_args(tmp_path, train, candidates, **fields):
    from diversity_simpo.rounds import OnPolicyArguments

    paths = {"candidates_config": "configs/demo_candidates.yaml", "train_config": "configs/demo.yaml"}
    return OnPolicyArguments(**(paths | fields), train=train, candidates=candidates, output_dir=str(tmp_path / "out"))


def test_every_kind_of_setting_reaches_each_stage_equal_to_what_was_given(tmp_path, monkeypatch):
    """None, lists, mappings, booleans, floats and strings given in the loop's mappings are what each stage's own
    reader reads from the settings file the loop writes for it (a flag per setting would turn None into "None" and
    join lists with commas)."""
    from diversity_simpo import rounds, settings
    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo_trainer import DiversitySimPOConfig

    monkeypatch.chdir(ROOT)
    train = {"max_completion_length": None, "lora_target_modules": ["q_proj", "v_proj"], "use_peft": True,
             "report_to": ["wandb", "tensorboard"], "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
             "learning_rate": 3.5e-07, "run_name": "ラウンド: 1, 2",
             "pair_selection": ["best_vs_worst", "divpo"]}  # fmt: skip
    candidates = {"system_prompt": None, "dataset_columns": {"prompt": "prompt"}, "temperature": 0.7,
                  "top_p": 1.0, "dataset_split": "train", "wrap_text_as_chat": True}  # fmt: skip
    args = loop_args(tmp_path, train, candidates)
    base = rounds.base_settings(args)
    for stage in rounds.stages(args, str(DEMO_MODEL.relative_to(ROOT)), 7, *base)[:2]:
        stage.settings_file.parent.mkdir(parents=True, exist_ok=True)
        stage.settings_file.write_text(rounds.settings_text(stage.settings), encoding="utf-8")
        argv = ["--config", str(stage.settings_file)]
        if stage.script == "generate_candidates.py":
            (read,) = settings.read_settings(argv, (CandidateArguments,), stage.settings_file)
            given = candidates
        else:
            read = settings.parse_args([*argv, "--bf16", "false"], DiversitySimPOConfig)
            given = train
        values = {k: v for part in (read if isinstance(read, tuple) else (read,)) for k, v in vars(part).items()}
        for key, value in given.items():
            assert values[key] == value, f"{stage.name}: {key}"
            assert type(values[key]) is type(value), f"{stage.name}: {key} is {type(values[key])}"


def test_the_training_stage_trains_on_the_rounds_candidates_whatever_its_config_says_of_the_source_prompts(
    tmp_path, monkeypatch
):
    """A training config written for a Hub dataset of pairs (its split, configuration, columns and system turn) is
    still the config of every round: the loop gives its training stage the round's candidates folder as they are."""
    from diversity_simpo import rounds

    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    config |= {"dataset_train_split": "train_prefs", "dataset_test_split": "test_prefs", "dataset_config": "ja",
               "dataset_columns": {"prompt": "instruction"},
               "system_prompt": "あなたは誠実なアシスタントです。"}  # fmt: skip
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    args = loop_args(tmp_path, {}, {"wrap_text_as_chat": True}, train_config=str(tmp_path / "train.yaml"))
    trained = [s for s in rounds.stages(args, "m", 7, *rounds.base_settings(args)) if s.script.startswith("train")]
    for r, stage in enumerate(trained, 1):
        assert {k: stage.settings[k] for k in rounds.LOOP_TRAINING if k in stage.settings} == {
            "model_name_or_path": "m" if r == 1 else str(tmp_path / "out" / f"round-{r - 1}" / "model"),
            "output_dir": str(tmp_path / "out" / f"round-{r}" / "model"),
            "dataset_name": str(tmp_path / "out" / f"round-{r}" / "candidates"),
            "dataset_config": None, "dataset_train_split": "train", "dataset_test_split": "test",
            "dataset_columns": None, "system_prompt": None, "wrap_text_as_chat": True,
        }  # fmt: skip
        assert stage.settings["learning_rate"] == config["learning_rate"]  # the rest is the config's
