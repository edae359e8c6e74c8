"""Scored candidates as data (`pair_selection`): the public layouts load, best_vs_worst and DivPO choose the pairs an
independent reference chooses, every odd row has a rule, and a DivPO run records its rule and its pairs."""

import itertools
import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import DEMO_MODEL, ROOT
from datasets import Dataset

from diversity_simpo.data import DataError, normalise
from diversity_simpo.pair_selection import best_vs_worst, candidate_logps, divpo

# --- the rules, against references written from their definitions ------------------------------------------------


def test_hand_made_candidates_get_the_pairs_worked_out_by_hand():
    """scores 0.9 0.5 0.85 0.1 0.3, mean log-probs -1.0 -0.2 -2.0 -0.5 -0.3. best_vs_worst: 0.9 against 0.1. DivPO at
    rho 0.3: the bar is 0.9 - 0.3 * 0.8 = 0.66, so 0.9 and 0.85 are good enough; the rarer (-2.0) is chosen; of the
    three below the bar the most typical (-0.2) is rejected. At rho 0 only 0.9 is good enough."""
    scores, logps, texts = [0.9, 0.5, 0.85, 0.1, 0.3], [-1.0, -0.2, -2.0, -0.5, -0.3], list("abcde")
    assert best_vs_worst(scores, texts) == (0, 3)
    assert divpo(scores, logps, 0.3, texts) == (2, 1)
    assert divpo(scores, logps, 0.0, texts) == (0, 1)
    assert divpo(scores, logps, 0.99, texts) == (2, 3)  # all but 0.1 good enough; only 0.1 below the bar


def divpo_reference(scores, logps, rho, texts):
    """DivPO from its definition, by enumerating every (chosen, rejected) pair allowed and ranking them."""
    bar = max(scores) - rho * (max(scores) - min(scores))
    allowed = [
        (c, r)
        for c, r in itertools.permutations(range(len(scores)), 2)
        if scores[c] >= bar and scores[r] < bar and texts[c] != texts[r]
    ]
    rarest = min((logps[c], c) for c, _ in allowed) if allowed else None
    if rarest is None:
        return None
    chosen = rarest[1]
    rejected = [r for c, r in allowed if c == chosen]
    return (chosen, min(rejected, key=lambda r: (-logps[r], r))) if rejected else None


def test_divpo_equals_the_reference_on_random_rows_with_ties_and_repeated_replies():
    generator = random.Random(0)
    for _ in range(500):
        n = generator.randint(2, 7)
        scores = [generator.choice([0.0, 0.5, 1.0, 2.0, generator.random()]) for _ in range(n)]
        logps = [generator.choice([-1.0, -generator.random() * 3]) for _ in range(n)]
        texts = [generator.choice("abcd") for _ in range(n)]  # the same reply sampled twice is common
        rho = generator.choice([0.0, 0.1, 0.3, 0.5, 0.9])
        expected = divpo_reference(scores, logps, rho, texts)
        assert divpo(scores, logps, rho, texts) == expected, (scores, logps, rho, texts)


# --- the public layouts, from rows written as their dataset cards show --------------------------------------------


def args(**overrides):
    fields = dict(dataset_columns=None, system_prompt=None, wrap_text_as_chat=False, pair_selection="best_vs_worst")
    return SimpleNamespace(**(fields | {"divpo_rho": 0.3, "candidate_score": "overall_score"} | overrides))


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
    pairs = normalise(Dataset.from_list([princeton_row()]), args(), "data", counts)
    assert pairs[0]["prompt"] == "富士山について教えて"
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("日本一の山です。", "わかりません。")
    assert counts["pair_selection"] == "best_vs_worst" and counts["kept"] == 1 and "princeton" in counts["layout"]


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
    pairs = normalise(Dataset.from_list([ultrafeedback_row()]), args(candidate_score=score), "data", counts)
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
    pairs = normalise(Dataset.from_list([row]), args(dataset_columns=mapping), "data")
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
    pairs = normalise(Dataset.from_list(rows), args(), "data", counts)
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


# --- DivPO with a real model ---------------------------------------------------------------------------------------


def test_candidate_log_probabilities_are_the_models_mean_over_the_reply_tokens():
    """Against a direct computation: the chat template's whole conversation through the model, the reply's tokens
    (and the end-of-turn token) averaged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompt = [{"role": "user", "content": "富士山について教えてください。"}]
    replies = [
        [{"role": "assistant", "content": "富士山は日本で最も高い山です。"}],
        [{"role": "assistant", "content": "わかりません。"}],
    ]
    (ours,) = candidate_logps(model, tokenizer, [{"prompt": prompt, "candidates": replies}])
    for reply, value in zip(replies, ours, strict=True):
        start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        ids = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        targets = torch.tensor(ids[1:])
        expected = logp[torch.arange(len(targets)), targets][start - 1 :].mean().item()
        assert value == pytest.approx(expected, abs=1e-5)  # float32 log-softmax means: ~1e-6 of their size


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


def run_cli(*args):
    command = [sys.executable, str(ROOT / "train_diversity_simpo.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_divpo_run_trains_and_records_its_rule_its_pair_count_and_its_pairs(tmp_path):
    data = scored_demo_file(tmp_path / "scored.jsonl")
    common = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", data, "--pair_selection", "divpo"]
    common += ["--max_steps", 2, "--eval_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", 0]
    common += ["--wrap_text_as_chat", "true", "--save_strategy", "no"]
    result = run_cli(*common, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "run_record.json").read_text(encoding="utf-8"))["data"]["rows"]["train"]
    assert rows["pair_selection"] == "divpo" and rows["kept"] == 12 and rows["read"] == 12
    assert len(rows["pairs_sha256"]) == 64
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "divpo" in card


def test_a_resumed_divpo_run_trains_on_the_pairs_of_the_run_it_resumes(tmp_path):
    """The pairs are chosen by the model training starts from (model_name_or_path), not by the checkpoint's trained
    weights: a run resumed after 2 steps records the same pairs (their fingerprint) as the run it continues (at lr
    5e-2 the trained weights would choose other pairs)."""
    data = scored_demo_file(tmp_path / "scored.jsonl")
    common = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", data, "--pair_selection", "divpo"]
    common += ["--eval_strategy", "no", "--report_to", "none", "--diversity_eval_prompts", 0, "--save_steps", 2]
    common += ["--wrap_text_as_chat", "true", "--learning_rate", "5e-2", "--output_dir", tmp_path / "out"]
    first = run_cli(*common, "--max_steps", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    record = tmp_path / "out" / "run_record.json"
    before = json.loads(record.read_text(encoding="utf-8"))["data"]["rows"]["train"]["pairs_sha256"]
    (tmp_path / "out" / "model.safetensors").unlink()  # a finished model would be refused; the checkpoint stays
    resumed = run_cli(*common, "--max_steps", 4, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(record.read_text(encoding="utf-8"))["data"]["rows"]["train"]["pairs_sha256"] == before
