"""Distributed training: ``torchrun`` with two CPU processes (gloo) on the CLI ``train`` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_toy_config

from napari_consistent_seg.models.store import load_model


@pytest.mark.slow
def test_torchrun_two_processes_icl_train(toy_data, tmp_path, user_model_dir):
    """ICL on purpose: USCL leaves parameters without gradient, which DDP must be told about."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside this python")
    config = write_toy_config(tmp_path / "toy.yaml", toy_data, "icl")
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "napari_consistent_seg.cli", "train",
         str(config), "--run-dir", str(run), "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["iteration"] == 4
    assert [h["iteration"] for h in state["history"]] == [2, 4]
    card = load_model(run / "last").card
    assert "world size 2" in card.training.hardware
    assert card.training.iterations == 4
    # rank 0 alone writes: one history line per evaluation, not one per rank
    assert len((run / "history.jsonl").read_text().splitlines()) == 2
