"""Time and memory of one full training step (forward, loss, backward, AdamW step) for four variants:

    trl    TRL's CPOTrainer with loss_type=simpo (the baseline)
    naive  the same plus the diversity term written as the user's sketch does it (full softmax/log_softmax/kl_div
           over the [2B, L, V] logits in float32); kept here only as a reference point
    ours   DiversitySimPOTrainer with its default diversity settings
    fused  the same with `fused_lm_head: true`: no [2B, L, V] logits at all

Same model (a small random Llama with a real vocabulary), batch and seed for all. Times are medians over repeats
interleaved trl, naive, ours, fused, trl, ... after a warm-up, in this process. Peak memory is measured for each
variant in a process of its own: on the CPU, peak resident memory (VmHWM) over two steps above the process's memory
before the first (AdamW's state included); on a GPU, the peak allocated in the forward and backward of the second
step above what was allocated before it (AdamW's state and its step, the same for every variant, left out).
`naive` is skipped where its float32 copies of the logits would not fit in memory.

    python benchmarks/bench_step.py                 # CPU: main shape (length 1024), then vocabulary and length sweeps
    python benchmarks/bench_step.py --quick         # main shape only
    python benchmarks/bench_step.py --hidden 2048 --layers 16 --activation-checkpointing   # GPU: ~1.6B model, 2048
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report_section import machine, write_section
from trl.experimental.cpo import CPOTrainer

from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer

VARIANTS = ("trl", "naive", "ours", "fused")
GB = 1e9


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


def random_llama(vocab, length, hidden, layers, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=length,
    )
    with torch.device(device):  # initialised where it runs: a 1.6B model's CPU init alone takes a minute
        return LlamaForCausalLM(config).to(dtype=getattr(torch, dtype))


def build(
    variant,
    vocab,
    length,
    pairs,
    hidden,
    layers,
    device,
    dtype,
    checkpointing=False,
    chunk=None,
    model=None,
    lengths=None,
):
    """(trainer, optimizer, batch); `model` shares one model between variants (on a GPU, four would not fit).
    `lengths` [(prompt, chosen, rejected)] per pair: a batch of those lengths (the layout variants)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    model = model or random_llama(vocab, length, hidden, layers, device, dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tiny-llama-ja")  # only to build the trainer
    tokenizer.pad_token = tokenizer.eos_token
    args = DiversitySimPOConfig(
        output_dir=str(ROOT / "output" / "bench"),
        report_to="none",
        bf16=False,
        use_cpu=device == "cpu",
        max_length=length,
        diversity_weight=0.0 if variant == "trl" else 0.05,
        fused_lm_head=variant == "fused" or variant.endswith("+fused"),
        prefix_sharing=variant.startswith(("prefix_sharing", "both")),
        padding_free=variant.startswith(("padding_free", "both")),
        **({"diversity_chunk_elements": chunk} if chunk else {}),
    )
    trainer_class = {"trl": CPOTrainer, "naive": NaiveDiversityTrainer}.get(variant, DiversitySimPOTrainer)
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = trainer_class(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)
    if variant.endswith("+flex"):
        trainer.bench_attention = trainer._attention = "flex_attention"
    trainer.model.train()
    batch = make_pairs(vocab, lengths, device) if lengths else make_batch(vocab, length, pairs, device)
    return trainer, torch.optim.AdamW(model.parameters(), lr=1e-5), batch


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


def make_pairs(vocab, lengths, device):
    """TRL's collated batch for pairs of the given (prompt, chosen, rejected) lengths: random token ids, each side
    right-padded to its longest row, labels -100 on the prompt (the same prompt tokens on both sides)."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for prompt, chosen, rejected in lengths:
        ids = torch.randint(0, vocab, (prompt + max(chosen, rejected),), generator=generator).tolist()
        rows.append((ids[:prompt], ids[prompt : prompt + chosen], ids[prompt : prompt + rejected][::-1]))
    batch = {}
    for side, reply in (("chosen", 1), ("rejected", 2)):
        width = max(len(row[0]) + len(row[reply]) for row in rows)
        ids, mask, labels = [], [], []
        for row in rows:
            pad = width - len(row[0]) - len(row[reply])
            ids.append(row[0] + row[reply] + [0] * pad)
            mask.append([1] * (width - pad) + [0] * pad)
            labels.append([-100] * len(row[0]) + row[reply] + [-100] * pad)
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
            batch[f"{side}_{name}"] = torch.tensor(value, device=device)
    return batch


def step(trainer, optimizer, batch):
    # The variants share one model: each step runs on its own trainer's attention (the model reads it per call).
    trainer.model.config._attn_implementation = getattr(trainer, "bench_attention", "sdpa")
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
    """Run in a child process: bytes of peak memory of a step (see the module docstring)."""
    trainer, optimizer, batch = build(variant, **shape)
    if shape["device"] == "cuda":
        step(trainer, optimizer, batch)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
        loss.backward()  # the peak of forward + backward: AdamW's own step (its foreach temporaries) is left out
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak resident memory (VmHWM) to its current value
    before = proc_status_bytes("VmRSS")
    for _ in range(2):  # the second step includes AdamW's state, allocated in the first
        step(trainer, optimizer, batch)
    return proc_status_bytes("VmHWM") - before


def variants_that_fit(shape):
    """All variants, but `naive` only where its ~6 float32 copies of the [2B, L, V] logits fit in half the memory."""
    naive_bytes = 6 * 4 * 2 * shape["pairs"] * shape["length"] * shape["vocab"]
    if shape["device"] == "cuda":
        available = torch.cuda.get_device_properties(0).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return tuple(v for v in VARIANTS if v != "naive" or naive_bytes < available / 2)


def time_variants(shape, variants, repeats, warmup=1):
    shared = random_llama(**{k: shape[k] for k in ("vocab", "length", "hidden", "layers", "device", "dtype")})
    built = {v: build(v, **shape, model=shared) for v in variants}
    times = {v: [] for v in variants}
    for round_ in range(warmup + repeats):
        for variant in variants:
            start = time.perf_counter()
            step(*built[variant])
            if round_ >= warmup:
                times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def measure(shape, repeats, variants=None):
    """(median step times, peak memory) of `variants` (default: those of the main table that fit) at `shape`."""
    variants = variants or variants_that_fit(shape)
    times = time_variants(shape, variants, repeats)
    print("step times (s): " + ", ".join(f"{v} {t:.3f}" for v, t in times.items()), flush=True)
    gc.collect()  # the trainers hold reference cycles: free the shared model and optimizers before the children run
    if shape["device"] == "cuda":
        torch.cuda.empty_cache()
    memory = {}
    for variant in variants:
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
        naive_extra = times["naive"] - times["trl"] if "naive" in times else None
        for v in VARIANTS:
            if v not in times:
                lines.append(f"| {shape['vocab']:,} | {shape['length']} | {v} | skipped: would not fit in memory |||||")
                continue
            extra = "" if v == "trl" or not naive_extra else f"{(times[v] - times['trl']) / naive_extra:.2f}"
            lines.append(
                f"| {shape['vocab']:,} | {shape['length']} | {v} | {times[v]:.2f} | "
                f"{times[v] / times['trl']:.2f}x | {extra} | {memory[v] / GB:.2f} | "
                f"{memory[v] / memory['trl']:.2f}x |"
            )
    return "\n".join(lines)


def verdict(value, limit):
    return "met" if value <= limit else "missed"


def targets(times, memory, gpu):
    """The performance targets, each with its measured value and whether it was met."""
    lines = []
    if "naive" in times:
        extra_share = (times["ours"] - times["trl"]) / (times["naive"] - times["trl"])
        lines.append(
            f"- ours' extra time over TRL as a share of the naive term's extra: {extra_share:.2f} "
            f"(<= 0.5: {verdict(extra_share, 0.5)})"
        )
    ratio = memory["ours"] / memory["trl"]
    lines.append(f"- ours' peak memory / TRL's: {ratio:.2f}x (<= 1.05x: {verdict(ratio, 1.05)})")
    limit_memory, limit_time = (0.6, 1.05) if gpu else (0.25, 1.0)
    ratio = memory["fused"] / memory["trl"]
    lines.append(f"- fused peak memory / TRL's: {ratio:.2f}x (<= {limit_memory}x: {verdict(ratio, limit_memory)})")
    ratio = times["fused"] / times["trl"]
    lines.append(f"- fused step time / TRL's: {ratio:.2f}x (<= {limit_time}x: {verdict(ratio, limit_time)})")
    return "\n".join(lines)


def memory_slopes(rows):
    """Least-squares slope of peak memory against sequence length, in GB per 1,000 tokens, per variant."""
    sweep = [r for r in rows if r[0]["sweep"] == "length"]
    slopes = {}
    for v in VARIANTS:
        points = [(r[0]["length"] / 1000, r[2][v] / GB) for r in sweep if v in r[2]]
        if len(points) >= 2:
            mx, my = statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)
            slopes[v] = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slopes


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (key, label) in enumerate((("vocab", "vocabulary size"), ("length", "sequence length"))):
        sweep = [r for r in rows if r[0]["sweep"] == key]
        x = [r[0][key] for r in sweep]
        for v in VARIANTS:
            nan = float("nan")  # a variant skipped at a shape (naive, too big) leaves a gap
            axes[0, column].plot(x, [r[1].get(v, nan) for r in sweep], marker="o", label=v)
            axes[1, column].plot(x, [r[2].get(v, nan) / GB for r in sweep], marker="o", label=v)
        axes[0, column].set(title=f"step time vs {label}", ylabel="seconds", xlabel=label)
        axes[1, column].set(title=f"peak memory vs {label}", ylabel="GB above start", xlabel=label)
    for ax in axes.flat:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


LAYOUTS = ("trl", "ours", "prefix_sharing", "padding_free", "both", "both+fused")
FLEX = ("both+fused+flex",)  # GPUs only: PyTorch has no FlexAttention backward on the CPU


def layout_shapes(gpu, toy=False):
    """(name, shape): the target shape (prompts ~600, replies 200-300), the prompt-to-reply ratio sweep, and a batch
    of realistic lengths; `toy`: the same batches on a model of hidden 32 and 1 layer (the GPU check's smoke run)."""
    base = dict(vocab=4096, hidden=512, layers=4, device="cpu", dtype="float32", checkpointing=False, chunk=None)
    if toy:
        base |= dict(hidden=32, layers=1)
    elif gpu:
        base |= dict(vocab=128256, hidden=2048, layers=16, device="cuda", dtype="bfloat16", checkpointing=True)
    prompt, reply = (1024, 512) if gpu else (600, 250)
    shapes = [
        (
            f"target: prompts ~{prompt}, replies ~{reply}",
            [(prompt, reply + 50, reply - 50), (prompt - 20, reply - 30, reply + 30)],
        )
    ]
    total = 1536 if gpu else 850  # prompt + reply per row
    for ratio in (0.4, 1, 2, 6):
        r = round(total / (1 + ratio))
        p_ = total - r
        shapes.append(
            (f"ratio {ratio}", [(p_, round(1.15 * r), round(0.85 * r)), (p_, round(0.9 * r), round(1.1 * r))])
        )
    # Real preference data's lengths are skewed: lognormal draws (sigma 0.7, so the longest of 4 is often twice the
    # median), clamped to [8, 2 x median]; seeded, so the batch is the same on every run.
    generator = torch.Generator().manual_seed(7)

    def draw(median, n):
        spread = torch.exp(0.7 * torch.randn(n, generator=generator))
        return (median * spread).round().int().clamp(8, 2 * median).tolist()

    prompts, chosen, rejected = draw(160, 4), draw(280 if gpu else 200, 4), draw(280 if gpu else 200, 4)
    shapes.append(("4 pairs, lengths as in real data", list(zip(prompts, chosen, rejected, strict=True))))
    return [
        (name, base | {"lengths": lengths, "pairs": len(lengths), "length": max(p + max(c, r) for p, c, r in lengths)})
        for name, lengths in shapes
    ]


def tokens_per_step(shape, variant):
    """(tokens through the backbone, of which padding, rows through the LM head), as the variant lays the batch out.
    The LM head: TRL's logits at every position; unfused layouts, each position a reply token is predicted from,
    once (`logits_to_keep`); the fused head, every reply position of every row."""
    from diversity_simpo.layout import FLEX_BLOCK, pack_pairs, response_positions

    batch = make_pairs(shape["vocab"], shape["lengths"], "cpu")
    inputs = CPOTrainer.concatenated_inputs(batch, padding_value=0)
    ids, mask, labels = (inputs[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    fused_rows = int(response_positions(labels, ids.shape[1]).sum())
    if variant in ("trl", "ours"):
        return ids.numel(), ids.numel() - int(mask.sum()), ids.numel()
    sharing, padding_free = variant.startswith(("prefix", "both")), variant.startswith(("padding", "both"))
    packed = pack_pairs(ids, mask, labels, sharing, padding_free, 0, FLEX_BLOCK if variant.endswith("+flex") else 1)
    head_rows = fused_rows if "fused" in variant else int(packed.keep.sum())
    return packed.tokens, int((packed.document < 0).sum()), head_rows


def layout_variants(shape, chosen=None):
    """The layout variants that run on this device, or those of them `chosen` (with trl and ours, the baselines)."""
    variants = LAYOUTS + (FLEX if shape["device"] == "cuda" else ())
    return tuple(v for v in variants if not chosen or v in ("trl", "ours", *chosen))


def layout_table(rows):
    lines = [
        "| batch | variant | tokens / step (padding) | LM-head rows | step time (s) | time / TRL | time / ours "
        "| peak memory (GB) | memory / TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape, times, memory in rows:
        for v in times:
            tokens, padding, head_rows = tokens_per_step(shape, v)
            lines.append(
                f"| {name} | {v} | {tokens:,} ({padding / tokens:.0%}) | {head_rows:,} | {times[v]:.3f} "
                f"| {times[v] / times['trl']:.2f}x | {times[v] / times['ours']:.2f}x | {memory[v] / GB:.2f} "
                f"| {memory[v] / memory['trl']:.2f}x |"
            )
    return "\n".join(lines)


def layouts_main(args):
    gpu = args.device == "cuda"
    rows = []
    for name, shape in layout_shapes(gpu, args.toy):
        if args.quick and rows:
            break
        times, memory = measure(shape, args.repeats, layout_variants(shape, args.variants))
        rows.append((name, shape, times, memory))
        print("\n".join(layout_table([rows[-1]]).splitlines()[2:]), flush=True)
    target = rows[0][2]
    best = min((v for v in target if v not in ("trl", "ours")), key=target.get)
    limit = 0.75 if gpu else 0.8
    shape = rows[0][1]
    report = [
        f"## {'GPU' if gpu else 'CPU'}, layouts: {machine()}",
        "",
        f"Model: random Llama, hidden {shape['hidden']}, {shape['layers']} layers, vocabulary {shape['vocab']:,}, "
        f"{shape['dtype']}{', activation checkpointing' if shape['checkpointing'] else ''}; every variant but `trl` "
        "with the diversity term (weight 0.05); `ours` is TRL's two-row layout, `both` is prefix_sharing + "
        f"padding_free. Median of {args.repeats} interleaved repeats after a warm-up; memory as in the main table, "
        "one process per variant. Tokens: what the backbone processes per step, and the share of it that is padding; "
        "LM-head rows: the positions projected to the vocabulary (TRL: all of them).",
        "",
        layout_table(rows),
        "",
        f"- target shape, best layout ({best}) step time / TRL's: {target[best] / target['trl']:.2f}x (<= {limit}x: "
        f"{verdict(target[best] / target['trl'], limit)})",
        f"- target shape, {best} / ours (TRL's layout): {target[best] / target['ours']:.2f}x (<= {limit}x: "
        f"{verdict(target[best] / target['ours'], limit)})",
    ]
    name = "gpu-layouts" if gpu else "cpu-layouts"
    write_section(args.output / "RESULTS.md", name, "\n".join(report), "Step benchmark")
    print("\n".join(report))


# Llama-3-8B's geometry (random weights) with LoRA on every projection, so that it trains on one GPU; a toy one for
# the CPU smoke run. 2 pairs of about 2,048 tokens: prompts of 1,024, replies of 900-1,024.
LLAMA3_8B = {
    "gpu": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, vocab=128256),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab=4096),
}
LLAMA3_8B_LENGTHS = {"gpu": [(1024, 1024, 900), (1024, 900, 1024)], "cpu": [(48, 16, 12), (40, 12, 16)]}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU (SXM)


def llama3_8b_main(args):
    """TRL's step and ours (both layouts, fused head) at Llama-3-8B's geometry: tokens per second, model FLOPs
    utilisation and peak memory, in absolute figures (the shape users train)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = args.device == "cuda"
    geometry = dict(LLAMA3_8B["gpu" if gpu else "cpu"])
    vocab = geometry.pop("vocab")
    lengths = LLAMA3_8B_LENGTHS["gpu" if gpu else "cpu"]
    config = LlamaConfig(
        vocab_size=vocab,
        num_key_value_heads=geometry["num_attention_heads"] // 4,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        **geometry,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        base = LlamaForCausalLM(config).to(torch.bfloat16 if gpu else torch.float32)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    frozen_matmul = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=projections))
    shape = dict(vocab=vocab, length=max(p + max(c, r) for p, c, r in lengths), pairs=len(lengths), lengths=lengths)
    shape |= dict(hidden=geometry["hidden_size"], layers=geometry["num_hidden_layers"], device=args.device)
    shape |= dict(dtype="bfloat16" if gpu else "float32", chunk=2**24 if gpu else None)
    variants = {"trl": "TRL's SimPO step", "both+fused": "ours (sdpa): both layouts, fused head, diversity term"}
    if gpu:
        variants["both+fused+flex"] = "ours (flex_attention): the same"
    rows = []
    for variant, label in variants.items():
        trainer, optimizer, batch = build(variant, **shape, model=model)
        for _ in range(1):  # warm-up (and FlexAttention's compilation)
            step(trainer, optimizer, batch)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(trainer, optimizer, batch)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / GB if gpu else float("nan")
        processed, padding, _ = tokens_per_step(shape, variant)
        real = sum(p + c + p + r for p, c, r in lengths)  # the pairs' tokens in TRL's layout, padding excluded
        flops = 4 * frozen_matmul * processed  # forward + backward to the activations (LoRA's own FLOPs: tiny)
        peak_flops = next(
            (f for name, f in PEAK_BF16_FLOPS.items() if gpu and name in torch.cuda.get_device_name()), None
        )
        mfu = f"{flops / seconds / peak_flops:.1%}" if peak_flops else "n/a"
        rows.append(
            f"| {label} | {seconds:.3f} | {real / seconds:,.0f} | {processed:,} ({padding / processed:.0%}) | {mfu} "
            f"| {peak:.1f} |"
        )
        print(rows[-1], flush=True)
        del trainer, optimizer
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    report = [
        f"## {'GPU' if gpu else 'CPU'}, Llama-3-8B geometry: {machine()}",
        "",
        f"Random Llama with {'Llama-3-8B' if gpu else 'a toy (CPU smoke run)'}'s geometry "
        f"({sum(p.numel() for p in base.parameters()) / 1e9:.2f}B parameters, "
        f"{geometry['num_hidden_layers']} layers, hidden {geometry['hidden_size']}, vocabulary {vocab:,}), "
        f"{shape['dtype']}, LoRA r 16 on every projection, activation checkpointing; 2 pairs of (prompt, chosen, "
        f"rejected) tokens {lengths}; median of {args.repeats} steps after a warm-up. "
        "Tokens/s: the pairs' tokens in TRL's layout (each prompt twice, padding excluded) per second, the same count "
        "for both, so it is the throughput a user sees. MFU: 4 x (parameters outside the embedding) x tokens the "
        "backbone processed, per second, over the GPU's dense bf16 peak (recomputation and attention's own FLOPs "
        "not counted). Peak memory: the most allocated during the timed steps, weights included.",
        "",
        "| step | time (s) | tokens/s | tokens processed (padding) | MFU | peak memory (GB) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    name = "gpu-llama3-8b" if gpu else "cpu-llama3-8b"
    write_section(args.output / "RESULTS.md", name, "\n".join(report), "Step benchmark")
    print("\n".join(report))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="main shape only, no sweeps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=128, help="GPU target: 2048 (with --layers 16, ~1.6B parameters)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, help="main shape's length (default: 2048 on a GPU, 1024 on the CPU)")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--activation-checkpointing", action="store_true", help="as the real config trains")
    parser.add_argument("--chunk-elements", type=int, help="diversity_chunk_elements (default: the config's default)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--layouts", action="store_true", help="prefix-shared and padding-free layouts against TRL's")
    parser.add_argument("--llama3-8b", action="store_true", help="TRL's step and ours at Llama-3-8B's geometry (LoRA)")
    parser.add_argument("--toy", action="store_true", help="--layouts on a toy model (the GPU check's smoke run)")
    parser.add_argument("--variants", nargs="+", help="--layouts: only these variants (trl and ours always run)")
    parser.add_argument("--child-memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(peak_memory(args.child_memory[0], json.loads(args.child_memory[1])))
        return
    if args.layouts:
        return layouts_main(args)
    if args.llama3_8b:
        return llama3_8b_main(args)

    gpu = args.device == "cuda"
    base = dict(
        vocab=args.vocab,
        length=args.length or (2048 if gpu else 1024),
        pairs=2,
        hidden=args.hidden,
        layers=args.layers,
        device=args.device,
        dtype="bfloat16" if gpu else "float32",
        checkpointing=args.activation_checkpointing,
        chunk=args.chunk_elements,
    )
    shapes = [base | {"sweep": "main"}]
    if not args.quick:
        shapes += [base | {"vocab": v, "sweep": "vocab"} for v in (32000, 64000, 128256)]
        shapes += [base | {"length": n, "sweep": "length"} for n in (256, 512, 1024, 2048)]
    rows, measured = [], {}
    for shape in shapes:
        run_shape = {k: v for k, v in shape.items() if k != "sweep"}
        key = json.dumps(run_shape, sort_keys=True)  # the sweeps pass through the main shape: measure it once
        if key not in measured:
            measured[key] = measure(run_shape, args.repeats)
        rows.append((shape, *measured[key]))
        print("\n".join(table([rows[-1]]).splitlines()[2:]), flush=True)

    memory_method = (
        "peak allocated in the forward and backward of the second step above what was allocated before it "
        "(AdamW's state and its step, the same for every variant, left out)"
        if gpu
        else "peak resident memory (VmHWM) over two steps above the process's memory before the first"
    )
    report = [
        f"## {'GPU' if gpu else 'CPU'}: {machine()}",
        "",
        f"Model: random Llama, hidden {base['hidden']}, {base['layers']} layers, {base['dtype']}"
        f"{', activation checkpointing' if base['checkpointing'] else ''}"
        f"{', diversity_chunk_elements ' + str(base['chunk']) if base['chunk'] else ''}; batch {base['pairs']} pairs; "
        "median of "
        f"{args.repeats} interleaved repeats after a warm-up; memory: {memory_method}, one process per variant.",
        "",
        "### Main shape",
        "",
        table(rows[:1]),
        "",
        targets(*rows[0][1:], gpu),
    ]
    if not args.quick:
        slopes = memory_slopes(rows)
        report += [
            "",
            "### Sweeps",
            "",
            table(rows[1:]),
            "",
            "Peak memory against length (least-squares slope, GB per 1,000 tokens of length): "
            + ", ".join(f"{v} {slope:.2f}" for v, slope in slopes.items())
            + f"; fused/TRL slope {slopes['fused'] / slopes['trl']:.3f}.",
            "",
            f"![sweep]({'bench_sweep_gpu' if gpu else 'bench_sweep'}.png)",
        ]
        plot(rows[1:], args.output / f"{'bench_sweep_gpu' if gpu else 'bench_sweep'}.png")
    write_section(args.output / "RESULTS.md", "gpu" if gpu else "cpu", "\n".join(report), "Step benchmark")
    print("\n".join(report))


if __name__ == "__main__":
    main()
