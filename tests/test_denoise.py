"""denoise.py on the user's own files: types, stacks, folders, refusals."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

import datasets
import denoise
import evaluate
import models
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]
DUKE = ROOT.parent / "shared" / "data" / "duke_bioptigen"


@pytest.fixture
def ckpt(tmp_path):
    """A small random DnCNN checkpoint in the shipped generator-only format."""
    torch.manual_seed(0)
    generator = models.build_generator("dncnn")
    path = tmp_path / "g.pth"
    torch.save({"generator": generator.state_dict(), "backbone": "dncnn", "method": "tcfl"}, path)
    return path


def speckle(shape, seed=0):
    return np.random.default_rng(seed).random(shape)


def run(inputs, out, ckpt, *extra):
    return denoise.main([*map(str, inputs), "--out", str(out), "--ckpt", str(ckpt), *extra])


@pytest.mark.parametrize("suffix, dtype", [(".tif", np.uint8), (".tif", np.uint16), (".png", np.uint8), (".png", np.uint16)])
def test_round_trip_keeps_name_dtype_shape_and_range(tmp_path, ckpt, suffix, dtype):
    top = np.iinfo(dtype).max
    image = (speckle((40, 60)) * top).astype(dtype)
    src = tmp_path / "in" / f"scan{suffix}"
    src.parent.mkdir()
    tifffile.imwrite(src, image) if suffix == ".tif" else cv2.imwrite(str(src), image)
    assert run([src], tmp_path / "out", ckpt) == 0
    out = datasets.read_raw(tmp_path / "out" / src.name)
    assert out.dtype == dtype and out.shape == image.shape
    if dtype == np.uint16:  # full 16-bit precision, not 8-bit levels scaled up
        assert len(np.unique(out)) > 256 and out.max() > 255


def test_stack_stays_a_stack(tmp_path, ckpt, capsys):
    stack = (speckle((3, 32, 48)) * 65535).astype(np.uint16)
    src = tmp_path / "in" / "volume.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, stack, photometric="minisblack")
    assert run([src], tmp_path / "out", ckpt) == 0
    captured = capsys.readouterr()
    assert "volume.tif" in captured.err and "3/3" in captured.err  # a progress bar over the stack's B-scans
    assert re.search(r"3 B-scan\(s\) in [\d.]+ s \([\d.]+ B-scans/s.*peak memory \d+ MB", captured.out)
    out = tifffile.imread(tmp_path / "out" / "volume.tif")
    assert out.shape == (3, 32, 48) and out.dtype == np.uint16
    second = models.load_checkpoint(ckpt)[0](stack[1].astype(np.float32) / 65535)
    assert np.abs(out[1] / 65535 - second).max() <= 1 / 65535  # each page denoised on its own


def test_folder_with_one_corrupt_file(tmp_path, ckpt, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.tif", "c.tif"):
        tifffile.imwrite(folder / name, (speckle((24, 24)) * 255).astype(np.uint8))
    (folder / "b.tif").write_bytes(b"II*\x00 definitely not a tiff")
    assert run([folder], tmp_path / "out", ckpt) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "c.tif"]
    printed = capsys.readouterr().out + capsys.readouterr().err
    assert "b.tif" in printed and "failed (1)" in printed


def test_refuses_to_overwrite_and_to_write_next_to_inputs(tmp_path, ckpt):
    src = tmp_path / "in" / "scan.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, (speckle((24, 24)) * 255).astype(np.uint8))
    with pytest.raises(DataError, match="refusing to write next to the inputs"):
        run([src], src.parent, ckpt)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scan.tif").write_bytes(b"mine")
    with pytest.raises(DataError, match="--overwrite"):
        run([src], tmp_path / "out", ckpt)
    assert (tmp_path / "out" / "scan.tif").read_bytes() == b"mine"
    assert run([src], tmp_path / "out", ckpt, "--overwrite") == 0
    assert (tmp_path / "out" / "scan.tif").read_bytes() != b"mine"


def test_tiled_equals_untiled_through_denoise(tmp_path, ckpt):
    image = speckle((70, 90)).astype(np.float32)
    net = models.load_checkpoint(ckpt)[0].net
    with torch.no_grad():  # strong outputs so the comparison means something
        net.body[-1].weight.mul_(1e5)
    whole = models.Denoiser(net, tile=1024)(image)
    tiled = models.Denoiser(net, tile=32)(image)
    assert np.abs(whole - image).max() > 1e-2 and np.abs(whole - tiled).max() < 1e-4


def test_shipped_checkpoint_matches_evaluate_on_a_real_scan(tmp_path):
    shipped = denoise.SHIPPED_CHECKPOINT
    if not DUKE.is_dir() or not shipped.is_file():
        pytest.skip(f"needs {DUKE} (the project's shared real data) and {shipped}")
    assert denoise.main([str(DUKE / "11" / "test.tif"), "--out", str(tmp_path / "d")]) == 0
    # one file alone: a --neighbours checkpoint reads it as copies of itself, as evaluate.py --lone_bscan does
    summary = evaluate.main(["--ckpt", str(shipped), "--dataset", "duke28", "--data_root", str(DUKE), "--split", "test",
                             "--lone_bscan", "--out_dir", str(tmp_path / "ev")])
    import csv
    with open(tmp_path / "ev" / "scores.csv") as f:
        psnr_11 = next(float(r["PSNR"]) for r in csv.DictReader(f) if r["id"] == "11")
    written, _ = datasets.read_image(tmp_path / "d" / "test.tif")
    reference, _ = datasets.read_image(DUKE / "11" / "average.tif")
    from utils import psnr
    assert abs(psnr(reference, written) - psnr_11) < 0.01 and summary["n_images"] == 5


def test_a_checkpoint_trained_binned_denoises_binned_unless_told_otherwise(tmp_path, ckpt):
    state = torch.load(ckpt, weights_only=True)
    binned_ckpt = tmp_path / "binned.pth"
    torch.save({**state, "args": {"lateral_bin": 2}}, binned_ckpt)
    image = speckle((40, 64)).astype(np.float32)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "scan.tif", (image * 255).astype(np.uint8))
    assert run([tmp_path / "in"], tmp_path / "a", binned_ckpt) == 0
    assert run([tmp_path / "in"], tmp_path / "b", binned_ckpt, "--lateral_bin", "1") == 0
    denoiser, _ = models.load_checkpoint(binned_ckpt)
    noisy, _ = datasets.read_image(tmp_path / "in" / "scan.tif")
    from utils import at_lateral_scale
    unbinned = models.Denoiser(denoiser.net, lateral_bin=1, zero_mean=denoiser.zero_mean)
    expected = np.clip(at_lateral_scale(unbinned, noisy, 2), 0, 1)
    binned, _ = datasets.read_image(tmp_path / "a" / "scan.tif")
    full, _ = datasets.read_image(tmp_path / "b" / "scan.tif")
    assert np.abs(binned - expected).max() <= 1 / 255 + 1e-6
    assert np.abs(binned - full).max() > 2 / 255
    with pytest.raises(DataError, match="--lateral_bin"):
        run([tmp_path / "in"], tmp_path / "c", binned_ckpt, "--lateral_bin", "0")


def test_precision_option_turns_bf16_on_only_where_asked_or_native(ckpt, monkeypatch):
    import argparse
    import utils
    parser = argparse.ArgumentParser()
    models.add_checkpoint_args(parser)
    bf16 = lambda *argv: models.load_for_options(parser.parse_args(["--device", "cpu", *argv]), ckpt)[0].bf16
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: False)
    assert not bf16() and not bf16("--precision", "fp32") and bf16("--precision", "bf16")
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: True)
    assert bf16() and not bf16("--precision", "fp32")


def test_bf16_denoising_writes_what_fp32_writes(tmp_path, ckpt):
    # --precision bf16 (auto's choice on CPUs with AVX512-BF16 / AMX) runs the whole path, reading to writing,
    # and its saved image differs from fp32's by bf16 rounding at most (test_precision_option_... checks the flag)
    tifffile.imwrite(tmp_path / "in.tif", (speckle((40, 64)) * 65535).astype(np.uint16))
    run([tmp_path / "in.tif"], tmp_path / "fp32", ckpt, "--precision", "fp32")
    run([tmp_path / "in.tif"], tmp_path / "bf16", ckpt, "--precision", "bf16")
    fp32, bf16 = (tifffile.imread(tmp_path / name / "in.tif").astype(np.float64) / 65535 for name in ("fp32", "bf16"))
    assert np.isfinite(bf16).all() and np.abs(bf16 - fp32).max() < 0.02


def with_and_without_noise_adapt(tmp_path, capsys, ckpt, src):
    """denoise.py on src with ckpt, then with --no-noise_adapt (which must report no adaptation): the first
    run's printed report and the two outputs."""
    assert run([src], tmp_path / "on", ckpt) == 0
    report = capsys.readouterr().out
    assert run([src], tmp_path / "off", ckpt, "--no-noise_adapt") == 0
    assert "noise adaptation" not in capsys.readouterr().out
    return report, *(tifffile.imread(tmp_path / name / src.name) for name in ("on", "off"))


def test_noise_adapt_reports_noisier_bscans_and_turns_off(tmp_path, capsys):
    # A checkpoint recording a training noise level far below a speckle stack's: every page is adapted
    # and the closing report says so; --no-noise_adapt gives the plain network's output.
    torch.manual_seed(0)
    path = tmp_path / "g.pth"
    generator = models.build_generator("dncnn")
    with torch.no_grad():
        generator.body[-1].weight.mul_(1e3)  # a noise map of order 0.01-0.1, not ~0
    torch.save({"generator": generator.state_dict(), "backbone": "dncnn", "method": "tcfl",
                "inference": {"lateral_bin": 1, "zero_mean": True, "noise_sigma": 0.1}}, path)
    stack = (speckle((2, 32, 48)) * 255).astype(np.uint8)
    src = tmp_path / "in" / "volume.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, stack, photometric="minisblack")
    report, on, off = with_and_without_noise_adapt(tmp_path, capsys, path, src)
    assert re.search(r"noise adaptation: 2 of 2 B-scan\(s\) noisier than the training scans, contrast compressed x0\.\d\d",
                     report)
    plain = models.Denoiser(models.load_checkpoint(path)[0].net, zero_mean=True)(stack[0].astype(np.float32) / 255)
    assert np.abs(off[0] / 255 - plain).max() <= 1 / 255 and np.mean(on != off) > 0.1


def test_noise_adapt_reports_a_quieter_scan_and_its_narrower_start(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "blur.pth"
    generator = models.build_generator("dncnn", skip_blur=(1.0, 3.0))
    torch.save({"generator": generator.state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {"skip_blur": [1.0, 3.0]},
                "inference": {"lateral_bin": 1, "zero_mean": True, "noise_sigma": 10.0}}, path)  # far noisier than the stack
    src = tmp_path / "in" / "scan.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, (speckle((32, 48)) * 255).astype(np.uint8))
    report, on, off = with_and_without_noise_adapt(tmp_path, capsys, path, src)
    assert re.search(r"noise adaptation: 1 of 1 B-scan\(s\) from a scan quieter than the training scans, the blur "
                     r"start's width x0\.\d\d", report)
    assert np.mean(on != off) > 0.1  # the narrower start keeps more of the speckle


def test_a_neighbours_checkpoint_reads_each_page_with_its_nearest_pages(tmp_path, capsys):
    torch.manual_seed(0)
    generator = models.build_generator("dncnn", in_channels=3)
    for conv in (m for m in generator.modules() if isinstance(m, torch.nn.Conv2d)):
        torch.nn.init.normal_(conv.weight, 0, 0.2)  # weights big enough that the neighbours move the output
    path = tmp_path / "g3.pth"
    torch.save({"generator": generator.state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {"neighbours": 2}}, path)
    stack = (speckle((4, 32, 48)) * 255).astype(np.uint8)
    src = tmp_path / "in" / "volume.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, stack, photometric="minisblack")
    assert run([src], tmp_path / "out", path) == 0
    out = tifffile.imread(tmp_path / "out" / "volume.tif") / 255
    denoiser = models.load_checkpoint(path)[0]
    volume = stack.astype(np.float32) / 255
    for page in range(4):
        assert np.abs(out[page] - denoiser(volume, centre=page)).max() <= 1 / 255
    assert np.abs(out[0] - denoiser(volume[0])).max() > 2 / 255  # not the page alone
    assert run([src], tmp_path / "lone", path, "--lone_bscan") == 0  # each page alone, as a single image is
    lone = tifffile.imread(tmp_path / "lone" / "volume.tif") / 255
    for page in range(4):
        assert np.abs(lone[page] - denoiser(volume[page])).max() <= 1 / 255


def test_a_lone_bscan_for_an_nlm_start_is_reported_as_its_own_blend(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "nlm.pth"
    generator = models.build_generator("dncnn", in_channels=5, skip_nlm=12, skip_centre_weight=0.6)
    torch.save({"generator": generator.state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {"skip_nlm": 12.0, "skip_centre_weight": 0.6, "neighbours": 4},
                "inference": {"lateral_bin": 1, "zero_mean": True, "neighbours": 4}}, path)
    src = tmp_path / "in" / "scan.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, (speckle((32, 48)) * 255).astype(np.uint8))
    assert run([src], tmp_path / "out", path) == 0
    assert "lone B-scans: 1 of 1 read without neighbours, as their own blend: contrast compressed x0.63" in capsys.readouterr().out
    stack = src.parent / "stack.tif"
    tifffile.imwrite(stack, (speckle((3, 32, 48)) * 255).astype(np.uint8), photometric="minisblack")
    assert run([stack], tmp_path / "out_stack", path) == 0
    assert "lone B-scans" not in capsys.readouterr().out  # pages of a stack read their neighbours
