"""Smoke tests: every benchmark runs end to end with tiny settings (no timing assertions)."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import blur_start  # noqa: E402
import ceiling  # noqa: E402
import correction  # noqa: E402
import grain  # noqa: E402
import infer_speed  # noqa: E402
import intensity  # noqa: E402
import misregistration  # noqa: E402
import inference_bin  # noqa: E402
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
    assert [s["method"] for s in summaries[:2]] == ["blur.py", "NLM.py"] and summaries[0]["n_images"] == 2
    # every row but the blur floor itself carries its paired difference to the blur floor, from its own images
    assert "blur.py" not in summaries[0]["paired"] and set(summaries[1]["paired"]) == {"blur.py"}
    nlm = summaries[1]
    diffs = [a["PSNR"] - b["PSNR"] for a, b in zip(nlm["per_image"], summaries[0]["per_image"])]
    assert nlm["paired"]["blur.py"]["PSNR"]["mean"] == pytest.approx(np.mean(diffs))


def test_quality_marks_volumetric_rows_and_pairs_with_bm3d():
    summaries = quality.main(["--dataset", "synthetic", "--quick", "--no_save", "--size", "40"])
    by_name = {s["method"]: s for s in summaries}
    assert by_name["BM4D.py"]["bscans"] == 5 and by_name["BM3D.py"]["bscans"] == 1
    assert set(by_name["NLM.py"]["paired"]) == {"blur.py", "BM3D.py"}


def test_grain_scores_validation_outputs_plain_and_blurred(tmp_path):
    import torch
    import models
    torch.manual_seed(0)
    path = tmp_path / "g.pth"
    torch.save({"generator": models.build_generator("dncnn").state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {"lateral_bin": 2}}, path)
    rows = grain.main(["--ckpt", str(path), "--dataset", "synthetic", "--sigmas", "1.0", "--no_save"])
    assert [r["blur_sigma"] for r in rows] == [0.0, 1.0] and rows[1]["output_tv"] < rows[0]["output_tv"]


def test_grain_feeds_a_neighbours_checkpoint_its_volume(tmp_path):
    import torch
    import models
    torch.manual_seed(0)
    path = tmp_path / "g5.pth"
    torch.save({"generator": models.build_generator("dncnn", in_channels=5).state_dict(), "backbone": "dncnn",
                "method": "tcfl", "args": {"lateral_bin": 2, "neighbours": 4}}, path)
    seen = []
    real_call = models.Denoiser.__call__

    def spy(self, image, centre=None):
        seen.append(np.asarray(image).shape)
        return real_call(self, image, centre)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.Denoiser, "__call__", spy)
        grain.main(["--ckpt", str(path), "--dataset", "synthetic", "--sigmas", "1.0", "--no_save"])
    assert seen and all(shape[0] == 5 and len(shape) == 3 for shape in seen)  # the B-scan and its 4 neighbours


def test_misregistration_shifts_only_the_neighbours_within_the_bound_and_scores_the_lone_reading(tmp_path):
    import torch
    import models
    from utils import psnr
    volume = np.random.default_rng(0).random((5, 40, 60)).astype(np.float32)
    moved = misregistration.misregistered(volume, 2, 3, 0, np.random.default_rng(1))
    np.testing.assert_array_equal(moved[2], volume[2])
    for page in (0, 1, 3, 4):  # each neighbour is its own copy moved axially by at most 3 pixels, never laterally
        matches = [d for d in range(-3, 4) if np.array_equal(moved[page][5:-5], np.roll(volume[page], d, 0)[5:-5])]
        assert len(matches) == 1
    assert not np.array_equal(moved, volume)
    torch.manual_seed(0)
    path = tmp_path / "g5.pth"
    torch.save({"generator": models.build_generator("dncnn", in_channels=5, skip_nlm=12, skip_centre_weight=0.6).state_dict(),
                "backbone": "dncnn", "method": "tcfl", "args": {"neighbours": 4, "skip_nlm": 12.0, "skip_centre_weight": 0.6}},
               path)
    rows = misregistration.main(["--ckpt", str(path), "--dataset", "synthetic", "--size", "64", "--draws", "1", "--no_save"])
    denoiser = models.load_checkpoint(path)[0]
    samples = misregistration.test_samples("synthetic", 64, split="val")[1]
    lone = [psnr(s.clean, denoiser(np.asarray(s.volume(), np.float32)[2])) for s in samples]
    registered = [psnr(s.clean, denoiser(np.asarray(s.volume(), np.float32), 2)) for s in samples]
    assert rows["lone B-scan"]["psnr"] == pytest.approx(np.mean(lone), abs=1e-6)
    assert rows["registered"]["psnr"] == pytest.approx(np.mean(registered), abs=1e-6)
    assert rows["axial ±20"]["psnr"] != pytest.approx(rows["registered"]["psnr"], abs=1e-3)  # the neighbours moved


SHARED_DUKE = BENCH.parent.parent / "shared" / "data" / "duke_bioptigen"


@pytest.mark.skipif(not SHARED_DUKE.is_dir(), reason="needs ../shared/data/duke_bioptigen (the real Duke scans)")
def test_inference_bin_scores_the_validation_bscans_at_each_binning():
    ckpt = BENCH.parent / "ckpt" / "tcfl_duke28_G.pth"
    payload = inference_bin.main(["--ckpt", str(ckpt), "--bins", "4", "8", "--classical", "blur", "--no_save"])
    rows = payload["rows"]
    assert list(rows) == ["blur.py", "tcfl_duke28_G.pth at 4:1 (uses 5 B-scans)", "tcfl_duke28_G.pth at 8:1 (uses 5 B-scans)"]
    assert payload["n_images"] == 10 and all(row["split"] == "val" and row["n_images"] == 10 for row in rows.values())
    assert {r["id"] for r in rows["blur.py"]["per_image"]} >= {"9", "10", "9/1.tif"}  # subjects 9-10 and neighbours
    # the paired difference is the difference of the means (same images, same order)
    vs = rows["tcfl_duke28_G.pth at 8:1 (uses 5 B-scans)"]["vs"]["blur.py"]
    assert vs["mean"] == pytest.approx(rows["tcfl_duke28_G.pth at 8:1 (uses 5 B-scans)"]["mean"]["PSNR"] - rows["blur.py"]["mean"]["PSNR"])
    assert vs["low"] <= vs["mean"] <= vs["high"]
    # the 2.5-D checkpoint reads each B-scan with its neighbours, as evaluate.py feeds it
    import datasets
    import models
    from utils import psnr
    sample = next(s for s in datasets.load_unpaired("duke28", SHARED_DUKE, "train", val_neighbours=True)[2] if s.id == "9")
    with_neighbours = psnr(sample.clean, models.load_checkpoint(ckpt)[0](sample.volume()))
    row = next(r for r in rows["tcfl_duke28_G.pth at 4:1 (uses 5 B-scans)"]["per_image"] if r["id"] == "9")
    assert row["PSNR"] == pytest.approx(with_neighbours, abs=1e-3)
    assert rows["tcfl_duke28_G.pth at 4:1 (uses 5 B-scans)"]["bscans"] == 5 and rows["blur.py"]["bscans"] == 1
    coarse = inference_bin.main(["--ckpt", str(ckpt), "--bins", "4", "--classical", "blur", "--decimate", "2", "--no_save"])
    assert coarse["decimate"] == 2 and coarse["rows"]["blur.py"]["n_images"] == 10
    assert coarse["rows"]["blur.py"]["mean"]["PSNR"] != rows["blur.py"]["mean"]["PSNR"]  # other images: every 2nd A-scan
    with pytest.raises(SystemExit, match="--classical: unknown or volume method bm4d"):
        inference_bin.main(["--ckpt", str(ckpt), "--classical", "bm4d", "--no_save"])


def test_quality_feeds_a_neighbours_checkpoint_its_volume(tmp_path, monkeypatch):
    import torch
    import models
    torch.manual_seed(0)
    path = tmp_path / "g3_G.pth"
    torch.save({"generator": models.build_generator("dncnn", in_channels=3).state_dict(), "backbone": "dncnn",
                "method": "tcfl", "args": {"neighbours": 2}}, path)
    monkeypatch.setattr(quality, "shipped_checkpoints", lambda: [path])
    seen = []
    real_timed = quality.timed
    monkeypatch.setattr(quality, "timed", lambda denoise, samples, volume=False: seen.append(volume) or real_timed(denoise, samples, volume))
    summaries = quality.main(["--dataset", "synthetic", "--quick", "--no_bm3d", "--no_save", "--size", "40"])
    row = {s["method"]: s for s in summaries}["tcfl (g3_G.pth)"]
    assert row["bscans"] == 3 and seen[-1] is True


def test_ceiling_finds_each_b_scans_best_gaussian_and_averages_the_classical_outputs(tmp_path, fake_duke28):
    from scipy import ndimage
    import baselines
    import datasets
    from utils import psnr
    noisy = np.random.default_rng(0).random((64, 256), dtype=np.float32)
    wide = datasets.Sample("wide", noisy, ndimage.gaussian_filter(noisy, (2.0, 32.0), mode="reflect") + 1e-3)
    row = ceiling.best_gaussian(wide)
    assert (row["best_axial"], row["best_lateral"]) == (2.0, 32.0) and row["best_psnr"] > row["blur_py_psnr"]
    mix = ceiling.classical_mix([wide])["wide"]
    by_hand = (baselines.blur_denoise(noisy) + baselines.CLASSICAL["bm3d"].denoise(noisy)) / 2
    assert mix["(blur+bm3d)/2"] == pytest.approx(psnr(wide.clean, by_hand), abs=1e-6)
    root = fake_duke28(tmp_path, ids=(1, 2, 3), neighbours=(1, 2, 3, 4), splits={"train": [1, 2], "test": [3]})
    payload = ceiling.main(["--data_root", str(root), "--no_save"])
    assert [row["id"] for row in payload["per_scan"]] == ["1", "2"] + [f"{n}/{k}.tif" for n in (1, 2) for k in range(1, 5)]
    assert payload["summary"]["oracle_gain_db"] >= 0  # blur.py's Gaussian is on the grid
    fold = payload["folds"]["1-2"]
    assert fold["n_images"] == 10
    assert fold["bm3d"] == pytest.approx(np.mean([scores["bm3d"] for scores in payload["classical_per_scan"].values()]))
    assert payload["classical_mix"]["blur"] == pytest.approx(np.mean([payload["classical_per_scan"][i]["blur"] for i in "12"]))


def test_blur_start_scores_what_an_untrained_generator_starts_from():
    """W = 1 reads the B-scan alone (neighbours do not matter); W < 1 blends in the neighbours, whose
    independent speckle the synthetic phantoms carry, so that start is ahead on every phantom."""
    payload = blur_start.main(["--dataset", "synthetic", "--size", "64", "--starts", "1.25,4,1", "1.0,3,0.6",
                               "--no_save"])
    plain, blend = payload["starts"]["1.25,4,1"], payload["starts"]["1.0,3,0.6"]
    assert payload["split"] == "test" and len(plain["per_image"]) == 8
    assert plain["vs_first"]["mean"] == 0 and blend["ahead_of_first"] == 8 and blend["vs_first"]["low"] > 0.5
    samples = blur_start.datasets.load_pairs("synthetic", split="test", synthetic_size=64)
    alone = blur_start.start_denoiser(blur_start.parse_start("1.25,4,1"))
    first = blur_start.psnr(samples[0].clean, np.clip(alone(samples[0].noisy), 0, 1))  # copies as neighbours
    assert plain["per_image"][0] == pytest.approx(first, abs=1e-6)
    with pytest.raises(SystemExit, match="W must be in"):
        blur_start.main(["--dataset", "synthetic", "--size", "64", "--starts", "1,3,1.5", "--no_save"])
    for bad in ("1,3", "nlm:12", "median:3,0.6", "nlm:x,0.6", "nlm:12,0.6,0.3,1"):
        with pytest.raises(SystemExit, match=f"--starts: '{bad}' is not"):
            blur_start.parse_start(bad)
    assert blur_start.parse_start("nlm:12,0.6") == {"skip_nlm": 12.0, "skip_centre_weight": 0.6}
    assert blur_start.parse_start("bm3d:2.5,0.5,0.3") == {"skip_bm3d": 2.5, "skip_centre_weight": 0.5, "skip_blur_share": 0.3}
    assert blur_start.parse_start("nlm+bm3dlc:12,2.5,0.6,0.2") == {
        "skip_nlm": 12.0, "skip_bm3d": 2.5, "skip_centre_weight": 0.6, "skip_blur_share": 0.2, "skip_bm3d_profile": "lc"}
    assert blur_start.parse_start("nlm+bm3d:12,2.5,0.6") == {"skip_nlm": 12.0, "skip_bm3d": 2.5, "skip_centre_weight": 0.6}
    for bad in ("nlm+bm3d:12,0.6", "bm3dlc:2.5", "nlm+bm3dlc:12,2.5,0.6,0.2,1"):
        with pytest.raises(SystemExit, match=re.escape(f"--starts: '{bad}' is not")):
            blur_start.parse_start(bad)
    with pytest.raises(SystemExit, match="S must be in"):
        blur_start.parse_start("nlm:12,0.6,1")


def test_blur_start_keeps_the_starts_scored_before_in_its_results_file(tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    blur_start.main(["--dataset", "synthetic", "--size", "32", "--starts", "1.25,4,1", "1.0,3,0.6"])
    blur_start.main(["--dataset", "synthetic", "--size", "32", "--starts", "1.0,3,0.6", "1.0,2,0.6"])
    saved = json.loads((tmp_path / "blur_start_synthetic_test.json").read_text())["starts"]
    assert set(saved) == {"1.25,4,1", "1.0,3,0.6", "1.0,2,0.6"}
    assert saved["1.25,4,1"]["first"] == "1.25,4,1" and saved["1.0,2,0.6"]["first"] == "1.0,3,0.6"


def test_blur_start_scores_an_nlm_start_as_nlm_py_of_the_neighbour_blend():
    import cv2
    from utils import bin_laterally, context_stack
    payload = blur_start.main(["--dataset", "synthetic", "--size", "64", "--starts", "1.0,3,0.6", "nlm:12,0.6",
                               "--no_save"])
    sample = blur_start.datasets.load_pairs("synthetic", split="test", synthetic_size=64)[0]
    volume = sample.volume()
    binned = bin_laterally(context_stack(volume, len(volume) // 2, 4), 4)
    filtered = blur_start.baselines.nlm(0.6 * binned[0] + 0.4 * binned[1:].mean(0), 12, 7, 21, eight_bit=True)
    filtered += (binned[0] - filtered).mean()  # the Denoiser's zero-mean noise map keeps the B-scan's mean
    expected = cv2.resize(filtered, volume.shape[:0:-1], interpolation=cv2.INTER_LINEAR)
    assert payload["starts"]["nlm:12,0.6"]["per_image"][0] == pytest.approx(
        blur_start.psnr(sample.clean, np.clip(expected, 0, 1)), abs=1e-3)


def test_intensity_calibration_finds_a_reference_flatter_than_the_output():
    rng = np.random.default_rng(1)
    output = rng.random((64, 96), dtype=np.float32)
    reference = 0.5 * output + 0.1  # half the contrast, shifted: the oracle's map undoes both
    oracle, contrast = intensity.calibrated(reference, output)
    assert contrast == pytest.approx(0.5, abs=1e-4) and oracle > 60 > intensity.psnr(reference, output)


def test_intensity_scores_a_checkpoint_and_its_start(tmp_path, fake_duke28):
    import models
    torch = pytest.importorskip("torch")
    root = fake_duke28(tmp_path, ids=(1, 2, 3, 4), neighbours=(1, 2, 3, 4), splits={"train": [1, 2, 3], "test": [4]})
    net = models.build_generator("dncnn", in_channels=5, skip_blur=(1.0, 3.0), skip_centre_weight=0.6)
    torch.nn.init.normal_([m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight, std=100.0)
    trained = models.Denoiser(net, lateral_bin=4, zero_mean=True, neighbours=4)
    sample = intensity.datasets.load_pairs("duke28", str(root), "train")[0]
    start = intensity.start_of(trained)
    untrained = blur_start.start_denoiser(blur_start.parse_start("1.0,3,0.6"))
    np.testing.assert_allclose(start(sample.volume()), untrained(sample.volume()), atol=1e-5)
    assert np.abs(trained(sample.volume()) - start(sample.volume())).max() > 1e-3  # the correction was zeroed
    payload = intensity.main(["--data_root", str(root), "--no_bm3d", "--no_save"])
    assert [row["id"] for row in payload["per_image"]["blur.py"]] == ["1", "2", "3"]
    blur = payload["summary"]["blur.py"]
    assert blur["calibrated_psnr"] >= blur["psnr"]  # the identity map is one the oracle could pick


def test_infer_speed_feeds_a_neighbours_checkpoint_its_volume():
    import datasets
    import models
    sample = datasets.load_pairs("synthetic", split="test", synthetic_size=32)[0]
    stacked = models.Denoiser(models.build_generator("dncnn", in_channels=5), neighbours=4)
    single = models.Denoiser(models.build_generator("dncnn"))
    region = (slice(0, 16), slice(8, 24))
    assert infer_speed.network_input(stacked, sample, region).shape == (5, 16, 16)
    np.testing.assert_array_equal(infer_speed.network_input(stacked, sample)[2], sample.noisy)  # the B-scan in the middle
    np.testing.assert_array_equal(infer_speed.network_input(single, sample, region), sample.noisy[region])
    assert infer_speed.network_input(lambda image: image, sample).shape == sample.noisy.shape  # NLM.py: the B-scan


def test_correction_scores_each_epoch_and_the_start_on_the_held_back_test_bscans(tmp_path, fake_duke28):
    import models
    torch = pytest.importorskip("torch")
    root = fake_duke28(tmp_path, ids=(1, 2, 3, 4), neighbours=(1, 2, 3, 4), splits={"train": [1, 2, 3], "test": [4]})
    args = {"dataset": "duke28", "data_root": str(root), "split": "train", "n_val": 1, "seed": 0, "val_subjects": None,
            "neighbours": 4, "skip_blur": [1.0, 3.0], "skip_centre_weight": 0.6, "lateral_bin": 4}
    net = models.build_generator("dncnn", in_channels=5, skip_blur=(1.0, 3.0), skip_centre_weight=0.6)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"generator": net.state_dict(), "backbone": "dncnn", "method": "tcfl", "args": args, "step": 400},
               run / "epoch_10.pth")  # correction still zero: scores as the start
    torch.nn.init.normal_([m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight, std=100.0)
    torch.save({"generator": net.state_dict(), "backbone": "dncnn", "method": "tcfl", "args": args, "step": 80},
               run / "epoch_2.pth")
    payload = correction.main([str(run), "--no_save"])
    result = payload["runs"][str(run)]
    assert result["subjects"] == ["3"]  # the held-back training subject's test.tif only, never the test split's 4
    start, trained, untrained = result["rows"]
    assert [start["step"], trained["step"], untrained["step"]] == [0, 80, 400]  # epoch 10 after epoch 2
    assert untrained["psnr"] == pytest.approx(start["psnr"], abs=1e-4) and trained["psnr"] != pytest.approx(start["psnr"], abs=0.01)
    classical = correction.main([str(run), "--classical", "--no_save"])["classical"]["rows"]
    sample = correction.held_out_bscans(torch.load(run / "epoch_2.pth", weights_only=True))[0]
    assert set(classical) == {"blur.py", "NLM.py", "BM3D.py", "BM4D.py"}
    assert classical["blur.py"]["psnr"] == pytest.approx(correction.psnr(sample.clean, correction.baselines.blur_denoise(sample.noisy)))
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save({"generator": models.build_generator("dncnn").state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {**args, "neighbours": 0, "skip_blur": [0.0, 0.0], "skip_centre_weight": 1.0}, "step": 40},
               plain / "epoch_1.pth")
    with pytest.raises(SystemExit, match="not a filter-start generator"):
        correction.main([str(plain), "--no_save"])


def test_correction_keeps_the_runs_scored_before_in_its_results_file(tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = {"subjects": ["3"], "rows": [{"step": 0, "psnr": 28.0, "ssim": 0.68}]}
    monkeypatch.setattr(correction, "score_run", lambda run, data_root: {**rows, "run": run})
    monkeypatch.setattr(correction, "score_classical", lambda run, data_root: {"blur.py": {"psnr": 27.0, "ssim": 0.67}})
    correction.main(["runs/a", "runs/b", "--classical"])
    correction.main(["runs/b", "runs/c"])
    saved = json.loads((tmp_path / "correction_duke28.json").read_text())
    assert set(saved["runs"]) == {"runs/a", "runs/b", "runs/c"}
    assert saved["classical"] == {"run": "runs/a", "rows": {"blur.py": {"psnr": 27.0, "ssim": 0.67}}}  # not scored again: kept
