"""The GPU check (`make gpu-check`) proven without a GPU: its CPU smoke mode runs every step end to end."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.distributed  # its DeepSpeed step goes through the launcher


def test_gpu_check_runs_every_step_at_toy_sizes_on_the_cpu_and_writes_its_report(tmp_path):
    report = tmp_path / "GPU.md"
    command = [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--report", str(report)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    text = report.read_text(encoding="utf-8")
    for check in (
        "environment",
        "tests",
        "benchmark",
        "layouts",
        "llama-3-8b",
        "candidates",
        "on-policy",
        "train (python)",
        "scorer",
    ):
        assert f"| {check} | pass |" in text or f"| {check} | missed |" in text, check
    assert "| train (deepspeed ZeRO-2) | pass |" in text and "| scorer | pass |" in text
    scorer = next(line for line in text.splitlines() if line.startswith("| scorer |"))
    assert re.search(r"held-out accuracy [01]\.\d{3}", scorer) and "tokens/s" in scorer
    assert "| both |" in text and "step time / TRL's" in text  # the layouts' table and targets
    assert "| TRL's SimPO step |" in text and "tokens/s" in text  # the 8B-geometry stage's table
    assert "| fused |" in text and "fused step time / TRL's" in text  # the benchmark's table and targets
    runs = [line for line in text.splitlines() if line.startswith("| train (")]
    assert all("diversity/* finite" in run and "tokens/s" in run and "diversity eval" in run for run in runs)
    assert "Packages that ran: torch" in text
    assert "| sampling, tokens/s (" in text and "batched (" in text  # the candidates stage's table and figures
    assert "| sampling path | tokens/s | against dynamic |" in text  # the sampling paths compared
    on_policy = next(line for line in text.splitlines() if line.startswith("| on-policy |"))
    assert "tokens/s" in on_policy and "replies/s" in on_policy and "rows/s on cpu" in on_policy
    assert "ELYZA 8B on one such GPU" in text and "minutes per 100 tokens of mean reply length" in text
