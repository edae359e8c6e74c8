"""Diversity you can count: a testbed where both the quality and the diversity of whole replies are exact.

Each prompt asks for one member of a known set in Japanese (a prefecture, a season, a colour, a fruit, an
animal: "好きな季節を一つ答えてください。"), and a reply is "<answer>です。". So a reply is *valid* exactly when its
answer is in the prompt's set, and the variety of the valid answers is counted, not estimated. No judge, no embedding.

    start       a tiny Llama (character tokenizer) warmed up on replies drawn from a skewed distribution: in each set
                a few modal answers take most of the mass, and 30% of the replies name a member of another set
                (imperfect: wrong answers to remove; concentrated: rare answers to keep)
    candidates  8 replies per training row sampled from the start model (temperature 1), each scored by the checker
                (1 if valid) plus the small preference for typical text that real reward models have (0.3 x the
                answer's share of its set in the warm-up data): princeton-nlp's layout, which training reads as is
    settings    plain SimPO on best-vs-worst pairs; the user's term at its defaults; the entropy part alone at a few
                weights; DivPO pairs (divpo_rho 0.3); DivPO with the user's term. Each trained by the CLI's own
                `main` from the same start and candidates, seeds 1, 2, 3
    measured    on held-out phrasings, 64 samples per prompt: validity (share of valid replies), the normalised
                entropy of the valid answers (entropy / log of the set's size: 1 is uniform over the whole set) and
                coverage (distinct valid answers / set size), each the mean over prompts

    python benchmarks/counted_diversity.py        # about 10 minutes on 2 CPU cores; make counted

Writes the table and the frontier figure (validity against answer entropy) into benchmarks/DIVERSITY.md (between its
`counted` markers) and benchmarks/counted_frontier.png; the runs stay in output/counted/.
"""

import json
import math
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "demo"))
OUT = ROOT / "output" / "counted"
SEEDS = (1, 2, 3)

SETS = {
    "都道府県": ["北海道", "青森", "京都", "大阪", "沖縄", "福岡", "長野", "静岡"],
    "季節": ["春", "夏", "秋", "冬"],
    "色": ["赤", "青", "緑", "黄色", "白", "黒"],
    "果物": ["りんご", "みかん", "ぶどう", "もも", "いちご", "なし"],
    "動物": ["いぬ", "ねこ", "うま", "うし", "さる", "とり"],
}
TRAIN_PHRASINGS = [
    "好きな{c}を一つ答えてください。",
    "{c}を一つ挙げてください。",
    "{c}の例を一つ教えてください。",
    "どれか一つの{c}は？",
]
HELD_OUT_PHRASINGS = ["{c}を一つだけ言ってください。", "思いつく{c}を一つ書いてください。"]
SKEW = 0.5  # the k-th answer of a set has warm-up weight SKEW^k: a few modal answers
WRONG = 0.3  # share of warm-up replies that name a member of another set
TYPICALITY = 0.3  # the reward's preference for typical text: 0.3 x the answer's warm-up share in its set
SETTINGS = [  # (label, pair_selection, diversity_weight, diversity_alpha)
    ("plain SimPO (best vs worst)", "best_vs_worst", 0.0, 0.1),
    ("user's term (weight 0.05, alpha 0.1)", "best_vs_worst", 0.05, 0.1),
    ("entropy only, weight 0.05", "best_vs_worst", 0.05, 1.0),
    ("entropy only, weight 0.2", "best_vs_worst", 0.2, 1.0),
    ("divpo (rho 0.3)", "divpo", 0.0, 0.1),
    ("divpo + user's term", "divpo", 0.05, 0.1),
]


def warm_up_share(category):
    """Each answer's share of its set among the warm-up replies that name a member of that set (the skew)."""
    weights = [SKEW**k for k in range(len(SETS[category]))]
    return {a: w / sum(weights) for a, w in zip(SETS[category], weights, strict=True)}


def answer_of(reply):
    return reply.strip().removesuffix("です。").strip()


def score(category, reply):
    answer = answer_of(reply)
    valid = answer in SETS[category]
    return float(valid) + (TYPICALITY * warm_up_share(category)[answer] if valid else 0.0)


def warm_up_rows(rng, per_prompt=40):
    rows = []
    for category in SETS:
        shares = warm_up_share(category)
        others = [a for c, answers in SETS.items() if c != category for a in answers]
        for phrasing in TRAIN_PHRASINGS + HELD_OUT_PHRASINGS:  # the model knows every phrasing's task
            for _ in range(per_prompt):
                if rng.random() < WRONG:
                    answer = rng.choice(others)
                else:
                    answer = rng.choices(list(shares), weights=list(shares.values()))[0]
                reply = [{"role": "assistant", "content": f"{answer}です。"}]
                prompt = [{"role": "user", "content": phrasing.format(c=category)}]
                rows.append({"prompt": prompt, "chosen": reply, "rejected": reply})
    return rows


def build_start():
    """The tokenizer and the warmed-up start model in OUT/start (seeded; reused when present)."""
    import torch
    from build_demo_assets import build_tokenizer, warm_up
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = OUT / "start"
    if (folder / "model.safetensors").is_file():
        return folder
    rows = warm_up_rows(random.Random(0))
    texts = [m["content"] for r in rows for k in ("prompt", "chosen") for m in r[k]]
    tokenizer = build_tokenizer([*texts, "".join(a for answers in SETS.values() for a in answers)])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = warm_up(LlamaForCausalLM(config), tokenizer, rows, epochs=12, learning_rate=2e-3)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def sample(model, tokenizer, prompt, n, seed):
    import torch

    torch.manual_seed(seed)
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10,
                             num_return_sequences=n, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return [tokenizer.decode(o[ids["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]


def write_candidates(folder, rows_per_prompt=10, n=8):
    """princeton-nlp's layout: prompt, all_generated_responses, all_rm_scores, sampled from the start model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = OUT / "candidates" / "train.jsonl"
    if path.is_file():
        return path.parent
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p, (category, phrasing) in enumerate((c, t) for c in SETS for t in TRAIN_PHRASINGS):
            prompt = [{"role": "user", "content": phrasing.format(c=category)}]
            for r in range(rows_per_prompt):
                replies = sample(model, tokenizer, prompt, n, seed=1000 * p + r)
                row = {"prompt": prompt[0]["content"], "all_generated_responses": replies,
                       "all_rm_scores": [score(category, reply) for reply in replies]}  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.parent


def measure(folder, samples=64):
    """validity, normalised entropy of the valid answers, coverage: means over the held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    scores = []
    for p, (category, phrasing) in enumerate((c, t) for c in SETS for t in HELD_OUT_PHRASINGS):
        prompt = [{"role": "user", "content": phrasing.format(c=category)}]
        answers = [answer_of(r) for r in sample(model, tokenizer, prompt, samples, seed=7 + p)]
        valid = Counter(a for a in answers if a in SETS[category])
        total = sum(valid.values())
        entropy = -sum(k / total * math.log(k / total) for k in valid.values()) if total else 0.0
        scores.append((total / samples, entropy / math.log(len(SETS[category])), len(valid) / len(SETS[category])))
    return {name: statistics.mean(s[i] for s in scores) for i, name in enumerate(("validity", "entropy", "coverage"))}


def train(start, data, label, selection, weight, alpha, seed):
    import train_diversity_simpo

    output = OUT / "runs" / f"{label.split(' (')[0].replace(' ', '_').replace(',', '')}-{weight}-{alpha}-{seed}"
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--model_name_or_path", str(start)]
    argv += ["--dataset_name", str(data), "--output_dir", str(output), "--overwrite_output_dir", "true"]
    argv += ["--pair_selection", selection, "--divpo_rho", "0.3", "--wrap_text_as_chat", "true"]
    argv += ["--diversity_weight", str(weight), "--diversity_alpha", str(alpha), "--seed", str(seed)]
    argv += ["--max_steps", "40", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--beta", "2.5"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--diversity_eval_prompts", "0", "--report_to", "none"]
    argv += ["--logging_steps", "10", "--dataset_test_fraction", "0", "--max_length", "64", "--disable_tqdm", "true"]
    train_diversity_simpo.main(argv)
    return output


def main():
    import os

    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1")
    start = build_start()
    data = write_candidates(start)
    results = {"start": [measure(start)]}
    print("start", results["start"][0], flush=True)
    for label, selection, weight, alpha in SETTINGS:
        results[label] = []
        for seed in SEEDS:
            results[label].append(measure(train(start, data, label, selection, weight, alpha, seed)))
            print(label, seed, results[label][-1], flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    report(results)


def report(results):
    from report_section import write_section

    def cell(runs, key):
        values = [r[key] for r in runs]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    lines = ["| setting | validity | answer entropy (normalised) | coverage |", "|---|---|---|---|"]
    for label, runs in results.items():
        lines.append(f"| {label} | {cell(runs, 'validity')} | {cell(runs, 'entropy')} | {cell(runs, 'coverage')} |")
    seeds = ", ".join(map(str, SEEDS))
    lines.append(
        f"\nMean ± standard deviation over seeds {seeds} (the start: one sampling); 10 held-out prompts x 64 samples."
    )
    plot(results, ROOT / "benchmarks" / "counted_frontier.png")
    lines.append("\n![validity against answer entropy](counted_frontier.png)")
    write_section(ROOT / "benchmarks" / "DIVERSITY.md", "counted", "\n".join(lines), "Diversity")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, runs) in enumerate(results.items()):
        x, y = [r["entropy"] for r in runs], [r["validity"] for r in runs]
        axis.scatter(x, y, s=18, alpha=0.4, color=f"C{i}")  # each seed
        axis.scatter(
            [statistics.mean(x)], [statistics.mean(y)], s=70, marker="DosP^v*"[i % 7], color=f"C{i}", label=label
        )
    axis.set_xlabel("normalised entropy of the valid answers (held-out phrasings)")
    axis.set_ylabel("validity (share of valid replies)")
    axis.set_title("Counted testbed: quality against diversity (up and right is better)")
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:  # the table and figure again from output/counted/results.json
        report(json.loads((OUT / "results.json").read_text(encoding="utf-8")))
    else:
        main()
