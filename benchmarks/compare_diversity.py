"""Plain SimPO against Diversity SimPO on the offline demo. Every run starts from the same warmed-up demo model, with
the same data, seed and steps; only diversity_weight differs. Each model is then scored by the CLI's own
`--eval_only`: preference accuracy on the eval split, and the diversity of 8 sampled replies to each eval prompt.

    python benchmarks/compare_diversity.py          # about 5 minutes on 2 CPU cores

Writes output/compare/{results.md, comparison.png} and copies both to benchmarks/ (DIVERSITY.md, diversity.png).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "output" / "compare"
WEIGHTS = [0.0, 0.05, 0.2, 1.0]
TRAIN = [
    "--max_steps",
    "60",
    "--eval_steps",
    "10",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--diversity_eval_prompts",
    "8",
    "--overwrite_output_dir",
    "true",
]
METRICS = [
    ("eval_rewards/accuracies", "preference accuracy"),
    ("diversity_eval/distinct_1", "distinct-1"),
    ("diversity_eval/distinct_2", "distinct-2"),
    ("diversity_eval/self_bleu", "self-BLEU (lower: more varied)"),
    ("diversity_eval/token_entropy", "token entropy"),
    ("diversity_eval/embedding_distance", "embedding distance"),
]


def cli(*args):
    command = [sys.executable, str(ROOT / "train_diversity_simpo.py"), "--config", "configs/demo.yaml", *args]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def evaluate(model_dir, output_dir):
    cli(
        "--eval_only",
        "true",
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--diversity_eval_prompts",
        "27",
        "--report_to",
        "none",
    )
    return json.loads((output_dir / "eval_results.json").read_text(encoding="utf-8"))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    results, histories = {"start (warmed-up demo model)": evaluate(ROOT / "demo" / "tiny-llama-ja", OUT / "start")}, {}
    for weight in WEIGHTS:
        run = OUT / f"weight-{weight}"
        print(f"training diversity_weight={weight} ...", flush=True)
        cli(*TRAIN, "--diversity_weight", str(weight), "--output_dir", str(run))
        histories[weight] = json.loads((run / "trainer_state.json").read_text())["log_history"]
        name = "plain SimPO (weight 0)" if weight == 0 else f"Diversity SimPO, weight {weight}"
        results[name] = evaluate(run, run / "eval")

    header = "| model | " + " | ".join(label for _, label in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "n/a" for k, _ in METRICS) + " |")
    examples = [f"- {name}: {r['diversity_eval/examples'][0]}" for name, r in results.items()]
    text = "\n".join(
        [
            "# Plain SimPO vs Diversity SimPO (offline demo, CPU)",
            "",
            f"Each run: configs/demo.yaml, {TRAIN[1]} steps from demo/tiny-llama-ja, seed 42. Scores: "
            "27 eval prompts x 8 sampled replies (temperature 1.0); character n-grams (see diversity_eval.py).",
            "",
            *lines,
            "",
            "First sampled reply to the first eval prompt:",
            "",
            *examples,
            "",
            "![comparison](diversity.png)",
            "",
        ]
    )
    (OUT / "results.md").write_text(text, encoding="utf-8")
    plot(results, histories, OUT / "comparison.png")
    shutil.copy(OUT / "results.md", ROOT / "benchmarks" / "DIVERSITY.md")
    shutil.copy(OUT / "comparison.png", ROOT / "benchmarks" / "diversity.png")
    print(text)


def plot(results, histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(results)
    keys = [(k, label) for k, label in METRICS if all(k in r for r in results.values())]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        axes[0].bar([j + i * width for j in range(len(keys))], [results[name][k] for k, _ in keys], width, label=name)
    axes[0].set_xticks(
        [j + 0.4 - width / 2 for j in range(len(keys))],
        [label.split(" (")[0] for _, label in keys],
        rotation=30,
        ha="right",
    )
    axes[0].set_title("after training (eval split)")
    axes[0].legend(fontsize=7)
    for weight, history in histories.items():
        entropy = [
            (e["step"], e["diversity_eval/token_entropy"]) for e in history if "diversity_eval/token_entropy" in e
        ]
        margins = [(e["step"], e["rewards/margins"]) for e in history if "rewards/margins" in e]
        axes[1].plot(*zip(*entropy, strict=True), marker="o", label=f"weight {weight}")
        axes[2].plot(*zip(*margins, strict=True), label=f"weight {weight}")
    axes[1].set(title="entropy of sampled replies during training", xlabel="step", ylabel="nats")
    axes[2].set(title="rewards/margins (train)", xlabel="step")
    for ax in axes[1:]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
