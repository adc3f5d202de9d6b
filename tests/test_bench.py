"""Smoke tests: every benchmark runs end to end with tiny settings (no timing assertions)."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import grain  # noqa: E402
import infer_speed  # noqa: E402
import quality  # noqa: E402
import train_speed  # noqa: E402


def test_train_speed_runs():
    rows = train_speed.main(["--patch_size", "32", "--batches", "1", "--repeats", "1", "--no_save"])
    assert rows[0]["batch"] == 1 and set(rows[0]["seconds_per_step"]) >= {"naive", "batched"}


def test_infer_speed_runs():
    timings, _ = infer_speed.main(["--height", "32", "--width", "48", "--no_save", "--quick", "--ckpt", "none"])
    assert set(timings) == {"dncnn", "unet", "srdensenet"}


def test_quality_runs_on_synthetic():
    summaries = quality.main(["--dataset", "synthetic", "--quick", "--no_bm3d", "--no_save", "--size", "48"])
    assert summaries[0]["method"] == "NLM.py" and summaries[0]["n_images"] == 2


def test_grain_scores_validation_outputs_plain_and_blurred(tmp_path):
    import torch
    import models
    torch.manual_seed(0)
    path = tmp_path / "g.pth"
    torch.save({"generator": models.build_generator("dncnn").state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {"lateral_bin": 2}}, path)
    rows = grain.main(["--ckpt", str(path), "--dataset", "synthetic", "--sigmas", "1.0", "--no_save"])
    assert [r["blur_sigma"] for r in rows] == [0.0, 1.0] and rows[1]["output_tv"] < rows[0]["output_tv"]
