"""Scored candidates as data (`pair_selection`): every rule, and every list of rules, makes the pairs an independent
reference written from the rules' definitions makes, on random rows through the product's own path; a candidate's
rarity is the mean log-probability of the labels TRL trains on; the public layouts load; a run records its rules, the
pairs each made and their fingerprint."""

import hashlib
import itertools
import json
import math
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_MODEL, ROOT
from datasets import Dataset
from precision import assert_close_at_scale

from diversity_simpo.data import DataError, normalise
from diversity_simpo.pair_selection import (
    GIVEN,
    NEEDS_LOGPS,
    RAREST_VS_GIVEN,
    RULES,
    best_vs_worst,
    choose_pairs,
    divpo,
    fingerprint,
    rarest_good,
    rarest_vs_worst,
)
from diversity_simpo.rarity import candidate_logps
from diversity_simpo.settings import CHOICES, ConfigError


def test_hand_made_candidates_get_the_pairs_worked_out_by_hand():
    """scores 0.9 0.5 0.85 0.1 0.3, mean log-probs -1.0 -0.2 -2.0 -0.5 -0.3. best_vs_worst: 0.9 against 0.1. DivPO at
    rho 0.3: the bar is 0.9 - 0.3 * 0.8 = 0.66, so 0.9 and 0.85 are good enough; the rarer (-2.0) is chosen; of the
    three below the bar the most typical (-0.2) is rejected. At rho 0 only 0.9 is good enough."""
    scores, logps, texts = [0.9, 0.5, 0.85, 0.1, 0.3], [-1.0, -0.2, -2.0, -0.5, -0.3], list("abcde")
    assert best_vs_worst(scores, texts, None, 0.3) == [(0, 3)]
    assert divpo(scores, texts, logps, 0.3) == [(2, 1)]
    assert divpo(scores, texts, logps, 0.0) == [(0, 1)]
    assert divpo(scores, texts, logps, 0.99) == [(2, 3)]  # all but 0.1 good enough; only 0.1 below the bar
    assert rarest_vs_worst(scores, texts, logps, 0.3) == [(2, 3)]  # the rarer good one against the lowest score
    assert rarest_good(scores, logps, 0.3) == 2 and rarest_good(scores, logps, 0.0) == 0  # rarest_vs_given's chosen


def test_every_rule_is_a_setting_and_every_setting_a_rule():
    assert set(CHOICES["pair_selection"]) == {*RULES, GIVEN, RAREST_VS_GIVEN}
    assert {*RULES, RAREST_VS_GIVEN} >= NEEDS_LOGPS


# --- the product's path against references written from the definitions ------------------------------------------


def reference_rule(name, scores, texts, logps, rho, cut):
    """The (chosen, rejected) pairs of one rule, by enumerating every pair the rule allows and ranking them; a reply
    cut at max_new_tokens is never chosen."""
    everything = [(c, r) for c, r in itertools.permutations(range(len(scores)), 2) if not cut[c]]
    if not everything:
        return []
    if name == "best_vs_worst":  # the first highest uncut score against the first lowest score whose reply differs
        top = max(scores[i] for i in range(len(scores)) if not cut[i])
        best = min(i for i in range(len(scores)) if not cut[i] and scores[i] == top)
        allowed = [(c, r) for c, r in everything if c == best and scores[r] < scores[c] and texts[r] != texts[c]]
        return [min(allowed, key=lambda p: (scores[p[1]], p[1]))] if allowed else []
    if name == "divpo":  # the rarest reply at or above the bar against the most typical one below it
        bar = max(scores) - rho * (max(scores) - min(scores))
        allowed = [(c, r) for c, r in everything if scores[c] >= bar > scores[r] and texts[c] != texts[r]]
        if not allowed:
            return []
        chosen = min((logps[c], c) for c, _ in allowed)[1]
        return [max(((logps[r], -r), (c, r)) for c, r in allowed if c == chosen)[1]]
    if name == "rarest_vs_worst":  # the rarest reply at or above the bar against the first lowest-scored one
        bar = max(scores) - rho * (max(scores) - min(scores))
        allowed = [(c, r) for c, r in everything if scores[c] >= bar > scores[r] and texts[c] != texts[r]]
        if not allowed:
            return []
        chosen = min((logps[c], c) for c, _ in allowed)[1]
        return [min(((scores[r], r), (c, r)) for c, r in allowed if c == chosen)[1]]
    raise AssertionError(f"no reference for rule {name}: write one from its definition")


def reference_pairs(rows, rules, rho, rarity, chat):
    """What training should make of princeton-nlp rows: the candidates with a finite score and a reply that has text;
    rows with fewer than two, or all scores equal, skipped; then each rule's pairs, a pair of the same two texts once.
    (row_id, chosen, rejected) with replies as training writes them, the pairs each rule made, and the fingerprint."""
    written = (lambda text: [{"role": "assistant", "content": text}]) if chat else (lambda text: text)
    pairs, made = [], dict.fromkeys(rules, 0)
    for row_id, row in enumerate(rows):
        marks = row.get("all_cut", [False] * len(row["all_rm_scores"]))
        kept = [
            (reply, score, mark)
            for reply, score, mark in zip(row["all_generated_responses"], row["all_rm_scores"], marks, strict=True)
            if isinstance(score, float) and math.isfinite(score) and reply.strip()
        ]
        texts, scores, cut = ([k[i] for k in kept] for i in range(3))
        if len(kept) < 2 or max(scores) == min(scores):
            continue
        logps = [rarity(text) for text in texts]
        done = set()
        for name in rules:
            if name == "given":  # the row's own pairs, whatever the scores; one that teaches nothing left out
                chosen = [
                    (g["chosen"], g["rejected"]) for g in row.get("given_pairs", []) if g["chosen"] != g["rejected"]
                ]
            elif name == "rarest_vs_given":  # the rarest uncut reply at or above the bar against each own rejected one
                bar = max(scores) - rho * (max(scores) - min(scores))
                allowed = [(c, g["rejected"]) for c in range(len(texts)) if not cut[c] and scores[c] >= bar
                           for g in row.get("given_pairs", [])]  # fmt: skip
                rarest = min((logps[c], c) for c, _ in allowed)[1] if allowed else None
                chosen = [(texts[c], r) for c, r in allowed if c == rarest and texts[c] != r]
            else:
                chosen = [(texts[c], texts[r]) for c, r in reference_rule(name, scores, texts, logps, rho, cut)]
            for pair in chosen:
                if pair not in done:
                    done.add(pair)
                    made[name] += 1
                    pairs.append((row_id, *map(written, pair)))
    items = json.dumps([list(p) for p in pairs], ensure_ascii=False).encode()
    return pairs, made, hashlib.sha256(items).hexdigest()


def rarity(text):
    """A stand-in for a model's mean token log-probability: a function of the reply's text alone, as a model's is."""
    return -int(hashlib.sha256(text.encode()).hexdigest()[:6], 16) % 997 / 100


REPLIES = ["春です。", "夏です。", "秋です。", "冬です。", "春です。 ", "", "   ", "\n"]  # a trailing space is text
SCORES = [0.0, 0.5, 1.0, 1.0, 2.0, None, float("nan"), float("inf"), -float("inf")]


def random_rows(generator, count, chat_prompt):
    rows = []
    for index in range(count):
        n = generator.randint(1, 7)
        question = f"季節を一つ答えてください（{index}）"
        rows.append({
            "prompt": [{"role": "user", "content": question}] if chat_prompt else question,
            "all_generated_responses": [generator.choice(REPLIES) for _ in range(n)],
            "all_rm_scores": [generator.choice([*SCORES, round(generator.random(), 2)]) for _ in range(n)],
            # the prompt's own pairs (0 to 2; the same reply twice, or a candidates' pair again, at times)
            "given_pairs": [{"chosen": generator.choice(REPLIES[:5]), "rejected": generator.choice(REPLIES[:5])}
                            for _ in range(generator.randint(0, 2))],
        })  # fmt: skip
    return rows


@pytest.mark.parametrize("kind", ["text", "text wrapped as chat", "chat"])
@pytest.mark.parametrize(
    "rules",
    [
        ["best_vs_worst"],
        ["divpo"],
        ["rarest_vs_worst"],
        ["best_vs_worst", "divpo"],
        ["divpo", "best_vs_worst"],
        ["best_vs_worst", "rarest_vs_worst"],
        ["given", "rarest_vs_worst"],
        ["best_vs_worst", "given"],
        ["given", "rarest_vs_given"],
        ["rarest_vs_given", "best_vs_worst"],
    ],
)
def test_the_written_pairs_and_their_fingerprint_are_the_references_on_random_rows(kind, rules):
    """Ties, the same reply twice, empty and whitespace replies, missing and non-finite scores, rows of one candidate,
    replies cut at max_new_tokens (at two of the four bars): every written chosen and rejected reply, the count per
    rule and the fingerprint equal the reference's."""
    generator = random.Random(len(kind) + 10 * len(rules) + rules[0].startswith("d"))
    for rho in (0.0, 0.3, 0.5, 0.9):
        rows = random_rows(generator, 60, chat_prompt=kind == "chat")
        if rho in (0.3, 0.9):
            rows = [r | {"all_cut": [generator.random() < 0.3 for _ in r["all_rm_scores"]]} for r in rows]
        if kind == "chat":
            rows = [r | {"all_generated_responses": [[{"role": "assistant", "content": t}] for t in r[
                "all_generated_responses"]]} for r in rows]  # fmt: skip
        options = args(wrap_text_as_chat=kind == "text wrapped as chat")
        counts = {}
        scored = normalise(Dataset.from_list(rows), options, "data", counts).to_list()
        logps = [[rarity(json_text(reply)) for reply in row["candidates"]] for row in scored]
        pairs = choose_pairs(scored, rules, rho, logps, counts)
        if kind == "chat":
            rows = [
                r | {"all_generated_responses": [m[0]["content"] for m in r["all_generated_responses"]]} for r in rows
            ]
        expected, made, fingerprint = reference_pairs(rows, rules, rho, rarity, chat=kind != "text")
        assert [(p["row_id"], p["chosen"], p["rejected"]) for p in pairs] == expected, (rho, rules)
        assert counts["pairs_by_rule"] == made and counts["kept"] == len(expected)
        assert counts["pairs_sha256"] == fingerprint


def json_text(reply):
    return reply if isinstance(reply, str) else reply[-1]["content"]


# --- a candidate's rarity: the mean log-probability of what TRL trains --------------------------------------------


@pytest.mark.parametrize("kind", ["text", "chat", "lora"])
def test_rarity_is_the_mean_log_probability_of_the_labels_trl_trains_on(tmp_path, kind):
    """Against TRL's own tokenisation of each candidate as a chosen reply (a real trainer's dataset: BOS once, the
    end-of-turn token, the prompt's last token moved into the reply when they merge) scored in float64 one sequence
    at a time; the pass batches 2 rows of unequal lengths per forward (padding) through TRL's fused head. `lora`: chat
    rows under a PEFT model whose adapter changes the logits (a LoRA round's model), against its own float64 logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    questions = ["富士山について教えてください。", "日本で一番長い川は何ですか。その長さも教えてください。", "桜とは？"]
    replies = [
        ["富士山は日本で最も高い山です。", "わかりません。"],
        ["信濃川です。", "利根川", "知りません。ごめんなさい。"],
    ]
    replies.append(["春に咲く花です。", "桜は花です。"])
    as_message = (lambda t: [{"role": "assistant", "content": t}]) if kind != "text" else (lambda t: t)
    as_prompt = (lambda q: [{"role": "user", "content": q}]) if kind != "text" else (lambda q: q)
    rows = [
        {"prompt": as_prompt(q), "candidates": [as_message(r) for r in rs]}
        for q, rs in zip(questions, replies, strict=True)
    ]
    ours = candidate_logps(model, tokenizer, rows, torch.device("cpu"), rows_per_forward=2)

    pairs = [{"prompt": row["prompt"], "chosen": c, "rejected": row["candidates"][1 - min(i, 1)]}
             for row in rows for i, c in enumerate(row["candidates"])]  # fmt: skip
    trainer = DiversitySimPOTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs),
        args=DiversitySimPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=512),
    )  # fmt: skip
    reference = model.double()
    tokenised = iter(trainer.train_dataset)
    for row, values in zip(rows, ours, strict=True):
        for value in values:
            sequence = next(tokenised)
            ids, labels = torch.tensor([sequence["chosen_input_ids"]]), torch.tensor(sequence["chosen_labels"][1:])
            assert labels[-1].item() == tokenizer.eos_token_id  # the end of the reply is scored, text or chat
            with torch.no_grad():
                logits = reference(ids).logits[0, :-1]
            scored = labels != -100
            log_p = torch.log_softmax(logits[scored], -1).gather(-1, labels[scored].unsqueeze(-1))
            expected = log_p.mean().item()
            assert_close_at_scale(value, expected, logits.abs().max(), f"{kind} row {row['prompt']}")


# --- the public layouts, from rows written as their dataset cards show --------------------------------------------


def args(**overrides):
    fields = dict(dataset_columns=None, system_prompt=None, wrap_text_as_chat=False, candidate_score="overall_score")
    return SimpleNamespace(**(fields | overrides))


def best_vs_worst_pairs(rows, options, counts=None):
    """The pairs training makes of `rows` with pair_selection: best_vs_worst."""
    counts = {} if counts is None else counts
    return choose_pairs(
        normalise(Dataset.from_list(rows), options, "data", counts).to_list(), ["best_vs_worst"], 0.3, counts=counts
    )


def princeton_row(
    prompt="富士山について教えて",
    replies=("高い山です。", "わかりません。", "日本一の山です。"),
    scores=(0.1, -0.4, 0.3),
):
    """princeton-nlp/llama3-ultrafeedback-armorm: prompt (a string), all_generated_responses (strings),
    all_rm_scores (floats), and chosen/rejected conversations of the authors' own pair (here deliberately not the
    best and worst, to show they are ignored)."""
    conversation = [{"role": "user", "content": prompt}]
    return {
        "prompt_id": "abc",
        "prompt": prompt,
        "all_generated_responses": list(replies),
        "all_rm_scores": list(scores),
        "chosen": [*conversation, {"role": "assistant", "content": replies[-2 if len(replies) > 1 else 0]}],
        "rejected": [*conversation, {"role": "assistant", "content": replies[0]}],
    }


def ultrafeedback_row():
    """openbmb/UltraFeedback: instruction, and completions with response, annotations (Rating strings, "N/A" among
    them), fine-grained_score and overall_score."""

    def completion(response, overall, fine, helpfulness):
        rating = {"Rating": helpfulness, "Rationale": "...", "Type": ["1"], "Rationale For Rating": "..."}
        return {
            "model": "m",
            "principle": "helpfulness",
            "custom_system_prompt": "",
            "response": response,
            "annotations": {"helpfulness": rating, "honesty": {"Rating": "4", "Rationale": "..."}},
            "fine-grained_score": fine,
            "overall_score": overall,
            "critique": "...",
        }

    return {
        "source": "evol_instruct",
        "instruction": "温泉について教えて",
        "models": ["a", "b", "c"],
        "completions": [
            completion("熱いお湯です。", 7.0, 4.0, "3"),
            completion("知りません。", 2.0, 1.5, "N/A"),
            completion("日本各地にあります。", 6.0, 4.5, "5"),
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }


def test_princeton_nlp_rows_give_their_best_against_their_worst_and_ignore_their_chosen_column():
    counts = {}
    pairs = best_vs_worst_pairs([princeton_row()], args(), counts)
    assert pairs[0]["prompt"] == "富士山について教えて"
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("日本一の山です。", "わかりません。")
    assert counts["pair_selection"] == ["best_vs_worst"] and counts["kept"] == 1 and "princeton" in counts["layout"]


@pytest.mark.parametrize(
    "score, chosen, rejected",
    [
        ("overall_score", "熱いお湯です。", "知りません。"),
        ("fine-grained_score", "日本各地にあります。", "知りません。"),
        ("helpfulness", "日本各地にあります。", "熱いお湯です。"),  # "N/A" is no score: that completion is left out
    ],
)
def test_ultrafeedback_rows_use_the_score_the_user_names(score, chosen, rejected):
    counts = {}
    pairs = best_vs_worst_pairs([ultrafeedback_row()], args(candidate_score=score), counts)
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == ("温泉について教えて", chosen, rejected)
    assert score in counts["layout"] and counts["unscored_candidates"] == (1 if score == "helpfulness" else 0)


def test_conversation_replies_and_renamed_columns_load_too():
    row = princeton_row()
    row = {
        "question": row["prompt"],
        "responses": [[{"role": "assistant", "content": r}] for r in row["all_generated_responses"]],
    }
    row["rewards"] = [0.1, -0.4, 0.3]
    mapping = {"prompt": "question", "all_generated_responses": "responses", "all_rm_scores": "rewards"}
    pairs = best_vs_worst_pairs([row], args(dataset_columns=mapping))
    assert pairs[0]["prompt"] == [{"role": "user", "content": "富士山について教えて"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "日本一の山です。"}]


def test_odd_rows_are_skipped_with_a_count_and_broken_rows_name_the_row(capsys):
    rows = [
        princeton_row(),
        princeton_row(replies=("一つだけ",), scores=(0.5,)),  # fewer than two candidates
        princeton_row(scores=(0.2, 0.2, 0.2)),  # all scores equal: no preference
        princeton_row(scores=(0.2, float("nan"), None)),  # two unscored: fewer than two left
        princeton_row(replies=("同じ", "同じ", "違う"), scores=(0.9, 0.1, 0.5)),  # the same reply twice is fine
    ]
    counts = {}
    pairs = best_vs_worst_pairs(rows, args(), counts)
    assert [p["row_id"] for p in pairs] == [0, 4] and (pairs[1]["chosen"], pairs[1]["rejected"]) == ("同じ", "違う")
    assert counts["skipped_few_candidates"] == 2 and counts["skipped_no_preference"] == 1
    assert counts["unscored_candidates"] == 2
    err = capsys.readouterr().err
    assert "skipped 2 of 5 rows with fewer than two scored candidates" in err and "all score the same" in err
    with pytest.raises(DataError, match=r"data: row 0: 3 replies in all_generated_responses but 2 scores"):
        normalise(Dataset.from_list([princeton_row(scores=(0.1, 0.2))]), args(), "data")
    with pytest.raises(DataError, match=r"data: row 0: score 0 is '0.1', a str where a number belongs"):
        normalise(Dataset.from_list([princeton_row(scores=("0.1", "-0.4", "0.3"))]), args(), "data")
    with pytest.raises(DataError, match="no row has two differently scored candidates"):
        normalise(Dataset.from_list([princeton_row(scores=(1.0, 1.0, 1.0))]), args(), "data")


# --- runs of the CLI -----------------------------------------------------------------------------------------------


def scored_demo_file(path, rows=12):
    """The demo's pairs as scored candidates: chosen (score 1), rejected (0), and a second phrasing of each (0.9, 0.1):
    DivPO's choice on either side of the bar then depends on the model's log-probabilities."""
    lines = (ROOT / "demo" / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            row = json.loads(line)
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            candidates = [chosen, rejected, chosen.replace("。", "！", 1), rejected.replace("。", "！", 1)]
            f.write(json.dumps({"prompt": row["prompt"][0]["content"], "all_generated_responses": candidates,
                                "all_rm_scores": [1.0, 0.0, 0.9, 0.1]}, ensure_ascii=False) + "\n")  # fmt: skip
    return path


def test_the_rules_that_read_the_prompts_own_pairs_on_rows_without_them_are_one_line_before_the_model_loads(tmp_path):
    from train_diversity_simpo import preflight

    data = scored_demo_file(tmp_path / "scored.jsonl")
    common = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", data, "--output_dir", tmp_path / "out"]
    common += ["--eval_strategy", "no"]
    for rules, named in [("[given, rarest_vs_worst]", "given"), ("[divpo, rarest_vs_given]", "rarest_vs_given")]:
        with pytest.raises(ConfigError, match=rf"has {named}, which reads the prompts' own pairs, and .*scored.jsonl "
                           rf"\[train\] holds none: .*; remove {named}$"):  # fmt: skip
            preflight([*common, "--pair_selection", rules])
    preflight([*common, "--pair_selection", "rarest_vs_worst"])  # the rules that choose among candidates apply
    assert not (tmp_path / "out").exists()


def run_cli(*args):
    command = [sys.executable, str(ROOT / "train_diversity_simpo.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_run_with_two_rules_trains_each_rows_pair_of_each_and_records_how_many_each_made(tmp_path):
    """`--pair_selection best_vs_worst,divpo`: on these rows the two rules choose different pairs (best_vs_worst 1.0
    against 0.0; DivPO, at rho 0.5, the rarer of the two good replies against the more typical of the two bad ones),
    so each of the 12 rows gives two; the run record and the model card say so."""
    data = scored_demo_file(tmp_path / "scored.jsonl")
    common = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", data, "--divpo_rho", "0.5"]
    common += ["--max_steps", 2, "--eval_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", 0]
    common += ["--wrap_text_as_chat", "true", "--save_strategy", "no", "--pair_selection", "best_vs_worst,divpo"]
    result = run_cli(*common, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rarity pass: 12 rows (48 candidates) on cpu" in result.stderr
    rows = json.loads((tmp_path / "out" / "run_record.json").read_text(encoding="utf-8"))["data"]["rows"]["train"]
    assert rows["pair_selection"] == ["best_vs_worst", "divpo"] and rows["read"] == rows["scored_rows"] == 12
    made = rows["pairs_by_rule"]
    assert made["best_vs_worst"] == 12 and 0 < made["divpo"] <= 12 and rows["kept"] == 12 + made["divpo"]
    card = " ".join((tmp_path / "out" / "README.md").read_text(encoding="utf-8").split())
    assert "`best_vs_worst` (The highest-scored candidate against the lowest): 12" in card
    assert f"most typical one below it): {made['divpo']} pairs" in card


def test_a_resumed_divpo_run_trains_the_pairs_its_run_chose_and_refuses_other_data_in_one_line(tmp_path):
    """The pairs are chosen once, by the model training starts from (not the checkpoint's trained weights, which at
    lr 5e-2 would choose others), and kept in output_dir/pairs/: a run resumed after 2 steps with another
    per_device_eval_batch_size (the pass's batching) trains exactly those, without a pass. Resumed on data with one
    score changed, it says so in one line and trains nothing."""
    data = scored_demo_file(tmp_path / "scored.jsonl")
    common = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", data, "--pair_selection", "divpo"]
    common += ["--eval_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", 0, "--save_steps", 2]
    common += ["--wrap_text_as_chat", "true", "--learning_rate", "5e-2", "--output_dir", tmp_path / "out"]
    first = run_cli(*common, "--max_steps", 2, "--per_device_eval_batch_size", 4)
    assert first.returncode == 0, first.stderr[-3000:]
    record = tmp_path / "out" / "run_record.json"
    before = json.loads(record.read_text(encoding="utf-8"))["data"]["rows"]["train"]["pairs_sha256"]
    kept = [json.loads(line) for line in (tmp_path / "out" / "pairs" / "train.jsonl").open(encoding="utf-8")]
    assert fingerprint(kept) == before
    (tmp_path / "out" / "model.safetensors").unlink()  # a finished model would be refused; the checkpoint stays

    changed = tmp_path / "changed.jsonl"
    rows = [json.loads(line) for line in data.open(encoding="utf-8")]
    rows[5]["all_rm_scores"][2] = 0.95
    changed.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    refused = run_cli(*common, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--dataset_name", changed)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "chose its pairs from other scored rows (the dataset changed)" in refused.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()

    resumed = run_cli(
        *common, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--per_device_eval_batch_size", 1
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rarity pass" not in resumed.stderr and f"training the {len(kept)} pairs chosen" in resumed.stderr
    resumed_record = json.loads(record.read_text(encoding="utf-8"))
    assert resumed_record["data"]["rows"]["train"]["pairs_sha256"] == before
    assert [run["global_step"] for run in resumed_record["earlier"]] == [2]  # the record of the run it continues


def test_the_rarity_pass_runs_on_the_device_training_runs_on(tmp_path, monkeypatch):
    """The pass asks for the training arguments' device (this rank's accelerator), not the device the model sits on
    (the CPU here: a model loaded to host memory, as under ZeRO-3, until the Trainer places it). No GPU exists here:
    the training device is mocked as cuda:0, the model is loaded to the CPU, and the pass stopped where it starts,
    with the device it was given."""
    from transformers import AutoModelForCausalLM

    import train_diversity_simpo
    from diversity_simpo import rarity
    from diversity_simpo_trainer import DiversitySimPOConfig

    class Asked(Exception):
        pass

    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: load(*a, **(k | {"device_map": None})))

    def record(model, tokenizer, rows, device, rows_per_forward):
        raise Asked(device, next(model.parameters()).device, rows_per_forward)

    monkeypatch.setattr(DiversitySimPOConfig, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(rarity, "candidate_logps", record)
    data = scored_demo_file(tmp_path / "scored.jsonl", rows=3)
    argv = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", data, "--pair_selection", "divpo"]
    argv += ["--eval_strategy", "no", "--report_to", "none", "--output_dir", tmp_path / "out", "--use_cpu", "false"]
    argv += ["--wrap_text_as_chat", "true", "--per_device_eval_batch_size", "3"]
    with pytest.raises(Asked) as asked:
        train_diversity_simpo.main(list(map(str, argv)))
    device, loaded_on, rows_per_forward = asked.value.args
    assert device == torch.device("cuda", 0) and loaded_on.type == "cpu" and rows_per_forward == 3


def test_the_rarity_pass_moves_the_model_and_its_inputs_to_the_device_it_is_given():
    """On the `meta` device (no data: the pass cannot finish there), the weights and every input go where asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(DEMO_MODEL), AutoTokenizer.from_pretrained(DEMO_MODEL)
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].device), with_kwargs=True
    )
    rows = [{"prompt": "富士山とは？", "candidates": ["山です。", "わかりません。"]}]
    with pytest.raises((NotImplementedError, RuntimeError)):  # a meta tensor has no values to return
        candidate_logps(model, tokenizer, rows, torch.device("meta"))
    assert next(model.parameters()).device.type == "meta" and seen == [torch.device("meta")]
