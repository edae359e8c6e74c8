"""The demo's assets: the builder is deterministic, the committed data is what it writes, and the demo starts
undecided (the point of the demo: SimPO has something to learn)."""

import filecmp
import json
import subprocess
import sys

import pytest
from conftest import DEMO_DATA, DEMO_MODEL, ROOT


def build(out, epochs=1):
    command = [sys.executable, str(ROOT / "demo" / "build_demo_assets.py"), "--out", str(out), "--epochs", str(epochs),
               "--reward-epochs", "1"]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


def test_the_builder_is_deterministic_and_writes_the_committed_data_tokenizer_and_config(tmp_path):
    first, second = build(tmp_path / "a"), build(tmp_path / "b")  # one warm-up epoch: determinism, not quality
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    expected = {
        "data/train.jsonl",
        "data/test.jsonl",
        "tiny-llama-ja/model.safetensors",
        "tiny-reward-ja/model.safetensors",
    }
    assert expected <= {str(p) for p in files}
    for path in files:
        assert filecmp.cmp(first / path, second / path, shallow=False), f"{path} differs between two builds"
    # Everything but the weights (which depend on the warm-up epochs) is what the demo ships: the data, the tokenizer
    # (its vocabulary, merges, chat template) and the model's config
    for path in files:
        if path.name != "model.safetensors":
            assert (first / path).read_bytes() == (ROOT / "demo" / path).read_bytes(), f"{path} differs from demo/"


def test_the_builder_balances_whatever_preference_its_warm_up_leaves(tmp_path, monkeypatch):
    """The builder's last step (`balance`) hands SimPO an undecided model. Its warm-up is replaced here by one on the
    chosen replies alone, which leaves a model that prefers them by far (on 18 training pairs, to keep it short); the
    model the builder writes must prefer them much less (with 1 real warm-up epoch the model starts undecided, so
    the determinism test above cannot see whether balancing runs)."""
    sys.path.insert(0, str(ROOT / "demo"))
    import build_demo_assets as builder

    splits = builder.preference_pairs()
    small = {"train": splits["train"][::12], "test": splits["test"][::12]}
    warmed = {}

    def warm_up_on_chosen(model, tokenizer, pairs, epochs):
        model = real_warm_up(model, tokenizer, [p | {"rejected": p["chosen"]} for p in pairs], epochs=3)
        warmed["preference"] = builder.preference(model, tokenizer, small["train"])
        return model

    real_warm_up = builder.warm_up
    monkeypatch.setattr(builder, "preference_pairs", lambda: small)
    monkeypatch.setattr(builder, "warm_up", warm_up_on_chosen)
    monkeypatch.setattr(
        sys, "argv", ["build_demo_assets.py", "--out", str(tmp_path), "--epochs", "1", "--reward-epochs", "1"]
    )
    builder.main()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama-ja").eval()
    accuracy, margin = builder.preference(
        built, AutoTokenizer.from_pretrained(tmp_path / "tiny-llama-ja"), small["train"]
    )
    (warm_accuracy, warm_margin) = warmed["preference"]
    assert warm_accuracy > 0.62 and warm_margin > 1.0, warmed  # the stand-in warm-up did leave a strong preference
    assert (accuracy <= 0.62 and margin < 0.35) or margin < warm_margin - 1.0, (warmed, accuracy, margin)


def test_eval_topics_are_held_out_and_every_pair_has_a_plausible_rejected_reply_and_a_reference():
    rows = {}
    for split in ("train", "test"):
        rows[split] = [json.loads(line) for line in (DEMO_DATA / f"{split}.jsonl").read_text("utf-8").splitlines()]
    facts = {split: {row["reference"] for row in rows[split]} for split in rows}  # one reference fact per topic
    assert not facts["train"] & facts["test"] and len(facts["test"]) == 9
    assert (len(rows["train"]), len(rows["test"])) == (216, 54)
    for row in rows["train"] + rows["test"]:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["reference"] in chosen and row["reference"] not in rejected
        assert len(rejected) >= 15  # fluent sentences, not "わかりません。"


def test_the_demo_reward_model_scores_the_chosen_reply_above_the_rejected_one_on_every_held_out_pair():
    """What the on-policy demo needs of its reward model: it tells a reply that states the topic's fact from a hedge,
    a wrong fact or another topic, also on the 9 topics it never trained on (the test split, which
    train_reward_model.py holds out; measured: all 54, margin 3.2 at least and 8.4 on average)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = ROOT / "demo" / "tiny-reward-ja"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (DEMO_DATA / "test.jsonl").read_text("utf-8").splitlines()]
    for row in rows:
        rewards = []
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[side], return_tensors="pt", return_dict=True)
            with torch.no_grad():
                rewards.append(model(**ids).logits[0, 0].item())
        assert rewards[0] > rewards[1] + 1, (row["prompt"], rewards)


def test_every_token_of_the_demo_tokenizer_is_whole_characters_so_no_sample_can_break_one():
    """A byte-level vocabulary lets a small model sample half of a three-byte Japanese character (the reply then shows
    U+FFFD). Here each token decodes alone to complete text, and the demo's whole alphabet is in the vocabulary, so
    no text of the demo falls back to <unk>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        assert text and "\ufffd" not in text, (token_id, text)
    rows = [json.loads(line) for split in ("train", "test") for line in (DEMO_DATA / f"{split}.jsonl").open("rb")]
    texts = [m["content"] for row in rows for key in ("prompt", "chosen", "rejected") for m in row[key]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


@pytest.fixture(scope="module")
def before_training(tmp_path_factory):
    from test_cli import DEMO_CONFIG, run_cli

    out = tmp_path_factory.mktemp("before")
    result = run_cli("--config", DEMO_CONFIG, "--eval_only", "true", "--output_dir", out, "--report_to", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "eval_results.json").read_text(encoding="utf-8"))


def test_the_demo_model_starts_undecided_on_held_out_prompts(before_training):
    """Measured: accuracy 0.607, margin 0.19. Undecided is near chance on both sides: neither reply preferred by
    more than simpo_gamma (0.7), so the SimPO loss is far from saturated and there is something to learn."""
    assert 0.35 <= before_training["eval_rewards/accuracies"] <= 0.65
    assert -0.7 < before_training["eval_rewards/margins"] < 0.7


def test_the_demo_configuration_learns_the_held_out_preference(tmp_path, before_training):
    """The demo's own settings (40 steps, evaluations at 20 and 40) on held-out topics: from the undecided start to
    at least 0.9 accuracy, with the margin past simpo_gamma, and no SimPO health warning on the way. Measured: 0.875
    and 0.54 at step 20, 0.929 and 0.78 at 40. Then the trained model answers a prompt in readable Japanese about
    its topic (what `make demo` prints)."""
    from test_cli import DEMO_CONFIG, run_cli

    result = run_cli("--config", DEMO_CONFIG, "--output_dir", tmp_path, "--report_to", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SimPO health" not in result.stderr  # the shipped settings show none of the failure signatures
    history = json.loads((tmp_path / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    evals = [e for e in history if "eval_rewards/accuracies" in e]
    assert [e["step"] for e in evals] == [20, 40]
    final = evals[-1]
    assert 0.9 <= final["eval_rewards/accuracies"] <= 1.0
    assert final["eval_rewards/accuracies"] >= before_training["eval_rewards/accuracies"] + 0.25
    assert 0.7 < final["eval_rewards/margins"] < 20  # past simpo_gamma, and not a runaway scale
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0]
    # What `make demo` prints: a reply that reads, about the prompt's topic
    sys.path.insert(0, str(ROOT / "demo"))
    from generate import generate

    prompts = {"富士山": "富士山について教えてください。", "温泉": "温泉について知っておくべきことは何ですか？"}
    for topic, prompt in prompts.items():
        reply = generate(tmp_path, prompt)
        assert topic in reply and "\ufffd" not in reply and reply.count("。") >= 1, reply
