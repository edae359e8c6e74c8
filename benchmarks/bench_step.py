"""Time and memory of one full training step (forward, loss, backward, AdamW step) for three variants:

    trl    TRL's CPOTrainer with loss_type=simpo (the baseline)
    naive  the same plus the diversity term written as the user's sketch does it (full softmax/log_softmax/kl_div
           over the [2B, L, V] logits in float32); kept here only as a reference point
    ours   DiversitySimPOTrainer with its default diversity settings
    fused  the same with `fused_lm_head: true`: no [2B, L, V] logits at all

Same model (a small random Llama with a real vocabulary), batch and seed for all three. Times are medians over
repeats interleaved trl, naive, ours, trl, ... after a warm-up, in this process. Peak memory is measured for each
variant in a process of its own: peak resident memory above that process's memory just before its first step.

    python benchmarks/bench_step.py                 # main shape, then the vocabulary and length sweeps
    python benchmarks/bench_step.py --quick         # main shape only
    python benchmarks/bench_step.py --hidden 2048 --layers 16   # on a GPU: a ~1.6B model at length 2048, bf16
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trl.experimental.cpo import CPOTrainer  # noqa: E402

from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer  # noqa: E402

VARIANTS = ("trl", "naive", "ours", "fused")


class NaiveDiversityTrainer(CPOTrainer):
    """The user's sketch: the whole [B, L, V] logits through softmax, log_softmax and kl_div, in float32."""

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        chosen_logps, rejected_logps, chosen_logits, rejected_logits, _ = self.concatenated_forward(model, batch)
        losses, _, _ = self.cpo_loss(chosen_logps, rejected_logps)
        chosen_probs = F.softmax(chosen_logits.float(), dim=-1)
        chosen_entropy = -(chosen_probs * torch.log(chosen_probs + 1e-10)).sum(dim=-1).mean()
        rejected_probs = F.softmax(rejected_logits.float(), dim=-1)
        kl = F.kl_div(F.log_softmax(chosen_logits.float(), dim=-1), rejected_probs, reduction="batchmean")
        alpha = self.args.diversity_alpha
        return losses.mean() + self.args.diversity_weight * (-alpha * chosen_entropy + (1 - alpha) * kl), {}


def build(variant, vocab, length, pairs, hidden, layers, device, dtype):
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=length,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tiny-llama-ja")  # only to build the trainer
    tokenizer.pad_token = tokenizer.eos_token
    args = DiversitySimPOConfig(
        output_dir=str(ROOT / "output" / "bench"),
        report_to="none",
        bf16=False,
        use_cpu=device == "cpu",
        max_length=length,
        diversity_weight=0.0 if variant == "trl" else 0.05,
        fused_lm_head=variant == "fused",
    )
    trainer_class = {"trl": CPOTrainer, "naive": NaiveDiversityTrainer}.get(variant, DiversitySimPOTrainer)
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = trainer_class(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)
    return trainer, torch.optim.AdamW(model.parameters(), lr=1e-5), make_batch(vocab, length, pairs, device)


def make_batch(vocab, length, pairs, device):
    """Random token ids; a quarter of each row is prompt, rejected responses end early and are right-padded."""
    generator = torch.Generator().manual_seed(1)
    batch = {}
    for side, end in (("chosen", length), ("rejected", length - length // 8)):
        ids = torch.randint(0, vocab, (pairs, length), generator=generator)
        labels = ids.clone()
        labels[:, : length // 4] = -100
        labels[:, end:] = -100
        mask = torch.ones_like(ids)
        mask[:, end:] = 0
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def step(trainer, optimizer, batch):
    loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if batch["chosen_input_ids"].is_cuda:
        torch.cuda.synchronize()


def proc_status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory(variant, shape):
    """Run in a child process: bytes of peak memory above the memory held just before the first step."""
    trainer, optimizer, batch = build(variant, **shape)
    if shape["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            step(trainer, optimizer, batch)
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak resident memory (VmHWM) to its current value
    before = proc_status_bytes("VmRSS")
    for _ in range(2):  # the second step includes AdamW's state, allocated in the first
        step(trainer, optimizer, batch)
    return proc_status_bytes("VmHWM") - before


def time_variants(shape, repeats, warmup=1):
    built = {v: build(v, **shape) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for round_ in range(warmup + repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            step(*built[variant])
            if round_ >= warmup:
                times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def measure(shape, repeats):
    times = time_variants(shape, repeats)
    memory = {}
    for variant in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, "--child-memory", variant, json.dumps(shape)], capture_output=True, text=True
        )
        if child.returncode:
            sys.exit(f"memory run of {variant} failed:\n{child.stderr[-2000:]}")
        memory[variant] = int(child.stdout.strip().splitlines()[-1])
    return times, memory


def table(rows):
    lines = [
        "| vocab | length | variant | step time (s) | time / TRL | extra time / naive's extra | "
        "peak memory (GB) | memory / TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, times, memory in rows:
        naive_extra = times["naive"] - times["trl"]
        for v in VARIANTS:
            extra = "" if v == "trl" else f"{(times[v] - times['trl']) / naive_extra:.2f}" if naive_extra > 0 else "n/a"
            lines.append(
                f"| {shape['vocab']:,} | {shape['length']} | {v} | {times[v]:.2f} | "
                f"{times[v] / times['trl']:.2f}x | {extra} | {memory[v] / 1e9:.2f} | "
                f"{memory[v] / memory['trl']:.2f}x |"
            )
    return "\n".join(lines)


def targets(times, memory):
    extra_share = (times["ours"] - times["trl"]) / (times["naive"] - times["trl"])
    return (
        f"Targets: peak memory ours/TRL {memory['ours'] / memory['trl']:.2f}x (<= 1.05x); extra time of ours over "
        f"TRL as a share of the naive term's extra time {extra_share:.2f}"
        " (<= 0.5). The remaining extra time is the term's two passes over the logits (one in forward, one "
        "recomputing in backward); its memory is a few float32 buffers of diversity_chunk_elements each."
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (key, label) in enumerate((("vocab", "vocabulary size"), ("length", "sequence length"))):
        sweep = [r for r in rows if r[0]["sweep"] == key]
        x = [r[0][key] for r in sweep]
        for v in VARIANTS:
            axes[0, column].plot(x, [r[1][v] for r in sweep], marker="o", label=v)
            axes[1, column].plot(x, [r[2][v] / 1e9 for r in sweep], marker="o", label=v)
        axes[0, column].set(title=f"step time vs {label}", ylabel="seconds", xlabel=label)
        axes[1, column].set(title=f"peak memory vs {label}", ylabel="GB above start", xlabel=label)
    for ax in axes.flat:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {gpu}; torch {torch.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="main shape only, no sweeps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=128, help="GPU target: 2048 (with --layers 16, ~1.6B parameters)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--child-memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(peak_memory(args.child_memory[0], json.loads(args.child_memory[1])))
        return

    gpu = args.device == "cuda"
    base = dict(
        vocab=128256,
        length=2048 if gpu else 512,
        pairs=2,
        hidden=args.hidden,
        layers=args.layers,
        device=args.device,
        dtype="bfloat16" if gpu else "float32",
    )
    shapes = [base | {"sweep": "main"}]
    if not args.quick:
        shapes += [base | {"vocab": v, "sweep": "vocab"} for v in (32000, 64000, 128256)]
        shapes += [base | {"length": n, "sweep": "length"} for n in (256, 512, 1024)]
    rows, measured = [], {}
    for shape in shapes:
        run_shape = {k: v for k, v in shape.items() if k != "sweep"}
        key = json.dumps(run_shape, sort_keys=True)  # the sweeps pass through the main shape: measure it once
        if key not in measured:
            measured[key] = measure(run_shape, args.repeats)
        rows.append((shape, *measured[key]))
        print("\n".join(table([rows[-1]]).splitlines()[-3:]), flush=True)

    report = [
        f"# Step benchmark ({args.device})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Model: random Llama, hidden {base['hidden']}, {base['layers']} layers, {base['dtype']}; "
        f"batch {base['pairs']} pairs; median of {args.repeats} interleaved repeats after a warm-up; "
        "memory: peak resident memory (VmHWM) above the process's memory before its first step, "
        "one process per variant.",
        "",
        "## Main shape",
        "",
        table(rows[:1]),
        "",
        targets(*rows[0][1:]),
    ]
    if not args.quick:
        report += ["", "## Sweeps", "", table(rows[1:]), "", "![sweep](bench_sweep.png)"]
        plot(rows[1:], args.output / "bench_sweep.png")
    (args.output / "RESULTS.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))


if __name__ == "__main__":
    main()
