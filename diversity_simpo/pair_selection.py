"""Which of a prompt's scored candidates are trained as pairs (`pair_selection`: one rule, or a list of rules).

A row of scored candidates holds a prompt, replies y_1..y_n and their scores s_1..s_n (a reward model's, say): the data
the SimPO authors train their strongest models on (princeton-nlp/llama3-ultrafeedback-armorm). A rule turns a row into
the (chosen, rejected) index pairs it trains; each takes the scores, the replies' texts and, if it asks for them
(`NEEDS_LOGPS`), the replies' mean token log-probabilities l_1..l_n under the model training starts from
(diversity_simpo/rarity.py), and `rho` (`divpo_rho`):

    best_vs_worst  chosen = the highest score, rejected = the lowest: the SimPO authors' on-policy recipe (numpy's
                   argmax and argmin there, so the first of tied candidates; here too)
    divpo          DivPO (Lanchantin et al., 2025, "Diverse Preference Optimization", arXiv 2501.18101) with its
                   model-probability criterion. The quality bar is t = max(s) - rho * (max(s) - min(s)), rho a
                   fraction of the row's score range (as in the paper and Meta's fairseq2 code). Among the candidates
                   that meet it (s >= t) the chosen reply is the rarest: the lowest l; among those below it (s < t)
                   the rejected reply is the most typical: the highest l. rho = 0 keeps only the best-scored replies
                   as chosen; a larger rho lets more good-enough replies compete on rarity. (fairseq2 draws the
                   rejected reply from a band near the lowest score, s <= min(s) + rho * (max(s) - min(s)); at
                   rho = 0.5 the two rules meet.)
    rarest_vs_worst  DivPO's chosen reply (the rarest at or above the bar) against best_vs_worst's rejected one (the
                   lowest score). DivPO's rejected reply, the most typical one below the bar, is often a reply the
                   model gives to other prompts where it is right (a frequent answer in the wrong place): pushing it
                   down there costs quality elsewhere, which the worst-scored reply does less often. With
                   best_vs_worst beside it (`[best_vs_worst, rarest_vs_worst]`) each row pushes up its best reply and
                   its rarest good one against its worst (benchmarks/DIVERSITY.md).

    given          the prompt's own pairs, as the user's preference data gave them, whatever the scores say: rows
                   that generate_candidates.py sampled from prompt/chosen/rejected pairs keep them (`given_pairs`).
                   Beside a rule that reads the scores (`[given, rarest_vs_worst]`) it anchors training on the
                   pairs the user trusts, so a learned scorer's errors on the rare replies it picks weigh less.
    rarest_vs_given  rarest_vs_worst's chosen reply (the rarest candidate at or above the bar) against each of the
                   prompt's own rejected replies (`given_pairs`), which are not candidates. A scorer learned from
                   the pairs errs most on replies unlike those it was trained on, and a good answer it has not seen
                   is often the lowest-scored candidate (a third to nearly a half of best_vs_worst's rejected replies
                   are valid on the counted testbeds): a reply the user rejected is known to be bad.

A candidate cut at max_new_tokens when it was sampled (`cut`, from generate_candidates.py's `all_cut`) is never
chosen: training appends the end-of-turn token to a chosen reply and would teach the cut text as a finished answer.
Each rule chooses among the others (`eligible`), its bar still set by every score; a cut reply may be rejected.
`allow_cut_replies: true` lets every candidate be chosen.

A rejected candidate whose text equals its chosen one is passed over (the same reply sampled twice is normal for short
answers; under divpo, if every reply below the bar is a copy of the rarest good one, the next rarest is chosen). With
several rules a row gives each rule's pairs, a pair two rules both make once. A row no rule makes a pair of is skipped
and counted, never turned into a pair that teaches nothing.

A new rule that chooses among the candidates is a function here with this signature, one entry in `RULES` (and in
`NEEDS_LOGPS` if it reads l), and its name in settings.CHOICES.
"""

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from datasets import Dataset

from diversity_simpo.candidate_folder import read_manifest, same_place, write_whole
from diversity_simpo.data import DataError
from diversity_simpo.rows import one_kind
from diversity_simpo.settings import ConfigError


def best_vs_worst(scores, texts, logps, rho, eligible=None):
    """The highest-scored candidate against the lowest: the first of tied ones, a rejected reply differing from the
    chosen one ([] when none differs); the chosen one among `eligible` (every candidate by default)."""
    chosen = max(_all(scores, eligible), key=lambda i: (scores[i], -i))
    below = [i for i in range(len(scores)) if scores[i] < scores[chosen] and texts[i] != texts[chosen]]
    return [(chosen, min(below, key=lambda i: (scores[i], i)))] if below else []


def divpo(scores, texts, logps, rho, eligible=None):
    """DivPO, the rarest candidate that meets the quality bar against the most typical one below it: the module
    docstring; ties go to the first candidate; the chosen one among `eligible`."""
    bar = _bar(scores, rho)
    for chosen in sorted((i for i in _all(scores, eligible) if scores[i] >= bar), key=lambda i: (logps[i], i)):
        below = [i for i in range(len(scores)) if scores[i] < bar and texts[i] != texts[chosen]]
        if below:  # else every reply below the bar is this one again: the next rarest good reply
            return [(chosen, min(below, key=lambda i: (-logps[i], i)))]
    return []


def rarest_vs_worst(scores, texts, logps, rho, eligible=None):
    """The rarest candidate that meets DivPO's quality bar against the lowest-scored one: DivPO's chosen reply with
    best_vs_worst's rejected reply; ties go to the first candidate; the chosen one among `eligible`."""
    bar = _bar(scores, rho)
    for chosen in sorted((i for i in _all(scores, eligible) if scores[i] >= bar), key=lambda i: (logps[i], i)):
        below = [i for i in range(len(scores)) if scores[i] < bar and texts[i] != texts[chosen]]
        if below:
            return [(chosen, min(below, key=lambda i: (scores[i], i)))]
    return []


def _all(scores, eligible):
    return range(len(scores)) if eligible is None else eligible


def _bar(scores, rho):
    """DivPO's quality bar: rho of the row's score range below its highest score."""
    return max(scores) - rho * (max(scores) - min(scores))


def rarest_good(scores, logps, rho, eligible=None):
    """The rarest candidate at or above DivPO's quality bar (the first of ties), among `eligible`: rarest_vs_given's
    chosen reply, which is rejected by none of the candidates."""
    good = [i for i in _all(scores, eligible) if scores[i] >= _bar(scores, rho)]
    return min(good, key=lambda i: (logps[i], i)) if good else None


RULES = {"best_vs_worst": best_vs_worst, "divpo": divpo, "rarest_vs_worst": rarest_vs_worst}
NEEDS_LOGPS = {"divpo", "rarest_vs_worst", "rarest_vs_given"}
GIVEN = "given"  # the row's own pairs: not chosen among the candidates (module docstring)
RAREST_VS_GIVEN = "rarest_vs_given"  # the rarest good candidate against the row's own rejected replies


def choose_pairs(rows, rules, rho, logps=None, counts=None, allow_cut=False):
    """The pairs `rules` make of `rows` ({prompt, candidates, scores, row_id, reference?}, from data.py), as
    {prompt, chosen, rejected, row_id, reference?} dicts in row order, each row's pairs in the order of `rules`;
    `logps[i]` the candidates' mean token log-probabilities of row i, for the rules that need them; a candidate
    marked `cut` in its row is never chosen unless `allow_cut`. `counts`, a dict
    if given, receives the rules, the pairs each made, the rows left without a pair, and `pairs_sha256`: the
    fingerprint of every pair's row, chosen text and rejected text, the same on any number of ranks and on resume."""
    pairs, made, unpaired = [], Counter(), 0
    for index, row in enumerate(rows):
        texts = [json.dumps(reply, ensure_ascii=False) for reply in row["candidates"]]
        seen, cut = set(), row.get("cut") if not allow_cut else None
        eligible = [i for i in range(len(texts)) if not (cut and cut[i])]
        for name in rules:
            if name == GIVEN:
                replies = row.get("given") or []
            elif name == RAREST_VS_GIVEN:
                rarest = rarest_good(row["scores"], logps[index], rho, eligible) if eligible else None
                given = (row.get("given") or []) if rarest is not None else []
                replies = [(row["candidates"][rarest], rejected) for _, rejected in given]
            else:
                rarity = logps[index] if logps else None
                chosen = RULES[name](row["scores"], texts, rarity, rho, eligible) if eligible else ()
                replies = [(row["candidates"][c], row["candidates"][r]) for c, r in chosen]
            for chosen, rejected in replies:
                key = (json.dumps(chosen, ensure_ascii=False), json.dumps(rejected, ensure_ascii=False))
                if key in seen or key[0] == key[1]:  # another rule's pair already, or a pair that teaches nothing
                    continue
                seen.add(key)
                made[name] += 1
                pair = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "row_id": row["row_id"]}
                pairs.append(pair | ({"reference": row["reference"]} if "reference" in row else {}))
        unpaired += not seen
    if counts is not None:
        counts.update(pair_selection=list(rules), pairs_by_rule={name: made[name] for name in rules})
        counts.update(kept=len(pairs), skipped_no_pair=unpaired, pairs_sha256=fingerprint(pairs))
    return pairs


def check_rules(dataset, rules, source):
    """What the rules need that the scored rows lack, said in one line before the model loads."""
    needs = [name for name in rules if name in (GIVEN, RAREST_VS_GIVEN)]
    if needs and ("given" not in dataset.column_names or not any(dataset["given"])):
        raise ConfigError(
            f"pair_selection {rules} has {needs[0]}, which reads the prompts' own pairs, and {source} holds none: "
            "candidates keep them when generate_candidates.py samples the prompts of prompt/chosen/rejected pairs; "
            f"remove {needs[0]}"
        )


def fingerprint(pairs):
    """sha256 of every pair's row id, chosen reply and rejected reply, in order."""
    items = [[p["row_id"], p["chosen"], p["rejected"]] for p in pairs]
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


KEPT = "pairs"  # output_dir/pairs/: the pairs a run trains, chosen when it starts


def select_pairs(dataset, split, choice, logps_of, counts, source, output_dir=None, resuming=False):
    """The training pairs of a split of scored rows, chosen once per run: (a Dataset of one kind, what to keep).

    `choice`: {pair_selection, divpo_rho, allow_cut_replies, model_name_or_path, stored_logps}. The rarity the rules
    read (if they read it) is the rows' own `logps` when `stored_logps` (generate_candidates.py stored them under the
    model this run starts from), else `logps_of(rows)`: the pass under that model. A run that resumes, and kept
    the pairs it started with in output_dir/pairs/, trains exactly those, without a pass, once it has checked that
    the rows and the settings that chose them are the same: a difference is one line and nothing trained."""
    rows = dataset.to_list()
    choice = {**choice, "rows_sha256": _sha256(rows)}
    if not NEEDS_LOGPS & set(choice["pair_selection"]) or choice["stored_logps"]:
        choice.pop("model_name_or_path")  # the model plays no part in the choice
    folder = Path(output_dir or ".") / KEPT
    if resuming and (folder / f"{split}.json").is_file():
        kept = json.loads((folder / f"{split}.json").read_text(encoding="utf-8"))
        if kept["choice"] != choice:
            key = min(k for k in choice.keys() | kept["choice"].keys() if choice.get(k) != kept["choice"].get(k))
            was, now = kept["choice"].get(key), choice.get(key)
            what = "other scored rows (the dataset changed)" if key == "rows_sha256" else f"{key}={was!r}, not {now!r}"
            raise ConfigError(
                f"{source}: the run being resumed chose its pairs from {what} ({folder / split}.json); resume with "
                "the data and settings it started with, or start a new output_dir"
            )
        pairs = [json.loads(line) for line in (folder / f"{split}.jsonl").open(encoding="utf-8")]
        if fingerprint(pairs) != kept["counts"]["pairs_sha256"]:
            raise ConfigError(f"{folder / split}.jsonl is not the file the run wrote (its fingerprint differs)")
        counts.update(kept["counts"])
        print(f"resume: training the {len(pairs)} pairs chosen when the run started ({folder / split}.jsonl)",
              file=sys.stderr)  # fmt: skip
        return Dataset.from_list(pairs), None
    rules, logps = choice["pair_selection"], None
    if NEEDS_LOGPS & set(rules):
        logps = [row["logps"] for row in rows] if choice["stored_logps"] else logps_of(rows)
    pairs = one_kind(choose_pairs(rows, rules, choice["divpo_rho"], logps, counts, choice["allow_cut_replies"]))
    if counts["skipped_no_pair"]:
        print(f"warning: {source}: {counts['skipped_no_pair']} of {len(rows)} rows make no pair by "
              f"{', '.join(rules)} (every reply below the bar is the chosen one again, or every good one was cut at "
              "max_new_tokens)", file=sys.stderr)  # fmt: skip
    if not pairs:
        raise DataError(f"{source}: no row makes a pair by {', '.join(rules)}")
    return Dataset.from_list(pairs), {"split": split, "choice": choice, "counts": dict(counts), "pairs": pairs}


def keep_pairs(output_dir, kept):
    """output_dir/pairs/{split}.jsonl and {split}.json (what chose them, and their fingerprint), each written whole:
    what a resumed run trains."""
    folder = Path(output_dir) / KEPT
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in kept["pairs"])
    write_whole(folder / f"{kept['split']}.jsonl", text)
    record = {"choice": kept["choice"], "counts": kept["counts"]}
    write_whole(folder / f"{kept['split']}.json", json.dumps(record, ensure_ascii=False, indent=1))


def stored_logps_apply(dataset_name, model_name_or_path):
    """Whether the log-probabilities stored with the candidates in `dataset_name` are those of the model a run
    starts from: a folder generate_candidates.py wrote by sampling from that same model."""
    manifest = read_manifest(dataset_name) if dataset_name and Path(dataset_name).is_dir() else None
    if not manifest:
        return False
    sampled_by = manifest["settings"].get("model_name_or_path")  # the same, or the same place after a move
    return sampled_by == model_name_or_path or same_place(sampled_by, manifest.get("folder"), model_name_or_path,
                                                          dataset_name)  # fmt: skip


def _sha256(rows):
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
