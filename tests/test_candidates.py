"""On-policy candidates (generate_candidates.py): prompts rendered as training renders them, replies sampled from the
tempered top-p distribution with draws that depend on the prompt, the reply's index and the seed only, every reply
scored by the reward model, written in whole shards that training reads as is and that a killed run completes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import DEMO_DATA, DEMO_MODEL, ROOT, refusal, two_rank_launcher
from precision import assert_close_at_scale
from test_preference_data import LAYOUTS, assistant, rows_of, settings, tiny_llama3, user, write_rows

from diversity_simpo.candidate_folder import manifest_for, read_manifest
from diversity_simpo.candidates import (
    CandidateArguments,
    CountedSampler,
    conversation,
    generate_candidates,
    prompt_token_ids,
    reply_key,
    uniform,
)
from diversity_simpo.data import DataError, load_preference_data, load_prompts, normalise

DEMO_REWARD = ROOT / "demo" / "tiny-reward-ja"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: 1 process and 2 ranks compute alike


def candidate_args(out, **overrides):
    """Six held-out demo prompts, three replies each, in batches and shards that do not divide them."""
    values = dict(
        model_name_or_path=str(DEMO_MODEL),
        reward_model=str(DEMO_REWARD),
        dataset_name=str(DEMO_DATA),
        dataset_split="test",
        max_prompts=6,
        num_candidates=3,
        temperature=1.3,
        top_p=0.9,
        max_new_tokens=16,
        seed=1,
        batch_size=4,
        score_batch_size=5,
        shard_size=4,
        output_dir=str(out),
        dtype="float32",
        use_cpu=True,
    )
    return CandidateArguments(**{**values, **overrides})


def cli_args(args):
    """The flags of `args`: a list as its values after the flag (none for an empty list), anything else as --k=v."""
    flags = []
    for k, v in vars(args).items():
        if isinstance(v, list):
            flags += [f"--{k}", *map(str, v)] if v else []
        elif v is not None:
            flags.append(f"--{k}={v}")
    return flags


def run_cli(*args, config=None):
    command = [
        sys.executable,
        "generate_candidates.py",
        "--config",
        str(config or ROOT / "configs/demo_candidates.yaml"),
    ]
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def written(folder):
    """The rows of every shard, in shard order, and the shard files' bytes."""
    shards = sorted(Path(folder).glob("*-of-*.jsonl"))
    rows = [json.loads(line) for shard in shards for line in shard.read_text(encoding="utf-8").splitlines()]
    return rows, {shard.name: shard.read_bytes() for shard in shards}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("candidates") / "out"
    one_thread(generate_candidates, candidate_args(out))
    return out


def one_thread(function, *args):
    """As the launched runs compute (ENV): the thread count decides how a sum is split, so the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


# --- sampling --------------------------------------------------------------------------------------------------------


def nucleus_inverse_cdf(logits, temperature, top_p, u):
    """Reference, float64, from the definitions: p = softmax(logits / T); the nucleus is the smallest set of the most
    probable tokens whose mass reaches top_p; q = p renormalised on it; the token is the first, in vocabulary order,
    at which q's cumulative sum exceeds u."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    mass, nucleus = 0.0, set()
    for token in order.tolist():
        nucleus.add(token)
        mass += p[token].item()
        if mass >= top_p:
            break
    q = [p[i].item() if i in nucleus else 0.0 for i in range(len(p))]
    total, running = sum(q), 0.0
    for token, weight in enumerate(q):
        running += weight / total
        if running > u:
            return token
    return max(nucleus)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_each_token_is_the_inverse_cdf_of_the_tempered_nucleus_at_its_counted_draw(temperature, top_p):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 11, generator=generator) * 3
    keys = [reply_key(0, "prompt", j) for j in range(64)]
    width, step = 5, 3
    input_ids = torch.zeros(64, width + step, dtype=torch.long)
    out = CountedSampler(keys, width, temperature, top_p)(input_ids, logits.clone())
    for row in range(64):
        expected = nucleus_inverse_cdf(logits[row], temperature, top_p, uniform(keys[row], step))
        assert out[row, expected] == 0 and torch.isinf(out[row]).sum() == 10, (row, expected, out[row])


def test_the_counted_draws_sample_the_tempered_nucleus_distribution():
    """20000 replies' draws at one position: each token's frequency within 5 standard errors of its probability
    under the nucleus of softmax(logits / T), and tokens outside the nucleus never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, top_p, n = 0.8, 0.9, 20000
    keys = [reply_key(7, "p", j) for j in range(n)]
    out = CountedSampler(keys, 1, temperature, top_p)(torch.zeros(n, 2, dtype=torch.long), logits.expand(n, -1))
    counts = torch.bincount(out.argmax(-1), minlength=6).double()
    p = torch.softmax(logits[0].double() / temperature, -1)
    keep = torch.cumsum(p, 0) - p < top_p  # sorted already: tokens before which the mass is still short of top_p
    q = torch.where(keep, p, 0) / p[keep].sum()
    assert counts[~keep].sum() == 0
    standard_error = (q * (1 - q) / n).sqrt()
    assert ((counts / n - q).abs() <= 5 * standard_error + 1e-12).all(), (counts / n, q)


def test_draws_are_uniform_in_zero_one_and_differ_by_reply_and_position():
    draws = [uniform(reply_key(0, "p", j), t) for j in range(200) for t in range(20)]
    assert all(0 <= u < 1 for u in draws) and len(set(draws)) == len(draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 5 * (1 / 12 / len(draws)) ** 0.5


# --- prompts ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_prompts_training_makes_of_it(tmp_path, layout):
    options = LAYOUTS[layout][1]
    rows = rows_of(layout)
    path = write_rows(tmp_path / "data.jsonl", rows)
    prompts = load_prompts(CandidateArguments(dataset_name=str(path), **options), "train")
    trained = normalise(torch_free_dataset(rows), settings(**options), layout)
    assert [p["prompt"] for p in prompts] == trained["prompt"]


def torch_free_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_scored_candidates_give_the_prompt_training_makes_of_them_not_that_of_their_pair_columns(tmp_path):
    """princeton-nlp's rows also carry chosen/rejected conversations; training reads the candidates (string replies,
    so a string prompt stays text), and so do the prompts."""
    from diversity_simpo.settings import ScriptArguments

    rows = [
        {"prompt": f"質問{i}", "all_generated_responses": ["はい", "いいえ"], "all_rm_scores": [1.0, 0.0],
         "chosen": [user(f"質問{i}"), assistant("はい")], "rejected": [user(f"質問{i}"), assistant("いいえ")]}
        for i in range(3)
    ]  # fmt: skip
    path = write_rows(tmp_path / "scored.jsonl", rows)
    prompts = load_prompts(CandidateArguments(dataset_name=str(path)), "train")
    trained, _ = load_preference_data(ScriptArguments(dataset_name=str(path)), seed=0)
    assert [p["prompt"] for p in prompts] == trained["prompt"] == ["質問0", "質問1", "質問2"]


def test_a_file_of_prompts_alone_is_read_as_text_or_as_chat_as_training_would(tmp_path):
    path = write_rows(
        tmp_path / "prompts.jsonl", [{"prompt": "富士山とは？"}, {"prompt": "桜とは？"}, {"prompt": "富士山とは？"}]
    )
    assert [p["prompt"] for p in load_prompts(CandidateArguments(dataset_name=str(path)), "train")] == [
        "富士山とは？",
        "桜とは？",
    ]  # each prompt once
    system = "あなたは誠実で優秀な日本人のアシスタントです。"
    chat = load_prompts(CandidateArguments(dataset_name=str(path), system_prompt=system), "train")
    assert chat[0]["prompt"] == [{"role": "system", "content": system}, {"role": "user", "content": "富士山とは？"}]


@pytest.mark.parametrize(
    "layout", ["standard", "standard-wrapped-as-chat", "conversational-multi-turn-system", "sharegpt"]
)
def test_a_prompt_is_tokenised_exactly_as_trls_cpo_trainer_tokenises_it(tmp_path, layout, llama3_tokenizer):
    from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer

    options = LAYOUTS[layout][1]
    normalised = normalise(torch_free_dataset(rows_of(layout, 4)), settings(**options), layout)
    trainer = DiversitySimPOTrainer(
        model=tiny_llama3(len(llama3_tokenizer)),
        processing_class=llama3_tokenizer,
        train_dataset=normalised,
        args=DiversitySimPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=512),
    )
    for row, source in zip(trainer.train_dataset, normalised, strict=True):
        assert prompt_token_ids(llama3_tokenizer, source["prompt"]) == row["prompt_input_ids"]


# --- the run ---------------------------------------------------------------------------------------------------------


def test_replies_depend_on_the_prompt_and_the_seed_not_on_the_batch_or_the_shard(tmp_path, reference_run):
    rows, _ = written(reference_run)
    generate_candidates(candidate_args(tmp_path / "one", batch_size=1, score_batch_size=1, shard_size=1))
    one_by_one, _ = written(tmp_path / "one")
    assert [r["prompt"] for r in one_by_one] == [r["prompt"] for r in rows]
    assert [r["all_generated_responses"] for r in one_by_one] == [r["all_generated_responses"] for r in rows]
    for a, b in zip(one_by_one, rows, strict=True):  # other padding, other rounding of the reward model's sums
        for x, y in zip(a["all_rm_scores"], b["all_rm_scores"], strict=True):
            assert_close_at_scale(x, y, abs(y), "reward")
    generate_candidates(candidate_args(tmp_path / "reseeded", seed=2))
    reseeded, _ = written(tmp_path / "reseeded")
    assert [r["all_generated_responses"] for r in reseeded] != [r["all_generated_responses"] for r in rows]


def test_the_output_is_princeton_nlps_layout_with_every_reply_scored_by_the_reward_model(reference_run):
    """Each score is the reward model's logit on that conversation alone, in its chat template (unpadded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows, shards = written(reference_run)
    assert list(shards) == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]  # the split training reads
    assert len(rows) == 6 and all(len(r["all_generated_responses"]) == len(r["all_rm_scores"]) == 3 for r in rows)
    layout = {"prompt", "reference", "all_generated_responses", "all_rm_scores", "all_cut", "all_mean_logps",
              "given_pairs"}  # fmt: skip
    assert all(set(r) == layout for r in rows)
    model = AutoModelForSequenceClassification.from_pretrained(DEMO_REWARD).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_REWARD)
    for row in rows:
        for reply, written_score in zip(row["all_generated_responses"], row["all_rm_scores"], strict=True):
            messages = [*row["prompt"], {"role": "assistant", "content": reply}]
            assert messages == conversation(row["prompt"], reply)
            ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, 0].item()
            assert_close_at_scale(written_score, expected, abs(expected), "reward")
    replies = [reply for row in rows for reply in row["all_generated_responses"]]
    assert len(set(replies)) > len(rows)  # sampled, not one reply per prompt


def test_prompts_sampled_from_preference_pairs_keep_their_own_pairs_for_the_given_rule(reference_run):
    """The demo's held-out pairs: each row keeps, as reply texts, every pair the data holds for its prompt, in file
    order (the `given` pair rule trains them); the manifest's fingerprint covers them."""
    rows = [json.loads(line) for line in (DEMO_DATA / "test.jsonl").open(encoding="utf-8")]
    own = {}
    for row in rows:
        own.setdefault(json.dumps(row["prompt"], ensure_ascii=False), []).append(
            {"chosen": row["chosen"][-1]["content"], "rejected": row["rejected"][-1]["content"]}
        )
    sampled = written(reference_run)[0]
    assert len(sampled) == 6
    for row in sampled:
        assert row["given_pairs"] == own[json.dumps(row["prompt"], ensure_ascii=False)]
    prompts = [{k: row[k] for k in ("prompt", "given_pairs")} for row in sampled]
    without = [p | {"given_pairs": []} for p in prompts]
    fingerprint = read_manifest(reference_run)["prompts_sha256"]
    assert manifest_for({}, prompts, 4)["prompts_sha256"] == fingerprint
    assert manifest_for({}, without, 4)["prompts_sha256"] != fingerprint


def test_a_prompt_of_several_pairs_is_sampled_once_and_keeps_each_pair(tmp_path):
    rows = [{"prompt": "春は？", "chosen": "暖かい", "rejected": "寒い"},
            {"prompt": "夏は？", "chosen": "暑い", "rejected": "冬"},
            {"prompt": "春は？", "chosen": "桜", "rejected": "雪"}]  # fmt: skip
    prompts = load_prompts(CandidateArguments(dataset_name=str(write_rows(tmp_path / "pairs.jsonl", rows))), "train")
    assert [p["given_pairs"] for p in prompts] == [
        [{"chosen": "暖かい", "rejected": "寒い"}, {"chosen": "桜", "rejected": "雪"}],
        [{"chosen": "暑い", "rejected": "冬"}],
    ]


def test_each_reply_is_marked_cut_exactly_when_it_did_not_end_within_max_new_tokens(reference_run, tmp_path):
    """The draws are counted, so the same seed with a longer limit samples the same replies further: a reply marked
    uncut at 16 tokens is the whole reply again at 64, and one marked cut is a strict prefix of a longer one."""
    longer = tmp_path / "longer"
    one_thread(generate_candidates, candidate_args(longer, max_new_tokens=64))
    short, long = written(reference_run)[0], written(longer)[0]
    marks = [m for row in short for m in row["all_cut"]]
    assert any(marks) and not all(marks)  # both kinds occur, so both halves of the rule are tested
    for row, again in zip(short, long, strict=True):
        for reply, cut, whole in zip(row["all_generated_responses"], row["all_cut"], again["all_generated_responses"],
                                     strict=True):  # fmt: skip
            if cut:
                assert whole.startswith(reply) and len(whole) > len(reply), (reply, whole)
            else:
                assert whole == reply


def test_each_reply_carries_its_mean_log_probability_under_the_model_that_sampled_it(reference_run):
    """all_mean_logps: each reply's mean token log-probability, tokenised as training tokenises it as a chosen reply,
    against the rarity of that reply computed alone in float64 (the rarity itself is pinned to TRL's tokenisation in
    tests/test_pair_selection.py); training from the same model reads these instead of running a pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diversity_simpo.rarity import candidate_logps, tokenised_candidates

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    rows, _ = written(reference_run)
    for row in rows:
        for reply, stored in zip(row["all_generated_responses"], row["all_mean_logps"], strict=True):
            alone = {"prompt": row["prompt"], "candidates": [[{"role": "assistant", "content": reply}]]}
            (expected,) = candidate_logps(model, tokenizer, [alone], torch.device("cpu"))[0]
            with torch.no_grad():  # the logits' size: what a float32 log-softmax of them is rounded at (precision.py)
                scale = model(torch.tensor([tokenised_candidates(tokenizer, alone)[0][0]])).logits.abs().max()
            assert_close_at_scale(stored, expected, scale, f"rarity of {reply!r}")


REWARD_FUNCTIONS = """
def mentions_reference(prompts, completions, reference, **columns):
    return [float(ref in c[0]["content"]) - len(c[0]["content"]) / 1000 for c, ref in zip(completions, reference)]

def broken_import_is_below():
    pass

def one_number(prompts, completions, **columns):
    return 1.0

def not_finite(prompts, completions, **columns):
    return [float("nan")] * len(completions)

def raises(prompts, completions, **columns):
    raise KeyError("answer")
"""


def test_reward_functions_score_beside_the_reward_model_with_their_weights(tmp_path, reference_run):
    """A verifiable reward (the reply names the prompt's reference, less a length penalty), called as TRL calls
    reward functions, weighted with the reward model's score: each written score is 0.5 x the reward model's plus
    2 x the function's, on the same replies; with the function alone, its reward."""
    (tmp_path / "rewards.py").write_text(REWARD_FUNCTIONS, encoding="utf-8")
    function = f"{tmp_path / 'rewards.py'}:mentions_reference"
    both, alone = tmp_path / "both", tmp_path / "alone"
    one_thread(generate_candidates, candidate_args(both, reward_funcs=[function], reward_weights=[0.5, 2.0]))
    one_thread(generate_candidates, candidate_args(alone, reward_funcs=[function], reward_model=None))
    for ours, theirs, solo in zip(written(both)[0], written(reference_run)[0], written(alone)[0], strict=True):
        assert ours["all_generated_responses"] == theirs["all_generated_responses"] == solo["all_generated_responses"]
        for reply, score, model_score, function_score in zip(
            ours["all_generated_responses"], ours["all_rm_scores"], theirs["all_rm_scores"], solo["all_rm_scores"],
            strict=True,
        ):  # fmt: skip
            expected = float(ours["reference"] in reply) - len(reply) / 1000
            assert function_score == expected
            assert score == pytest.approx(0.5 * model_score + 2 * expected, rel=1e-12, abs=1e-12)
    assert any(s > 0 for row in written(alone)[0] for s in row["all_rm_scores"])  # some replies name the reference


def test_a_reward_model_among_the_reward_functions_scores_as_reward_model_does(tmp_path, reference_run):
    """reward_funcs takes reward models too (a Hub id or folder, as TRL's GRPOTrainer does): the demo reward model
    there, with reward_model unset, writes the scores it writes as reward_model; both at once, weighted 1 and -0.5,
    half of them."""
    alone, both = tmp_path / "alone", tmp_path / "both"
    one_thread(generate_candidates, candidate_args(alone, reward_model=None, reward_funcs=[str(DEMO_REWARD)]))
    one_thread(generate_candidates, candidate_args(both, reward_funcs=[str(DEMO_REWARD)], reward_weights=[1.0, -0.5]))
    for ours, halves, theirs in zip(written(alone)[0], written(both)[0], written(reference_run)[0], strict=True):
        assert ours["all_rm_scores"] == theirs["all_rm_scores"]
        assert halves["all_rm_scores"] == pytest.approx([0.5 * s for s in theirs["all_rm_scores"]], rel=1e-12)


def test_the_implicit_reward_is_a_replys_log_probability_under_the_policy_less_the_references(tmp_path, reference_run):
    """implicit_reward_reference (DICE's implicit reward in SimPO's form): the demo model samples and a copy of it with
    perturbed weights is the reference. Weighted 3 beside the reward model's 1, each written score is the reward
    model's (the reference run's, on the same draws) plus 3 x (the reply's stored mean log-probability under the
    policy less its mean log-probability under the reference, that computed alone in float64). On rows that hold
    their replies already, nothing sampled them: one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diversity_simpo.candidates import check_locations
    from diversity_simpo.rarity import candidate_logps, tokenised_candidates
    from diversity_simpo.settings import ConfigError

    reference, tokenizer = tmp_path / "reference", AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    out = tmp_path / "implicit"
    args = candidate_args(out, implicit_reward_reference=str(reference), reward_weights=[1, 3])
    one_thread(generate_candidates, args)
    model = model.double().eval()
    differences = []
    for ours, theirs in zip(written(out)[0], written(reference_run)[0], strict=True):
        assert ours["all_generated_responses"] == theirs["all_generated_responses"]  # the same draws
        columns = ("all_generated_responses", "all_rm_scores", "all_mean_logps")
        for reply, score, policy, model_score in zip(*(ours[c] for c in columns), theirs["all_rm_scores"], strict=True):
            alone = {"prompt": ours["prompt"], "candidates": [[{"role": "assistant", "content": reply}]]}
            (expected,) = candidate_logps(model, tokenizer, [alone], torch.device("cpu"))[0]
            with torch.no_grad():  # the logits' size: what a float32 log-softmax of them is rounded at (precision.py)
                scale = model(torch.tensor([tokenised_candidates(tokenizer, alone)[0][0]])).logits.abs().max()
            assert_close_at_scale(policy - (score - model_score) / 3, expected, scale, f"reference of {reply!r}")
            differences.append(policy - expected)
    assert max(map(abs, differences)) > 0.01  # the two models differ: the reference, not the policy, was subtracted
    with pytest.raises(ConfigError, match=r"^implicit_reward_reference scores the replies that model_name_or_path"):
        check_locations(candidate_args(tmp_path / "scored", implicit_reward_reference=str(reference)), sampling=False)


# --- replies sampled elsewhere: scored only ---------------------------------------------------------------------------


def replies_sampled_elsewhere(path):
    """princeton-nlp's layout without scores, as vLLM on another cluster writes it: string replies, and one row whose
    replies are whole conversations that begin with its own prompt; two rows share a prompt (both are kept)."""
    rows = [json.loads(line) for line in (DEMO_DATA / "test.jsonl").read_text(encoding="utf-8").splitlines()[:5]]
    written_rows = []
    for row in [*rows, rows[0]]:
        question, reply = row["prompt"][0]["content"], row["chosen"][0]["content"]
        written_rows.append({"prompt": question, "all_generated_responses": [reply, reply[::-1], "わかりません。"]})
    question = written_rows[2]["prompt"]
    written_rows[2]["all_generated_responses"] = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": r}]
        for r in written_rows[2]["all_generated_responses"]
    ]
    write_rows(path, written_rows)
    return written_rows


def test_replies_sampled_elsewhere_are_scored_as_they_are_in_the_same_layout_and_shards(tmp_path):
    """No policy model is needed; every row keeps its replies (as text) and gets the reward model's score of each,
    against one unbatched pass per reply; training reads the output."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = replies_sampled_elsewhere(tmp_path / "sampled.jsonl")
    args = candidate_args(tmp_path / "out", dataset_name=str(tmp_path / "sampled.jsonl"), dataset_split="train",
                          model_name_or_path=None, wrap_text_as_chat=True, shard_size=4)  # fmt: skip
    one_thread(generate_candidates, args)
    rows, shards = written(tmp_path / "out")
    assert list(shards) == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"] and len(rows) == 6
    model = AutoModelForSequenceClassification.from_pretrained(DEMO_REWARD).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_REWARD)
    for row, given in zip(rows, source, strict=True):
        texts = [r if isinstance(r, str) else r[-1]["content"] for r in given["all_generated_responses"]]
        assert (
            row["prompt"] == [{"role": "user", "content": given["prompt"]}] and row["all_generated_responses"] == texts
        )
        for reply, written_score in zip(texts, row["all_rm_scores"], strict=True):
            messages = conversation(row["prompt"], reply)
            ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, 0].item()
            assert_close_at_scale(written_score, expected, abs(expected), "reward")
    train, _ = load_preference_data(SimpleNamespace(**{**vars(settings()), "dataset_name": str(tmp_path / "out"),
        "dataset_train_split": "train", "dataset_test_split": "test", "dataset_test_fraction": 0,
        "dataset_config": None, "candidate_score": "overall_score"}), seed=0)  # fmt: skip
    assert len(train) == 6 and all(len(row["candidates"]) == 3 for row in train)

    (tmp_path / "out" / "train-00001-of-00002.jsonl").unlink()  # a killed run: the same command writes the rest
    one_thread(generate_candidates, args)
    assert written(tmp_path / "out")[1] == shards


def test_a_reply_that_answers_another_prompt_is_one_line_with_nothing_written(tmp_path):
    rows = replies_sampled_elsewhere(tmp_path / "sampled.jsonl")
    rows[2]["all_generated_responses"][1][0]["content"] = "別の質問です。"
    write_rows(tmp_path / "sampled.jsonl", rows)
    result = run_cli("--dataset_name", tmp_path / "sampled.jsonl", "--output_dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "row 2: reply 1 is a conversation whose turns before the reply are not the row's " \
        "prompt" in errors[0], result.stderr[-2000:]  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_reward_model_without_a_pad_token_scores_each_reply_where_it_reads_it_alone(tmp_path):
    """Without pad_token_id it reads its score at the last token; given the end-of-turn token as pad (the tokenizer's
    fallback) it would read the one before: the written scores are those of each conversation alone."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "no-pad"
    shutil.copytree(DEMO_REWARD, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    del config["pad_token_id"]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    del tokenizer_config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    fast = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    fast["padding"] = None  # no pad token anywhere: the tokenizer falls back to its end-of-turn token
    (folder / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False), encoding="utf-8")
    one_thread(generate_candidates, candidate_args(tmp_path / "out", reward_model=str(folder), max_prompts=2))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for row in written(tmp_path / "out")[0]:
        for reply, written_score in zip(row["all_generated_responses"], row["all_rm_scores"], strict=True):
            ids = tokenizer.apply_chat_template(
                conversation(row["prompt"], reply), return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                expected = model(**ids).logits[0, 0].item()
            assert_close_at_scale(written_score, expected, abs(expected), "reward")


def test_training_from_the_sampling_model_reads_the_stored_rarity_and_chooses_what_a_pass_would(
    reference_run, tmp_path
):
    """Trained from the model that sampled them (the same model_name_or_path as in the folder's manifest), the rules
    read the stored log-probabilities, with no pass; named by another path, the model may be another one, and the
    pass runs (a copy of it elsewhere): both choose the same DivPO pairs (at rho 0.9, where rarity decides the chosen
    reply). Each run keeps its pairs in output_dir/pairs/."""
    common = ["--config", ROOT / "configs" / "demo.yaml", "--dataset_name", reference_run, "--max_steps", 1]
    common += ["--pair_selection", "divpo", "--divpo_rho", 0.9, "--eval_strategy", "no", "--report_to", "none"]
    common += ["--diversity_eval_prompts", 0, "--save_strategy", "no", "--dataset_test_fraction", 0]
    common += ["--allow_cut_replies", "true"]  # more good replies to choose from: the rarest is not always the best
    runs, copy = {}, shutil.copytree(DEMO_MODEL, tmp_path / "copy")
    for name, model in (("stored", DEMO_MODEL), ("pass", copy)):
        command = [sys.executable, "train_diversity_simpo.py", *map(str, common)]
        command += ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / name)]
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("rarity pass:" in result.stderr) == (name == "pass"), result.stderr[-3000:]
        record = json.loads((tmp_path / name / "run_record.json").read_text(encoding="utf-8"))
        runs[name] = record["data"]["rows"]["train"]
        kept = [json.loads(line) for line in (tmp_path / name / "pairs" / "train.jsonl").open(encoding="utf-8")]
        assert len(kept) == runs[name]["kept"]
    assert runs["stored"]["pairs_sha256"] == runs["pass"]["pairs_sha256"]
    best = {json.dumps(r["prompt"]): max(zip(r["all_rm_scores"], r["all_generated_responses"], strict=True))[1]
            for r in written(reference_run)[0]}  # fmt: skip
    assert any(p["chosen"][0]["content"] != best[json.dumps(p["prompt"])] for p in kept)  # rarity decided some pairs


def test_training_with_the_given_rule_trains_each_prompts_own_pair_beside_the_scorers_choice(reference_run, tmp_path):
    """`[given, rarest_vs_given]` (the on-policy recipe) on candidates sampled from the demo's pairs: every row's own
    pair is trained as the data gave it, every other pair sets a candidate against one of the row's own rejected
    replies, and the model card and run record count each rule's pairs."""
    command = [sys.executable, "train_diversity_simpo.py", "--config", ROOT / "configs" / "demo.yaml"]
    command += ["--dataset_name", reference_run, "--max_steps", 1, "--eval_strategy", "no", "--report_to", "none"]
    command += ["--diversity_eval_prompts", 0, "--save_strategy", "no", "--dataset_test_fraction", 0]
    command += ["--pair_selection", "[given, rarest_vs_given]", "--output_dir", tmp_path / "out"]
    result = subprocess.run([*map(str, command)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [json.loads(line) for line in (tmp_path / "out" / "pairs" / "train.jsonl").open(encoding="utf-8")]
    trained = {(json.dumps(p["prompt"]), p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in kept}
    own = {
        (json.dumps(r["prompt"]), g["chosen"], g["rejected"])
        for r in written(reference_run)[0]
        for g in r["given_pairs"]
    }
    assert own <= trained and len(own) == 6
    rejected = {(prompt, no) for prompt, _, no in own}
    candidates = {(json.dumps(r["prompt"]), reply) for r in written(reference_run)[0] for reply in r[
        "all_generated_responses"]}  # fmt: skip
    assert all((p, yes) in candidates and (p, no) in rejected for p, yes, no in trained - own) and trained - own
    made = json.loads((tmp_path / "out" / "run_record.json").read_text())["data"]["rows"]["train"]["pairs_by_rule"]
    assert made["given"] == 6 and made["rarest_vs_given"] == len(kept) - 6
    assert "`given` (the prompt's own pair): 6" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_training_reads_the_output_as_is_and_refuses_it_while_a_shard_is_missing(reference_run, tmp_path):
    from types import SimpleNamespace

    from diversity_simpo.settings import ScriptArguments

    args = ScriptArguments(dataset_name=str(reference_run))
    train, _ = load_preference_data(args, seed=0)
    rows, _ = written(reference_run)
    by_prompt = {json.dumps(r["prompt"], ensure_ascii=False): r for r in rows}
    for scored in train:  # every written reply and its score, in order, as conversations of the prompt
        row = by_prompt[json.dumps(scored["prompt"], ensure_ascii=False)]
        assert [c[0]["content"] for c in scored["candidates"]] == row["all_generated_responses"]
        assert scored["scores"] == row["all_rm_scores"]
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("candidates.yaml", "train-00000-of-00002.jsonl"):
        (partial / name).write_bytes((reference_run / name).read_bytes())
    with pytest.raises(DataError, match=r"unfinished generate_candidates.py run \(1 of 2 shards written\)"):
        load_preference_data(SimpleNamespace(**{**vars(args), "dataset_name": str(partial)}), seed=0)


def test_a_run_killed_at_any_moment_resumes_to_the_output_of_an_uninterrupted_one(tmp_path):
    """A real SIGKILL once two of eight shards are written; the same command again writes the rest, and the folder is
    byte for byte an uninterrupted run's: no prompt lost or written twice, no half-written file left."""
    args = candidate_args(tmp_path / "killed", max_prompts=24, shard_size=3, batch_size=3, max_new_tokens=48)
    command = [sys.executable, "generate_candidates.py", *cli_args(args)]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "killed").glob("*-of-*.jsonl"))) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no shard written in 5 minutes"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((tmp_path / "killed").glob("*-of-*.jsonl")))
    assert 2 <= done < 8, f"{done} of 8 shards written when killed: the run must be cut short"
    resumed = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} of 8 shards already written; sampling the other {8 - done}" in resumed.stderr + resumed.stdout
    generate_candidates(
        candidate_args(tmp_path / "whole", max_prompts=24, shard_size=3, batch_size=3, max_new_tokens=48)
    )
    assert_same_candidates(tmp_path / "killed", tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )
    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


def test_overwrite_deletes_exactly_the_files_of_the_run_it_replaces(tmp_path, reference_run):
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(reference_run, folder)
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    (folder / ".train-00001-of-00002.jsonl.4242.tmp").write_text("{", encoding="utf-8")  # a killed run's leftover
    one_thread(generate_candidates, candidate_args(folder, max_prompts=2, overwrite=True))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["candidates.yaml", "notes.txt", "train-00000-of-00001.jsonl"], names
    assert len(written(folder)[0]) == 2
    empty_but_a_leftover = tmp_path / "fresh"
    empty_but_a_leftover.mkdir()
    (empty_but_a_leftover / ".candidates.yaml.4242.tmp").write_text("sett", encoding="utf-8")  # killed at its 1st write
    one_thread(generate_candidates, candidate_args(empty_but_a_leftover, max_prompts=2))
    assert sorted(p.name for p in empty_but_a_leftover.iterdir()) == ["candidates.yaml", "train-00000-of-00001.jsonl"]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_two_ranks_write_the_candidates_and_scores_of_one_process(tmp_path, reference_run, launcher):
    """Shards 0 and 1 are sampled by ranks 0 and 1; the folder holds what the one-process run writes."""
    launch = two_rank_launcher(launcher)
    args = cli_args(candidate_args(tmp_path / "ranks"))
    result = subprocess.run(
        [*map(str, launch), "generate_candidates.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=600, start_new_session=True,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for rank in (0, 1):  # each shard sampled once, by its own rank
        assert f"rank {rank}: sampled 1 of the 2 shards to write" in result.stdout + result.stderr
    assert_same_candidates(tmp_path / "ranks", reference_run)
    ours, theirs = manifest(tmp_path / "ranks"), manifest(reference_run)
    assert ours.pop("folder") == str((tmp_path / "ranks").resolve()) and theirs.pop("folder") == str(reference_run)
    assert ours == theirs  # and nothing else differs: where a folder was written is all that depends on its place


def manifest(folder):
    return yaml.safe_load((Path(folder) / "candidates.yaml").read_text(encoding="utf-8"))


def assert_same_candidates(folder, reference):
    """The same shards, prompts and replies; scores to float32 rounding (a sum's last bit can depend on where a
    process's buffers sit in memory, even with one thread)."""
    (rows, shards), (expected, expected_shards) = written(folder), written(reference)
    assert list(shards) == list(expected_shards)
    assert [(r["prompt"], r["all_generated_responses"]) for r in rows] == [
        (r["prompt"], r["all_generated_responses"]) for r in expected
    ]
    for row, other in zip(rows, expected, strict=True):
        for x, y in zip(row["all_rm_scores"], other["all_rm_scores"], strict=True):
            assert_close_at_scale(x, y, abs(y), "reward")


# --- mistakes: one line, exit 2, nothing written -------------------------------------------------------------------


def custom_reward_model(folder, objectives):
    """A reward model with its own code (trust_remote_code), shaped like ArmoRM: `rewards` per objective and their
    mean as `score`; saved with transformers' own auto-class registration and the demo's tokenizer."""
    import importlib.util
    import shutil

    code = folder.parent / "tiny_score_code"
    code.mkdir(exist_ok=True)
    (code / "modeling_tiny_score.py").write_text(
        """import torch
from dataclasses import dataclass
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class TinyScoreConfig(PreTrainedConfig):
    model_type = "tiny_score"

    def __init__(self, vocab_size=2048, hidden_size=8, objectives=3, **kwargs):
        self.vocab_size, self.hidden_size, self.objectives = vocab_size, hidden_size, objectives
        super().__init__(**kwargs)


@dataclass
class ScoreOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class TinyScoreModel(PreTrainedModel):
    config_class = TinyScoreConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.heads = torch.nn.Linear(config.hidden_size, config.objectives)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (self.embed(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        rewards = self.heads(pooled)
        return ScoreOutput(score=rewards.mean(-1, keepdim=True), rewards=rewards)
""",
        encoding="utf-8",
    )
    spec = importlib.util.spec_from_file_location("modeling_tiny_score", code / "modeling_tiny_score.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # transformers copies the class's source file beside the weights
    spec.loader.exec_module(module)
    module.TinyScoreConfig.register_for_auto_class()
    module.TinyScoreModel.register_for_auto_class("AutoModelForSequenceClassification")
    torch.manual_seed(0)
    module.TinyScoreModel(module.TinyScoreConfig(objectives=objectives)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_REWARD / name, folder / name)
    return folder


def test_a_reward_model_with_its_own_code_is_read_through_its_score_output(tmp_path, reference_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = custom_reward_model(tmp_path / "armo-like", objectives=3)
    args = candidate_args(tmp_path / "out", reward_model=str(folder), trust_remote_code=True, max_prompts=2)
    result = subprocess.run(
        [sys.executable, "generate_candidates.py", *cli_args(args)], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows, _ = written(tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for row in rows:
        for reply, written_score in zip(row["all_generated_responses"], row["all_rm_scores"], strict=True):
            ids = tokenizer.apply_chat_template(
                conversation(row["prompt"], reply), return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                output = model(**ids)
            expected = output.rewards.double().mean().item()  # the mean of the objectives, from the model's parts
            assert_close_at_scale(written_score, expected, output.rewards.abs().sum(), "score")
    assert [r["all_generated_responses"] for r in rows] == [
        r["all_generated_responses"] for r in written(reference_run)[0][:2]
    ]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, reference_run):
    """Folders and files that are wrong in one way each."""
    import shutil

    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("mistakes")
    no_template = root / "no-template"
    shutil.copytree(DEMO_MODEL, no_template)
    (no_template / "chat_template.jinja").unlink()
    three_labels = root / "three-labels"
    torch.manual_seed(0)
    LlamaForSequenceClassification(
        LlamaConfig(vocab_size=2048, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_labels=3, pad_token_id=1)
    ).save_pretrained(three_labels)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_REWARD / name, three_labels / name)
    write_rows(root / "texts.jsonl", [{"text": "富士山とは？"}])
    (root / "rewards.py").write_text(REWARD_FUNCTIONS, encoding="utf-8")
    (root / "broken.py").write_text("import no_such_module_here\n", encoding="utf-8")
    (root / "empty.jsonl").write_text("", encoding="utf-8")
    (root / "typo.yaml").write_text(
        (ROOT / "configs/demo_candidates.yaml")
        .read_text(encoding="utf-8")
        .replace("num_candidates:", "num_candidate:"),
        encoding="utf-8",
    )
    system_refused = root / "system-refused"
    shutil.copytree(DEMO_REWARD, system_refused)
    template = (DEMO_REWARD / "chat_template.jinja").read_text(encoding="utf-8")
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (system_refused / "chat_template.jinja").write_text(refuse + template, encoding="utf-8")  # as Gemma's templates
    (root / "other-files").mkdir()
    (root / "other-files" / "notes.txt").write_text("mine", encoding="utf-8")
    return root, reference_run


MISTAKES = {
    "causal LM as reward model": (["--reward_model", "demo/tiny-llama-ja"], "has no trained classification head"),
    "model folder missing": (
        ["--model_name_or_path", "./no-such-model"],
        "./no-such-model not found; check model_name_or_path",
    ),
    "reward folder missing": (["--reward_model", "./no-such-rm"], "./no-such-rm not found; check reward_model"),
    "scorer not trained yet": (  # a Hub id in form, but its owner is a folder here: the path of a scorer to train
        ["--reward_model", "demo/no-such-scorer"],
        "model folder demo/no-such-scorer not found; check reward_model (train one on your pairs: python "
        "train_reward_model.py)",
    ),
    "file without prompts": (["--dataset_name", "{root}/texts.jsonl"], "and no prompts: give a prompt"),
    "empty prompt file": (["--dataset_name", "{root}/empty.jsonl"], "is empty"),
    "one candidate": (["--num_candidates", "1"], "num_candidates=1 is out of range: it must be an integer >= 2"),
    "no chat template": (["--model_name_or_path", "{root}/no-template"], "has no chat template"),
    "reward model with three labels": (["--reward_model", "{root}/three-labels"], "outputs 3 logits, not one score"),
    "typo in a key": (["--config", "{root}/typo.yaml"], "unknown key 'num_candidate'; did you mean 'num_candidates'?"),
    "output of other settings": (
        ["--output_dir", "{run}", "--temperature", "0.5", "--dataset_split", "test", "--max_prompts", "6"],
        "holds candidates made with",
    ),
    "output_dir with other files": (["--output_dir", "{root}/other-files"], "not candidates of this tool"),
    "reward function file missing": (["--reward_funcs", "{root}/nothing.py:f"], "file {root}/nothing.py not found"),
    "reward function that fails to import": (
        ["--reward_funcs", "{root}/broken.py:f"],
        "importing {root}/broken.py failed: ModuleNotFoundError: No module named 'no_such_module_here'",
    ),
    "reward function not defined": (["--reward_funcs", "{root}/rewards.py:missing"], "defines no function 'missing'"),
    "reward function without a function": (["--reward_funcs", "rewards.py"], "must be path/to/file.py:function_name"),
    "reward model in reward_funcs missing": (
        ["--reward_funcs", "./no-such-rm"],
        "./no-such-rm not found; check reward_f",
    ),
    "reward function returns a number": (["--reward_funcs", "{root}/rewards.py:one_number"], "returned float for 1"),
    "reward function returns NaN": (
        ["--reward_funcs", "{root}/rewards.py:not_finite"],
        "returned nan for completion 0",
    ),
    "reward function raises": (["--reward_funcs", "{root}/rewards.py:raises"], "raised KeyError: 'answer'"),
    "reward weights of other length": (
        ["--reward_funcs", "{root}/rewards.py:one_number", "--reward_weights", "1.0"],
        "reward_weights has 1 weights for 2 scorers",
    ),
    "overwrite over other files": (
        ["--output_dir", "{root}/other-files", "--overwrite", "true"],
        "not candidates of this tool; choose a new or empty output_dir",
    ),
    "reward template refuses a system turn": (
        ["--reward_model", "{root}/system-refused", "--system_prompt", "あなたは誠実なアシスタントです。"],
        "the chat template of reward_model {root}/system-refused rejects prompt 0 with its reply",
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_with_nothing_written(tmp_path, mistakes, case):
    from generate_candidates import main

    root, run = mistakes
    flags, message = MISTAKES[case]
    flags, message = [f.format(root=root, run=run) for f in flags], message.format(root=root)
    before = snapshot(root, run)
    config = ROOT / "configs" / "demo_candidates.yaml"
    if "--config" in flags:
        config, flags = flags[1], flags[2:]
    out = ["--output_dir", tmp_path / "out"] if "--output_dir" not in flags else []
    refused = refusal(main, "--config", config, *out, *flags)
    assert message in refused, refused
    assert not (tmp_path / "out").exists()
    assert snapshot(root, run) == before


def snapshot(*folders):
    """Every path under the folders, and each file's bytes and modification time (a folder's own time changes when
    the write check's probe comes and goes)."""
    paths = [p for folder in folders for p in folder.rglob("*")]
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None for p in paths}


def test_a_folder_of_a_version_that_decided_by_other_settings_is_refused_naming_the_setting(tmp_path):
    """A manifest written with a setting this version no longer has (or without one it has) differs in that setting:
    one line names it, whichever side lacks it."""
    from diversity_simpo import candidate_folder
    from diversity_simpo.settings import ConfigError

    ours = candidate_folder.manifest_for({"seed": 1, "temperature": 0.8}, [{"prompt": "p"}], 4)
    for theirs, named in (({"seed": 1, "temperature": 0.8, "old": True}, "old=True, not '(unset)'"),
                          ({"seed": 1}, "temperature='(unset)', not 0.8")):  # fmt: skip
        folder = tmp_path / named.split("=")[0]
        candidate_folder.start_folder(folder, ours | {"settings": theirs}, overwrite=False)
        with pytest.raises(ConfigError, match=re.escape(f"holds candidates made with {named}")):
            candidate_folder.shards_to_write(folder, ours, overwrite=False)
