"""What the diversity term buys and costs, on the offline demo: a sweep from the same undecided start.

Settings: diversity_weight in {0, 0.01, 0.05, 0.2, 1.0} at diversity_alpha 0.1, plus diversity_alpha 1.0 (entropy
only) and 0.0 (KL only) at weights 0.05 and 1.0. Each is trained with configs/demo.yaml from demo/tiny-llama-ja with
seeds 1, 2 and 3, and scored at its last step on the held-out eval topics: TRL's preference accuracy and margins, the
diversity of 8 sampled replies per eval prompt (diversity_simpo/reply_diversity.py), and the share of sampled
replies that state the prompt's reference fact (`reference_rate`, from the data: a signal that does not come from
the model). The start model is scored the same way (one sampling per seed).

    python benchmarks/compare_diversity.py          # about 20 minutes on 2 CPU cores; make compare

Writes the table and figure into benchmarks/DIVERSITY.md (between its sweep markers; the reading around them stays)
and benchmarks/diversity.png; the runs stay in output/compare/. Same seeds, same table.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from report_section import write_section

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "output" / "compare"
SEEDS = (1, 2, 3)
SETTINGS = [  # (label, diversity_weight, diversity_alpha)
    ("plain SimPO", 0.0, 0.1),
    ("weight 0.01", 0.01, 0.1),
    ("weight 0.05", 0.05, 0.1),
    ("weight 0.2", 0.2, 0.1),
    ("weight 1.0", 1.0, 0.1),
    ("weight 0.05, entropy only (alpha 1)", 0.05, 1.0),
    ("weight 0.05, KL only (alpha 0)", 0.05, 0.0),
    ("weight 1.0, entropy only (alpha 1)", 1.0, 1.0),  # at a weight where the term moves things, which part does it?
    ("weight 1.0, KL only (alpha 0)", 1.0, 0.0),
]
TEMPERATURE = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["diversity_eval_temperature"]
EVAL = ["--diversity_eval_prompts", "54", "--diversity_eval_samples", "8", "--report_to", "none"]
METRICS = [
    ("eval_rewards/accuracies", "preference accuracy"),
    ("eval_rewards/margins", "reward margin"),
    ("diversity_eval/reference_rate", "fact rate"),
    ("diversity_eval/distinct_1", "distinct-1"),
    ("diversity_eval/distinct_2", "distinct-2"),
    ("diversity_eval/self_bleu", "self-BLEU (lower: more varied)"),
    ("diversity_eval/token_entropy", "token entropy"),
    ("diversity_eval/embedding_distance", "embedding distance"),
]


def cli(*args):
    command = [sys.executable, str(ROOT / "train_diversity_simpo.py"), "--config", "configs/demo.yaml", *args]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def start_scores(seed):
    out = OUT / f"start-seed{seed}"
    cli("--eval_only", "true", "--seed", str(seed), "--output_dir", str(out), *EVAL)
    return json.loads((out / "eval_results.json").read_text(encoding="utf-8"))


def run_scores(weight, alpha, seed):
    """The metrics of the last evaluation of one training run (the demo config's steps, evaluated at the end)."""
    out = OUT / f"w{weight}-a{alpha}-seed{seed}"
    steps = ["--seed", str(seed), "--eval_steps", "40", "--save_strategy", "no", "--overwrite_output_dir", "true"]
    cli(*steps, "--diversity_weight", str(weight), "--diversity_alpha", str(alpha), "--output_dir", str(out), *EVAL)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    scores = {}
    for entry in history:
        scores.update({k: v for k, v in entry.items() if k.startswith(("eval_", "diversity_eval/"))})
    return scores


def summarise(runs):
    """{metric: (mean, standard deviation over seeds)} for the metrics every run has."""
    keys = [k for k, _ in METRICS if all(k in r for r in runs)]
    return {k: (statistics.fmean(r[k] for r in runs), statistics.stdev(r[k] for r in runs)) for k in keys}


def table(results):
    keys = [(k, label) for k, label in METRICS if all(k in r for r in results.values())]
    lines = ["| setting | " + " | ".join(label for _, label in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, summary in results.items():
        cells = [f"{summary[k][0]:.3f} ± {summary[k][1]:.3f}" for k, _ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (key, label) in zip(
        axes,
        [("eval_rewards/accuracies", "preference accuracy"), ("diversity_eval/reference_rate", "fact rate")],
        strict=True,
    ):
        for name, summary in results.items():
            x, y = summary["diversity_eval/distinct_2"], summary[key]
            ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], marker="o", capsize=3, label=name)
        ax.set(xlabel="distinct-2 of sampled replies (more varied →)", ylabel=f"{label} (held-out topics)")
        ax.set_title(f"{label} against diversity, mean ± sd over seeds {', '.join(map(str, SEEDS))}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"start (demo model, before preference training)": summarise([start_scores(s) for s in SEEDS])}
    for name, weight, alpha in SETTINGS:
        print(f"{name}: seeds {SEEDS} ...", flush=True)
        results[name] = summarise([run_scores(weight, alpha, seed) for seed in SEEDS])
        print(table({name: results[name]}).splitlines()[-1], flush=True)
    plot(results, ROOT / "benchmarks" / "diversity.png")
    text = "\n".join(
        [
            f"Each setting: configs/demo.yaml (40 steps, learning rate 2e-4, batch 8) from demo/tiny-llama-ja, seeds "
            f"{', '.join(map(str, SEEDS))}; scored at the last step on the 54 held-out pairs (9 topics never "
            f"preference-trained) and 8 sampled replies (temperature {TEMPERATURE}, the demo's) per prompt. Mean ± "
            "standard deviation over seeds. Fact rate: share of sampled replies that contain the prompt's reference "
            "fact.",
            "",
            table(results),
            "",
            "![accuracy and fact rate against distinct-2](diversity.png)",
        ]
    )
    write_section(ROOT / "benchmarks" / "DIVERSITY.md", "sweep", text, "What the diversity term buys and costs")
    print(text)


if __name__ == "__main__":
    main()
