"""SimPO health warnings: one line (and a W&B alert) when the logged metrics show a known failure signature.

The signatures are the SimPO authors' guidance (princeton-nlp/SimPO, README and issues), turned into thresholds on
what the run already logs. Each warning is given once per run, by the global rank 0, and names what to change.

    chosen reward falling    rewards/chosen has fallen by more than `beta` since the first log (the chosen replies'
                             average log-probability, by more than 1 nat per token) while rewards/margins rose: the
                             margin is bought by pushing both replies down. Raise beta, or lower learning_rate.
    entropy collapse         diversity/entropy is below 25% of its first logged value: the model is becoming
                             deterministic. Lower learning_rate, or raise diversity_weight (with diversity_alpha > 0).
    repetitive replies       diversity_eval/self_bleu >= 0.6 (the sampled replies to a prompt share most of their
                             character n-grams), or diversity_eval/distinct_2 below half its first evaluated value:
                             too high a learning rate gives repetitive output. Lower learning_rate.
    not learning             after at least 8 logged steps, the mean loss of the last 4 logs is not below that of the
                             first 4 and the mean rewards/accuracies of the last 4 is within 0.5 +- 0.15. Raise
                             learning_rate; check that chosen and rejected are not swapped or nearly identical.
"""

import sys

from transformers import TrainerCallback

ENTROPY_COLLAPSE = 0.25
REPETITIVE_SELF_BLEU = 0.6
DISTINCT_2_DROP = 0.5
STUCK_WINDOW = 4
STUCK_ACCURACY = (0.35, 0.65)


class SimPOHealthWarnings(TrainerCallback):
    def __init__(self, beta):
        self.beta = beta
        self.train, self.first_eval, self.given = [], {}, set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and "rewards/chosen" in logs:
            self.train.append(logs)
        for key in ("diversity_eval/distinct_2", "diversity_eval/self_bleu"):
            if key in logs:
                self.first_eval.setdefault(key, logs[key])
        for name, message in self.check(logs):
            if name not in self.given:
                self.given.add(name)
                if state.is_world_process_zero:
                    self.warn(args, name, f"step {state.global_step}: {message}")

    def check(self, logs):
        """(name, message) for each signature the metrics logged so far show."""
        found = []
        first, last = (self.train[0], self.train[-1]) if self.train else (None, None)
        if last is not None and last is logs:
            fall = first["rewards/chosen"] - last["rewards/chosen"]
            if fall > self.beta and last["rewards/margins"] > first["rewards/margins"]:
                found.append(("chosen reward falling", (
                    f"rewards/chosen fell from {first['rewards/chosen']:.2f} to {last['rewards/chosen']:.2f} (more "
                    f"than beta={self.beta:g}) while rewards/margins rose from {first['rewards/margins']:.2f} to "
                    f"{last['rewards/margins']:.2f}: both replies are being pushed down. Raise beta or lower "
                    "learning_rate"
                )))  # fmt: skip
            if (
                "diversity/entropy" in last
                and last["diversity/entropy"] < ENTROPY_COLLAPSE * first["diversity/entropy"]
            ):
                found.append(("entropy collapse", (
                    f"diversity/entropy fell from {first['diversity/entropy']:.3f} to {last['diversity/entropy']:.3f} "
                    f"nats (below {ENTROPY_COLLAPSE:.0%} of its start): the model is becoming deterministic. Lower "
                    "learning_rate, or raise diversity_weight (with diversity_alpha > 0)"
                )))  # fmt: skip
            if len(self.train) >= 2 * STUCK_WINDOW:
                head, tail = self.train[:STUCK_WINDOW], self.train[-STUCK_WINDOW:]
                loss_then, loss_now = (sum(e["loss"] for e in w) / STUCK_WINDOW for w in (head, tail))
                accuracy = sum(e["rewards/accuracies"] for e in tail) / STUCK_WINDOW
                if loss_now >= loss_then and STUCK_ACCURACY[0] <= accuracy <= STUCK_ACCURACY[1]:
                    found.append(("not learning", (
                        f"the loss is not decreasing ({loss_then:.3f} -> {loss_now:.3f}) and rewards/accuracies stays "
                        f"near 0.5 ({accuracy:.2f}): the preference is not being learned. Raise learning_rate; check "
                        "that chosen and rejected are not swapped or nearly identical"
                    )))  # fmt: skip
        self_bleu, distinct = logs.get("diversity_eval/self_bleu"), logs.get("diversity_eval/distinct_2")
        first_distinct = self.first_eval.get("diversity_eval/distinct_2")
        if (self_bleu is not None and self_bleu >= REPETITIVE_SELF_BLEU) or (
            distinct is not None and first_distinct and distinct < DISTINCT_2_DROP * first_distinct
        ):
            found.append(("repetitive replies", (
                f"sampled replies are turning repetitive (diversity_eval/self_bleu {_number(self_bleu)}, distinct_2 "
                f"{_number(distinct)}): too high a learning rate gives repetitive output. Lower learning_rate"
            )))  # fmt: skip
        return found

    @staticmethod
    def warn(args, name, message):
        from tqdm import tqdm

        tqdm.write(f"warning: SimPO health ({name}), {message}", file=sys.stderr)  # on a line of its own, not the bar's
        if "wandb" in (args.report_to or []):
            try:
                import wandb

                if wandb.run is not None:
                    wandb.run.alert(title=f"SimPO health: {name}", text=message, level=wandb.AlertLevel.WARN)
            except Exception as e:  # an alert is a courtesy: it must never stop a run
                print(f"warning: could not send the W&B alert: {e}", file=sys.stderr)


def _number(value):
    return "n/a" if value is None else f"{value:.3f}"
