"""Shared test setup: everything runs offline, on the tiny model and data that the repo ships, on the CPU unless
TEST_DEVICE says otherwise (`TEST_DEVICE=cuda`: the GPU check runs the loss and trainer tests on a GPU)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# No test may reach the network: the Hub is unreachable here, and wandb logs offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
ON_CPU = DEVICE.type == "cpu"
DEMO_MODEL = ROOT / "demo" / "tiny-llama-ja"
DEMO_DATA = ROOT / "demo" / "data"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "distributed: launches DeepSpeed with several CPU ranks (deselect: -m 'not distributed')"
    )


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


_SUMMARY = []  # lines a test wants in the terminal summary (the generated-mistakes counts, say)


@pytest.fixture
def record_summary():
    return _SUMMARY.append


def pytest_terminal_summary(terminalreporter):
    for line in _SUMMARY:
        terminalreporter.write_line(line)
