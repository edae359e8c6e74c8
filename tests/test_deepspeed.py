"""Real DeepSpeed on CPU ranks: the README's launch commands, ZeRO-2 and ZeRO-3, saving and resuming.

DeepSpeed picks its CPU accelerator and the gloo backend here, with its shared-memory all-reduce (`make setup`
compiles that extension once, into TORCH_EXTENSIONS_DIR). Skip these locally with `-m "not distributed"`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, free_port, remove_orphan_deepspeed_buffers
from precision import assert_close_at_scale, metric_scale, relative_norm_difference, tolerance
from safetensors.torch import load_file
from test_faults import trained_steps

from diversity_simpo.checkpoints import checkpoint_problem

pytestmark = pytest.mark.distributed

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")  # the launcher installed beside this Python
COMMON = [
    "--config",
    "configs/demo.yaml",
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--eval_strategy",
    "no",
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
]
# ADAM_STEPS_PRECISION: weights after a few Adam steps (lr 2e-4) in two launches. Adam divides by sqrt(v), so a
# gradient's rounding (~1e-5 of its norm) moves an update by about that relative amount, except in entries whose
# gradient is near its own rounding, which can move by up to lr per step: rtol 1e-4 and atol 1e-5 (a twentieth of one
# step) hold for the first and bound the second by how few entries sit there; a wrong gradient moves every entry by ~lr.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank on 2 cores; more oversubscribes them 5x


def launch(*args, ranks=2, stdout=subprocess.PIPE):
    command = [
        DEEPSPEED,
        f"--num_gpus={ranks}",
        "--master_port",
        free_port(),
        "train_diversity_simpo.py",
        *map(str, args),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=ENV, text=True, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
    )


def run(*args, ranks=2):
    process = launch(*args, ranks=ranks)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # a hung rank must not outlive the test
        raise
    assert process.returncode == 0, output[-4000:]
    return output


def weights(directory):
    return load_file(Path(directory) / "model.safetensors")


def run_plain(*command):
    """A command without the deepspeed launcher; it must succeed."""
    result = subprocess.run([*map(str, command)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    """The same global batch (2 ranks x 4 pairs) in one plain process: 4 pairs x 2 accumulation steps."""
    output = tmp_path_factory.mktemp("single") / "out"
    run_plain(
        sys.executable,
        "train_diversity_simpo.py",
        *COMMON,
        "--gradient_accumulation_steps",
        "2",
        "--output_dir",
        output,
    )
    return output


@pytest.mark.parametrize("fused", ["false", "true"], ids=["unfused", "fused"])
@pytest.mark.parametrize("ds_config", ["configs/ds_config.json", "configs/ds_config_zero3.json"])
def test_two_ranks_train_log_diversity_and_save_the_single_process_model(
    tmp_path, ds_config, fused, single_process_reference
):
    """ZeRO-2 and ZeRO-3, with the logits or the fused head (which must run inside the engine's forward, where
    ZeRO-3 gathers the LM head): the same weights as one process with the logits."""
    output = tmp_path / "out"
    log = run(*COMMON, "--deepspeed", ds_config, "--fused_lm_head", fused, "--output_dir", output)
    assert "terminate called" not in log
    assert (output / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's engine wrote it, not plain torch
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    assert all("diversity/loss" in entry and "diversity/entropy" in entry for entry in logged)
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("resolved")) == ["resolved_config.yaml"]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(output)  # the consolidated model loads
    ours, reference = weights(output), weights(single_process_reference)
    assert ours.keys() >= reference.keys()  # DeepSpeed may also write the tied lm_head.weight
    for name in reference:  # ADAM_STEPS_PRECISION
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero2_fused_run_killed_after_a_checkpoint_resumes_to_the_end(tmp_path):
    output = tmp_path / "out"
    args = [*COMMON, "--max_steps", "8", "--deepspeed", "configs/ds_config.json", "--fused_lm_head", "true"]
    args += ["--output_dir", output]
    process = launch(*args, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (output / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before checkpoint-4"
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, as a node failure would
    process.wait()
    assert not (output / "model.safetensors").exists()

    killed_at = max(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if checkpoint_problem(p) is None)
    assert killed_at in (4, 6)  # DeepSpeed's checkpoints pass the completeness rule too
    log = run(*args, "--resume_from_checkpoint", "latest")
    assert trained_steps(log) == 8 - killed_at  # resumed: a restart would train all 8 again
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, 9))
    assert (output / "model.safetensors").exists()


def test_single_process_deepspeed_runs_without_a_launcher(tmp_path):
    args = [*COMMON, "--max_steps", "2", "--deepspeed", "configs/ds_config.json", "--output_dir", tmp_path / "out"]
    result = run_plain(sys.executable, "train_diversity_simpo.py", *args)
    assert "mpi4py" not in result.stderr and (tmp_path / "out" / "checkpoint-2" / "global_step2").is_dir()


def test_the_suite_removes_the_buffers_deepspeed_leaves_in_shared_memory_and_none_a_process_holds():
    """DeepSpeed's CPU ranks leave a 69 MB buffer each in /dev/shm (memory); conftest sweeps those no process holds,
    so a suite of launches does not fill the machine's memory. A held buffer, or one just written, may be a running
    rank's, whose peers wait for it: those stay."""
    orphan, held, fresh = (Path("/dev/shm") / f"deepspeed_allreduce_buffer_test_{os.getpid()}_{n}" for n in range(3))
    holder = None
    try:
        for buffer in (orphan, held, fresh):
            buffer.write_bytes(b"\0" * 64)
        settled = time.time() - 60
        os.utime(orphan, (settled, settled))
        os.utime(held, (settled, settled))
        hold = "import sys, time; f = open(sys.argv[1]); print('open', flush=True); time.sleep(60)"
        holder = subprocess.Popen([sys.executable, "-c", hold, held], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "open\n"
        removed = remove_orphan_deepspeed_buffers()
        assert orphan in removed and not orphan.exists()
        assert held.exists() and fresh.exists() and held not in removed and fresh not in removed
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for buffer in (orphan, held, fresh):
            buffer.unlink(missing_ok=True)


def test_accelerate_launch_with_deepspeed_trains_on_two_ranks(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    args = [*COMMON, "--max_steps", "2", "--deepspeed", "configs/ds_config.json", "--output_dir", tmp_path / "out"]
    port = ["--main_process_port", free_port()]
    run_plain(accelerate, "launch", "--num_processes", "2", *port, "--use_deepspeed", "train_diversity_simpo.py", *args)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert (tmp_path / "out" / "checkpoint-2" / "global_step2").is_dir()


@pytest.mark.parametrize("gather", ["true", "false"], ids=["gathered", "sharded-synced"])
def test_diversity_eval_numbers_do_not_depend_on_the_number_of_ranks(tmp_path, gather):
    """5 prompts in groups of 2: rank 0 samples groups 0 and 2, rank 1 group 1 and then waits (with the ZeRO-3 weights
    gathered once) or runs a spare group in lockstep (weights left sharded); neither hangs, and the gathered
    statistics equal one process's."""
    args = ["--config", "configs/demo.yaml", "--eval_only", "true", "--diversity_eval_prompts", "5"]
    args += ["--diversity_eval_batch_size", "2", "--diversity_eval_samples", "3"]
    args += ["--diversity_eval_max_new_tokens", "12"]
    run_plain(sys.executable, "train_diversity_simpo.py", *args, "--output_dir", tmp_path / "one")
    args += ["--diversity_eval_gather_weights", gather]
    run(*args, "--deepspeed", "configs/ds_config_zero3.json", "--output_dir", tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("one", "two"))
    keys = [k for k in one if k.startswith("diversity_eval/") and k != "diversity_eval/runtime"]
    assert {"diversity_eval/distinct_2", "diversity_eval/embedding_distance"} <= set(keys)
    assert len(one["diversity_eval/samples"]) == 5
    for key in keys:
        # the same sampled tokens on 1 and 2 ranks: text scores are exact; the entropy and embedding scores are float32
        # per reply (a few ulps, 1e-6 ~ 8 ulps), averaged in float64
        assert two[key] == (pytest.approx(one[key], rel=1e-6) if isinstance(one[key], float) else one[key]), key


def test_the_original_notes_command_runs_zero2_from_the_real_config(tmp_path):
    """`deepspeed --num_gpus=N train_diversity_simpo.py`, exactly as the user's notes launch it (no --config, no
    --deepspeed): the real config names configs/ds_config.json, so the run is ZeRO-2. Pointed at the demo model and
    data on 2 CPU ranks; everything else is the real config (fused head, activation checkpointing, ...)."""
    output = tmp_path / "out"
    demo = ["--model_name_or_path", "demo/tiny-llama-ja", "--dataset_name", "demo/data", "--dtype", "float32"]
    demo += ["--bf16", "false", "--use_cpu", "true", "--max_length", "128", "--report_to", "none"]
    short = ["--max_steps", "2", "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_steps", "2"]
    log = run(*demo, *short, "--diversity_eval_prompts", "0", "--output_dir", output)
    assert "terminate called" not in log
    resolved = yaml.safe_load((output / "resolved_config.yaml").read_text(encoding="utf-8"))
    assert resolved["deepspeed"] == "configs/ds_config.json" and resolved["fused_lm_head"] is True
    shards = sorted(p.name for p in (output / "checkpoint-2" / "global_step2").glob("*optim_states.pt"))
    assert len(shards) == 2 and all("zero_pp_rank_" in name for name in shards), shards  # ZeRO: one shard per rank
    config = json.loads((ROOT / "configs" / "ds_config.json").read_text(encoding="utf-8"))
    assert config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed-hostfile"])
def test_two_nodes_on_one_machine_write_once_gather_metrics_and_train_like_one_process(
    tmp_path, launcher, single_process_reference
):
    """Two launcher processes, each a "node" with one CPU rank and its own working folder (node-local disk, the case
    that shows double writes), ZeRO-2 and the demo config: torchrun's multi-node rendezvous, or DeepSpeed's own
    multi-node launcher reading a hostfile (`--no_ssh`: each node starts its ranks itself, as ssh/pdsh would). Both
    ranks have LOCAL_RANK 0: only global rank 0 may write the model, resolved_config.yaml, trainer_state.json, the
    curves, run_record.json and the model card; the logged metrics are gathered over both; the weights equal one
    process's."""
    port = free_port()
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n", encoding="utf-8")
    script = [str(ROOT / "train_diversity_simpo.py"), *COMMON, "--report_to", "none", "--output_dir", "out"]
    script[script.index("configs/demo.yaml")] = str(ROOT / "configs" / "demo.yaml")
    script += ["--model_name_or_path", ROOT / "demo" / "tiny-llama-ja", "--dataset_name", ROOT / "demo" / "data"]
    script += ["--deepspeed", ROOT / "configs" / "ds_config.json"]
    bin_dir = Path(sys.executable).parent
    nodes = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        if launcher == "torchrun":
            command = [bin_dir / "torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", rank]
            command += ["--master_addr", "127.0.0.1", "--master_port", port, *script]
        else:
            command = [DEEPSPEED, "--hostfile", tmp_path / "hostfile", "--no_ssh", "--node_rank", rank]
            command += ["--master_addr", "127.0.0.1", "--master_port", port, *script]
        nodes.append(
            subprocess.Popen(
                [str(c) for c in command],
                cwd=node,
                env=ENV,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]

    first, second = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    once = ["model.safetensors", "resolved_config.yaml", "trainer_state.json", "training_curves.png", "run_record.json",
            "README.md"]  # fmt: skip
    assert all((first / name).exists() for name in once)
    assert not [name for name in once if (second / name).exists()], "global rank 1 wrote what only rank 0 may write"
    assert not list(second.glob("checkpoint-*/trainer_state.json"))
    assert list(second.glob("checkpoint-4/global_step4/*optim_states.pt"))  # its own ZeRO shard: that it must write

    logged = [e for e in json.loads((first / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    reference = [e for e in json.loads((single_process_reference / "trainer_state.json").read_text())["log_history"]]
    reference = [e for e in reference if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    for ours, theirs in zip(logged, reference, strict=True):  # each step's metrics: the mean over both ranks' pairs
        for key in ("loss", "rewards/margins", "logps/chosen", "diversity/entropy"):
            # 4 Adam steps (ADAM_STEPS_PRECISION): 2^13 ulps, 1e-3 of the scale
            assert_close_at_scale(ours[key], theirs[key], metric_scale(key, theirs), key, ulps=8192)
    ours, theirs = weights(first), weights(single_process_reference)
    for name in theirs:  # ADAM_STEPS_PRECISION
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


SHARED = ["--prefix_sharing", "true", "--padding_free", "true"]


@pytest.mark.parametrize(
    "launcher, layout",
    [
        ("torchrun", []),
        ("configs/ds_config.json", []),
        ("configs/ds_config.json", SHARED),
        ("configs/ds_config_zero3.json", [*SHARED, "--fused_lm_head", "true"]),
    ],
    ids=["torchrun", "zero2", "zero2-prefix-shared-padding-free", "zero3-prefix-shared-padding-free-fused"],
)
def test_two_ranks_of_2_pairs_give_the_update_of_one_process_of_4_pairs(tmp_path, launcher, layout):
    """One step is a function of its pairs: 2 ranks x 2 pairs = 1 process x 4 pairs in TRL's layout, with the
    diversity term on and plain SGD (no clipping, no Adam normalisation to hide a different gradient). Plain DDP, and
    DeepSpeed ZeRO-2 and ZeRO-3, the last two also with each prompt computed once and no padding."""
    sgd = ["--config", "configs/demo.yaml", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"]
    sgd += ["--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
    sgd += ["--max_grad_norm", "0", "--diversity_weight", "0.3", "--diversity_alpha", "0.35", "--report_to", "none"]
    sgd += ["--diversity_eval_prompts", "0"]
    run_plain(
        sys.executable,
        "train_diversity_simpo.py",
        *sgd,
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        tmp_path / "one",
    )
    two = [*sgd, *layout, "--per_device_train_batch_size", "2", "--output_dir", tmp_path / "two"]
    if launcher == "torchrun":
        torchrun = [Path(sys.executable).parent / "torchrun", "--nproc_per_node", "2", "--master_port", free_port()]
        run_plain(*torchrun, "train_diversity_simpo.py", *two)
    else:
        run(*two, "--deepspeed", launcher)
    start = load_file(ROOT / "demo" / "tiny-llama-ja" / "model.safetensors")
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    update_one = torch.cat([(one[k] - start[k]).flatten() for k in start])
    update_two = torch.cat([(two[k] - start[k]).flatten() for k in start])
    assert update_one.norm() > 0
    # SGD: the update is the gradient, summed over the ranks by gloo's all-reduce (ZeRO: in buckets, then partitioned):
    # the same float32 sums in another order, a few ulps of the gradient's norm; 2^10 ulps (1.2e-4) covers the
    # reductions of two steps with the all-reduce on top
    assert relative_norm_difference(update_two, update_one) < tolerance(1, ulps=1024)


def test_a_scorer_on_two_zero2_ranks_of_2_pairs_gets_the_update_and_held_out_figures_of_one_process_of_4(tmp_path):
    """train_reward_model.py under DeepSpeed's launcher: with plain SGD, 2 ranks x 2 pairs move every weight (its new
    score head too) as 1 process x 4 pairs does; and the held-out accuracy and margin it reports are those of one
    process, over each of the 19 held-out pairs once (2 ranks pad 19 to 20: the repeat must not count)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    data = tmp_path / "pairs"
    data.mkdir()
    for split, count in (("train", 16), ("test", 19)):
        lines = (ROOT / "demo" / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sgd = ["--config", "configs/demo_reward_model.yaml", "--dataset_name", data, "--max_steps", "2", "--report_to"]
    sgd += ["none", "--eval_strategy", "no", "--save_strategy", "no", "--early_stopping_patience", "0"]
    sgd += ["--load_best_model_at_end", "false", "--optim", "sgd", "--learning_rate", "0.1", "--warmup_steps", "0"]
    sgd += ["--max_grad_norm", "0", "--per_device_eval_batch_size", "16"]
    run_plain(sys.executable, "train_reward_model.py", *sgd, "--per_device_train_batch_size", "4", "--output_dir",
              tmp_path / "one")  # fmt: skip
    two = [*sgd, "--per_device_train_batch_size", "2", "--deepspeed", "configs/ds_config.json"]
    command = [DEEPSPEED, "--num_gpus=2", "--master_port", free_port(), "train_reward_model.py", *two]
    run_plain(*command, "--output_dir", tmp_path / "two")
    set_seed(42)  # the run's seed, set before its new score head is drawn
    start = AutoModelForSequenceClassification.from_pretrained(ROOT / "demo" / "tiny-llama-ja", num_labels=1)
    start = start.state_dict()
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert set(one) == set(two) and "score.weight" in one
    update_one = torch.cat([(one[k] - start[k]).flatten() for k in one])
    update_two = torch.cat([(two[k] - start[k]).flatten() for k in one])
    assert (one["score.weight"] - start["score.weight"]).norm() > 0
    # SGD: the update is the gradient, averaged over the ranks by the all-reduce: the same float32 sums in another
    # order (the bound of the SimPO test above)
    assert relative_norm_difference(update_two, update_one) < tolerance(1, ulps=1024)

    def held_out(folder):
        return json.loads((tmp_path / folder / "run_record.json").read_text())["results"]

    figures_one, figures_two = held_out("one"), held_out("two")
    assert figures_one["held_out_pairs"] == figures_two["held_out_pairs"] == 19
    # the same 19 margins, each computed in float32 in other batches (other padding) by weights a few ulps apart: the
    # accuracy is the same count of 19 (unless a margin lay within that rounding of 0), the mean margin the same to
    # 2^10 ulps of its scale (scores of order 1 from the tiny model's new head)
    assert figures_two["held_out_accuracy"] == figures_one["held_out_accuracy"]
    scale = abs(figures_one["held_out_margin"]) + 1
    assert_close_at_scale(
        figures_two["held_out_margin"], figures_one["held_out_margin"], scale, "held-out margin", 1024
    )


def test_zero3_lora_run_writes_the_merged_model_of_base_plus_its_gathered_adapter(tmp_path):
    """Under ZeRO-3 the adapter is sharded while it trains: the saved (gathered) adapter is what gets merged."""
    from test_lora import assert_merged_model_has_the_logits_of_base_plus_adapter

    output = tmp_path / "out"
    lora = ["--use_peft", "true", "--lora_r", "4", "--merge_adapter", "true", "--learning_rate", "2e-3"]
    run(*COMMON, "--max_steps", "2", "--deepspeed", "configs/ds_config_zero3.json", *lora, "--output_dir", output)
    assert_merged_model_has_the_logits_of_base_plus_adapter(output)


@pytest.mark.parametrize(
    "ds_config", ["configs/ds_config.json", "configs/ds_config_zero3.json"], ids=["zero2", "zero3"]
)
def test_divpo_makes_the_pairs_of_one_process_on_two_ranks(tmp_path, ds_config):
    """DivPO's log-probabilities come from one pass of the starting model before step 1, each rank scoring its share
    (ZeRO-3: with the weights gathered): the same pairs as one process (their fingerprint in run_record.json)."""
    from test_pair_selection import scored_demo_file

    data = scored_demo_file(tmp_path / "scored.jsonl", rows=9)  # 9 rows: the ranks' shares differ in size
    args = ["--config", "configs/demo.yaml", "--dataset_name", data, "--pair_selection", "divpo", "--max_steps", "1"]
    args += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", "0"]
    args += ["--wrap_text_as_chat", "true", "--divpo_rho", "0.5"]
    run_plain(sys.executable, "train_diversity_simpo.py", *args, "--output_dir", tmp_path / "one")
    run(*args, "--deepspeed", ds_config, "--output_dir", tmp_path / "two")

    def pairs(folder):
        return json.loads((tmp_path / folder / "run_record.json").read_text())["data"]["rows"]["train"]

    one, two = pairs("one"), pairs("two")
    assert one["kept"] == two["kept"] == 9 and one["pairs_sha256"] == two["pairs_sha256"]
