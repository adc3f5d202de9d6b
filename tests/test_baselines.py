"""The classical baselines: BM3D and NLM each improve a small synthetic B-scan, keep shape,
dtype and range, the 16-bit NLM path keeps precision; all four scripts (blur.py, BM3D.py, NLM.py,
BM4D.py) run end to end on a tiny fake duke28 tree (JSON summary with the B-scans read per output,
one-line errors for a missing folder and for tuning on test subjects)."""

import dataclasses
import json

import numpy as np
import pytest
import tifffile

import BM3D
import BM4D
import baselines
import scoring
import NLM
import blur
import synthetic
from conftest import write_duke28
from utils import psnr

SCRIPTS = {"BM3D": BM3D, "NLM": NLM, "blur": blur, "BM4D": BM4D}
BSCANS = {"BM3D": 1, "NLM": 1, "blur": 1, "BM4D": 5}
DENOISERS = {"BM3D": baselines.bm3d_denoise, "NLM": baselines.nlm_denoise}
JSON_KEYS = {"method", "dataset", "split", "n_images", "bscans", "mean", "std", "noisy_mean", "noisy_std",
             "seconds_per_image", "per_image"}


def pair(seed=0, height=64, width=96, eight_bit=True):
    noisy, clean = synthetic.noisy_clean_pair(seed, height, width)
    if eight_bit:  # as real 8-bit B-scans arrive from datasets.read_image
        noisy = np.round(noisy * 255).astype(np.float32) / 255
    return noisy, clean


@pytest.mark.parametrize("name", DENOISERS)
@pytest.mark.parametrize("eight_bit", [True, False])
def test_denoiser_improves_psnr(name, eight_bit):
    noisy, clean = pair(eight_bit=eight_bit)
    out = DENOISERS[name](noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert psnr(clean, out) > psnr(clean, noisy) + 5


@pytest.mark.parametrize("name", DENOISERS)
def test_flat_image_stays_flat(name):
    flat = np.full((40, 60), 0.5, np.float32)
    np.testing.assert_allclose(DENOISERS[name](flat), 0.5, atol=1 / 255)


@pytest.mark.parametrize("name", DENOISERS)
def test_odd_width_and_no_binning(name):
    noisy, _ = pair(seed=1, height=40, width=67)
    for lateral_bin in (1, 3):
        assert DENOISERS[name](noisy, lateral_bin=lateral_bin).shape == (40, 67)


def test_is_8bit():
    assert baselines.is_8bit(np.arange(256, dtype=np.uint8).astype(np.float32) / 255)
    assert not baselines.is_8bit(np.arange(0, 65536, 7, dtype=np.uint16).astype(np.float32) / 65535)


def test_nlm_16bit_path_keeps_precision():
    # A smooth uint16 ramp spanning 0.2..0.4: 8-bit NLM could return at most ~52
    # distinct levels; the uint16/NORM_L1 path must keep the ramp to well under a grey level.
    ramp16 = np.round(np.linspace(0.2, 0.4, 512) * 65535).astype(np.uint16)
    image = np.tile(ramp16, (48, 1)).astype(np.float32) / 65535
    assert not baselines.is_8bit(image)
    for lateral_bin in (1, baselines.NLM_LATERAL_BIN):
        out = baselines.nlm_denoise(image, lateral_bin=lateral_bin)
        inner = (slice(None), slice(64, -64))  # away from the lateral borders (reflected there)
        assert len(np.unique(np.round(out[inner] * 65535))) > 300
        assert np.abs(out[inner] - image[inner]).max() < 0.25 / 255


def write_fake_duke28(root):
    """Subjects 1 and 2 of 48 x 96 with their 4 neighbouring B-scans (BM4D reads them)."""
    return write_duke28(root, ids=(1, 2), neighbours=(1, 2, 3, 4))


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_end_to_end(name, tmp_path):
    root = tmp_path / "duke"
    write_fake_duke28(root)
    out_dir, json_path = tmp_path / "out", tmp_path / "out.json"
    summary = SCRIPTS[name].main(["--dataset", "duke28", "--data_root", str(root), "--split", "all",
                                  "--json", str(json_path), "--out_dir", str(out_dir)])
    saved = json.loads(json_path.read_text())
    assert set(saved) == JSON_KEYS
    assert saved["method"] == name and saved["dataset"] == "duke28" and saved["split"] == "all"
    assert saved["bscans"] == BSCANS[name]
    assert saved["n_images"] == 2 and saved["seconds_per_image"] > 0
    assert saved["mean"]["PSNR"] > saved["noisy_mean"]["PSNR"] + 5
    assert summary["mean"]["PSNR"] == pytest.approx(saved["mean"]["PSNR"])
    for i in (1, 2):  # written back at the input's bit depth
        written = tifffile.imread(out_dir / f"{i}.tif")
        assert written.dtype == np.uint8 and written.shape == (48, 96)
    assert (out_dir / "scores.csv").is_file()


def test_main_workers(tmp_path):
    root = tmp_path / "duke"
    write_fake_duke28(root)
    args = ["--dataset", "duke28", "--data_root", str(root), "--split", "all", "--out_dir", str(tmp_path / "o")]
    single = NLM.main(args)
    parallel = NLM.main(args + ["--workers", "2"])
    assert parallel["mean"] == pytest.approx(single["mean"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_data_root_is_one_line_error(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].main(["--dataset", "duke28", "--data_root", str(missing), "--out_dir", str(tmp_path / "o")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and str(missing) in message and "\n" not in message


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("split", ["test", "all"])
def test_tune_refuses_any_split_with_test_subjects(name, split, tmp_path):
    root = tmp_path / "duke"
    write_fake_duke28(root)
    (root / "splits.json").write_text('{"train": [1], "test": [2]}')
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].main(["--dataset", "duke28", "--data_root", str(root), "--split", split, "--tune"])
    message = str(exit_info.value.code)
    assert message.startswith("error: --tune") and "holds test images" in message and "\n" not in message


def test_tune_table(tmp_path, capsys, monkeypatch):
    root = tmp_path / "duke"
    write_fake_duke28(root)
    small_grid = dataclasses.replace(baselines.NLM, tune_grid={"lateral_bin": (1, 2), "h": (10, 20)})
    (root / "splits.json").write_text('{"train": [1, 2], "test": []}')
    rows = scoring.baseline_main(small_grid, NLM.__doc__, ["--dataset", "duke28", "--data_root", str(root), "--split", "train", "--tune"])
    assert len(rows) == 4
    assert "best: --lateral_bin" in capsys.readouterr().out
