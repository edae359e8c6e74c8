"""A picture of a training run: `training_curves.png` next to the model, drawn from the trainer's log history, so that
a user without wandb access sees how the run went without reading JSON. Train and eval series share a panel."""

import math
import sys

PANELS = [
    ("loss", "loss"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "preference accuracy"),
    ("diversity/entropy", "entropy of chosen responses (nats)"),
    ("diversity/kl", "KL(rejected || chosen)"),
]


def plot_training_curves(log_history, path):
    """Write the curves to `path`; returns False (after one line on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("training curves skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    keys = {key for entry in log_history for key in entry}
    panels = [(key, title) for key, title in PANELS if key in keys or f"eval_{key}" in keys]
    sampled = sorted(k for k in keys if k.startswith("diversity_eval/") and k != "diversity_eval/runtime")
    panels += [(key, key) for key in sampled]
    columns = 3
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for name, label, style in ((key, "train", "-"), (f"eval_{key}", "eval", "o--")):
            points = [(e["step"], e[name]) for e in log_history if name in e and "step" in e]
            if key.startswith("diversity_eval/"):
                label, style = "sampled on eval prompts", "o-"
            if points:
                ax.plot(*zip(*points, strict=True), style, label=label, markersize=4)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
