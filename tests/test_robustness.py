"""bench/robustness.py: the noise levels are built as documented, and the benchmark runs end to end
on tiny synthetic images (no timing assertions)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import datasets  # noqa: E402
import models  # noqa: E402
import robustness  # noqa: E402


def constant_sample():
    """test.tif = 0 and neighbours 1..4.tif = 1, 2, 3, 4 (so each mean names the neighbours in it)."""
    shape = (4, 6)
    return datasets.Sample("s", np.zeros(shape, np.float32), np.full(shape, 0.5, np.float32),
                           neighbours=[np.full(shape, v, np.float32) for v in (1, 2, 3, 4)])


def test_duke28_levels_average_the_nearest_neighbours_first():
    sample = constant_sample()
    # nearest first: 2.tif and 3.tif (beside test.tif in the volume 1, 2, test, 3, 4), then 1.tif, 4.tif
    means = {k: float(robustness.averaged(sample, k).noisy.mean()) for k in (0, 1, 2, 3, 4)}
    assert means == pytest.approx({0: 0.0, 1: 1.0, 2: 5 / 3, 3: 1.5, 4: 2.0})
    level = robustness.averaged(sample, 2)
    volume = level.volume()
    assert [float(b.mean()) for b in volume] == pytest.approx([1.0, 2.0, 5 / 3, 3.0, 4.0])  # neighbours as recorded, input at the centre
    assert float(sample.noisy.mean()) == 0.0  # the loaded sample is left alone


def test_synthetic_levels_scale_the_speckle_residual_of_every_bscan():
    level = robustness.scaled(constant_sample(), 1.5)  # clean 0.5: 0.5 + 1.5 (v - 0.5), clipped to [0, 1]
    assert float(level.noisy.mean()) == 0.0 and [float(n.mean()) for n in level.neighbours] == [1.0] * 4
    level = robustness.scaled(constant_sample(), 0.5)
    assert float(level.noisy.mean()) == 0.25 and float(level.neighbours[0].mean()) == 0.75


def test_duke28_levels_run_from_quieter_to_noisier():
    levels = robustness.make_levels("duke28", [constant_sample()])
    assert [level.name for level in levels] == ["k=0", "k=1", "k=2", "k=4", "s=1.5", "s=2"]
    assert [level.training for level in levels] == [True] + [False] * 5
    # s: the residual against the reference (0.5) scaled: 0.5 + 2 (0 - 0.5) = -0.5, clipped to 0
    noisier = levels[-1].samples[0]
    assert float(noisier.noisy.mean()) == 0.0 and float(noisier.neighbours[0].mean()) == 1.0
    assert float(levels[1].samples[0].noisy.mean()) == 1.0  # k=1: test.tif with 2.tif


def test_ckpt_adds_any_checkpoint_as_a_row(tmp_path):
    missing = tmp_path / "epoch_3.pth"
    with pytest.raises(SystemExit, match="epoch_3.pth: checkpoint not found"):
        robustness.main(["--dataset", "synthetic", "--ckpt", str(missing), "--no_save"])
    torch.manual_seed(0)
    path = tmp_path / "g.pth"
    torch.save({"generator": models.build_generator("dncnn").state_dict(), "backbone": "dncnn", "method": "tcfl"}, path)
    payload = robustness.main(["--dataset", "synthetic", "--quick", "--no_save", "--size", "48",
                               "--methods", "noisy", "--ckpt", str(path)])
    assert list(payload["results"]) == ["noisy input", str(path)]
    row = payload["results"][str(path)]
    assert list(row) == ["s=0.5", "s=1.0", "s=1.5"] and row["s=1.0"]["n_images"] == 2
    assert robustness.method_table([path])[str(path)][2]().noise_sigma is None  # this file records no noise level
    torch.save({**torch.load(path, weights_only=True), "inference": {"lateral_bin": 1, "zero_mean": True, "noise_sigma": 0.1}}, path)
    assert robustness.method_table([path])[str(path)][2]().noise_sigma == 0.1
    assert robustness.method_table([path], noise_adapt=False)[str(path)][2]().noise_sigma is None
    wide = tmp_path / "g3.pth"  # a --neighbours 2 checkpoint: its rows read 3 B-scans (the volume)
    torch.save({"generator": models.build_generator("dncnn", in_channels=3).state_dict(), "backbone": "dncnn",
                "method": "tcfl", "args": {"neighbours": 2}}, wide)
    label, bscans, load = robustness.method_table([wide])[str(wide)]
    assert bscans == 3 and load().neighbours == 2


def test_quick_leaves_out_bm3d_and_bm4d_unless_named():
    table = robustness.method_table()
    assert {"noisy", "blur", "bm3d", "nlm", "bm4d"} <= set(table)
    quick = robustness.choose("all", table, quick=True)
    assert "bm3d" not in quick and "bm4d" not in quick and "nlm" in quick
    assert set(robustness.choose("all", table, quick=False)) == set(table)
    assert robustness.choose("nlm,bm4d", table, quick=True) == ["nlm", "bm4d"]


def test_robustness_runs_on_synthetic():
    payload = robustness.main(["--dataset", "synthetic", "--quick", "--no_save", "--size", "48",
                               "--methods", "noisy,nlm,bm4d"])
    names = ["s=0.5", "s=1.0", "s=1.5"]
    assert [level["name"] for level in payload["levels"]] == names
    assert [level["training"] for level in payload["levels"]] == [False, True, False]
    assert list(payload["results"]) == ["noisy input", "NLM.py", "BM4D.py"]
    for label, by_level in payload["results"].items():
        assert list(by_level) == names and all(s["method"] == label and s["n_images"] == 2 for s in by_level.values())
    assert payload["results"]["BM4D.py"]["s=1.0"]["bscans"] == 5
    # the noisier the level, the lower the input's PSNR; at the training level a denoiser gains
    inputs = [level["input"]["mean"]["PSNR"] for level in payload["levels"]]
    assert inputs[0] > inputs[1] > inputs[2]
    assert payload["results"]["NLM.py"]["s=1.0"]["mean"]["PSNR"] > inputs[1] + 3
    assert payload["markdown"]["PSNR"].count("\n") == 5 and "| input SSIM |" in payload["markdown"]["SSIM"]


@pytest.mark.skipif(not (robustness.ROOT.parent / "shared" / "data" / "duke_bioptigen").is_dir(),
                    reason="needs ../shared/data/duke_bioptigen (the real Duke scans)")
def test_val_split_scores_the_validation_subjects_never_the_test_ones():
    payload = robustness.main(["--split", "val", "--methods", "noisy", "--no_save"])
    _, validation = robustness.test_samples("duke28", split="val")
    assert payload["split"] == "val" and [s.id for s in validation] == ["9", "10"]
    assert payload["results"]["noisy input"]["k=0"]["n_images"] == 2
    assert all(cell["split"] == "val" for cell in payload["results"]["noisy input"].values())  # each cell says so


def test_a_run_of_some_methods_keeps_the_other_rows_of_the_results_file(tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(robustness, "RESULTS", tmp_path)
    monkeypatch.setattr(robustness, "ROOT", tmp_path)  # the figure goes under tmp_path/img
    first = robustness.main(["--dataset", "synthetic", "--quick", "--size", "48", "--methods", "noisy,blur"])
    second = robustness.main(["--dataset", "synthetic", "--quick", "--size", "48", "--methods", "nlm,blur"])
    assert list(second["results"]) == ["noisy input", "blur.py", "NLM.py"]  # blur.py run again, in its place
    assert second["results"]["noisy input"] == first["results"]["noisy input"]
    saved = (tmp_path / "robustness_synthetic_quick.json").read_text()
    assert "NLM.py" in saved and "noisy input" in saved and (tmp_path / "img" / "robustness_synthetic_quick.png").exists()
