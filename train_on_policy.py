"""On-policy rounds in one command: sample replies from the model, score them with a reward model, choose pairs
(by score, and by rarity under that model), train; then again from the model just trained.

    deepspeed --num_gpus=4 train_on_policy.py                  # configs/on_policy.yaml: ELYZA 8B, 2 rounds, 4 GPUs
    python train_on_policy.py --train '{"use_peft": true, "deepspeed": "", "gradient_accumulation_steps": 64}'  # 1 GPU
    python train_on_policy.py --config configs/demo_on_policy.yaml                      # the offline CPU demo

Settings are the fields of OnPolicyArguments (diversity_simpo/rounds.py), from the YAML and the command line as for
the two other tools. Each round runs two stages, each a process of its own under the launcher this command runs
under: sampling and scoring (generate_candidates.py, its settings from `candidates_config` with the `candidates`
mapping over them), then training (train_diversity_simpo.py, from `train_config` and `train`). The same command after
a kill continues the loop: finished stages are passed over, a training stage resumes from its newest checkpoint.
Mistakes end the run with a one-line `error:` and exit status 2, before anything is written.
"""

import sys
from pathlib import Path

from diversity_simpo import rounds, settings
from diversity_simpo.candidates import CandidateArguments
from diversity_simpo.data import DataError
from diversity_simpo.settings import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "on_policy.yaml"


def main(argv=None):
    from trl import ModelConfig

    from diversity_simpo_trainer import DiversitySimPOConfig  # the training stage's settings, checked up front

    argv = sys.argv[1:] if argv is None else argv
    stages = {
        "train": (settings.ScriptArguments, DiversitySimPOConfig, ModelConfig),
        "candidates": (CandidateArguments,),
    }
    (args,) = settings.read_settings(argv, (rounds.OnPolicyArguments,), DEFAULT_CONFIG, nested=stages)
    rounds.run(rounds.over_config(args, argv, DEFAULT_CONFIG), DiversitySimPOConfig)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
