"""evaluate.py and the scoring library: ROI metrics in every output format, the validation
split of a checkpoint, published outputs with the literature's check values, paired intervals."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from utils import DataError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def fake_duke28(root, ids=(1, 2, 3), size=(48, 96), splits=None, rois=True):
    for n in ids:
        noisy, clean = synthetic.noisy_clean_pair(n, *size)
        (root / str(n)).mkdir(parents=True)
        tifffile.imwrite(root / str(n) / "test.tif", np.round(noisy * 255).astype(np.uint8))
        tifffile.imwrite(root / str(n) / "average.tif", np.round(clean * 255).astype(np.uint8))
    if splits:
        (root / "splits.json").write_text(json.dumps(splits))
    if rois:
        rects = [[0, 0, 20, 6], [10, 20, 30, 8], [50, 30, 30, 8]]  # first: background (vitreous at the top)
        (root / "rois.json").write_text(json.dumps(
            {"subjects": {str(n): {"background": [1], "rects_xywh": rects} for n in ids}}))
    return root


def test_outputs_are_scored_with_roi_metrics_in_table_csv_and_json(tmp_path, capsys):
    root = fake_duke28(tmp_path / "duke")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for n in (1, 2, 3):  # a blurred copy of the noisy scan: a smoother background than the input's
        noisy = tifffile.imread(root / str(n) / "test.tif").astype(np.float64)
        tifffile.imwrite(outputs / f"{n}.tif", np.round(ndimage.gaussian_filter(noisy, 3)).astype(np.uint8))
    summary = evaluate.main(["--outputs", str(outputs), "--dataset", "duke28", "--data_root", str(root), "--split", "all",
                             "--json", str(tmp_path / "s.json"), "--out_dir", str(tmp_path / "o")])
    saved = json.loads((tmp_path / "s.json").read_text())
    for key in ("MSR", "CNR", "ENL"):
        assert key in saved["mean"] and key in saved["noisy_mean"] and key in saved["per_image"][0]
    assert saved["mean"]["ENL"] > saved["noisy_mean"]["ENL"]  # the reference's background is smoother
    assert "ENL" in capsys.readouterr().out.split("noisy")[0]  # a column of the printed table
    assert "ENL" in (tmp_path / "o" / "scores.csv").read_text().splitlines()[0]
    assert summary["mean"]["CNR"] == pytest.approx(saved["mean"]["CNR"])
    (root / "rois.json").unlink()  # no regions file: no ROI columns, the rest unchanged
    plain = evaluate.main(["--outputs", str(outputs), "--dataset", "duke28", "--data_root", str(root), "--split", "all",
                           "--out_dir", str(tmp_path / "o2")])
    assert "ENL" not in plain["mean"] and plain["mean"]["PSNR"] == pytest.approx(summary["mean"]["PSNR"])


def test_bad_regions_file_is_one_line_error(tmp_path):
    root = fake_duke28(tmp_path / "duke")
    (root / "rois.json").write_text('{"subjects": {"1": {"background": [], "rects_xywh": [[0, 0, 4, 4]]}}}')
    with pytest.raises(DataError, match="rois.json: not a regions file") as error:
        evaluate.main(["--outputs", str(tmp_path), "--dataset", "duke28", "--data_root", str(root), "--split", "all"])
    assert "\n" not in str(error.value)


def test_split_val_scores_the_subject_a_checkpoint_held_back(tmp_path):
    """A run trained with --n_val 1 validates on its last training subject only: --split val must
    score exactly that subject, read from the checkpoint, not the default two."""
    root = fake_duke28(tmp_path / "duke", ids=(1, 2, 3, 4), size=(64, 96), splits={"train": [1, 2, 3], "test": [4]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--n_val", "1", "--patch_size", "32", "--batch_size", "2",
                "--epoch_size", "4", "--niter", "1", "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    summary = evaluate.main(["--epoch", "1", "--ckpt_dir", str(ckpt), "--dataset", "duke28", "--data_root", str(root),
                             "--split", "val", "--out_dir", str(tmp_path / "ev")])
    assert [row["id"] for row in summary["per_image"]] == ["3"]


def test_published_mifcn_outputs_reproduce_the_literature_roi_values(tmp_path):
    folder = DATA / "published_outputs" / "MIFCN"
    if not folder.is_dir():
        pytest.skip(f"published outputs not found at {folder}")
    summary = evaluate.main(["--outputs", str(folder), "--dataset", "duke28", "--data_root", str(DATA / "duke_bioptigen"),
                             "--split", "test", "--json", str(tmp_path / "out.json"), "--out_dir", str(tmp_path / "o")])
    assert summary["mean"]["MSR"] == pytest.approx(8.83, rel=0.01 / 8.83)
    assert summary["mean"]["CNR"] == pytest.approx(3.97, rel=0.01 / 3.97)
    assert summary["mean"]["ENL"] == pytest.approx(2278, rel=1e-3)


def test_paired_difference_interval():
    better = scoring.paired_difference([30.0, 31.0, 29.5, 30.5, 31.5], [29.0, 30.2, 28.9, 29.4, 30.1])
    assert better["low"] > 0 and better["low"] <= better["mean"] <= better["high"]
    assert better["mean"] == pytest.approx(np.mean([1.0, 0.8, 0.6, 1.1, 1.4]))
    mixed = scoring.paired_difference([1.0, -1.0, 2.0, -2.0, 0.5], [0, 0, 0, 0, 0])
    assert mixed["low"] < 0 < mixed["high"]  # the interval covers 0: no conclusion
    same = scoring.paired_difference([2.0, 2.0], [1.0, 1.0])
    assert same == {"mean": 1.0, "low": 1.0, "high": 1.0}


def test_export_records_the_inference_binning_chosen_for_it(tmp_path):
    # evaluate.py --export OUT --lateral_bin N: the file denoises N:1 from then on (denoise.py's default),
    # its training options stay as they were; without --lateral_bin it keeps the training binning.
    torch.manual_seed(0)
    source = tmp_path / "epoch_1.pth"
    torch.save({"generator": models.build_generator("dncnn").state_dict(), "backbone": "dncnn", "method": "tcfl",
                "args": {"lateral_bin": 4}, "inference": {"lateral_bin": 4, "zero_mean": True, "noise_sigma": 0.1}}, source)
    evaluate.main(["--ckpt", str(source), "--export", str(tmp_path / "as_trained.pth")])
    evaluate.main(["--ckpt", str(source), "--export", str(tmp_path / "wider.pth"), "--lateral_bin", "8"])
    as_trained, _ = models.load_checkpoint(tmp_path / "as_trained.pth")
    wider, state = models.load_checkpoint(tmp_path / "wider.pth")
    assert as_trained.lateral_bin == 4 and wider.lateral_bin == 8 and state["args"]["lateral_bin"] == 4
    assert wider.zero_mean and wider.noise_sigma == 0.1
    with pytest.raises(DataError, match="exists"):
        evaluate.main(["--ckpt", str(source), "--export", str(tmp_path / "wider.pth")])
