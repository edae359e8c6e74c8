"""The rule for a complete checkpoint (diversity_simpo/checkpoints.py), file by file: each kind of cut-short write is
caught and named. A real kill during a real write is in test_faults.py; real DeepSpeed checkpoints pass the rule in
test_deepspeed.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diversity_simpo.checkpoints import checkpoint_problem, newest_complete_checkpoint


def write_checkpoint(folder, step, deepspeed=False):
    """The files the HF Trainer writes, in its order (trainer_state.json last), with real serialisers."""
    folder.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64)}, folder / "model.safetensors", metadata={"format": "pt"})
    if deepspeed:
        engine = folder / f"global_step{step}"
        engine.mkdir()
        torch.save({"module": None}, engine / "mp_rank_00_model_states.pt")
        for rank in (0, 1):
            torch.save({"state": torch.randn(1000)}, engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        (folder / "latest").write_text(f"global_step{step}")
    else:
        torch.save({"state": torch.randn(1000)}, folder / "optimizer.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("deepspeed", [False, True], ids=["plain", "deepspeed"])
def test_a_checkpoint_written_to_the_end_is_complete(tmp_path, deepspeed):
    assert checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-5", 5, deepspeed)) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda f: cut(f / "trainer_state.json"), "trainer_state.json is cut short"),
        (lambda f: (f / "trainer_state.json").write_text('{"global_step": 4}'), "names step 4"),
        (lambda f: (f / "model.safetensors").unlink(), "no model weights"),
        (lambda f: cut(f / "model.safetensors", 0.99), "model.safetensors is cut short"),
        (lambda f: cut(f / "model.safetensors", 0.001), "model.safetensors is cut short"),
        (lambda f: cut(f / "optimizer.pt", 0.9), "optimizer.pt is cut short"),
        (lambda f: cut(f / "rng_state.pth", 0.9), "rng_state.pth is cut short"),
    ],
)
def test_each_cut_short_or_missing_file_of_a_plain_checkpoint_is_named(tmp_path, damage, problem):
    folder = write_checkpoint(tmp_path / "checkpoint-5", 5)
    damage(folder)
    assert problem in checkpoint_problem(folder)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "latest").unlink(), "`latest` file is missing"),
        (lambda f: cut(f / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"), "rank_1_mp_rank_00_optim"),
        (lambda f: (f / "global_step5" / "mp_rank_00_model_states.pt").unlink(), "holds no model states"),
    ],
)
def test_an_unfinished_deepspeed_engine_checkpoint_is_named(tmp_path, damage, problem):
    folder = write_checkpoint(tmp_path / "checkpoint-5", 5, deepspeed=True)
    damage(folder)
    assert problem in checkpoint_problem(folder)


def test_the_newest_complete_checkpoint_is_chosen_past_newer_incomplete_ones_and_nothing_is_deleted(tmp_path):
    for step in (5, 10, 15, 20):
        write_checkpoint(tmp_path / f"checkpoint-{step}", step)
    cut(tmp_path / "checkpoint-20" / "model.safetensors")
    (tmp_path / "checkpoint-15" / "trainer_state.json").unlink()
    cut(tmp_path / "checkpoint-5" / "optimizer.pt")  # older than the one chosen: not even looked at
    found, passed_over = newest_complete_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-10"
    assert [(p.name, "cut short" in why or "trainer_state" in why) for p, why in passed_over] == [
        ("checkpoint-20", True),
        ("checkpoint-15", True),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{s}" for s in (10, 15, 20, 5)]


def test_no_complete_checkpoint_gives_none(tmp_path):
    cut(write_checkpoint(tmp_path / "checkpoint-3", 3) / "model.safetensors")
    assert newest_complete_checkpoint(tmp_path)[0] is None
    assert newest_complete_checkpoint(tmp_path / "missing") == (None, [])
