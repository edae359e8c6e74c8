"""run_record.json's project section: this tool's version and the git commit of the checkout it ran from (the
whole record of a demo run is read in test_cli.py, a killed run's in test_faults.py)."""

import json
import subprocess
from types import SimpleNamespace

import pytest
from conftest import DEMO_DATA, ROOT

from diversity_simpo import run_record


def git(*args):
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    return result.stdout.strip() if result.returncode == 0 else None


def test_the_record_names_the_git_commit_and_dirtiness_of_the_checkout_it_ran_from(tmp_path):
    """README: run_record.json keeps this tool's git commit (the checkout's HEAD), and whether the tree was dirty."""
    head = git("rev-parse", "HEAD")
    if head is None:
        pytest.skip("the tests do not run from a git checkout")
    training_args = SimpleNamespace(world_size=1, seed=42, resume_from_checkpoint=None)
    run_record.start(tmp_path, ["--config", "configs/demo.yaml"], training_args, DEMO_DATA, {})
    project = json.loads((tmp_path / run_record.RECORD).read_text(encoding="utf-8"))["project"]
    assert project["git_commit"] == head and len(head) == 40
    assert project["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no"))
    assert project["version"] == run_record.VERSION
