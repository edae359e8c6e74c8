"""The documentation (README.md, CONTRIBUTING.md, docs/*.md) says nothing the code contradicts.

- every relative link and image resolves to a file of the repository, and a link's #anchor to a heading there;
- every `configs/`, `demo/` and `benchmarks/` path written in code exists;
- every `make X` written in code is a target of the Makefile;
- every `--flag` given to an entry point in code (also through `deepspeed` or `accelerate launch`) is an option of
  that entry point's own parser;
- every settings YAML in configs/ passes its tool's own settings check, and an on-policy YAML's stage settings pass
  the stages' checks;
- the README stays within 8 KB and links every docs page and CONTRIBUTING.md;
- the words of the documentation are a user's: no workshop phrases.

Offline and quick: nothing here loads a model or reads a dataset.
"""

import dataclasses
import functools
import os
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = ("train_diversity_simpo.py", "generate_candidates.py", "train_on_policy.py", "train_reward_model.py")
README_LIMIT = 8192  # bytes: a README a newcomer reads in five minutes
CHECKED_FOLDERS = ("configs", "demo", "benchmarks")
# Phrases of the people who build this tool, not of the people who use it
WORKSHOP = re.compile(r"\bthe user's\b|\bissue\b|\btask\b|carried with the tree", re.IGNORECASE)

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(CHECKED_FOLDERS)})/[^\s`'\"()<>,;:|\]\[{{}}]*)")
MAKE = re.compile(r"(?<![\w./-])make\s+([A-Za-z0-9_.-]+)")
SEPARATORS = {"&&", "||", ";", "|", "&"}


# --- reading the documentation ---------------------------------------------------------------------------------------


@functools.cache
def parts(path):
    """(prose, code): the prose lines with code spans blanked out, and the code: every fenced block (its `\\`
    continuations joined) and every inline code span, one string each."""
    prose, code, block = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                code.append("\n".join(block).replace("\\\n", " "))
                block = None
            continue
        if block is not None:
            block.append(line)
            continue
        code += [m[2] for m in CODE_SPAN.finditer(line)]
        prose.append(CODE_SPAN.sub("code", line))  # link texts may hold code: `[`x`](y)` stays a link
    assert block is None, f"{path.name}: a code block is never closed"
    return "\n".join(prose), code


@functools.cache
def anchors(path):
    """The #anchors of a Markdown file's headings, as GitHub makes them: lower case, punctuation but `-` and `_`
    dropped, spaces as hyphens; a repeated heading gets -1, -2, ..."""
    seen, found, in_code = {}, set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        in_code ^= bool(FENCE.match(line))
        heading = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def doc_id(path):
    return str(path.relative_to(ROOT))


def commands(code):
    """Each command line of a piece of code, as shell words (comments dropped)."""
    for line in code.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an apostrophe in a message quoted as code: plain words are enough here
            words = line.split()
        command = []
        for word in words:
            if word in SEPARATORS:
                yield command
                command = []
            else:
                command.append(word)
        yield command


def script_flags(words):
    """(entry point, [--flags given to it]) of one command, or None when it runs no entry point. A launcher's own
    flags (`deepspeed --num_gpus=4`, `accelerate launch --multi_gpu`) come before the script and are not its own."""
    for index, word in enumerate(words):
        if Path(word).name in ENTRY_POINTS:
            flags = [w.split("=", 1)[0] for w in words[index + 1 :] if w.startswith("--")]
            return Path(word).name, flags
    return None


@functools.cache
def options(script):
    """The option strings the entry point's own parser accepts, and --config, which the settings reader takes."""
    from trl import ModelConfig, RewardConfig

    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo.settings import ScriptArguments, make_parser
    from diversity_simpo_trainer import DiversitySimPOConfig
    from train_reward_model import RewardModelArguments

    dataclasses = {
        "train_diversity_simpo.py": (ScriptArguments, DiversitySimPOConfig, ModelConfig),
        "generate_candidates.py": (CandidateArguments,),
        "train_on_policy.py": (OnPolicyArguments,),
        "train_reward_model.py": (RewardModelArguments, RewardConfig, ModelConfig),
    }[script]
    return set(make_parser(dataclasses)._option_string_actions) | {"--config"}


def makefile_targets():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for names in re.findall(r"^([A-Za-z0-9_.-][A-Za-z0-9_. -]*?)\s*:(?!=)", text, re.MULTILINE):
        targets.update(names.split())
    return targets


# --- the documentation ----------------------------------------------------------------------------------------------


def test_the_documentation_pages_exist():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 2, DOCS


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_resolves_to_a_file(doc):
    prose, _ = parts(doc)
    targets = LINK.findall(prose) + REFERENCE_LINK.findall(prose) + HTML_LINK.findall(prose)
    broken = []
    for target in targets:
        if SCHEME.match(target):
            continue  # a web address
        path, _, anchor = unquote(target.split("?", 1)[0]).partition("#")
        file = (doc.parent / path) if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file.resolve())):
            broken.append(target)
    assert not broken, f"{doc_id(doc)} links to files or headings that do not exist: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_repository_path_in_code_exists(doc):
    _, code = parts(doc)
    missing = set()
    for piece in code:
        for path in PATH.findall(piece):
            path = path.rstrip(".")
            if "*" in path:  # a pattern, not one file
                continue
            if not (ROOT / path).exists():
                missing.add(path)
    assert not missing, f"{doc_id(doc)} names paths that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_make_command_is_a_makefile_target(doc):
    _, code = parts(doc)
    targets = makefile_targets()
    unknown = {name for piece in code for name in MAKE.findall(piece)} - targets
    assert not unknown, f"{doc_id(doc)} runs make targets the Makefile lacks: {sorted(unknown)}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_flag_given_to_an_entry_point_is_one_of_its_options(doc):
    _, code = parts(doc)
    unknown = []
    for piece in code:
        for words in commands(piece):
            found = script_flags(words)
            if found:
                script, flags = found
                unknown += [f"{script} {flag}" for flag in flags if flag not in options(script)]
    assert not unknown, f"{doc_id(doc)} gives options the entry points do not have: {unknown}"


def test_the_readme_is_at_most_8_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (at most {README_LIMIT})"


def test_the_readme_links_every_docs_page_and_contributing():
    prose, _ = parts(ROOT / "README.md")
    linked = {(ROOT / unquote(t.split("#", 1)[0])).resolve() for t in LINK.findall(prose) if not SCHEME.match(t)}
    pages = [p for p in DOCS if p.name != "README.md" or p.parent != ROOT]
    unlinked = [doc_id(p) for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md's documentation index lacks {unlinked}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_the_documentation_speaks_to_users(doc):
    text = doc.read_text(encoding="utf-8")
    found = sorted({m[0] for m in WORKSHOP.finditer(text)})
    assert not found, f"{doc_id(doc)} uses words from the workshop, not the user's: {found}"


# --- the settings files ---------------------------------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch):
    """Settings are read as the tools read them, from the repository root; reading one that names a DeepSpeed JSON
    sets process-wide variables (settings.single_process_deepspeed_env), which must not leak into other tests."""
    monkeypatch.chdir(ROOT)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def read_as(tool, argv):
    """The settings of `argv` read by `tool`'s own reader (its checks raise ConfigError)."""
    from diversity_simpo import settings
    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo_trainer import DiversitySimPOConfig

    config = argv[argv.index("--config") + 1]
    if tool == "training":  # bf16 on a machine without a GPU is a fact of this machine, not a mistake of the file
        return settings.parse_args([*argv, *NO_GPU], DiversitySimPOConfig)
    if tool == "reward model":
        import train_reward_model

        return train_reward_model.parse_args([*argv, *NO_GPU])
    if tool == "candidates":
        return settings.read_settings(argv, (CandidateArguments,), config)
    return settings.read_settings(argv, (OnPolicyArguments,), config)


NO_GPU = [] if torch.cuda.is_available() else ["--bf16", "false"]
SETTINGS_FILES = sorted((ROOT / "configs").glob("*.yaml"))  # the DeepSpeed JSONs are not settings files


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=lambda p: p.name)
def test_every_settings_file_passes_its_tools_settings_check(path, environment):
    from diversity_simpo import rounds
    from diversity_simpo.settings import ConfigError

    config = str(path.relative_to(ROOT))
    refusals, accepted = {}, None
    for tool in ("training", "candidates", "on-policy", "reward model"):  # whose file it is: the tool that takes it
        try:
            accepted = read_as(tool, ["--config", config])
        except ConfigError as e:
            refusals[tool] = str(e)
            continue
        break
    assert accepted is not None, f"{config} passes no tool's settings check: {refusals}"
    if tool == "on-policy":  # its stages read their own configs with the loop's settings over them, as rounds does
        (loop,) = accepted
        from diversity_simpo_trainer import DiversitySimPOConfig

        try:  # the settings files the loop writes for round 1's stages, through each stage's own reader
            if NO_GPU:  # as for a training file
                loop.train = {**loop.train, "bf16": False}
            candidates, training = rounds.base_settings(loop)
            start = loop.model_name_or_path or training.get("model_name_or_path")
            rounds.read_stages(loop, DiversitySimPOConfig, start, candidates, training)
        except ConfigError as e:
            pytest.fail(f"{config}: a stage's settings fail their check: {e}")


# --- --help ---------------------------------------------------------------------------------------------------------

HELP_CASES = [  # (entry point, the --config given or None, the YAML it then reads)
    ("train_diversity_simpo.py", None, "configs/config_diversity_simpo.yaml"),
    ("train_diversity_simpo.py", "configs/demo.yaml", "configs/demo.yaml"),
    ("generate_candidates.py", None, "configs/candidates.yaml"),
    ("generate_candidates.py", "configs/demo_candidates.yaml", "configs/demo_candidates.yaml"),
    ("train_on_policy.py", None, "configs/on_policy.yaml"),
    ("train_on_policy.py", "configs/demo_on_policy.yaml", "configs/demo_on_policy.yaml"),
    ("train_reward_model.py", None, "configs/reward_model.yaml"),
    ("train_reward_model.py", "configs/demo_reward_model.yaml", "configs/demo_reward_model.yaml"),
]


def help_of(script, config, capsys, monkeypatch):
    """{field: (its help line, the default it prints)} and the whole text of `script --help` (with `--config`)."""
    import importlib

    monkeypatch.setenv("COLUMNS", "100000")  # one line per option's help: nothing wrapped
    argv = [*(["--config", config] if config else []), "--help"]
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script.removesuffix(".py")).main(argv)
    assert stop.value.code == 0
    text = capsys.readouterr().out
    fields, name = {}, None
    for line in text.splitlines():
        option = re.match(r"\s{2}--(\w+).*?(?:\s{2,}(.*))?$", line)  # the option, and its help if on the same line
        if option:
            name = option[1]
            fields.setdefault(name, option[2] or "")
        elif name and line.startswith(" " * 10):
            fields[name] += " " + line.strip()
        else:
            name = None
    defaults = {k: (v, re.search(r"\(default: (.*)\)$", v)) for k, v in fields.items()}
    return {k: (v, m[1] if m else None) for k, (v, m) in defaults.items()}, text


def printed_equals(printed, value):
    """Whether the default --help printed is `value` (a YAML value), read back as the command line reads it."""
    import json

    if isinstance(value, bool):
        return printed == str(value).lower()
    if value is None:
        return printed == "None"
    if isinstance(value, list):
        return printed.split() == [str(v) for v in value] or (printed == "[]" and not value)
    try:
        if isinstance(value, dict):
            return json.loads(printed) == value
        if isinstance(value, (int, float)):
            return float(printed) == float(value)
    except ValueError:  # printed is not a number or a JSON object at all
        return False
    return printed == str(value)


@pytest.mark.parametrize(("script", "config", "yaml_file"), HELP_CASES, ids=lambda v: str(v))
def test_help_shows_as_default_what_a_run_with_that_config_uses(script, config, yaml_file, capsys, monkeypatch,
                                                                environment):  # fmt: skip
    import yaml

    shown, text = help_of(script, config, capsys, monkeypatch)
    values = yaml.safe_load((ROOT / yaml_file).read_text(encoding="utf-8"))
    wrong = {
        key: (shown.get(key, (None, "not listed"))[1], value)
        for key, value in values.items()
        if key != "env" and not (key in shown and shown[key][1] is not None and printed_equals(shown[key][1], value))
    }
    assert not wrong, f"{script} --help prints defaults other than {yaml_file}'s: {wrong} (printed, YAML)"
    assert f"what a run with {yaml_file} uses" in " ".join(text.split())


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_lists_the_most_edited_settings_first(script, capsys, monkeypatch, environment):
    shown, text = help_of(script, None, capsys, monkeypatch)
    groups = [line for line in text.splitlines() if re.match(r"^\S.*:$", line)]
    assert groups[:2] == ["most edited settings:", "all other settings:"], groups
    first = text.split("all other settings:")[0]
    for name in ("model_name_or_path", "output_dir"):
        assert f"--{name} " in first, f"{script} --help does not list {name} among the most edited settings"
    if script == "train_diversity_simpo.py":
        assert "latest" in shown["resume_from_checkpoint"][0]
        for name in ("dataset_name", "system_prompt", "diversity_weight", "use_peft", "gradient_accumulation_steps"):
            assert f"--{name} " in first, name


# --- recipes: every command that trains the 8B model fits the GPUs it names and keeps the global batch -------------

GLOBAL_BATCH = 128  # pairs per optimizer step (the README): per device x accumulation x GPUs
GPU_GB, PARAMETERS = 80, 8.0e9  # the README's GPUs; ELYZA 8B
LAUNCHERS = ("python", "deepspeed", "accelerate", "torchrun")
ENTRY_DEFAULTS = {
    "train_diversity_simpo.py": "configs/config_diversity_simpo.yaml",
    "generate_candidates.py": "configs/candidates.yaml",
    "train_on_policy.py": "configs/on_policy.yaml",
    "train_reward_model.py": "configs/reward_model.yaml",
}


def entry_point_help_texts():
    """(where, text) of every help text: each entry point's docstring and each field's help."""
    import importlib

    from trl import ModelConfig

    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo.settings import ScriptArguments
    from diversity_simpo_trainer import DiversitySimPOConfig
    from train_reward_model import RewardModelArguments

    for script in ENTRY_POINTS:
        yield script, importlib.import_module(script.removesuffix(".py")).__doc__
    for cls in (ScriptArguments, DiversitySimPOConfig, ModelConfig, CandidateArguments, OnPolicyArguments,
                RewardModelArguments):  # fmt: skip
        for f in dataclasses.fields(cls):
            yield f"{cls.__name__}.{f.name}", f.metadata.get("help", "")


def recipes():
    """(where, the line as written, its words) of every command that runs an entry point: in the documentation's code,
    the comments of configs/*.yaml (`\\` continues a line) and the help texts."""
    found = []
    for doc in DOCS:
        for piece in parts(doc)[1]:
            found += [(doc_id(doc), " ".join(words), words) for words in commands(piece)]
    for path in SETTINGS_FILES:
        comment = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                continue
            comment += line.lstrip("#").strip()
            if comment.endswith("\\"):
                comment = comment[:-1] + " "
                continue
            found += [(path.name, comment, words) for words in commands(re.split(r"\s{2,}\(", comment)[0])]
            comment = ""
    for where, text in entry_point_help_texts():
        found += [(where, line, words) for line in (text or "").splitlines() for words in commands(line)]
    out = []
    for where, line, words in found:
        index = next((i for i, w in enumerate(words) if Path(w).name in ENTRY_POINTS), None)
        start = next((i for i, w in enumerate(words[: index or 0]) if w in LAUNCHERS), None)
        if start is not None and "--help" not in words:  # a command, not a file's name in a sentence
            out.append((where, line, words[start:]))
    return out


def gpus(launcher):
    """The number of processes a launcher's words start, or None when they do not say (a hostfile alone)."""
    option = {}
    for i, word in enumerate(launcher):
        if word.startswith("--"):
            name, _, value = word.partition("=")
            option[name] = value or (launcher[i + 1] if i + 1 < len(launcher) else "")
    if not launcher or launcher[0] == "python":
        return 1
    if launcher[0] == "deepspeed":
        if "--num_gpus" not in option:
            return None
        return int(option["--num_gpus"]) * int(option.get("--num_nodes", 1))
    if launcher[0] == "accelerate":
        return int(option["--num_processes"]) if "--num_processes" in option else None
    return int(option.get("--nproc_per_node", 1)) * int(option.get("--nnodes", 1))


def training_settings(script, argv, tmp_path):
    """(ScriptArguments, DiversitySimPOConfig, ModelConfig) that `script argv` trains with: for the loop, its training
    settings (its train_config with the YAML's `train` mapping and --train over them)."""
    import json

    import yaml

    from diversity_simpo import settings
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo_trainer import DiversitySimPOConfig

    if script == "train_diversity_simpo.py":
        return settings.parse_args([*argv, *NO_GPU], DiversitySimPOConfig)
    config = argv[argv.index("--config") + 1] if "--config" in argv else ENTRY_DEFAULTS[script]
    (loop,) = settings.read_settings(argv, (OnPolicyArguments,), config)
    loop_yaml = yaml.safe_load((ROOT / config).read_text(encoding="utf-8"))
    given = json.loads(argv[argv.index("--train") + 1]) if "--train" in argv else {}
    train = yaml.safe_load((ROOT / loop.train_config).read_text(encoding="utf-8"))
    train.update({**(loop_yaml.get("train") or {}), **given})
    if loop.model_name_or_path:
        train["model_name_or_path"] = loop.model_name_or_path
    merged = tmp_path / "train.yaml"
    merged.write_text(yaml.safe_dump(train, allow_unicode=True), encoding="utf-8")
    return settings.parse_args(["--config", str(merged), *NO_GPU], DiversitySimPOConfig)


def state_gb_per_gpu(script, training, model, world):
    """The bytes of weights, gradients and AdamW's state on each GPU, before activations (docs/distributed.md)."""
    import json

    if script.eval_only:
        return 2 * PARAMETERS / 1e9
    if model.use_peft:
        return 2 * PARAMETERS / 1e9  # the frozen bf16 weights; the adapter's share is small
    zero = {}
    if training.deepspeed:
        zero = json.loads((ROOT / training.deepspeed).read_text(encoding="utf-8")).get("zero_optimization", {})
    stage, offload = zero.get("stage", 0), "offload_optimizer" in zero
    per_parameter = {0: 16, 1: 4 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage]
    return (0 if offload and stage == 3 else per_parameter) * PARAMETERS / 1e9


def test_every_recipe_fits_the_gpus_it_names_and_keeps_the_global_batch(environment, tmp_path):
    from diversity_simpo.settings import ConfigError

    checked, wrong = 0, []
    for where, line, words in recipes():
        index = next(i for i, w in enumerate(words) if Path(w).name in ENTRY_POINTS)
        script, argv, world = Path(words[index]).name, words[index + 1 :], gpus(words[:index])
        if script in ("generate_candidates.py", "train_reward_model.py") or world is None:
            continue  # sampling holds the bf16 weights of two 8B models, 32 GB; the scorer: docs/reward-model.md
        try:
            script_args, training, model = training_settings(script, argv, tmp_path)
        except ConfigError as e:
            wrong.append(f"{where}: `{line}` fails the settings check: {e}")
            continue
        if training.use_cpu or "8B" not in str(model.model_name_or_path):
            continue  # the demo
        checked += 1
        batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * world
        if batch != GLOBAL_BATCH and not script_args.eval_only:
            wrong.append(f"{where}: `{line}` updates on {batch} pairs on {world} GPU(s), not {GLOBAL_BATCH}")
        needed = state_gb_per_gpu(script_args, training, model, world)
        if needed > 0.75 * GPU_GB and "does not fit" not in line:
            wrong.append(f"{where}: `{line}` needs {needed:.0f} GB per GPU before activations on {world} GPU(s)")
    assert checked > 10, f"only {checked} recipes found"
    assert not wrong, "\n".join(wrong)


# --- what the documentation quotes: sections, defaults, messages, metrics, results ----------------------------------

SECTION_NAMED = re.compile(r"\]\(([^)\s#]+\.md)\),? section \"([^\"]+)\"|\]\(([^)\s#]+\.md)\)'s \"([^\"]+)\" section")
ANCHOR_IN_COMMENT = re.compile(r"([\w./-]+\.md)#([\w-]+)")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_section_named_beside_a_link_exists(doc):
    """`[GPU.md](../benchmarks/GPU.md), section "On-policy loop"` names a heading that must be there."""
    prose, _ = parts(doc)
    missing = []
    for match in SECTION_NAMED.finditer(" ".join(prose.split())):
        target, heading = (match[1], match[2]) if match[1] else (match[3], match[4])
        file = (doc.parent / target).resolve()
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        if not file.exists() or slug not in anchors(file):
            missing.append(f"{target}: {heading}")
    assert not missing, f"{doc_id(doc)} names sections that do not exist: {missing}"


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=lambda p: p.name)
def test_every_section_a_config_comment_points_to_exists(path):
    comments = " ".join(line for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("#"))
    missing = [
        f"{target}#{anchor}"
        for target, anchor in ANCHOR_IN_COMMENT.findall(comments)
        if not (ROOT / target).exists() or anchor not in anchors(ROOT / target)
    ]
    assert not missing, f"{path.name} points to sections that do not exist: {missing}"


def built_in_defaults():
    """{field: its dataclass default} over the settings of all three tools."""
    from trl import ModelConfig

    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo.settings import ScriptArguments
    from diversity_simpo_trainer import DiversitySimPOConfig

    out = {}
    for cls in (ScriptArguments, DiversitySimPOConfig, ModelConfig, CandidateArguments, OnPolicyArguments):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out.setdefault(f.name, f.default_factory())
    return out


def tables(doc):
    """Each Markdown table of `doc` as (header cells, [row cells])."""
    found, rows = [], []
    for line in [*doc.read_text(encoding="utf-8").splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            found.append((rows[0], [r for r in rows[2:]]))
            rows = []
    return found


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_default_in_a_table_is_the_configs_or_the_built_in_one(doc):
    """A table whose column is headed by a settings file shows that file's values; one headed "built in", the value a
    config that leaves the field out gets."""
    import yaml

    built_in, wrong = built_in_defaults(), []
    for header, rows in tables(doc):
        sources = {}
        for index, cell in enumerate(header):
            config = re.search(r"`(configs/[\w.-]+\.yaml)`", cell)
            if config:
                sources[index] = (config[1], yaml.safe_load((ROOT / config[1]).read_text(encoding="utf-8")))
            elif cell.startswith("built in"):
                sources[index] = ("built in", built_in)
        for row in rows:
            name = re.fullmatch(r"`(\w+)`", row[0])
            for index, (source, values) in sources.items() if name else ():
                expected = values.get(name[1], built_in.get(name[1]))
                if not printed_equals(row[index].split()[0], expected):
                    wrong.append(f"{name[1]}: {row[index]!r} under {source}, which has {expected!r}")
    assert not wrong, f"{doc_id(doc)} quotes defaults other than the settings': {wrong}"


QUOTED_SETTING = re.compile(r"`((\w+)=('?[^`':, ]+'?)[^`]*)`")  # the message, the setting, its value


def test_every_quoted_setting_message_is_the_one_the_tool_prints(environment, tmp_path):
    """`name=value ...` quoted in troubleshooting.md is what the tool that has the setting says to that value in its
    YAML file (the demo's, with that one value changed)."""
    import yaml
    from trl import ModelConfig

    from diversity_simpo import settings
    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo.settings import ConfigError
    from diversity_simpo_trainer import DiversitySimPOConfig

    tools = [  # (the demo's settings file, the tool's dataclasses, how the tool reads them)
        ("configs/demo.yaml", (settings.ScriptArguments, DiversitySimPOConfig, ModelConfig), "training"),
        ("configs/demo_candidates.yaml", (CandidateArguments,), "candidates"),
        ("configs/demo_on_policy.yaml", (OnPolicyArguments,), "on-policy"),
    ]
    checked, wrong = 0, []
    for quoted, name, value in QUOTED_SETTING.findall((ROOT / "docs" / "troubleshooting.md").read_text("utf-8")):
        if "..." in value:
            continue
        config, _, tool = next(t for t in tools if name in {f.name for c in t[1] for f in dataclasses.fields(c)})
        values = yaml.safe_load((ROOT / config).read_text(encoding="utf-8"))
        values[name] = yaml.safe_load(value.strip("'")) if not value.startswith("'") else value.strip("'")
        changed = tmp_path / f"{checked}.yaml"
        changed.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
        try:
            read_as(tool, ["--config", str(changed)])
            wrong.append(f"{name}={value}: accepted")
        except ConfigError as e:
            message, position = str(e), 0
            for fragment in (f.strip() for f in quoted.split("...") if f.strip()):
                found = message.find(fragment, position)
                if found < 0:
                    wrong.append(f"`{quoted}`: the tool says {message!r}")
                    break
                position = found + len(fragment)
        checked += 1
    assert checked >= 4, checked
    assert not wrong, "\n".join(wrong)


def test_every_metric_that_needs_a_reference_says_so_where_it_is_named():
    """The quality-gated diversity figures exist only for eval data with a `reference` column: every paragraph or
    table row that names one says so."""
    from diversity_simpo.reply_diversity import quality_gated

    gated = set(quality_gated(["富士山", "山"], "山"))
    unsaid = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in re.split(r"\n\s*\n|\n(?=\|)", text):
            named = {m for m in re.findall(r"diversity_eval/(\w+)", block) if m in gated}
            named |= {m for m in re.findall(r"`(\w+)`", block) if m in gated and "diversity_eval/" in block}
            if named and "reference" not in block.replace("diversity_eval/reference_rate", ""):
                unsaid.append(f"{doc_id(doc)}: {sorted(named)} in {block.strip()[:80]!r}")
    assert not unsaid, "\n".join(unsaid)


RESULT_ROW = re.compile(r"^\| [^|]+ \| pass \| (.*) \|$", re.MULTILINE)
TARGET = re.compile(r"([\d.]+)x? \(<= ([\d.]+)x?")


def test_no_results_row_marked_pass_misses_its_target():
    wrong = []
    for path in sorted((ROOT / "benchmarks").glob("*.md")):
        for detail in RESULT_ROW.findall(path.read_text(encoding="utf-8")):
            wrong += [f"{path.name}: {v} (<= {t})" for v, t in TARGET.findall(detail) if float(v) > float(t)]
    assert not wrong, f"rows marked pass beside a missed target: {wrong}"


def test_the_performance_page_names_the_versions_the_gpu_figures_ran_with_where_they_are_not_the_pins():
    ran = re.search(r"Packages that ran: (.*)", (ROOT / "benchmarks" / "GPU.md").read_text(encoding="utf-8"))[1]
    ran = dict(item.split() for item in ran.split(", "))
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (ROOT / "requirements.txt").read_text(encoding="utf-8"), re.MULTILINE))
    other = {f"{name} {version}" for name, version in ran.items() if name in pins and pins[name] != version}
    text = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    unsaid = {v for v in other if v not in text}
    assert not unsaid, f"docs/performance.md does not say that the GPU figures ran {sorted(unsaid)}"
    if not other:
        assert "versions other than the pins" not in text, "the GPU figures now ran the pinned versions: say so"
