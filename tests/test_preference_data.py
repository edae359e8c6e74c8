"""Every common preference layout, as public sets lay it out, reaches TRL in one shape and trains through the CLI.

Rows are built from the demo's Japanese pairs in the layout of a real public set each (see LAYOUTS). The tests check
the normalised rows, TRL's tokenisation with the real Llama-3 tokenizer and chat template (one BOS, labels exactly the
final reply plus <|eot_id|>, system prompt and earlier turns in the prompt), and a short training run through the
real CLI from each file format.
"""

import gzip
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_DATA, ROOT, refusal
from test_cli import run_cli, write_yaml

from diversity_simpo.data import DataError, load_preference_data, normalise
from train_diversity_simpo import main

SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"  # ELYZA's model card's default system prompt


def demo_pairs(count=12):
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows[:count]]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


FIRST = ("こんにちは。", "こんにちは。何でも聞いてください。")  # an earlier exchange, for multi-turn layouts


def standard(q, a, b, i):  # cyberagent/chatbot-arena-ja-calm2-7b-chat-experimental
    return {"prompt": q, "chosen": a, "rejected": b}


def magpie_judged(q, a, b, i):  # Aratako/magpie-sft-v1.0-dpo-judged: many extra string columns
    extra = {"judge": "chosen", "raw_judge_prompt": "比較してください", "raw_judge_output": "Aが良い"}
    return {"id": f"m{i}", "prompt": q, "chosen": a, "rejected": b, **extra, "chosen_model": "x", "rejected_model": "y"}


def iterative_dpo(q, a, b, i):  # Aratako/iterative-dpo-data-for-ORPO-iter3: string prompt, multi-turn conversations
    context = [{"role": "system", "content": SYSTEM}, user(FIRST[0]), assistant(FIRST[1]), user(q)]
    return {
        "id": i,
        "prompt": q,
        "chosen": [*context, assistant(a)],
        "rejected": [*context, assistant(b)],
        "chosen_score": 8.5,
        "rejected_score": 3.0,
        "metadata": {"source": "demo", "turns": 2, "tags": ["ja"]},
    }


def ultrafeedback(q, a, b, i):  # HuggingFaceH4/ultrafeedback_binarized: implicit prompt, plus prompt and messages
    chosen = [user(q), assistant(a)]
    return {
        "prompt": q,
        "prompt_id": f"{i:064x}",
        "chosen": chosen,
        "rejected": [user(q), assistant(b)],
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 5.0 if i % 3 else None,
    }


def nectar(q, a, b, i):  # Columbia-NLP/DPO-Nectar: like UltraFeedback, with nested metadata
    row = ultrafeedback(q, a, b, i)
    return {**row, "prompt": f"\n\nHuman: {q}\n\nAssistant:", "other_info": {"source": "demo", "ranks": [1, 4]}}


def hh(q, a, b, i):  # Anthropic/hh-rlhf: transcripts; both replies start with the same character
    context = f"\n\nHuman: {FIRST[0]}\n\nAssistant: {FIRST[1]}\n\nHuman: {q}"
    return {"chosen": f"{context}\n\nAssistant: 青{a}", "rejected": f"{context}\n\nAssistant: 青{b}"}


def sharegpt(q, a, b, i):  # llm-jp/hh-rlhf-12k-ja: ShareGPT prompt, string replies
    turns = [{"from": "human", "value": FIRST[0]}, {"from": "gpt", "value": FIRST[1]}, {"from": "human", "value": q}]
    return {"conversations": turns, "chosen": a, "rejected": b}


def sharegpt_dict_replies(q, a, b, i):  # LLaMA-Factory's sharegpt preference format (hiyouga/DPO-En-Zh-20k)
    turns = [{"from": "system", "value": SYSTEM}, {"from": "human", "value": q}]
    return {"conversations": turns, "chosen": {"from": "gpt", "value": a}, "rejected": {"from": "gpt", "value": b}}


def orca_distilabel(q, a, b, i):  # argilla/distilabel-intel-orca-dpo-pairs: prompt under `input`, a system column
    return {
        "system": SYSTEM if i % 2 else "",
        "input": q,
        "chosen": a,
        "rejected": b,
        "generations": [a, b],
        "status": "tie" if i % 5 == 0 else "unchanged",
        "chosen_score": 9.0,
        "labelling_prompt": [{"role": "system", "content": "judge"}, user(q)],
        "rationale": None,
    }


def orca_pairs(q, a, b, i):  # Intel/orca_dpo_pairs: prompt under `question`
    return {"system": SYSTEM, "question": q, "chosen": a, "rejected": b}


# (make a row, settings, what the normalised prompt of pair (q, a, b) must be, reply prefix)
LAYOUTS = {
    "standard": (standard, {}, lambda q: q, ""),
    "standard-wrapped-as-chat": (standard, {"wrap_text_as_chat": True}, lambda q: [user(q)], ""),
    "magpie-extra-columns": (magpie_judged, {"wrap_text_as_chat": True}, lambda q: [user(q)], ""),
    "conversational-multi-turn-system": (
        iterative_dpo,
        {},
        lambda q: [{"role": "system", "content": SYSTEM}, user(FIRST[0]), assistant(FIRST[1]), user(q)],
        "",
    ),
    "ultrafeedback": (ultrafeedback, {}, lambda q: [user(q)], ""),
    "nectar": (nectar, {}, lambda q: [user(q)], ""),
    "anthropic-hh": (hh, {}, lambda q: [user(FIRST[0]), assistant(FIRST[1]), user(q)], "青"),
    "sharegpt": (sharegpt, {}, lambda q: [user(FIRST[0]), assistant(FIRST[1]), user(q)], ""),
    "sharegpt-dict-replies": (
        sharegpt_dict_replies,
        {},
        lambda q: [{"role": "system", "content": SYSTEM}, user(q)],
        "",
    ),
    "orca-mapped-columns": (orca_distilabel, {"dataset_columns": {"prompt": "input"}}, None, ""),
    "orca-pairs-question": (
        orca_pairs,
        {"dataset_columns": {"prompt": "question"}},
        lambda q: [{"role": "system", "content": SYSTEM}, user(q)],
        "",
    ),
}


def settings(**overrides):
    base = {"dataset_columns": None, "system_prompt": None, "wrap_text_as_chat": False}
    return SimpleNamespace(**{**base, **overrides})


def rows_of(layout, count=12):
    make = LAYOUTS[layout][0]
    return [make(q, a, b, i) for i, (q, a, b) in enumerate(demo_pairs(count))]


def dataset_of(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_becomes_prompt_chosen_rejected_with_the_reply_alone(layout):
    _, options, expected_prompt, prefix = LAYOUTS[layout]
    normalised = normalise(dataset_of(rows_of(layout)), settings(**options), layout)
    assert normalised.column_names == ["prompt", "chosen", "rejected", "row_id"]
    for row, (q, a, b) in zip(normalised, demo_pairs(), strict=True):
        if expected_prompt is None:  # orca: the system column is empty in every other row
            system = [{"role": "system", "content": SYSTEM}] if row["row_id"] % 2 else []
            assert row["prompt"] == [*system, user(q)]
        else:
            assert row["prompt"] == expected_prompt(q)
        if isinstance(row["prompt"], str):
            assert (row["chosen"], row["rejected"]) == (a, b)
        else:
            assert (row["chosen"], row["rejected"]) == ([assistant(prefix + a)], [assistant(prefix + b)])


def test_system_prompt_is_added_where_a_prompt_has_none_and_turns_text_rows_into_chat():
    normalised = normalise(dataset_of(rows_of("standard", 2)), settings(system_prompt=SYSTEM), "s")
    assert normalised[0]["prompt"][0] == {"role": "system", "content": SYSTEM}
    conversational = normalise(
        dataset_of(rows_of("conversational-multi-turn-system", 2)), settings(system_prompt="x"), "c"
    )
    assert conversational[0]["prompt"][0]["content"] == SYSTEM  # its own system turn stays


def test_hh_pairs_that_differ_before_the_last_reply_are_skipped_with_a_count(capsys):
    rows = rows_of("anthropic-hh", 4)
    rows[1] = {**rows[1], "rejected": rows[1]["rejected"].replace(FIRST[1], "別の返事です。")}
    normalised = normalise(dataset_of(rows), settings(), "hh")
    assert len(normalised) == 3 and normalised["row_id"] == [0, 2, 3]
    assert "skipped 1 of 4 rows whose conversations differ before the reply" in capsys.readouterr().err


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "q", "chosen": [user("q")], "rejected": [user("q"), assistant("b")]},
            "'chosen' has no assistant reply",
        ),
        ({"prompt": "q", "chosen": 42, "rejected": "b"}, "'chosen' is a number (42), not text"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen' is empty (null)"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "'rejected' is empty"),
        ({"prompt": 3.5, "chosen": "a", "rejected": "b"}, "'prompt' is a number (3.5), not text"),
        (
            {"conversations": [{"from": "robot", "value": "q"}], "chosen": "a", "rejected": "b"},
            "unknown speaker 'robot'",
        ),
        ({"chosen": "a", "rejected": "b"}, "there is no prompt column"),
        ({"model_a": "x", "model_b": "y", "winner": "model_a", "conversation_a": [user("q")]}, "not preference pairs"),
        ({"messages": [user("q")], "response1": "a", "response2": "b", "preference": 1.0}, "not preference pairs"),
    ],
    ids=[
        "no-assistant-reply",
        "number",
        "null",
        "blank",
        "number-prompt",
        "unknown-role",
        "no-prompt",
        "ranking",
        "scored",
    ],
)
def test_rows_that_cannot_be_pairs_are_refused_in_one_line_naming_the_row(row, message):
    with pytest.raises(DataError) as error:
        normalise(dataset_of([row]), settings(), "data.jsonl")
    assert message in str(error.value) and "\n" not in str(error.value)
    if "not preference pairs" in message:
        assert "Accepted layouts" in str(error.value) and "columns [" in str(error.value)


# --- TRL's tokenisation of every layout, with the real Llama-3 tokenizer and chat template ------------------------


def tiny_llama3(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "standard"])
def test_trl_tokenises_every_chat_layout_with_one_bos_and_labels_exactly_the_final_reply(
    tmp_path, layout, llama3_tokenizer
):
    from diversity_simpo_trainer import DiversitySimPOConfig, DiversitySimPOTrainer

    options = LAYOUTS[layout][1]
    normalised = normalise(dataset_of(rows_of(layout, 4)), settings(**options), layout)
    trainer = DiversitySimPOTrainer(
        model=tiny_llama3(len(llama3_tokenizer)),
        processing_class=llama3_tokenizer,
        train_dataset=normalised,
        args=DiversitySimPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=512),
    )
    bos, tok = llama3_tokenizer.bos_token_id, llama3_tokenizer
    for row, source in zip(trainer.train_dataset, normalised, strict=True):
        for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            assert row[key][0] == bos and row[key].count(bos) == 1, key
        prompt_text = tok.decode(row["prompt_input_ids"])
        assert prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        for turn in source["prompt"]:  # system prompt and earlier turns are prompt, in order
            assert f"<|start_header_id|>{turn['role']}<|end_header_id|>\n\n{turn['content'].strip()}" in prompt_text
        for side in ("chosen", "rejected"):
            labels = [t for t in row[f"{side}_labels"] if t != -100]
            assert tok.decode(labels) == source[side][0]["content"].strip() + "<|eot_id|>", side


# --- the real CLI on each layout, from each file format ------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_model_dir(tmp_path_factory, llama3_tokenizer):
    path = tmp_path_factory.mktemp("llama3") / "model"
    tiny_llama3(len(llama3_tokenizer)).save_pretrained(path)
    llama3_tokenizer.save_pretrained(path)
    return path


def write_rows(path, rows):
    """jsonl, jsonl.gz, json (an array), parquet or csv, by the path's suffix."""
    import pandas as pd

    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.name.endswith(".json"):
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else path.open("w", encoding="utf-8") as f:
            f.write(text)
    return path


# (layout, where the data goes: a file name, or a folder of split files)
FORMATS = [
    ("standard", "arena.csv"),
    ("magpie-extra-columns", "magpie.jsonl"),
    ("conversational-multi-turn-system", "iter3/"),
    ("ultrafeedback", "ultrafeedback.parquet"),
    ("nectar", "nectar.json"),
    ("anthropic-hh", "hh.jsonl.gz"),
    ("sharegpt", "hh-rlhf-12k-ja.json"),
    ("sharegpt-dict-replies", "llama-factory.jsonl"),
    ("orca-mapped-columns", "orca.parquet"),
]


@pytest.mark.parametrize("layout, where", FORMATS, ids=[f"{layout}-{where}" for layout, where in FORMATS])
def test_each_layout_trains_through_the_cli_with_finite_diversity_metrics(tmp_path, layout, where, llama3_model_dir):
    rows = rows_of(layout, 12)
    if where.endswith("/"):  # a folder of split files: train.jsonl and test.jsonl
        data = tmp_path / where
        data.mkdir()
        write_rows(data / "train.jsonl", rows[:10])
        write_rows(data / "test.jsonl", rows[10:])
    else:
        data = write_rows(tmp_path / where, rows)
    fields = {"dataset_name": str(data), "model_name_or_path": str(llama3_model_dir), **LAYOUTS[layout][1]}
    if not where.endswith("/"):
        fields["dataset_test_fraction"] = 0.2
    if layout == "ultrafeedback":
        fields["dataset_train_split"] = "train_prefs"  # its splits are train_prefs / test_prefs
    config = write_yaml(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), **fields)
    short = ["--max_steps", 2, "--eval_steps", 2, "--save_strategy", "no", "--logging_steps", 1]
    result = run_cli("--config", config, *short, "--per_device_train_batch_size", 2, "--diversity_eval_prompts", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "diversity/kl" in e]
    assert logged and all(torch.isfinite(torch.tensor(e["diversity/kl"])) for e in logged)
    assert any("eval_rewards/accuracies" in e for e in history)


def test_a_json_line_that_does_not_parse_is_named_with_file_and_line(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows_of("standard", 5)]
    lines[3] = lines[3][:-5]  # cut short
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    refused = refusal(
        main, "--config", write_yaml(tmp_path / "c.yaml", dataset_name=str(data), output_dir=str(tmp_path / "o"))
    )
    assert "pairs.jsonl, line 4: not valid JSON" in refused, refused
    assert not (tmp_path / "o").exists()


def load_file(path):
    args = settings(dataset_name=str(path), dataset_config=None, dataset_train_split="train")
    return load_preference_data(SimpleNamespace(**vars(args), dataset_test_split="test", dataset_test_fraction=0), 0)


def test_a_pretty_printed_json_file_of_rows_loads_like_json_lines(tmp_path):
    rows = rows_of("standard", 5)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    train, _ = load_file(data)
    assert train["chosen"] == [r["chosen"] for r in rows]


@pytest.mark.parametrize(
    "document, message",
    [
        # what pandas' to_json() and hand-written exports give: datasets would read the whole file as one row
        ({"prompt": ["q1", "q2"], "chosen": ["a1", "a2"], "rejected": ["b1", "b2"]}, "is one JSON object"),
        ({"version": 1, "data": [{"prompt": "q", "chosen": "a", "rejected": "b"}]}, "is one JSON object"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}, None], "it has null in its list"),
        ([["q", "a", "b"]], "it has a list in its list"),
        ([], "is an empty list"),
    ],
    ids=["columns-object", "object-with-data-field", "null-row", "rows-as-arrays", "empty-list"],
)
def test_a_json_document_that_is_not_a_list_of_rows_is_refused_naming_the_file(tmp_path, document, message):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(document, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=message) as refusal:
        load_file(data)
    assert str(data) in str(refusal.value)


def test_a_broken_pretty_printed_json_file_is_named_with_its_line(tmp_path):
    text = json.dumps(rows_of("standard", 3), ensure_ascii=False, indent=2).splitlines()
    del text[5]  # a line of the second row's object
    data = tmp_path / "pairs.json"
    data.write_text("\n".join(text), encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.json: invalid JSON at line \d+, column \d+"):
        load_file(data)


def test_a_folder_of_non_data_json_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    """`dataset_name: configs` (the config folder, not the data): its DeepSpeed JSON is no dataset."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ds_config.json").write_text(json.dumps({"bf16": {"enabled": "auto"}}, indent=2), "utf-8")
    config = write_yaml(tmp_path / "c.yaml", dataset_name=str(tmp_path / "configs"), output_dir=str(tmp_path / "o"))
    refused = refusal(main, "--config", config)
    assert "ds_config.json is one JSON object (keys ['bf16'])" in refused, refused
    assert not (tmp_path / "o").exists()


def test_a_ranking_dataset_is_refused_naming_its_columns_and_the_layouts(tmp_path):
    rows = [{"model_a": "a", "model_b": "b", "winner": "model_a", "conversation_a": [user("q")]}] * 3
    data = write_rows(tmp_path / "arena.jsonl", rows)
    config = write_yaml(tmp_path / "c.yaml", dataset_name=str(data), output_dir=str(tmp_path / "o"))
    refused = refusal(main, "--config", config, "--eval_strategy", "no")
    assert "columns ['conversation_a', 'model_a', 'model_b', 'winner']" in refused, refused
    assert "Accepted layouts" in refused, refused


def test_cli_module_imports_stay_light():
    """The data checks run before torch-heavy work: importing the data module does not import torch or TRL."""
    code = "import sys, diversity_simpo.data; print('torch' in sys.modules, 'trl' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".jsonl.gz"])
def test_a_utf8_file_with_a_byte_order_mark_loads_like_one_without(tmp_path, suffix):
    """Notepad and Excel ("CSV UTF-8") start UTF-8 files with a byte-order mark; it is skipped, not refused."""
    import pandas as pd

    rows = rows_of("standard", 5)
    if suffix == ".csv":
        text = pd.DataFrame(rows).to_csv(index=False)
    elif suffix == ".json":
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    for path, encoding in ((plain, "utf-8"), (marked, "utf-8-sig")):
        data = text.encode(encoding)
        path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf" or suffix.endswith(".gz")
    train, _ = load_file(marked)
    assert train.column_names == load_file(plain)[0].column_names  # "prompt", not "\ufeffprompt"
    assert train["chosen"] == load_file(plain)[0]["chosen"] == [r["chosen"] for r in rows]


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz"])
def test_a_compressed_file_loads_the_rows_of_the_plain_one(tmp_path, compress):
    """gzip, bzip2 and xz, as `datasets` reads them; each file's text is checked (UTF-8, JSON lines) decompressed."""
    import bz2
    import lzma

    rows = rows_of("standard", 5)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path = tmp_path / f"pairs.jsonl.{compress}"
    path.write_bytes({"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compress](text))
    train, _ = load_file(path)
    assert train["chosen"] == [r["chosen"] for r in rows]
    broken = tmp_path / f"broken.jsonl.{compress}"
    broken.write_bytes({"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compress](b'{"prompt": 1,\n'))
    with pytest.raises(DataError, match=rf"broken.jsonl.{compress}: invalid JSON at line 2"):
        load_file(broken)


def test_a_zstd_file_without_the_zstandard_package_is_one_line_naming_the_fix(tmp_path):
    import importlib.util

    if importlib.util.find_spec("zstandard") is not None:
        pytest.skip("zstandard is installed here: the file is read")
    path = tmp_path / "pairs.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")  # zstd's magic number
    with pytest.raises(DataError, match=r"zstd-compressed, which needs the zstandard package: pip install zstandard"):
        load_file(path)


@pytest.mark.parametrize(
    "encoding, named, iconv",
    [("cp932", "Shift_JIS (cp932)", "iconv -f CP932 -t UTF-8"), ("euc_jp", "EUC-JP", "iconv -f EUC-JP -t UTF-8")],
)
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_japanese_file_not_in_utf8_is_refused_naming_its_encoding_and_the_fix(
    tmp_path, encoding, named, iconv, suffix
):
    """Excel on Japanese Windows saves CSV in Shift_JIS: the one line says so and how to convert the file."""
    import pandas as pd

    rows = rows_of("standard", 5)
    data = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        text = pd.DataFrame(rows).to_csv(index=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data.write_bytes(text.encode(encoding))
    refused = refusal(
        main, "--config", write_yaml(tmp_path / "c.yaml", dataset_name=str(data), output_dir=str(tmp_path / "o"))
    )
    for phrase in (f"dataset file {data} is not UTF-8 text", f"it looks like {named}", f"{iconv} {data}"):
        assert phrase in refused, refused
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("separator", ["\t", ";"])
def test_a_csv_written_with_another_separator_is_named_as_such(tmp_path, separator):
    """Excel in many locales writes ';', and a TSV is easily saved as .csv: one glued column, said in one line."""
    import pandas as pd

    data = tmp_path / "pairs.csv"
    pd.DataFrame(rows_of("standard", 5)).to_csv(data, index=False, sep=separator)
    with pytest.raises(DataError) as refusal:
        load_file(data)
    assert f"separated by {separator!r}, not commas" in str(refusal.value)
