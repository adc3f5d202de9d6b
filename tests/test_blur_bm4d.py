"""blur.py and BM4D.py: each denoiser improves a small synthetic B-scan (BM4D from a stack of
noisy repeats of the same phantom, and more than from copies of the B-scan alone), keeps
shape, dtype and range; BM4D keeps the central B-scan; BM4D without
neighbours is a one-line error naming the image, --tune prints its table, and the synthetic
default runs (the end-to-end script tests of all four baselines: tests/test_baselines.py)."""

import dataclasses

import numpy as np
import pytest

import BM4D
import baselines
import scoring
import blur
import datasets
import synthetic
from conftest import write_duke28
from utils import psnr

SCRIPTS = {"blur": blur, "BM4D": BM4D}
BSCANS = {"blur": 1, "BM4D": 5}
JSON_KEYS = {"method", "dataset", "split", "n_images", "bscans", "mean", "std", "noisy_mean", "noisy_std",
             "seconds_per_image", "per_image"}


def eight_bit(image):
    return np.round(image * 255).astype(np.float32) / 255  # as real 8-bit B-scans arrive from read_image


def synthetic_sample(height=64, width=96):
    """A test phantom's noisy B-scan, its clean image and 4 further noisy repeats of it."""
    data = synthetic.SyntheticOCT(n_test=1, height=height, width=width)
    noisy, clean = data.test_pair(0)
    return datasets.Sample("s0", eight_bit(noisy), clean, 8, "", [eight_bit(n) for n in data.test_neighbours(0)])


def check_output(out, shape):
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_blur_improves_psnr():
    noisy, clean = synthetic.noisy_clean_pair(0, 64, 96)
    noisy = eight_bit(noisy)
    out = baselines.blur_denoise(noisy)
    check_output(out, noisy.shape)
    assert psnr(clean, out) > psnr(clean, noisy) + 5


def test_blur_is_anisotropic_gaussian():
    impulse = np.zeros((41, 81), np.float32)
    impulse[20, 40] = 1.0
    out = baselines.blur_denoise(impulse, sigma_axial=1.0, sigma_lateral=4.0)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)  # normalised kernel
    rows, cols = np.mgrid[:41, :81]
    var_axial = float((out * (rows - 20) ** 2).sum())
    var_lateral = float((out * (cols - 40) ** 2).sum())
    assert var_axial == pytest.approx(1.0, rel=0.05) and var_lateral == pytest.approx(16.0, rel=0.05)


def test_bm4d_improves_psnr_with_neighbours():
    sample = synthetic_sample()
    volume = sample.volume()
    assert volume.shape == (5, 64, 96)
    out = baselines.bm4d_denoise(volume)
    check_output(out, sample.noisy.shape)
    assert psnr(sample.clean, out) > psnr(sample.clean, sample.noisy) + 8
    # The neighbours carry information: 5 copies of the B-scan alone denoise clearly worse.
    alone = baselines.bm4d_denoise(np.stack([sample.noisy] * 5))
    assert psnr(sample.clean, out) > psnr(sample.clean, alone) + 0.5


def test_bm4d_keeps_the_central_bscan_flat():
    levels = np.array([0.8, 0.7, 0.2, 0.6, 0.9], np.float32)
    volume = np.ones((5, 40, 64), np.float32) * levels[:, None, None]
    out = baselines.bm4d_denoise(volume)
    check_output(out, (40, 64))
    np.testing.assert_allclose(out, 0.2, atol=1 / 255)


def test_bm4d_refuses_a_single_bscan():
    with pytest.raises(ValueError, match="stack"):
        baselines.bm4d_denoise(np.zeros((40, 64), np.float32))


def test_bm4d_without_neighbours_is_one_line_error(tmp_path):
    root = tmp_path / "duke"
    write_duke28(root, ids=(1,), neighbours=(1, 2, 3, 4))
    write_duke28(root, ids=(2,))  # subject 2 has no 1..4.tif
    with pytest.raises(SystemExit) as exit_info:
        BM4D.main(["--dataset", "duke28", "--data_root", str(root), "--split", "all", "--out_dir", str(tmp_path / "o")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "image '2'" in message and "neighbour" in message
    assert "image '1'" not in message and "\n" not in message


@pytest.mark.parametrize("name, grid", [("blur", {"sigma_axial": (1.0, 2.0), "sigma_lateral": (4.0, 8.0)}),
                                        ("BM4D", {"lateral_bin": (4,), "sigma_factor": (3.0,)})])
def test_tune_table(name, grid, tmp_path, capsys, monkeypatch):
    root = tmp_path / "duke"
    write_duke28(root, ids=(1, 2), neighbours=(1, 2, 3, 4))
    (root / "splits.json").write_text('{"train": [1], "test": [2]}')
    spec = {"blur": "BLUR", "BM4D": "BM4D"}[name]
    small_grid = dataclasses.replace(getattr(baselines, spec), tune_grid=grid)
    rows = scoring.baseline_main(small_grid, SCRIPTS[name].__doc__, ["--dataset", "duke28", "--data_root", str(root), "--split", "train", "--tune"])
    assert len(rows) == int(np.prod([len(values) for values in grid.values()]))
    assert all(mean_psnr > 20 for mean_psnr, _, _ in rows)  # denoised, so the volume reached BM4D
    assert f"best: --{next(iter(grid))}" in capsys.readouterr().out


class SmallSyntheticOCT(synthetic.SyntheticOCT):
    """The built-in synthetic set, 2 small test images (bm4d spends 1-4 s per call whatever the size)."""
    def __init__(self, n_train=64, n_test=8, height=256, width=256, seed=0):
        super().__init__(n_train, 2, 48, 64, seed)


@pytest.mark.parametrize("name", SCRIPTS)
def test_synthetic_default(name, tmp_path, monkeypatch):
    if name == "BM4D":  # the full default (8 images of 256 x 256) takes ~40 s: same path, smaller images
        monkeypatch.setattr(synthetic, "SyntheticOCT", SmallSyntheticOCT)
    summary = SCRIPTS[name].main(["--out_dir", str(tmp_path / "o")])
    n_images = 2 if name == "BM4D" else 8
    assert summary["dataset"] == "synthetic" and summary["split"] == "test" and summary["n_images"] == n_images
    assert summary["bscans"] == BSCANS[name]
    assert summary["mean"]["PSNR"] > summary["noisy_mean"]["PSNR"] + 5
    assert len(list((tmp_path / "o").glob("synthetic_*.tif"))) == n_images
