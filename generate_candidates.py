"""Sample replies from the model, score them with a reward model, and write them for training (on-policy data).

    python generate_candidates.py --config configs/candidates.yaml          # N replies per prompt, scored
    deepspeed --num_gpus=4 generate_candidates.py --config configs/candidates.yaml          # 4 GPUs, a share each
    deepspeed --num_gpus=4 train_diversity_simpo.py --dataset_name output/candidates        # then train on them

Settings are the fields of CandidateArguments (diversity_simpo/candidates.py), from the YAML and the command line as
for training. The output folder holds princeton-nlp's layout (prompt, all_generated_responses, all_rm_scores) in
shards; run the same command again after a kill and it continues where it stopped. Mistakes end the run with a
one-line `error:` and exit status 2, before anything is written.
"""

import sys
from pathlib import Path

from diversity_simpo import settings
from diversity_simpo.candidates import CandidateArguments, generate_candidates
from diversity_simpo.data import DataError
from diversity_simpo.settings import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "candidates.yaml"


def main(argv=None):
    (args,) = settings.read_settings(sys.argv[1:] if argv is None else argv, (CandidateArguments,), DEFAULT_CONFIG)
    generate_candidates(args)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
