"""The counted testbeds (benchmarks/counted_diversity.py) started where a user starts: one preference pair per prompt.

Per variant and seed, the start model and its 8 exact-scored candidates per row are counted_diversity's. Then:

    pairs       the user's data: each row's best- and worst-scored candidate as prompt/chosen/rejected (a rater's
                pick; rows whose candidates all score the same give none)
    plain       plain SimPO on those pairs (the training CLI, as a user with pairs trains today); and with the
                diversity term on: as specified (weight 0.05, alpha 0.1), and entropy only at weights 0.05 and 0.2
    scorer      a reward model learned from the same pairs by train_reward_model.py (the start model's backbone and a
                new score head, a tenth of the pairs held out for early stopping); its agreement with validity: the
                share of (valid, invalid) candidate pairs of a row it orders right; and how often the candidate it
                scores worst (and best) is valid
    the path    the same candidates scored by that scorer, each row keeping its own pair (`given_pairs`), trained with
                pair rules on the learned scores: [given, rarest_vs_given] (configs/on_policy.yaml), [given,
                rarest_vs_worst], each also with a stricter bar (divpo_rho 0.1), [given, best_vs_worst],
                [best_vs_worst, rarest_vs_worst], and each rule alone: best_vs_worst, rarest_vs_worst, divpo and
                rarest_vs_given (`given` alone is plain SimPO on the pairs)
    ensemble    two more scorers by the same recipe at other seeds (another held-out tenth, score head and order);
                each candidate's three scores made one by their minimum (worst case) or their mean less their
                standard deviation (Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization", ICLR
                2024): a bar that a reply the scorers disagree on must clear by their disagreement
    implicit    no scorer: DICE's implicit reward in SimPO's form (the mean token log-probability under plain SimPO
                on the pairs less that under the start model) scores the candidates, with [given, rarest_vs_given],
                [given, best_vs_worst], [given, rarest_vs_worst] and [best_vs_worst, rarest_vs_worst]
    typicality  the learned scorer's and the implicit reward's scores less their least-squares fit on the start
                model's mean log-probability of each candidate (what they say beyond how typical a reply is: the
                rater's choice favours typical replies), with [given, rarest_vs_given]
    longer      plain SimPO and [given, rarest_vs_given] at 90 steps rather than 60: the path trains more pairs, so
                at the same steps it passes over the user's fewer times
    measured    as counted_diversity measures: validity and the normalised entropy of the valid answers

    python benchmarks/counted_from_pairs.py --jobs 2    # make counted-from-pairs

Writes its table into benchmarks/DIVERSITY.md (between its `from-pairs` markers); every run's figures stay in
output/counted/ beside counted_diversity's (a run already measured there is not run again).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from counted_diversity import (  # the testbeds' own pieces
    OUT,
    ROOT,
    ROWS,
    SEEDS,
    SETS,
    STEPS,
    VARIANTS,
    answer_of,
    build_start,
    cached,
    cell,
    mean,
    measure,
    train,
    training_prompts,
    write_candidates,
)

# the path trains about 1.5 times as many pairs as the user gave: at the same steps it passes over them fewer times;
# these rows give both it and plain SimPO half as many steps again
LONGER = STEPS * 3 // 2
IMPLICIT = "implicit reward"
# fmt: off
RULES = {  # label -> (pair rules, divpo_rho, the scores they read, steps): "scorer" is the one learned scorer
    "[given, rarest_vs_worst]": (["given", "rarest_vs_worst"], 0.3, "scorer", STEPS),
    "[given, rarest_vs_worst], rho 0.1": (["given", "rarest_vs_worst"], 0.1, "scorer", STEPS),
    "[given, best_vs_worst]": (["given", "best_vs_worst"], 0.3, "scorer", STEPS),
    "[given, rarest_vs_given]": (["given", "rarest_vs_given"], 0.3, "scorer", STEPS),
    "[given, rarest_vs_given], rho 0.1": (["given", "rarest_vs_given"], 0.1, "scorer", STEPS),
    "[given, rarest_vs_given], ensemble, worst case": (["given", "rarest_vs_given"], 0.3, "worst case", STEPS),
    "[given, rarest_vs_given], ensemble, mean - std": (["given", "rarest_vs_given"], 0.3, "mean - std", STEPS),
    "[given, rarest_vs_worst], ensemble, worst case": (["given", "rarest_vs_worst"], 0.3, "worst case", STEPS),
    f"[given, rarest_vs_given], {LONGER} steps": (["given", "rarest_vs_given"], 0.3, "scorer", LONGER),
    "[given, rarest_vs_given], implicit reward": (["given", "rarest_vs_given"], 0.3, IMPLICIT, STEPS),
    "[given, best_vs_worst], implicit reward": (["given", "best_vs_worst"], 0.3, IMPLICIT, STEPS),
    "[given, rarest_vs_worst], implicit reward": (["given", "rarest_vs_worst"], 0.3, IMPLICIT, STEPS),
    "[best_vs_worst, rarest_vs_worst], implicit reward": (["best_vs_worst", "rarest_vs_worst"], 0.3, IMPLICIT, STEPS),
    "[given, rarest_vs_given], implicit reward less typicality": (
        ["given", "rarest_vs_given"], 0.3, "implicit reward less typicality", STEPS),
    "[given, rarest_vs_given], learned scorer less typicality": (
        ["given", "rarest_vs_given"], 0.3, "scorer less typicality", STEPS),
    "[best_vs_worst, rarest_vs_worst]": (["best_vs_worst", "rarest_vs_worst"], 0.3, "scorer", STEPS),
    "best_vs_worst": (["best_vs_worst"], 0.3, "scorer", STEPS),
    "rarest_vs_worst": (["rarest_vs_worst"], 0.3, "scorer", STEPS),
    "divpo": (["divpo"], 0.3, "scorer", STEPS),
    "rarest_vs_given": (["rarest_vs_given"], 0.3, "scorer", STEPS),
}
# fmt: on
TERM = {  # label -> (diversity_weight, diversity_alpha): plain SimPO on the pairs with the diversity term
    "the term as specified (0.05, alpha 0.1)": (0.05, 0.1),
    "entropy only, weight 0.05": (0.05, 1.0),
    "entropy only, weight 0.2": (0.2, 1.0),
}
ENSEMBLE = {  # how three scorers' scores of a candidate make one (Coste et al. 2024, arXiv 2310.02743)
    "worst case": min,  # the lowest of the three
    "mean - std": lambda s: sum(s) / len(s) - (sum((x - sum(s) / len(s)) ** 2 for x in s) / len(s)) ** 0.5,
}
DICE = {  # label -> the rules of a DICE round after plain SimPO (60 + 60 steps)
    "DICE round after plain SimPO: [given, rarest_vs_given]": ["given", "rarest_vs_given"],
    "DICE round after plain SimPO: [given, best_vs_worst]": ["given", "best_vs_worst"],
}
PATH = "[given, rarest_vs_given]"  # what configs/on_policy.yaml trains on a learned scorer's candidates


def user_pairs(candidates, path):
    """Each row's best- and worst-scored non-empty candidate (the first of ties) as a prompt/chosen/rejected pair (a
    preference file holds no empty reply: the training CLI refuses one)."""
    rows = [json.loads(line) for line in candidates.read_text(encoding="utf-8").splitlines()]
    pairs = []
    for row in rows:
        kept = [(s, r) for s, r in zip(row["all_rm_scores"], row["all_generated_responses"], strict=True) if r.strip()]
        if not kept:
            continue
        scores, replies = zip(*kept, strict=True)
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if scores[best] > scores[worst] and replies[best] != replies[worst]:
            pairs.append({"prompt": row["prompt"], "chosen": replies[best], "rejected": replies[worst]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def train_scorer(start, pairs, seed, output):
    """train_reward_model.py's own main on the pairs, from the start model: the scorer's folder."""
    import train_reward_model

    if (output / "run_record.json").is_file():
        return output
    argv = ["--config", str(ROOT / "configs" / "demo_reward_model.yaml"), "--model_name_or_path", str(start)]
    argv += ["--dataset_name", str(pairs), "--dataset_test_fraction", "0.1", "--output_dir", str(output)]
    argv += ["--wrap_text_as_chat", "true", "--seed", str(seed), "--max_length", "64", "--report_to", "none"]
    argv += ["--num_train_epochs", "4", "--eval_steps", "10", "--save_steps", "10", "--disable_tqdm", "true"]
    train_reward_model.main(argv)
    return output


def reward_model_scores(rows, scorer):
    """Each row's candidates scored by the reward model in folder `scorer`."""
    import torch

    from diversity_simpo.candidates import conversation, load_reward_model, score

    options = argparse.Namespace(trust_remote_code=False)
    model, tokenizer = load_reward_model(options, torch.device("cpu"), torch.float32, str(scorer))
    chats = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    return [score(model, tokenizer, [conversation(chat, r) for r in row["all_generated_responses"]], 16)
            for chat, row in zip(chats, rows, strict=True)]  # fmt: skip


def model_logps(rows, folder):
    """Each candidate's mean token log-probability under the model in `folder`, tokenised as training tokenises a
    pair."""
    import torch

    from diversity_simpo.candidates import load_policy, load_tokenizer
    from diversity_simpo.rarity import candidate_logps

    scored = [{"prompt": [{"role": "user", "content": row["prompt"]}],
               "candidates": [[{"role": "assistant", "content": r}] for r in row["all_generated_responses"]]}
              for row in rows]  # fmt: skip
    tokenizer = load_tokenizer(str(folder), False, "model")
    options = argparse.Namespace(model_name_or_path=str(folder), trust_remote_code=False)
    model = load_policy(options, "cpu", torch.float32, tokenizer)
    return candidate_logps(model, tokenizer, scored, torch.device("cpu"), rows_per_forward=20)


def less_typicality(scores, typicality):
    """`scores` less their least-squares fit on `typicality` (the start model's mean log-probability of each
    candidate) over every candidate: what a scorer learned from a rater who prefers typical replies says beyond that."""
    xs, ys = [t for row in typicality for t in row], [v for row in scores for v in row]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return [[v - slope * t for v, t in zip(row, ts, strict=True)] for row, ts in zip(scores, typicality, strict=True)]


def implicit_reward_scores(rows, policy, start):
    """DICE's implicit reward (Chen et al., ICLR 2025, arXiv 2406.09760) in SimPO's form: each candidate's mean token
    log-probability (tokenised as training tokenises a pair) under `policy`, SimPO trained on the pairs from `start`,
    less that under `start`."""
    under_policy, under_start = model_logps(rows, policy), model_logps(rows, start)
    return [[a - b for a, b in zip(p, s, strict=True)] for p, s in zip(under_policy, under_start, strict=True)]


def rescored(candidates, members, pairs, path, combine=None):
    """The candidates scored by `members()` (each member's scores of every row: one member, or an ensemble whose
    scores of a candidate `combine` makes one), each row keeping its own pair; and the agreement of those scores with
    validity (the exact scores) over every (valid, invalid) candidate pair of a row."""
    rows = [json.loads(line) for line in candidates.read_text(encoding="utf-8").splitlines()]
    if not path.is_file():
        own = {p["prompt"]: {"chosen": p["chosen"], "rejected": p["rejected"]} for p in _lines(pairs)}
        each = members(rows)
        out = []
        for index, row in enumerate(rows):
            per_candidate = zip(*(member[index] for member in each), strict=True)
            learned = [combine(list(s)) if combine else s[0] for s in per_candidate]
            given = [own[row["prompt"]]] if row["prompt"] in own else []
            out.append({**row, "all_rm_scores": learned, "exact_scores": row["all_rm_scores"], "given_pairs": given})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    right = total = 0
    for learned, valid in scored_validity(path):
        for i in (i for i, v in enumerate(valid) if v):
            for j in (j for j, v in enumerate(valid) if not v):
                right, total = right + (learned[i] > learned[j]), total + 1
    return path, right / total if total else float("nan")


def scored_validity(path):
    """Each row of a scored file as (its candidates' scores, whether each candidate is a valid answer)."""
    category = {prompt[0]["content"]: c for c, prompt in training_prompts()}
    for row in _lines(path):
        answers = SETS[category[row["prompt"]]]
        yield row["all_rm_scores"], [answer_of(r) in answers for r in row["all_generated_responses"]]


def picks_valid(path):
    """The share of rows (whose scores are not all equal) where the candidate `best_vs_worst` would reject on these
    scores, and the one it would choose, is a valid answer."""
    picks = [(valid[scores.index(min(scores))], valid[scores.index(max(scores))])
             for scores, valid in scored_validity(path) if max(scores) != min(scores)]  # fmt: skip
    return {"worst": sum(w for w, _ in picks) / len(picks), "best": sum(b for _, b in picks) / len(picks)}


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def run_job(job):
    """Plain SimPO on the pairs and the path's rules on the learned scores, for one (variant, seed)."""
    import torch

    torch.set_num_threads(1)
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1")
    (reward, skew), seed = job
    here = OUT / f"{skew}-{seed}" / reward.replace(" ", "-")
    start = build_start(skew, seed)
    candidates = write_candidates(start, (reward, skew), seed, range(ROWS), here / "candidates" / "train.jsonl")
    work = here / "from-pairs"
    pairs = user_pairs(candidates, work / "pairs" / "train.jsonl")
    results = {"start": cached(here / "start.json", lambda: measure(start))}
    plain = work / "plain-SimPO-on-the-pairs"

    def plain_run():
        return measure(train(start, pairs.parent, ["best_vs_worst"], STEPS, seed, plain / "model"))

    results["plain SimPO on the pairs"] = cached(plain / "figures.json", plain_run)
    longer = work / f"plain-SimPO-on-the-pairs-{LONGER}-steps"

    def plain_longer():
        return measure(train(start, pairs.parent, ["best_vs_worst"], LONGER, seed, longer / "model"))

    results[f"plain SimPO on the pairs, {LONGER} steps"] = cached(longer / "figures.json", plain_longer)
    for label, term in TERM.items():
        folder = work / f"term-{term[0]}-{term[1]}"

        def term_run(folder=folder, term=term):
            return measure(train(start, pairs.parent, ["best_vs_worst"], STEPS, seed, folder / "model", term=term))

        results[label] = cached(folder / "figures.json", term_run)
    scorer = train_scorer(start, pairs, seed, work / "scorer")
    data, agreement = rescored(candidates, lambda rows: [reward_model_scores(rows, scorer)], pairs,
                               work / "scored" / "train.jsonl")  # fmt: skip
    results["scorer agreement"], scored_by = {"agreement": agreement}, {"scorer": data}
    results["scorer picks"] = picks_valid(data)
    # an ensemble: the same recipe at other seeds (another held-out tenth, head and order), combined pessimistically
    members = [scorer] + [train_scorer(start, pairs, seed + k * 1000, work / f"scorer-{k}") for k in (1, 2)]
    for name, combine in ENSEMBLE.items():
        path = work / f"scored-{name.replace(' ', '-')}" / "train.jsonl"
        scores = lambda rows: [reward_model_scores(rows, member) for member in members]  # noqa: E731
        scored_by[name], figure = rescored(candidates, scores, pairs, path, combine)
        results[f"{name} agreement"] = {"agreement": figure}
    # no scorer: the implicit reward of plain SimPO on the pairs against the start model
    scores = lambda rows: [implicit_reward_scores(rows, plain / "model", start)]  # noqa: E731
    path = work / "scored-implicit-reward" / "train.jsonl"
    scored_by["implicit reward"], figure = rescored(candidates, scores, pairs, path)
    results["implicit reward agreement"] = {"agreement": figure}
    # each scorer less what it says of how typical a reply is (its fit on the start model's log-probability)
    typical = lambda rows: model_logps(rows, start)  # noqa: E731
    for name, scorer_of in (("implicit reward", lambda rows: implicit_reward_scores(rows, plain / "model", start)),
                            ("scorer", lambda rows: reward_model_scores(rows, scorer))):  # fmt: skip
        path = work / f"scored-{name.replace(' ', '-')}-less-typicality" / "train.jsonl"
        scores = lambda rows, scorer_of=scorer_of: [less_typicality(scorer_of(rows), typical(rows))]  # noqa: E731
        scored_by[f"{name} less typicality"], figure = rescored(candidates, scores, pairs, path)
        results[f"{name} less typicality agreement"] = {"agreement": figure}
    for label, (rules, rho, scores, steps) in RULES.items():
        folder = work / label.replace("[", "").replace("]", "").replace(", ", "-and-").replace(" ", "-")
        scored = scored_by[scores]

        def run(folder=folder, rules=rules, rho=rho, scored=scored, steps=steps):
            return measure(train(start, scored.parent, rules, steps, seed, folder / "model", rho))

        results[label] = cached(folder / "figures.json", run)
        print(f"{reward}, {skew}, seed {seed}: {label}: {results[label]}", flush=True)
    # DICE's round: plain SimPO on the pairs samples the candidates, its implicit reward scores them, and training
    # goes on from it; against plain SimPO trained as many steps in all
    after = work / "DICE-round"
    sampled = write_candidates(plain / "model", (reward, skew), seed, range(ROWS), after / "candidates" / "train.jsonl")
    scores = lambda rows: [implicit_reward_scores(rows, plain / "model", start)]  # noqa: E731
    data, figure = rescored(sampled, scores, pairs, after / "scored" / "train.jsonl")
    results["DICE round agreement"] = {"agreement": figure}
    for label, rules in DICE.items():
        folder = after / "-and-".join(rules)

        def dice(folder=folder, rules=rules):
            return measure(train(plain / "model", data.parent, rules, STEPS, seed, folder / "model"))

        results[label] = cached(folder / "figures.json", dice)
    twice = work / f"plain-SimPO-on-the-pairs-{2 * STEPS}-steps"

    def plain_twice():
        return measure(train(start, pairs.parent, ["best_vs_worst"], 2 * STEPS, seed, twice / "model"))

    results[f"plain SimPO on the pairs, {2 * STEPS} steps"] = cached(twice / "figures.json", plain_twice)
    return job, results


def report(results, seeds):
    from report_section import write_section

    lines = []
    for variant, settings in results.items():
        base = settings["plain SimPO on the pairs"]
        agreement = ", ".join(f"{r['agreement']:.2f}" for r in settings["scorer agreement"])
        named = [*((n, f"three scorers, {n}") for n in ENSEMBLE), ("implicit reward", "implicit reward")]
        for n, what in (("scorer", "learned scorer"), ("implicit reward", "implicit reward")):
            named.append((f"{n} less typicality", f"{what} less typicality"))
        for name, what in [*named, ("DICE round", "implicit reward on the plain model's own samples")]:
            if f"{name} agreement" in settings:
                agreement += f"; {what}: " + ", ".join(f"{r['agreement']:.2f}" for r in settings[f"{name} agreement"])
        picks = "; ".join(f"{side}-scored {', '.join(f'{r[side]:.2f}' for r in settings['scorer picks'])}"
                          for side in ("worst", "best"))  # fmt: skip
        lines += [f"**{variant}** (the learned scorer orders valid over invalid replies: {agreement} by seed; the "
                  f"candidate it scores worst is valid in this share of rows, and the best: {picks})\n",
                  "| setting | validity | answer entropy (normalised) | validity vs plain | entropy vs plain |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for label, runs in settings.items():
            if label.endswith(("agreement", "picks")):
                continue
            cells = " | ".join(cell(runs, k) for k in ("validity", "entropy"))
            delta = " | ".join(f"{mean(runs, k) - mean(base, k):+.3f}" for k in ("validity", "entropy"))
            lines.append(f"| {label} | {cells} | {delta if label != 'start' else ' | '} |")
        validity, entropy = (mean(settings[PATH], k) - mean(base, k) for k in ("validity", "entropy"))
        narrows = mean(base, "entropy") < mean(settings["start"], "entropy")
        spread = (f"{'met' if entropy >= 0.15 else 'missed'}: at least +0.15 where plain SimPO narrows the answers"
                  if narrows else "plain SimPO does not narrow the answers here")  # fmt: skip
        lines.append(
            f"\n{PATH} on the learned scores: validity {validity:+.3f} against plain SimPO on the pairs "
            f"({'met' if validity >= -0.01 else 'missed'}: within 0.01 or above), answer entropy {entropy:+.3f} "
            f"({spread}).\n"
        )
    lines.append(
        f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}; 10 held-out prompts x 64 samples."
    )
    write_section(ROOT / "benchmarks" / "DIVERSITY.md", "from-pairs", "\n".join(lines), "Diversity")


def main(jobs, variants, seeds):
    import multiprocessing

    chosen = [v for v in VARIANTS if not variants or f"{v[0]}, {v[1]}" in variants]
    work = [(variant, seed) for variant in chosen for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        done = pool.map(run_job, work, chunksize=1)
    results = {f"{reward}, {skew}": {} for reward, skew in chosen}
    for ((reward, skew), _), figures in done:
        for label, values in figures.items():
            results[f"{reward}, {skew}"].setdefault(label, []).append(values)
    (OUT / "from_pairs.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    report(results, seeds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="processes side by side (one thread each)")
    parser.add_argument("--variants", nargs="*", help='e.g. "validity only, geometric" (default: all six)')
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS), help="default: 1 2 3")
    args = parser.parse_args()
    main(args.jobs, args.variants, args.seeds)
