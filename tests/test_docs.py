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
ENTRY_POINTS = ("train_diversity_simpo.py", "generate_candidates.py", "train_on_policy.py")
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
    from trl import ModelConfig

    from diversity_simpo.candidates import CandidateArguments
    from diversity_simpo.rounds import OnPolicyArguments
    from diversity_simpo.settings import ScriptArguments, make_parser
    from diversity_simpo_trainer import DiversitySimPOConfig

    dataclasses = {
        "train_diversity_simpo.py": (ScriptArguments, DiversitySimPOConfig, ModelConfig),
        "generate_candidates.py": (CandidateArguments,),
        "train_on_policy.py": (OnPolicyArguments,),
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
    for tool in ("training", "candidates", "on-policy"):  # which tool's file it is: the one whose reader takes it
        try:
            accepted = read_as(tool, ["--config", config])
        except ConfigError as e:
            refusals[tool] = str(e)
            continue
        break
    assert accepted is not None, f"{config} passes no tool's settings check: {refusals}"
    if tool == "on-policy":  # its stages read their own configs with the loop's settings over them, as rounds does
        (loop,) = accepted
        stages = (("training", loop.train_config, loop.train), ("candidates", loop.candidates_config, loop.candidates))
        for stage, stage_config, over in stages:
            try:
                read_as(stage, ["--config", stage_config, *rounds.flags(over)])
            except ConfigError as e:
                pytest.fail(f"{config}: its {stage} stage ({stage_config} with {over}) fails its check: {e}")
