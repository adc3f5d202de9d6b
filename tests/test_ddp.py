"""train.py under torchrun: two CPU processes over Gloo, as on a multi-GPU machine."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate

ROOT = Path(__file__).resolve().parents[1]

ARGS = ["--dataset", "synthetic", "--patch_size", "32", "--epoch_size", "16", "--batch_size", "2",
        "--n_val", "1", "--ckpt_dir", "ckpt", "--img_dir", "img"]


def torchrun(cwd, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *ARGS, *extra]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_train_resume_and_evaluate(tmp_path):
    out = torchrun(tmp_path, "--max_steps", "3")
    hashes = re.findall(r"rank (\d) generator sha1 ([0-9a-f]{40})", out)
    assert sorted(r for r, _ in hashes) == ["0", "1"] and hashes[0][1] == hashes[1][1]
    assert out.count("----------------- options") == 1  # rank 1 neither prints nor writes
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch_1.pth", "log.csv", "opt.json", "opt.txt"]  # no leftover .tmp from a second writer
    state = torch.load(tmp_path / "ckpt" / "epoch_1.pth", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not any(k.startswith("module.") for k in state["generator"])
    rows = (tmp_path / "ckpt" / "log.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and "nan" not in rows[0] and "inf" not in rows[0]

    out = torchrun(tmp_path, "--max_steps", "6", "--resume")
    assert "resuming from" in out and torch.load(tmp_path / "ckpt" / "epoch_2.pth", weights_only=True)["step"] == 6

    summary = evaluate.main(["--epoch", "2", "--ckpt_dir", str(tmp_path / "ckpt"), "--out_dir", str(tmp_path / "ev")])
    assert summary["n_images"] == 8
