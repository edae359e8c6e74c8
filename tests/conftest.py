"""Shared test setup: everything runs offline on the CPU, on the tiny model and data that the repo ships."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# No test may reach the network: the Hub is unreachable here, and wandb logs offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

DEMO_MODEL = ROOT / "demo" / "tiny-llama-ja"
DEMO_DATA = ROOT / "demo" / "data"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "distributed: launches DeepSpeed with several CPU ranks (deselect: -m 'not distributed')"
    )


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
