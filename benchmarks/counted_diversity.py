"""Diversity you can count: testbeds where both the quality and the diversity of whole replies are exact.

Each prompt asks for one member of a known set in Japanese (a prefecture, a season, a colour, a fruit, an animal:
"好きな季節を一つ答えてください。"), and a reply is "<answer>です。". A reply is *valid* exactly when its answer is in
the prompt's set, and the variety of the valid answers is counted, not estimated. No judge, no embedding.

    start       per seed, a tiny Llama (character tokenizer) warmed up (24 epochs) on replies drawn from a skewed
                distribution: in each set the k-th answer weighs skew(k), and 30% of the replies name a member of
                another set
                (imperfect: wrong answers to remove; concentrated: rare answers to keep)
    candidates  per seed, 8 replies per row sampled from the start model (generate_candidates' counted sampler,
                temperature 1), scored by the checker (1 if valid) plus the reward variant's bias: 240 rows of
                princeton-nlp's layout, which training reads as is
    variants    the reward: validity alone; + 0.1 x the reply's mean token log-probability under the model that
                sampled it (a reward model's preference for fluent, typical text); + 0.3 x the answer's share of its
                set in the warm-up data. The skew: geometric (0.5^k) or Zipf (1/(k+1)). Six variants
    settings    each pair rule, the lists [best_vs_worst, divpo] and [best_vs_worst, rarest_vs_worst], a rule tried
                and not kept (every good reply against the most typical bad one: registered here only), and two
                on-policy rounds (30 steps on 120 rows; 120 new rows sampled and scored from that model, pairs by
                rarity under it; 30 steps) of a rule or a list; every one trained by the training CLI's own `main`
                (configs/demo.yaml, 60 steps of 8 pairs, lr 5e-4, no diversity term)
    measured    on held-out phrasings, 64 samples per prompt: validity (share of valid replies), the normalised
                entropy of the valid answers (entropy / log of the set's size: 1 is uniform over the whole set) and
                coverage (distinct valid answers / set size), each the mean over prompts

    python benchmarks/counted_diversity.py --jobs 2    # make counted: about 40 minutes on 2 CPU cores

Writes one table per variant and a frontier figure (validity against answer entropy, every setting, every variant)
into benchmarks/DIVERSITY.md (between its `counted` markers) and benchmarks/counted_frontier.png; every run's figures
stay in output/counted/ (a run already measured there is not run again), and results.json holds them all.
"""

import argparse
import json
import math
import os
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
WRONG = 0.3  # share of warm-up replies that name a member of another set
ROWS, CANDIDATES, STEPS = 240, 8, 60
SKEWS = {"geometric": lambda k: 0.5**k, "Zipf": lambda k: 1 / (k + 1)}
REWARDS = {  # the bias a reward adds to validity (1 if valid): name -> (what it reads, its weight)
    "validity only": (None, 0.0),
    "log-probability bias": ("logp", 0.1),
    "warm-up-share bias": ("share", 0.3),
}
VARIANTS = [(reward, skew) for skew in SKEWS for reward in REWARDS]
SETTINGS = {  # label -> (pair rules, on-policy rounds)
    "best_vs_worst": (["best_vs_worst"], 1),
    "divpo": (["divpo"], 1),
    "rarest_vs_worst": (["rarest_vs_worst"], 1),
    "best_vs_worst + divpo": (["best_vs_worst", "divpo"], 1),
    "best_vs_worst + rarest_vs_worst": (["best_vs_worst", "rarest_vs_worst"], 1),
    "trial: every good vs the most typical bad": (["every_good_vs_typical_bad"], 1),
    "2 rounds of best_vs_worst": (["best_vs_worst"], 2),
    "2 rounds of divpo": (["divpo"], 2),
    "2 rounds of best_vs_worst + divpo": (["best_vs_worst", "divpo"], 2),
    "2 rounds of best_vs_worst + rarest_vs_worst": (["best_vs_worst", "rarest_vs_worst"], 2),
}
RECOMMENDED = "2 rounds of best_vs_worst + rarest_vs_worst"  # what README.md and the configs use for diversity


def every_good_vs_typical_bad(scores, texts, logps, rho, eligible=None):
    """Every candidate at or above DivPO's bar against the most typical one below it (one pair per good reply); the
    chosen ones among `eligible`, as the product's rules take it."""
    bar = max(scores) - rho * (max(scores) - min(scores))
    pairs = []
    for chosen in (i for i in (range(len(scores)) if eligible is None else eligible) if scores[i] >= bar):
        below = [i for i in range(len(scores)) if scores[i] < bar and texts[i] != texts[chosen]]
        if below:
            pairs.append((chosen, min(below, key=lambda i: (-logps[i], i))))
    return pairs


TRIAL_RULES = {"every_good_vs_typical_bad": every_good_vs_typical_bad}


def register_trial_rules():
    """Rules tried here before any enters the product: registered with the training CLI in this process only."""
    from diversity_simpo import pair_selection, settings

    pair_selection.RULES.update(TRIAL_RULES)
    pair_selection.NEEDS_LOGPS.update(TRIAL_RULES)
    settings.CHOICES["pair_selection"] = tuple(dict.fromkeys([*settings.CHOICES["pair_selection"], *TRIAL_RULES]))


def answer_of(reply):
    return reply.strip().removesuffix("です。").strip()


def warm_up_share(category, skew):
    """Each answer's share of its set among the warm-up replies that name a member of that set (the skew)."""
    weights = [SKEWS[skew](k) for k in range(len(SETS[category]))]
    return {a: w / sum(weights) for a, w in zip(SETS[category], weights, strict=True)}


def training_prompts():
    """(category, prompt) of the 20 training prompts; row r of a candidate set asks prompt r mod 20."""
    return [(c, [{"role": "user", "content": t.format(c=c)}]) for c in SETS for t in TRAIN_PHRASINGS]


def warm_up_rows(rng, skew, per_prompt=40):
    rows = []
    for category in SETS:
        shares = warm_up_share(category, skew)
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


def build_start(skew, seed):
    """The warmed-up start model of a skew and a seed in OUT/<skew>-<seed>/start (reused when present)."""
    import torch
    from build_demo_assets import build_tokenizer, warm_up
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = OUT / f"{skew}-{seed}" / "start"
    if (folder / "model.safetensors").is_file():
        return folder
    rows = warm_up_rows(random.Random(seed), skew)
    texts = [m["content"] for r in rows for k in ("prompt", "chosen") for m in r[k]]
    tokenizer = build_tokenizer([*texts, "".join(a for answers in SETS.values() for a in answers)])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = warm_up(
        LlamaForCausalLM(config),
        tokenizer,
        rows,
        epochs=24,
        learning_rate=2e-3,
        seed=seed,
    )
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def write_candidates(model_folder, variant, seed, rows, path):
    """Rows `rows` (a range) of a candidate set sampled from `model_folder` with generate_candidates' counted sampler
    and scored by `variant`'s reward, in princeton-nlp's layout at `path` (kept when present)."""
    import torch

    from diversity_simpo.candidates import load_policy, load_tokenizer, sample
    from diversity_simpo.rarity import candidate_logps

    if path.is_file():
        return path
    tokenizer = load_tokenizer(str(model_folder), False, "model")
    model = load_policy(argparse.Namespace(model_name_or_path=str(model_folder), trust_remote_code=False), "cpu",
                        torch.float32, tokenizer)  # fmt: skip
    prompts = training_prompts()
    settings = argparse.Namespace(
        num_candidates=CANDIDATES,
        seed=seed,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=10,
        cache_implementation="dynamic",
    )
    lines = []
    for start in range(rows.start, rows.stop, 20):
        batch = [(r, *prompts[r % len(prompts)]) for r in range(start, min(start + 20, rows.stop))]
        # 20 rows, each prompt once; the draws of the same prompt in another row come from another seed
        draws = argparse.Namespace(**{**vars(settings), "seed": seed * 100_003 + start})
        replies, _, _ = sample(model, tokenizer, [p for _, _, p in batch], draws)
        scored = [{"prompt": p, "candidates": [[{"role": "assistant", "content": t}] for t in rs]}
                  for (_, _, p), rs in zip(batch, replies, strict=True)]  # fmt: skip
        logps = candidate_logps(model, tokenizer, scored, torch.device("cpu"), rows_per_forward=20)
        for (_, category, prompt), rs, ls in zip(batch, replies, logps, strict=True):
            scores = [score(variant, category, reply, logp) for reply, logp in zip(rs, ls, strict=True)]
            lines.append({"prompt": prompt[0]["content"], "all_generated_responses": rs, "all_rm_scores": scores})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines), encoding="utf-8")
    return path


def score(variant, category, reply, logp):
    reward, skew = variant
    answer = answer_of(reply)
    valid = answer in SETS[category]
    reads, weight = REWARDS[reward]
    bias = {None: 0.0, "logp": logp, "share": warm_up_share(category, skew).get(answer, 0.0) if valid else 0.0}
    return float(valid) + weight * bias[reads]


def measure(folder, samples=64):
    """validity, normalised entropy of the valid answers, coverage: means over the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    scores = []
    for p, (category, phrasing) in enumerate((c, t) for c in SETS for t in HELD_OUT_PHRASINGS):
        prompt = [{"role": "user", "content": phrasing.format(c=category)}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        torch.manual_seed(7 + p)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10,
                                 num_return_sequences=samples, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        replies = [tokenizer.decode(o[ids["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]
        answers = [answer_of(r) for r in replies]
        valid = Counter(a for a in answers if a in SETS[category])
        total = sum(valid.values())
        entropy = -sum(k / total * math.log(k / total) for k in valid.values()) if total else 0.0
        scores.append((total / samples, entropy / math.log(len(SETS[category])), len(valid) / len(SETS[category])))
    return {name: statistics.mean(s[i] for s in scores) for i, name in enumerate(("validity", "entropy", "coverage"))}


def train(model, data, rules, steps, seed, output, rho=0.3, term=(0.0, 0.1)):
    """The training CLI's own main on scored candidates (or pairs), from `model`, with the diversity term at `term`
    (weight, alpha; off by default); the trained model in `output`."""
    import train_diversity_simpo

    if (output / "model.safetensors").is_file():
        return output
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--model_name_or_path", str(model)]
    argv += ["--dataset_name", str(data), "--output_dir", str(output), "--overwrite_output_dir", "true"]
    argv += ["--pair_selection", ",".join(rules), "--divpo_rho", str(rho), "--wrap_text_as_chat", "true"]
    argv += ["--diversity_weight", str(term[0]), "--diversity_alpha", str(term[1]), "--seed", str(seed)]
    argv += ["--learning_rate", "5e-4"]
    argv += ["--max_steps", str(steps), "--per_device_train_batch_size", "8", "--warmup_steps", "0"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--diversity_eval_prompts", "0", "--report_to", "none"]
    argv += ["--logging_steps", "10", "--dataset_test_fraction", "0", "--max_length", "64", "--disable_tqdm", "true"]
    train_diversity_simpo.main(argv)
    return output


def run_job(job):
    """Every setting of one (variant, seed): {label: figures}; each run's figures cached in its folder."""
    import torch

    torch.set_num_threads(1)
    register_trial_rules()
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1")
    (reward, skew), seed = job
    here = OUT / f"{skew}-{seed}" / reward.replace(" ", "-")
    start = build_start(skew, seed)
    offline = write_candidates(start, (reward, skew), seed, range(ROWS), here / "candidates" / "train.jsonl")
    results = {"start": cached(here / "start.json", lambda: measure(start))}
    for label, (rules, rounds) in SETTINGS.items():
        folder = here / label.replace(" ", "-").replace("+", "and")

        def run(folder=folder, rules=rules, rounds=rounds):
            model, per_round = start, ROWS // rounds
            for r in range(rounds):
                rows = range(r * per_round, (r + 1) * per_round)
                if r == 0:  # the first round's rows are the start model's own samples: the offline set's first rows
                    data = folder / "round-1" / "candidates" / "train.jsonl"
                    data.parent.mkdir(parents=True, exist_ok=True)
                    lines = offline.read_text(encoding="utf-8").splitlines(keepends=True)[:per_round]
                    data.write_text("".join(lines), encoding="utf-8")
                else:
                    data = write_candidates(
                        model, (reward, skew), seed, rows, folder / f"round-{r + 1}" / "candidates" / "train.jsonl"
                    )
                model = train(model, data.parent, rules, STEPS // rounds, seed, folder / f"round-{r + 1}" / "model")
            return measure(model)

        results[label] = cached(folder / "figures.json", run)
        print(f"{reward}, {skew}, seed {seed}: {label}: {results[label]}", flush=True)
    return job, results


def cached(path, compute):
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    figures = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures), encoding="utf-8")
    return figures


def main(jobs):
    import multiprocessing

    work = [(variant, seed) for variant in VARIANTS for seed in SEEDS]
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        done = pool.map(run_job, work, chunksize=1)
    results = {f"{reward}, {skew}": {} for reward, skew in VARIANTS}
    for ((reward, skew), _), figures in done:
        for label, values in figures.items():
            results[f"{reward}, {skew}"].setdefault(label, []).append(values)
    (OUT / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    report(results)


def mean(runs, key):
    return statistics.mean(r[key] for r in runs)


def cell(runs, key):
    """The mean over seeds, ± their standard deviation (a table cell)."""
    spread = f" ± {statistics.stdev([r[key] for r in runs]):.3f}" if len(runs) > 1 else ""
    return f"{mean(runs, key):.3f}{spread}"


def report(results):
    from report_section import write_section

    lines = []
    for variant, settings in results.items():
        base = settings["best_vs_worst"]
        lines += [f"**{variant}**\n", "| setting | validity | answer entropy (normalised) | coverage | "
                  "validity vs best_vs_worst | entropy vs best_vs_worst |", "|---|---|---|---|---|---|"]  # fmt: skip
        for label, runs in settings.items():
            delta = (
                ""
                if label == "start"
                else " | ".join(f"{mean(runs, k) - mean(base, k):+.3f}" for k in ("validity", "entropy"))
            )
            cells = " | ".join(cell(runs, key) for key in ("validity", "entropy", "coverage"))
            lines.append(f"| {label} | {cells} | {delta or ' | '} |")
        if RECOMMENDED in settings:
            validity, entropy = (mean(settings[RECOMMENDED], k) - mean(base, k) for k in ("validity", "entropy"))
            lines.append(
                f"\n{RECOMMENDED}: validity {validity:+.3f} against best_vs_worst "
                f"({'met' if validity >= -0.01 else 'missed'}: within 0.01 or above), answer entropy {entropy:+.3f} "
                f"({'met' if entropy >= 0.15 else 'missed'}: at least +0.15)."
            )
        lines.append("")
    seeds = ", ".join(map(str, SEEDS))
    lines.append(f"Mean ± standard deviation over seeds {seeds} (each seed its own start model and candidates); 10 "
                 "held-out prompts x 64 samples.")  # fmt: skip
    plot(results, ROOT / "benchmarks" / "counted_frontier.png")
    lines.append("\n![validity against answer entropy, per variant](counted_frontier.png)")
    write_section(ROOT / "benchmarks" / "DIVERSITY.md", "counted", "\n".join(lines), "Diversity")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(2, 3, figsize=(15, 9.5), sharex=True, sharey=True)
    colours = plt.get_cmap("tab20").colors
    for axis, (variant, settings) in zip(axes.flat, results.items(), strict=False):
        for i, (label, runs) in enumerate(settings.items()):
            x, y = [r["entropy"] for r in runs], [r["validity"] for r in runs]
            colour = colours[
                (2 * i) % 20 + (2 * i) // 20
            ]  # the dark shade of each pair: 10 distinct colours, then 10 more
            axis.scatter(x, y, s=12, alpha=0.3, color=colour)  # each seed
            axis.scatter([statistics.mean(x)], [statistics.mean(y)], s=60, marker="DosP^v*XhH<>"[i % 12], color=colour,
                         label=label)  # fmt: skip
        axis.set_title(variant, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("normalised entropy of the valid answers")
    for axis in axes[:, 0]:
        axis.set_ylabel("validity")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    figure.suptitle("Counted testbeds: quality against diversity of whole replies (up and right is better; small "
                    "points: each seed)")  # fmt: skip
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="(variant, seed) jobs run at once, one CPU core each")
    parser.add_argument("--report", action="store_true", help="the tables and figure again from results.json")
    options = parser.parse_args()
    if options.report:
        report(json.loads((OUT / "results.json").read_text(encoding="utf-8")))
    else:
        main(options.jobs)
