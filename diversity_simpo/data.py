"""Preference data in the layouts public sets use, checked and normalised to one shape before TRL sees it.

Every row becomes `{"prompt", "chosen", "rejected", "row_id"}`: three strings (the standard layout, kept as is), or a
prompt conversation (a list of `{"role", "content"}`, system turn first) with one assistant message each for chosen and
rejected. TRL then applies the chat template to the prompt and appends each reply, so the labels are exactly the
final assistant reply and earlier turns are prompt. `row_id` is the row's index in its split (errors name it).

Layouts (docs/data.md has an example row of each):
    standard        prompt, chosen, rejected: strings
    conversational  chosen, rejected: conversations ending in the assistant's reply; the prompt is their shared
                    leading turns, or the `prompt` column (a string or a conversation) when they hold the reply alone
    hh              chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic HH); no prompt
    sharegpt        conversations: [{"from": "human" | "gpt" | "system", "value"}]; chosen, rejected: strings, or
                    one {"from", "value"} each
`dataset_columns` renames columns first ({prompt: input, system: system}, say); a `system` column or `system_prompt`
gives prompts without a system turn one; a system turn, `system_prompt` or `wrap_text_as_chat` turns string rows into
conversations. An optional `reference` column (a string a good reply contains) is kept for the diversity eval's
`reference_rate`. Other columns (ids, scores, metadata, a `messages` column) are dropped.
"""

import bz2
import gzip
import importlib.util
import json
import lzma
import math
import re
import sys
from pathlib import Path

from diversity_simpo.candidate_folder import missing_shards
from diversity_simpo.rows import as_chat, empty_reply, is_score, one_kind, with_system
from diversity_simpo.settings import DEMO_HINT, ULTRAFEEDBACK_ASPECTS, first_line

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MAPPABLE = ("prompt", "system", "chosen", "rejected", "conversations", "reference", "all_generated_responses",
            "all_rm_scores", "completions")  # fmt: skip
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
LAYOUTS = (
    "prompt/chosen/rejected strings; chosen/rejected conversations ({role, content} lists, with or without a "
    "prompt); chosen/rejected Anthropic-HH transcripts; ShareGPT conversations ({from, value}) with chosen/rejected; "
    "scored candidates: prompt, all_generated_responses and all_rm_scores lists (princeton-nlp), or UltraFeedback's "
    "instruction and completions"
)


class DataError(ValueError):
    """A mistake in the user's data or data settings: reported in one line, without a traceback."""


def load_preference_data(args, seed, counts=None):
    """(train, eval or None), normalised and checked, from `args` (the CLI's ScriptArguments). `counts`, a dict if
    given, receives each split's rows read, kept and skipped (for the run record)."""
    dataset = _read(args, args.dataset_train_split)
    if args.dataset_train_split not in dataset:
        raise DataError(
            f"dataset {args.dataset_name!r} has no split {args.dataset_train_split!r}; it has {list(dataset)}: "
            "set dataset_train_split"
        )
    train = dataset[args.dataset_train_split]
    if args.dataset_test_split in dataset:
        evaluation = dataset[args.dataset_test_split]
    elif args.dataset_test_fraction > 0:
        if len(train) < 2:
            raise DataError(f"dataset {args.dataset_name!r} has {len(train)} row(s): too few to hold out an eval split")
        split = train.train_test_split(test_size=args.dataset_test_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = None
    counts = {} if counts is None else counts
    train = normalise(train, args, f"{args.dataset_name} [{args.dataset_train_split}]", counts.setdefault("train", {}))
    if evaluation is not None:
        evaluation = normalise(evaluation, args, f"{args.dataset_name} [eval]", counts.setdefault("eval", {}))
    return train, evaluation


def load_prompts(args, split, counts=None):
    """The prompts of `split` ({"prompt", "reference"?} per row, in file order, each prompt once) exactly as training
    will render them: a row's prompt is what `normalise` makes of it (a system turn from a `system` column or
    `system_prompt`, chat or plain text as the row's replies or `wrap_text_as_chat` decide), read from any layout
    training reads, or from a file of prompts alone (a `prompt` or `instruction` column: strings or conversations).
    Replies to score (princeton-nlp's `all_generated_responses` without `all_rm_scores`): every row, with "replies",
    their texts (a reply given as a conversation must begin with the row's own prompt). Preference pairs: with
    "given_pairs", the prompt's own pairs as reply texts ({chosen, rejected}, every row of that prompt), for the
    `given` pair rule. `counts` receives the rows read and the repeated prompts left out."""
    dataset = _read(args, split)
    if split not in dataset:
        raise DataError(
            f"dataset {args.dataset_name!r} has no split {split!r}; it has {list(dataset)}: set dataset_split"
        )
    source = f"{args.dataset_name} [{split}]"
    dataset = dataset[split]
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows, so no prompts")
    dataset = _rename(dataset, args.dataset_columns, source)
    columns = set(dataset.column_names)
    prompt_key = next((k for k in ("prompt", "instruction") if k in columns), None)
    scored = bool({"all_generated_responses", "completions"} & columns)  # as `normalise`: candidates before pairs
    pairs = not scored and ({"chosen", "rejected"} <= columns or "conversations" in columns)
    if prompt_key is None and not pairs:
        raise DataError(
            f"{source} has columns {sorted(columns)} and no prompts: give a prompt (or instruction) column, or "
            f"preference data in one of the layouts training reads ({LAYOUTS}); map other names with dataset_columns"
        )
    to_score = "all_generated_responses" in columns and "all_rm_scores" not in columns
    keep = [c for c in (*MAPPABLE, "instruction") if c in columns]
    prompts, seen = [], {}
    for index, row in enumerate(dataset.select_columns(keep)):
        where = f"{source}: row {index}"
        if to_score and prompt_key is None:
            raise DataError(f"{source} has replies to score but no prompt column; map one with dataset_columns")
        texts = _reply_texts(row["all_generated_responses"], row[prompt_key], where) if to_score else None
        if pairs:  # the prompt of the pair training would make of this row
            pair = _pair(row, args, where)
        else:  # a prompt alone, or scored candidates: the first candidate's form (string or message) decides
            replies = row.get("all_generated_responses") or [c.get("response") for c in row.get("completions") or []]
            reply = replies[0] if replies and not empty_reply(replies[0]) else "-"
            context = {k: row[k] for k in ("system",) if k in row}
            pair = _pair({**context, "prompt": row[prompt_key], "chosen": reply, "rejected": reply}, args, where)
        if pair is None:  # conversations that differ before the reply: training skips the row too
            continue
        key = json.dumps(pair["prompt"], ensure_ascii=False)
        given = [{k: reply_text(pair[k]) for k in ("chosen", "rejected")}] if pairs else []
        if key in seen and not to_score:
            if pairs:  # another pair of the same prompt
                seen[key]["given_pairs"] += given
            continue
        prompt = {"prompt": pair["prompt"]} | ({"replies": texts} if to_score else {})
        prompt |= {"given_pairs": given} if pairs else {}
        seen[key] = prompt
        if "reference" in row:
            prompt["reference"] = _text(row["reference"], f"{where}: 'reference'")
        prompts.append(prompt)
    if len({isinstance(p["prompt"], str) for p in prompts}) > 1:  # as `one_kind`: string prompts join chat ones
        prompts = [p | {"prompt": as_chat(p)["prompt"]} for p in prompts]
    if counts is not None:
        counts.update(
            read=len(dataset), prompts=len(prompts), skipped_repeated_or_diverging=len(dataset) - len(prompts)
        )
    if not prompts:
        raise DataError(f"{source}: no row has a prompt")
    return prompts


def _reply_texts(replies, prompt, where):
    """The text of each reply to score: a string, or a conversation's last (assistant) turn, whose earlier turns, if
    any, must be the row's prompt (a reply to another prompt would be scored against the wrong one)."""
    if not isinstance(replies, list) or not replies:
        raise DataError(f"{where}: all_generated_responses must be a list of replies, not {_kind(replies)}")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, f"{where}: prompt")
    texts = []
    for i, reply in enumerate(replies):
        if isinstance(reply, str):
            texts.append(reply)
            continue
        messages = _messages(reply, f"{where}: reply {i}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: reply {i} does not end with an assistant turn")
        if len(messages) > 1 and [m for m in messages[:-1] if m["role"] != "system"] != [
            m for m in turns if m["role"] != "system"
        ]:
            raise DataError(
                f"{where}: reply {i} is a conversation whose turns before the reply are not the row's prompt: give "
                "the replies alone (strings), or conversations that begin with the row's own prompt"
            )
        texts.append(messages[-1]["content"])
    return texts


# --- reading -----------------------------------------------------------------------------------------------------


def _read(args, split):
    """A DatasetDict from a Hub id, a local file (.jsonl, .jsonl.gz, .json, .parquet, .csv; read as `split`) or a
    folder of them."""
    from datasets import load_dataset

    name = args.dataset_name
    if not name or not isinstance(name, str):
        raise DataError("dataset_name is not set: give a Hub dataset id or a local .jsonl/.json/.parquet/.csv path")
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = _builder(path)
            encoding = _check_text(path, builder)
            return load_dataset(builder, data_files={split: str(path)}, **encoding)
        if path.is_dir():
            files = data_files(path)
            if not files:
                raise DataError(f"dataset folder {path} holds no .jsonl/.json/.parquet/.csv file")
            _check_candidates_complete(path)
            encodings = [_check_text(file, _builder(file)) for file in files]
            return load_dataset(str(path), name=args.dataset_config, **max(encodings, key=len))
        if _builder(path, strict=False) or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise DataError(f"dataset file {name} not found; check dataset_name")
        return load_dataset(name, name=args.dataset_config)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the message, not the stack
        hub = "the Hugging Face Hub could not provide it: offline?"
        hint = "" if path.exists() else f" (not a local path, and {hub}{DEMO_HINT})"
        raise DataError(f"could not load dataset {name!r}{hint}: {first_line(e)}") from None


def _check_candidates_complete(folder):
    """A folder that generate_candidates.py is still writing (or that a killed run left) trains on nothing: its
    manifest names every shard, and a missing one is an error, not fewer prompts trained on in silence."""
    missing, total = missing_shards(folder)
    if missing:
        raise DataError(
            f"dataset folder {folder} holds the candidates of an unfinished generate_candidates.py run "
            f"({total - missing} of {total} shards written): run the same command again to finish it"
        )


def data_files(folder):
    """The data files `datasets` reads from a folder: .jsonl(.gz), .json, .parquet and .csv, at any depth."""
    return [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and _builder(p, strict=False)]


def _builder(path, strict=True):
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    builder = FILE_BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None and strict:
        raise DataError(
            f"dataset file {path} must end in .jsonl, .json, .parquet or .csv (optionally compressed: .gz, .bz2, .xz, "
            ".zst)"
        )
    return builder


def _check_text(path, builder):
    """A text file (JSON, CSV) must be UTF-8: a byte-order mark is skipped (the keyword arguments returned tell
    `datasets` so), and a file in another encoding is refused naming the encoding it looks like (Shift_JIS, as Excel
    saves CSV on Japanese Windows, is the usual one) and how to convert it. JSON files are then checked for layout."""
    if builder not in ("json", "csv"):
        return {}
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    if path.suffix.lower() == ".zst":  # `datasets` reads it through the zstandard package, which is optional
        if importlib.util.find_spec("zstandard") is None:
            raise DataError(
                f"dataset file {path} is zstd-compressed, which needs the zstandard package: pip install zstandard, "
                f"or decompress it (zstd -d {path})"
            )
        import zstandard

        opener = zstandard.open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"dataset file {path} cannot be read: {first_line(e)}") from None
    bom = data.startswith(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(path, data, e)) from None
    if builder == "json":
        _check_json(path, text)
    return {"encoding": "utf-8-sig"} if bom else {}


def _not_utf8(path, data, error):
    from charset_normalizer import from_bytes

    best = from_bytes(data[:1_000_000]).best()
    guess = best.encoding if best is not None else None
    # charset_normalizer names the exact variant; people and iconv know the family
    families = {"cp932": ("Shift_JIS (cp932)", "CP932"), "euc_jp": ("EUC-JP", "EUC-JP"), "utf_16": ("UTF-16", "UTF-16")}
    families |= {"shift_jis": families["cp932"], "shift_jis_2004": families["cp932"]}
    families |= {"shift_jisx0213": families["cp932"], "euc_jis_2004": families["euc_jp"]}
    families["euc_jisx0213"] = families["euc_jp"]
    name, source = families.get(guess, (guess, (guess or "ENCODING").upper().replace("_", "-")))
    looks = f"; it looks like {name}" if guess else ""
    excel = ' (in Excel: Save As "CSV UTF-8")' if path.suffix.lower() == ".csv" else ""
    return (
        f"dataset file {path} is not UTF-8 text (byte {error.start} cannot be decoded){looks}: convert it to UTF-8, "
        f"e.g. iconv -f {source} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}{excel}"
    )


def _check_json(path, text):
    """A JSON file that `datasets` would misread is refused, naming the file and the line: one that does not parse, or
    one JSON document that is not a list of rows (datasets reads a pretty-printed object as a single row)."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"dataset file {path} is empty")
    try:  # JSON lines start with a whole value on the first line; anything else is one document over several lines
        one_per_line = not isinstance(json.loads(lines[0][1]), list)
    except json.JSONDecodeError:
        one_per_line = False
    if not one_per_line:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"dataset file {path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        if isinstance(document, dict):
            raise DataError(
                f"dataset file {path} is one JSON object (keys {sorted(document)[:6]}), which would be read as a "
                "single row; write one object per pair: a list of objects, or one object per line (.jsonl)"
            )
        if document == []:
            raise DataError(f"dataset file {path} is an empty list: it has no rows")
        items = document if isinstance(document, list) else [document]
        odd = [item for item in items if not isinstance(item, dict)]
        if odd:
            where = " in its list" if isinstance(document, list) else ""
            raise DataError(
                f"dataset file {path} must hold a list of objects, one per pair; it has {_kind(odd[0])}{where}"
            )
        return
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"dataset file {path}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"dataset file {path}, line {number}: each line must be a JSON object, not {_kind(row)}")


# --- normalising ---------------------------------------------------------------------------------------------------


def normalise(dataset, args, source, counts=None):
    """The rows of `dataset` as {prompt, chosen, rejected, row_id} (module docstring); mistakes raise DataError naming
    `source` and the row; identical pairs, and pairs whose conversations differ before the final reply, are dropped
    with a count."""
    from datasets import Dataset

    if len(dataset) == 0:
        raise DataError(f"{source} has no rows")
    dataset = _rename(dataset, args.dataset_columns, source)
    columns = set(dataset.column_names)
    if {"all_generated_responses", "completions"} & columns:
        return _scored_candidates(dataset, args, source, counts)
    if len({"chosen", "rejected"} & columns) == 1:
        missing = sorted({"chosen", "rejected"} - columns)
        raise DataError(
            f"{source} lacks column(s) {missing}; it has {sorted(columns)}. A preference pair needs chosen and "
            "rejected (map other names with dataset_columns)"
        )
    if not {"chosen", "rejected"} <= columns:
        glued = [sep for sep in ("\t", ";", "|") if len(columns) == 1 and sep in next(iter(columns))]
        if glued:  # one column whose name holds the others: a CSV written with another separator
            raise DataError(
                f"{source} has one column {sorted(columns)}: the file is separated by {glued[0]!r}, not commas; "
                "save it as comma-separated CSV (or as .jsonl)"
            )
        raise DataError(
            f"{source} has columns {sorted(columns)}, which are not preference pairs. Accepted layouts: {LAYOUTS}. "
            "Map other names with dataset_columns (e.g. {prompt: input})."
        )
    keep = [c for c in MAPPABLE if c in columns]
    rows, identical, diverging = [], 0, 0
    for index, row in enumerate(dataset.select_columns(keep)):
        pair = _pair(row, args, f"{source}: row {index}")
        if pair is None:
            diverging += 1
        elif pair["chosen"] == pair["rejected"]:
            identical += 1
        else:
            if "reference" in row:
                pair["reference"] = _text(row["reference"], f"{source}: row {index}: 'reference'")
            rows.append({**pair, "row_id": index})
    if counts is not None:
        counts.update(read=len(dataset), kept=len(rows), skipped_identical=identical, skipped_diverging=diverging)
        counts["layout"] = _layout(dataset[0], columns)
    skipped = ((identical, "chosen and rejected are identical"), (diverging, "conversations differ before the reply"))
    for count, why in skipped:
        if count:
            print(f"warning: {source}: skipped {count} of {len(dataset)} rows whose {why}", file=sys.stderr)
    if not rows:
        raise DataError(f"{source}: no row is left with a preference to learn (see the warnings above)")
    return Dataset.from_list(one_kind(rows))


def _scored_candidates(dataset, args, source, counts):
    """Rows of scored candidates as {prompt, candidates, scores, row_id, reference?, cut?, logps?, given?}: each
    candidate a reply in the form training uses (a string, or an assistant message list), with a finite score, and
    (given the `all_cut` and `all_mean_logps` columns that generate_candidates.py writes) whether it was cut at
    max_new_tokens and its mean token log-probability under the model that sampled it; `given` (from `given_pairs`):
    the prompt's own pairs, [chosen, rejected] in the same form. `pair_selection.choose_pairs` makes the pairs of
    them once the model training starts from is loaded. Candidates without a finite score or without text are left
    out with a count; rows with fewer than two, or whose scores are all equal, are skipped
    with a count. The `chosen`/`rejected` columns such data also carries are ignored."""
    from datasets import Dataset

    columns = set(dataset.column_names)
    ultrafeedback = "all_generated_responses" not in columns
    prompt_key = next((k for k in ("prompt", "instruction") if k in columns), None)
    if prompt_key is None:
        raise DataError(
            f"{source} has scored candidates but no prompt column (prompt, or UltraFeedback's instruction); map one "
            "with dataset_columns: {prompt: <column>}"
        )
    if not ultrafeedback and "all_rm_scores" not in columns:
        raise DataError(
            f"{source} has all_generated_responses but no all_rm_scores: each candidate needs its score (map other "
            "names with dataset_columns: {all_rm_scores: <column>})"
        )
    keep = (prompt_key, "system", "reference", "all_generated_responses", "all_rm_scores", "completions", "all_cut",
            "all_mean_logps", "given_pairs")  # fmt: skip
    rows, unscored, few, no_preference, cut = [], 0, 0, 0, 0
    for index, row in enumerate(dataset.select_columns([c for c in keep if c in columns])):
        where = f"{source}: row {index}"
        if ultrafeedback:
            replies, scores = _ultrafeedback(row["completions"], args.candidate_score, where)
        else:
            replies, scores = row["all_generated_responses"], row["all_rm_scores"]
            if not isinstance(replies, list) or not isinstance(scores, list):
                raise DataError(
                    f"{where}: all_generated_responses and all_rm_scores must be lists (of replies, of numbers), "
                    f"not {_kind(replies)} and {_kind(scores)}"
                )
            if len(replies) != len(scores):
                raise DataError(
                    f"{where}: {len(replies)} replies in all_generated_responses but {len(scores)} scores in "
                    "all_rm_scores; each reply needs its own score"
                )
        context = {k: row[k] for k in ("system",) if k in row}
        marks = row.get("all_cut") or [False] * len(replies)  # generate_candidates.py: reached max_new_tokens
        if len(marks) != len(replies) or not all(isinstance(m, bool) for m in marks):
            raise DataError(f"{where}: all_cut must be a list of true/false, one for each reply")
        rarity = row.get("all_mean_logps") or [0.0] * len(replies)  # generate_candidates.py: under the sampler
        if len(rarity) != len(replies) or not all(is_score(v) for v in rarity):
            raise DataError(f"{where}: all_mean_logps must be a list of finite numbers, one for each reply")
        candidates = []
        for i, (reply, score) in enumerate(zip(replies, scores, strict=True)):
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise DataError(  # a layout mistake (quoted numbers from a CSV export, say), not a missing score
                    f"{where}: score {i} is {score!r}, {_kind(score)} where a number belongs; write scores as "
                    'numbers (0.8, not "0.8")'
                )
            if not is_score(score) or empty_reply(reply):  # unscored, or sampled empty: left out, counted
                unscored += 1
                continue
            pair = _pair({**context, "prompt": row[prompt_key], "chosen": reply, "rejected": reply}, args, where)
            if pair is None:
                raise DataError(f"{where}: candidate {i} is a conversation that does not continue the prompt")
            candidates.append((pair, float(score), marks[i], rarity[i]))
        if len(candidates) < 2:
            few += 1
            continue
        scores = [c[1] for c in candidates]
        if max(scores) == min(scores):
            no_preference += 1
            continue
        out = {"prompt": candidates[0][0]["prompt"], "candidates": [c[0]["chosen"] for c in candidates]}
        out |= {"scores": scores, "row_id": index}
        if "all_cut" in columns:
            out["cut"] = [c[2] for c in candidates]
            cut += sum(out["cut"])
        if "all_mean_logps" in columns:
            out["logps"] = [c[3] for c in candidates]
        if "reference" in row:
            out["reference"] = _text(row["reference"], f"{where}: 'reference'")
        if "given_pairs" in columns:  # the prompt's own pairs, in the form of its candidates (the `given` rule)
            out["given"] = [_given_pair(row, context, prompt_key, given, args, where) for given in row["given_pairs"]]
        rows.append(out)
    if counts is not None:
        score = f", score: {args.candidate_score}" if ultrafeedback else ""
        layout = "UltraFeedback completions" if ultrafeedback else "scored candidates (princeton-nlp)"
        counts.update(read=len(dataset), layout=f"{layout}{score}", scored_rows=len(rows))
        counts.update(skipped_few_candidates=few, skipped_no_preference=no_preference, unscored_candidates=unscored)
        if "all_cut" in columns:
            counts["cut_candidates"] = cut
    skipped = (
        (few, "rows with fewer than two scored candidates"),
        (no_preference, "rows whose candidates all score the same (no preference)"),
    )
    for count, why in skipped:
        if count:
            print(f"warning: {source}: skipped {count} of {len(dataset)} {why}", file=sys.stderr)
    if unscored:
        print(f"warning: {source}: left out {unscored} candidates without a finite score or text", file=sys.stderr)
    if not rows:
        raise DataError(f"{source}: no row has two differently scored candidates (see the warnings above)")
    return Dataset.from_list(one_kind(rows))


def _given_pair(row, context, prompt_key, given, args, where):
    """[chosen, rejected] of one of a row's `given_pairs` ({chosen, rejected} reply texts), as training's replies."""
    if not isinstance(given, dict) or not all(isinstance(given.get(k), str) for k in ("chosen", "rejected")):
        raise DataError(f"{where}: given_pairs must be a list of {{chosen, rejected}} reply texts")
    pair = _pair({**context, "prompt": row[prompt_key], **given}, args, where)
    return [pair["chosen"], pair["rejected"]]


def _ultrafeedback(completions, score_name, where):
    """(replies, scores) of an UltraFeedback row's completions: `response`, and `overall_score`,
    `fine-grained_score` or one aspect's `Rating` ("N/A" and missing scores become None: left out, counted)."""
    if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
        raise DataError(f"{where}: 'completions' must be a list of objects with a response and its scores")
    replies, scores = [], []
    for i, completion in enumerate(completions):
        if "response" not in completion:
            raise DataError(f"{where}: completion {i} has no 'response'")
        replies.append(completion["response"])
        if score_name in ULTRAFEEDBACK_ASPECTS:
            rating = ((completion.get("annotations") or {}).get(score_name) or {}).get("Rating")
            scores.append(float(rating) if isinstance(rating, str) and rating.strip().isdigit() else None)
        else:
            scores.append(completion.get(score_name))
    return replies, scores


def _rename(dataset, mapping, source):
    if not mapping:
        return dataset
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f"dataset_columns must map names to column names, e.g. {{prompt: input}}; got {mapping!r}")
    unknown = sorted(set(mapping) - set(MAPPABLE))
    if unknown:
        raise DataError(f"dataset_columns: unknown key(s) {unknown}; the keys are {list(MAPPABLE)}")
    missing = sorted(v for v in mapping.values() if v not in dataset.column_names)
    if missing:
        raise DataError(
            f"dataset_columns names {missing}, which {source} lacks; its columns are {dataset.column_names}"
        )
    renames = {column: key for key, column in mapping.items() if column != key}
    dataset = dataset.remove_columns([c for c in renames.values() if c in dataset.column_names and c not in renames])
    return dataset.rename_columns(renames)


def _layout(row, columns):
    """The layout's name (module docstring), as the first row shows it: for the run record and the model card."""
    if "conversations" in columns:
        return "sharegpt"
    if isinstance(row["chosen"], (list, dict)):
        return "conversational" + (" (explicit prompt)" if "prompt" in columns else " (implicit prompt)")
    if "prompt" not in columns:
        return "hh"
    return "standard (conversation prompt)" if isinstance(row["prompt"], list) else "standard"


def reply_text(reply):
    """The text of a reply in the form training uses (a string, or an assistant message list)."""
    return reply if isinstance(reply, str) else reply[-1]["content"]


def _pair(row, args, where):
    """{prompt, chosen, rejected} for one row, or None when its two conversations differ before the final reply."""
    system = row.get("system")
    if system is not None:
        system = _text(system, f"{where}: 'system'", allow_empty=True) or None
    system = system or args.system_prompt or None
    if "conversations" in row:
        prompt = _messages(row["conversations"], f"{where}: 'conversations'")
        chosen, rejected = (_reply(row[k], f"{where}: {k!r}") for k in ("chosen", "rejected"))
        return with_system({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}, system)
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, (list, dict)) or isinstance(rejected, (list, dict)):
        return _conversation_pair(row, system, where)
    chosen, rejected = (_text(row[k], f"{where}: {k!r}") for k in ("chosen", "rejected"))
    if "prompt" not in row and _is_hh(chosen) and _is_hh(rejected):
        (context, chosen_reply), (other, rejected_reply) = _split_hh(chosen, where), _split_hh(rejected, where)
        if context != other:
            return None
        pair = {"prompt": context, "chosen": [chosen_reply], "rejected": [rejected_reply]}
        return with_system(pair, system)
    if "prompt" not in row:
        raise DataError(
            f"{where}: chosen and rejected are strings but there is no prompt column (and they are not "
            "'\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts); map one with dataset_columns: {prompt: <column>}"
        )
    if isinstance(row["prompt"], list):  # a conversation prompt with string replies
        prompt = _messages(row["prompt"], f"{where}: 'prompt'")
        return as_chat({"prompt": prompt, "chosen": chosen, "rejected": rejected}, system)
    pair = {"prompt": _text(row["prompt"], f"{where}: 'prompt'"), "chosen": chosen, "rejected": rejected}
    return as_chat(pair, system) if args.wrap_text_as_chat or system else pair


def _conversation_pair(row, system, where):
    conversations = {k: _messages(row[k], f"{where}: {k!r}") for k in ("chosen", "rejected")}
    for key, messages in conversations.items():
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: {key!r} has no assistant reply (its last turn is {messages[-1]['role']!r}); a preference "
                "pair needs the assistant's reply last"
            )
    context = conversations["chosen"][:-1]
    if context != conversations["rejected"][:-1]:
        return None
    if context:
        prompt = context
    elif "prompt" in row and row["prompt"] is not None:
        if isinstance(row["prompt"], list):
            prompt = _messages(row["prompt"], f"{where}: 'prompt'")
        else:
            prompt = [{"role": "user", "content": _text(row["prompt"], f"{where}: 'prompt'")}]
    else:
        raise DataError(f"{where}: chosen and rejected hold the reply alone and there is no prompt column")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; the last prompt turn must be the user's")
    pair = {"prompt": prompt, "chosen": [conversations["chosen"][-1]], "rejected": [conversations["rejected"][-1]]}
    return with_system(pair, system)


def _messages(value, where):
    """A conversation as [{"role", "content"}]: {role, content} or ShareGPT {from, value} turns, checked."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a conversation (a list of turns), not {_kind(value)}")
    messages = []
    for turn in value:
        if not isinstance(turn, dict):
            raise DataError(f"{where}: every turn must be an object with role and content, not {_kind(turn)}")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise DataError(f"{where}: unknown speaker {speaker!r}; expected one of {sorted(ROLES)}")
        messages.append({"role": role, "content": _text(content, f"{where}: a {role} turn")})
    return messages


def _reply(value, where):
    """A ShareGPT reply: a string, or one {from, value} turn (LLaMA-Factory), as an assistant message."""
    if isinstance(value, (dict, list)):
        messages = _messages(value, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where} has no assistant reply (its last turn is {messages[-1]['role']!r})")
        return messages[-1]
    return {"role": "assistant", "content": _text(value, where)}


def _is_hh(text):
    return text.lstrip("\n").startswith("Human: ") and "\n\nAssistant: " in text


def _split_hh(text, where):
    """(context turns, final reply) of an HH transcript, split at its last '\\n\\nAssistant: ' (not character by
    character, which would move shared leading characters of Japanese replies into the prompt)."""
    context, _, reply = ("\n\n" + text.lstrip("\n")).rpartition("\n\nAssistant: ")
    parts = HH_TURN.split(context)[1:]  # ["Human", text, "Assistant", text, ...]
    turns = [{"role": ROLES[s.lower()], "content": c.strip()} for s, c in zip(parts[::2], parts[1::2], strict=True)]
    if not turns or turns[-1]["role"] != "user" or not reply.strip():
        raise DataError(f"{where}: an HH transcript must end with a Human turn and the Assistant's reply")
    return turns, {"role": "assistant", "content": reply.strip()}


def _text(value, where, allow_empty=False):
    if isinstance(value, float) and math.isnan(value):
        value = None  # an empty CSV cell
    if not isinstance(value, str):
        what = "empty (null)" if value is None else f"{_kind(value)}, not text"
        raise DataError(f"{where} is {what}; fill it in or remove the row")
    if not value.strip() and not allow_empty:
        raise DataError(f"{where} is empty; fill it in or remove the row")
    return value


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"
