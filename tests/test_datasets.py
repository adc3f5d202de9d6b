"""datasets.py: image I/O, the data set layouts, bad-input errors and training triplets.

Every layout is built as a tiny fake tree under tmp_path; the real Duke/Bioptigen
scans are only read (and the test skips when they are absent).
"""
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

import datasets
from utils import DataError

H, W = 16, 24
REAL_DUKE28 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_bioptigen"


def image(tag=0, dtype=np.uint8, shape=(H, W), seed=None):
    """Random grey image whose top-left pixel is `tag`, so tests can tell images apart."""
    rng = np.random.default_rng(tag if seed is None else seed)
    top = np.iinfo(dtype).max
    array = rng.integers(0, top, size=shape, endpoint=True).astype(dtype)
    array[0, 0] = tag
    return array


def tag_of(float_image):
    return int(round(float(float_image[0, 0]) * 255))


def raises(path, *fragments):
    """Context manager: DataError whose single-line message names `path` and every fragment."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            swallowed = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            assert str(path) in message, message
            for fragment in fragments:
                assert fragment in message, message
            return swallowed
    return _Check()


# ---------------------------------------------------------------- fake trees

@pytest.fixture
def make_duke28(fake_duke28):
    """make_duke28(root, ids=range(1, 7), splits=None): conftest's tree with tagged H x W images and all four
    neighbours; tags: noisy 10n + k (test.tif k = 0, k.tif k), clean 10n + 9."""
    def make(root, ids=range(1, 7), splits=None):
        return fake_duke28(root, ids, images="tagged", size=(H, W), neighbours=(1, 2, 3, 4), splits=splits)
    return make


def make_pku37(root, n_noisy=3, n_clean=2):
    for kind, count, offset in (("noisy", n_noisy, 100), ("clean", n_clean, 200)):
        (root / kind).mkdir(parents=True)
        for i in range(count):
            tifffile.imwrite(root / kind / f"{i:04d}.tif", image(offset + i))
    return root


def make_duke17(root, ids=(1, 2)):
    for n in ids:
        d = root / str(n)
        d.mkdir(parents=True)
        tifffile.imwrite(d / f"{n}_Raw Image.tif", image(n, np.uint16))
        tifffile.imwrite(d / f"{n}_Averaged Image.tif", image(100 + n, np.uint16))
    return root


SPLITS = {"train": [1, 2, 3, 4], "test": [5, 6]}


# ---------------------------------------------------------------- image I/O

@pytest.mark.parametrize("suffix", [".tif", ".png"])
@pytest.mark.parametrize("dtype, depth", [(np.uint8, 8), (np.uint16, 16)])
def test_round_trip_keeps_dtype_shape_values(tmp_path, suffix, dtype, depth):
    original = image(7, dtype)
    source = tmp_path / f"in{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(source, original)
    else:
        assert cv2.imwrite(str(source), original)
    loaded, bit_depth = datasets.read_image(source)
    assert bit_depth == depth
    assert loaded.dtype == np.float32 and loaded.shape == (H, W)
    assert 0.0 <= loaded.min() and loaded.max() <= 1.0
    np.testing.assert_array_equal(datasets.from_float(loaded, bit_depth), original)

    out = tmp_path / "sub" / f"out{suffix}"  # parent is created on write
    datasets.write_image(out, loaded, bit_depth)
    back = datasets.read_raw(out)
    assert back.dtype == dtype and back.shape == (H, W)
    np.testing.assert_array_equal(back, original)


def test_lzw_tiff_loads(tmp_path):
    # The real scans are compressed; tifffile needs imagecodecs to decode LZW.
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, image(3), compression="lzw")
    loaded, depth = datasets.read_image(path)
    assert depth == 8 and tag_of(loaded) == 3


def test_float_tiff(tmp_path):
    values = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    datasets.write_image(tmp_path / "f.tif", values, 32)
    loaded, depth = datasets.read_image(tmp_path / "f.tif")
    assert depth == 32 and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values)

    # A rounding overshoot from another tool is clipped, not rejected.
    tifffile.imwrite(tmp_path / "over.tif", (values * (1 + 1e-7)).astype(np.float64))
    loaded, depth = datasets.read_image(tmp_path / "over.tif")
    assert depth == 32 and loaded.max() <= 1.0

    bad = tmp_path / "range.tif"
    tifffile.imwrite(bad, values * 255)
    with raises(bad, "[0, 1]"):
        datasets.read_image(bad)
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((H, W), np.nan, np.float32))
    with raises(nan, "finite"):
        datasets.read_image(nan)
    with raises(tmp_path / "f.png", "PNG"):
        datasets.write_image(tmp_path / "f.png", values, 32)


def test_from_float_clips_and_zeroes_nan():
    out = datasets.from_float(np.array([[-0.5, 0.5, 2.0, np.nan]], np.float32), 8)
    np.testing.assert_array_equal(out, [[0, 128, 255, 0]])
    assert out.dtype == np.uint8
    assert datasets.from_float(np.ones((2, 2)), 16).max() == 65535
    with pytest.raises(ValueError):
        datasets.from_float(np.ones((2, 2)), 12)


def test_write_image_unknown_format(tmp_path):
    with raises(tmp_path / "x.jpg", "unsupported"):
        datasets.write_image(tmp_path / "x.jpg", np.zeros((H, W)), 8)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_rgb_with_equal_channels_is_grey(tmp_path, suffix):
    grey = image(5)
    path = tmp_path / f"rgb{suffix}"
    rgb = np.stack([grey] * 3, axis=-1)
    if suffix == ".tif":
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        cv2.imwrite(str(path), rgb)
    loaded, depth = datasets.read_image(path)
    assert loaded.shape == (H, W) and depth == 8
    np.testing.assert_array_equal(datasets.from_float(loaded, 8), grey)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_colour_image_is_rejected(tmp_path, suffix):
    rgb = np.stack([image(1), image(2), image(3)], axis=-1)
    path = tmp_path / f"colour{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        cv2.imwrite(str(path), rgb)
    with raises(path, "colour"):
        datasets.read_image(path)


def test_singleton_channel_axis_is_grey(tmp_path):
    path = tmp_path / "hw1.tif"
    tifffile.imwrite(path, image(4)[..., None], photometric="minisblack")
    assert datasets.read_image(path)[0].shape == (H, W)


@pytest.mark.parametrize("array", [
    np.zeros((3, H, W), np.uint8),   # 3-page stack
    np.arange(10, dtype=np.uint8),   # 1-D
    np.zeros((0, 5), np.uint8),      # empty 2-D
    np.zeros((0,), np.uint8),        # empty 1-D
], ids=["3-page", "1-D", "empty-2-D", "empty-1-D"])
def test_not_a_2d_grey_image(tmp_path, array):
    path = tmp_path / "bad.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about writing zero-size arrays
        tifffile.imwrite(path, array)
    with raises(path, "not a 2-D grey image"):
        datasets.read_image(path)


def test_unsupported_pixel_type(tmp_path):
    path = tmp_path / "int32.tif"
    tifffile.imwrite(path, image(1).astype(np.int32))
    with raises(path, "int32"):
        datasets.read_image(path)


def _truncated(source, target):
    data = source.read_bytes()
    target.write_bytes(data[:len(data) // 2])
    return target


@pytest.mark.parametrize("kind", ["tif", "lzw-tif", "junk-tif", "png", "junk-png"])
def test_corrupt_file_is_a_data_error(tmp_path, kind):
    big = image(1, np.uint16, shape=(64, 64))
    if kind == "tif":
        tifffile.imwrite(tmp_path / "ok.tif", big)
        path = _truncated(tmp_path / "ok.tif", tmp_path / "cut.tif")
    elif kind == "lzw-tif":
        tifffile.imwrite(tmp_path / "ok.tif", big, compression="lzw")
        path = _truncated(tmp_path / "ok.tif", tmp_path / "cut.tif")
    elif kind == "png":
        cv2.imwrite(str(tmp_path / "ok.png"), big)
        path = _truncated(tmp_path / "ok.png", tmp_path / "cut.png")
    else:
        path = tmp_path / f"junk.{kind.split('-')[1]}"
        path.write_bytes(b"this is not an image")
    with raises(path, "unreadable or corrupt"):
        datasets.read_image(path)


def test_missing_file(tmp_path):
    with raises(tmp_path / "nope.tif", "no such file"):
        datasets.read_image(tmp_path / "nope.tif")


def test_list_images(tmp_path):
    with raises(tmp_path / "missing", "not found"):
        datasets.list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with raises(tmp_path / "empty", "no .tif"):
        datasets.list_images(tmp_path / "empty")
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("b.TIF", "a.png", "c.tiff", "notes.txt", "._a.png"):  # ._ : macOS AppleDouble junk
        (folder / name).write_bytes(b"x")
    assert [p.name for p in datasets.list_images(folder)] == ["a.png", "b.TIF", "c.tiff"]


def test_is_blank():
    assert datasets.is_blank(np.ones((H, W), np.float32))
    assert datasets.is_blank(np.zeros((H, W), np.float32))
    assert not datasets.is_blank(image(1) / 255.0)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("nesting", ["", "PKU37_OCT_Denoising", "PKU37_OCT_Denoising/PKU37_OCT_Denoising"])
def test_pku37_layout(tmp_path, nesting):
    make_pku37(tmp_path / nesting if nesting else tmp_path)
    noisy, clean, val = datasets.load_unpaired("pku37", tmp_path)
    assert sorted(tag_of(x) for x in noisy) == [100, 101, 102]
    assert sorted(tag_of(x) for x in clean) == [200, 201]
    assert val == []
    assert all(x.shape == (H, W) and x.dtype == np.float32 for x in noisy + clean)


def test_pku37_blank_clean_image_skipped_with_warning(tmp_path):
    make_pku37(tmp_path)
    white, black = tmp_path / "clean" / "white.tif", tmp_path / "clean" / "black.png"
    tifffile.imwrite(white, np.full((H, W), 255, np.uint8))
    cv2.imwrite(str(black), np.zeros((H, W), np.uint8))
    with pytest.warns(UserWarning) as record:
        _, clean, _ = datasets.load_unpaired("pku37", tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    assert str(white) in messages and "white" in messages
    assert str(black) in messages and "black" in messages
    assert sorted(tag_of(x) for x in clean) == [200, 201]


def test_pku37_all_clean_blank_is_an_error(tmp_path):
    make_pku37(tmp_path, n_clean=0)
    tifffile.imwrite(tmp_path / "clean" / "w.tif", np.full((H, W), 255, np.uint8))
    with pytest.warns(UserWarning), raises(tmp_path / "clean", "blank"):
        datasets.load_unpaired("pku37", tmp_path)


def test_pku37_bad_trees(tmp_path):
    (tmp_path / "noisy").mkdir()
    with raises(tmp_path, "noisy/ and clean/"):
        datasets.load_unpaired("pku37", tmp_path)
    (tmp_path / "clean").mkdir()
    with raises(tmp_path / "noisy", "no .tif"):
        datasets.load_unpaired("pku37", tmp_path)
    with raises(tmp_path / "absent", "not found"):
        datasets.load_unpaired("pku37", tmp_path / "absent")
    with pytest.raises(DataError, match="no registered references"):
        datasets.load_pairs("pku37", tmp_path)


def test_pku37_corrupt_noisy_image_names_it(tmp_path):
    make_pku37(tmp_path)
    bad = tmp_path / "noisy" / "0001.tif"
    bad.write_bytes(b"II*\x00garbage")
    with raises(bad, "unreadable or corrupt"):
        datasets.load_unpaired("pku37", tmp_path)


def test_duke17_layout(tmp_path):
    make_duke17(tmp_path, ids=(2, 10, 1))
    (tmp_path / "notes").mkdir()  # non-numeric folders are not subjects
    samples = datasets.load_pairs("duke17", tmp_path)
    assert [s.id for s in samples] == ["1", "2", "10"]
    for s in samples:
        assert s.bit_depth == 16 and s.noisy.shape == s.clean.shape == (H, W)
        assert s.path == str(tmp_path / s.id / f"{s.id}_Raw Image.tif")
    np.testing.assert_array_equal(datasets.from_float(samples[0].clean, 16), image(101, np.uint16))
    with pytest.raises(DataError, match="not an unpaired training set"):
        datasets.load_unpaired("duke17", tmp_path)


def test_duke17_bad_trees(tmp_path):
    with raises(tmp_path, "no subject folders"):
        datasets.load_pairs("duke17", tmp_path)
    make_duke17(tmp_path)
    averaged = tmp_path / "2" / "2_Averaged Image.tif"
    averaged.unlink()
    with raises(averaged, "no such file"):
        datasets.load_pairs("duke17", tmp_path)
    tifffile.imwrite(averaged, image(0, np.uint16, shape=(H, W + 1)))
    with raises(tmp_path / "2" / "2_Raw Image.tif", "differs"):
        datasets.load_pairs("duke17", tmp_path)


@pytest.mark.parametrize("split, ids", [("train", ["1", "2", "3", "4"]), ("test", ["5", "6"]),
                                        ("all", ["1", "2", "3", "4", "5", "6"])])
def test_duke28_pairs_by_split(tmp_path, split, ids, make_duke28):
    make_duke28(tmp_path, splits=SPLITS)
    samples = datasets.load_pairs("duke28", tmp_path, split)
    assert [s.id for s in samples] == ids
    for s in samples:
        assert tag_of(s.noisy) == 10 * int(s.id) and tag_of(s.clean) == 10 * int(s.id) + 9
        assert s.bit_depth == 8 and s.path == str(tmp_path / s.id / "test.tif")


def test_duke28_split_order_and_duplicates_do_not_matter(tmp_path, make_duke28):
    make_duke28(tmp_path, splits={"train": [4, "2", 1, 2, 3], "test": [6, 5]})
    assert [d.name for d in datasets.duke28_subjects(tmp_path, "train")] == ["1", "2", "3", "4"]
    assert [d.name for d in datasets.duke28_subjects(str(tmp_path), "test")] == ["5", "6"]


def test_duke28_split_errors(tmp_path, make_duke28):
    make_duke28(tmp_path)
    # No splits.json: only --split all works.
    assert len(datasets.load_pairs("duke28", tmp_path, "all")) == 6
    with raises(tmp_path / "splits.json", "--split all"):
        datasets.load_pairs("duke28", tmp_path, "test")

    (tmp_path / "splits.json").write_text(json.dumps({"train": [1, 2], "test": [5, 99]}))
    with raises(tmp_path / "splits.json", "99"):
        datasets.load_pairs("duke28", tmp_path, "test")
    with raises(tmp_path / "splits.json", "no split 'val'"):
        datasets.load_pairs("duke28", tmp_path, "val")

    (tmp_path / "splits.json").write_text("{not json")
    with raises(tmp_path / "splits.json", "JSON"):
        datasets.load_pairs("duke28", tmp_path, "test")
    (tmp_path / "splits.json").write_text(json.dumps([1, 2, 3]))
    with raises(tmp_path / "splits.json", "id lists"):
        datasets.load_pairs("duke28", tmp_path, "test")


def test_duke28_bad_trees(tmp_path, make_duke28):
    (tmp_path / "empty").mkdir()
    with raises(tmp_path / "empty", "no subject folders"):
        datasets.load_pairs("duke28", tmp_path / "empty", "all")
    with raises(tmp_path / "missing", "not found"):
        datasets.load_pairs("duke28", tmp_path / "missing", "all")
    root = make_duke28(tmp_path / "tree", ids=(1, 2))
    tifffile.imwrite(root / "2" / "average.tif", image(29, shape=(H + 2, W)))
    with raises(root / "2" / "test.tif", "differs"):
        datasets.load_pairs("duke28", root, "all")
    (root / "2" / "average.tif").unlink()
    with raises(root / "2" / "average.tif", "no such file"):
        datasets.load_pairs("duke28", root, "all")


def test_duke28_unpaired_uses_train_subjects_and_holds_back_validation(tmp_path, make_duke28):
    make_duke28(tmp_path, splits=SPLITS)
    (tmp_path / "2" / "3.tif").unlink()  # neighbours are optional, per file
    (tmp_path / "2" / "4.tif").unlink()
    noisy, clean, val = datasets.load_unpaired("duke28", tmp_path, "train", n_val=1)
    # Train subjects 1-3 (4 held back): test + neighbours as noisy, averages as clean.
    assert sorted(tag_of(x) for x in noisy) == [10, 11, 12, 13, 14, 20, 21, 22, 30, 31, 32, 33, 34]
    assert sorted(tag_of(x) for x in clean) == [19, 29, 39]
    assert [s.id for s in val] == ["4"]
    assert tag_of(val[0].noisy) == 40 and tag_of(val[0].clean) == 49
    # Test subjects 5 and 6 appear nowhere.
    used = {tag_of(x) // 10 for x in noisy + clean} | {int(s.id) for s in val}
    assert used == {1, 2, 3, 4}

    _, clean, val = datasets.load_unpaired("duke28", tmp_path, "train", n_val=2)
    assert [s.id for s in val] == ["3", "4"] and len(clean) == 2
    _, clean, val = datasets.load_unpaired("duke28", tmp_path, "train", n_val=0)
    assert val == [] and len(clean) == 4


def test_duke28_unpaired_never_trains_on_test_subjects(tmp_path, make_duke28):
    make_duke28(tmp_path, splits=SPLITS)
    with raises(tmp_path, "test split"):
        datasets.load_unpaired("duke28", tmp_path, "test")
    with pytest.warns(UserWarning, match="without the test subjects 5, 6"):
        noisy, clean, val = datasets.load_unpaired("duke28", tmp_path, "all", n_val=1)
    assert {tag_of(x) // 10 for x in noisy + clean} == {1, 2, 3}
    assert [s.id for s in val] == ["4"]

    (tmp_path / "splits.json").write_text(json.dumps({"train": [1, 2, 5], "test": [5, 6]}))
    with raises(tmp_path / "splits.json", "shares subject(s) 5"):
        datasets.load_unpaired("duke28", tmp_path, "train")


def test_duke28_unpaired_errors(tmp_path, make_duke28):
    make_duke28(tmp_path, splits=SPLITS)
    with raises(tmp_path, "too few"):
        datasets.load_unpaired("duke28", tmp_path, "train", n_val=4)
    with pytest.raises(DataError, match="n_val"):
        datasets.load_unpaired("duke28", tmp_path, "train", n_val=-1)
    with raises(tmp_path / "splits.json", "no split 'training'"):
        datasets.load_unpaired("duke28", tmp_path, "training")
    (tmp_path / "splits.json").unlink()
    with raises(tmp_path / "splits.json"):
        datasets.load_unpaired("duke28", tmp_path, "train")
    # Without splits.json, --split all trains on every subject.
    noisy, clean, val = datasets.load_unpaired("duke28", tmp_path, "all", n_val=2)
    assert len(noisy) == 4 * 5 and len(clean) == 4 and [s.id for s in val] == ["5", "6"]


def test_pairs_and_unpaired_data_each_need_the_right_layout(tmp_path):
    with pytest.raises(DataError, match="no registered references"):
        datasets.load_pairs("pku37", tmp_path)
    with pytest.raises(DataError, match="not an unpaired training set"):
        datasets.load_unpaired("duke17", tmp_path)


def test_dataset_name_and_root_errors(tmp_path):
    with pytest.raises(DataError, match="unknown --dataset duke29"):
        datasets.load_pairs("duke29")
    with pytest.raises(DataError, match="unknown --dataset pku"):
        datasets.load_unpaired("pku")
    with pytest.raises(DataError, match="needs --data_root"):
        datasets.load_pairs("duke28", None, "test")
    with raises(tmp_path / "missing", "not found"):
        datasets.load_pairs("duke28", tmp_path / "missing", "test")
    assert set(datasets.DATASETS) == {"synthetic", "pku37", "duke17", "duke28"}


def test_synthetic_is_built_in():
    samples = datasets.load_pairs("synthetic", synthetic_size=32)
    assert len(samples) > 0 and samples[0].noisy.shape == samples[0].clean.shape == (32, 32)
    with pytest.raises(DataError, match="split test"):
        datasets.load_pairs("synthetic", split="train", synthetic_size=32)


# ---------------------------------------------------------------- triplets

def test_random_crop_is_a_window_or_its_mirror():
    import random
    base = np.arange(H * W, dtype=np.float32).reshape(H, W)
    rng = random.Random(0)
    for _ in range(20):
        crop = datasets.random_crop(base, 8, rng)
        top, left = divmod(int(crop.min()), W)
        window = base[top:top + 8, left:left + 8]
        assert np.array_equal(crop, window) or np.array_equal(crop, window[:, ::-1])
    with pytest.raises(DataError, match="smaller than --patch_size 32"):
        datasets.random_crop(base, 32, rng)


def _triplets(seed=0, length=16):
    # Each image sits at its own level (plus texture), so a crop tells where it came from.
    # The arrays are float64 on purpose: crops must still come out float32.
    noisy = [np.full((H, W), v, np.float32) + image(i, seed=i) / 2550.0 for i, v in enumerate((0.1, 0.3, 0.5, 0.7))]
    clean = [np.full((H, W), 0.9, np.float32) + image(9, seed=9) / 2550.0]
    return datasets.TripletDataset(noisy, clean, patch_size=8, length=length, seed=seed)


def test_triplet_dataset_shapes_and_distinct_noisy_images():
    data = _triplets()
    assert len(data) == 16
    for index in range(len(data)):
        a, b, c = data[index]
        for crop in (a, b, c):
            assert isinstance(crop, torch.Tensor) and crop.shape == (1, 8, 8) and crop.dtype == torch.float32
        level = lambda t: round(float(t.min()), 1)  # which noisy image a crop came from
        assert level(a) != level(b)
        assert level(a) in (0.1, 0.3, 0.5, 0.7) and level(c) == 0.9


def test_triplet_dataset_deterministic_per_seed_epoch_index():
    first, second = _triplets(seed=3), _triplets(seed=3)

    def epoch_items(data):
        return [torch.cat(data[i]) for i in range(len(data))]

    items = epoch_items(first)
    assert all(torch.equal(x, y) for x, y in zip(items, epoch_items(second)))
    assert torch.equal(torch.cat(first[5]), torch.cat(first[5]))  # re-reading an index is stable

    first.set_epoch(1)
    changed = epoch_items(first)
    assert not all(torch.equal(x, y) for x, y in zip(items, changed))
    second.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(changed, epoch_items(second)))
    other_seed = epoch_items(_triplets(seed=4))
    assert not all(torch.equal(x, y) for x, y in zip(items, other_seed))


def test_triplet_dataset_rejects_unusable_inputs():
    one = [np.zeros((H, W), np.float32)]
    with pytest.raises(DataError, match="at least 2 noisy"):
        datasets.TripletDataset(one, one, 8, 4)
    with pytest.raises(DataError, match="at least 1 clean"):
        datasets.TripletDataset(one * 2, [], 8, 4)
    with pytest.raises(DataError, match=f"clean training image 0 is {H}x{W}, smaller than --patch_size 20"):
        datasets.TripletDataset([np.zeros((40, 40), np.float32)] * 2, one, 20, 4)


# ---------------------------------------------------------------- real data

def test_real_duke28_data_loads():
    if not (REAL_DUKE28 / "splits.json").is_file():
        pytest.skip(f"real Duke/Bioptigen data not found at {REAL_DUKE28}")
    samples = datasets.load_pairs("duke28", REAL_DUKE28, "test")
    assert [s.id for s in samples] == ["11", "12", "13", "14", "15"]
    for s in samples:
        assert s.noisy.shape == s.clean.shape == (450, 900)
        assert s.bit_depth == 8 and s.noisy.dtype == np.float32
        assert not datasets.is_blank(s.noisy) and not datasets.is_blank(s.clean)
    with tifffile.TiffFile(REAL_DUKE28 / "11" / "test.tif") as tif:
        assert tif.pages[0].compression != 1, "expected the real scans to be compressed"

    # Training reads ~50 such scans (a second); the subject lists are enough here.
    assert [d.name for d in datasets.duke28_subjects(REAL_DUKE28, "train")] == [str(n) for n in range(1, 11)]
    assert all((REAL_DUKE28 / str(n) / f"{k}.tif").is_file() for n in range(1, 16) for k in range(1, 5))


def test_val_neighbours_add_each_held_back_subjects_neighbours_scored_against_its_average(tmp_path, fake_duke28):
    root = fake_duke28(tmp_path / "duke", ids=(1, 2, 3, 4), images="tagged", neighbours=(1, 2, 3, 4),
                       splits={"train": ["1", "2", "3", "4"], "test": []})
    _, _, plain = datasets.load_unpaired("duke28", root, "train", n_val=2)
    _, _, more = datasets.load_unpaired("duke28", root, "train", n_val=2, val_neighbours=True)
    assert [s.id for s in plain] == ["3", "4"] and len(more) == 2 + 2 * 4
    assert [s.id for s in more[2:6]] == ["3/1.tif", "3/2.tif", "3/3.tif", "3/4.tif"]
    for k, sample in enumerate(more[2:6]):
        np.testing.assert_array_equal(sample.noisy, plain[0].neighbours[k])
        assert round(float(sample.noisy[0, 0]) * 255) == 30 + k + 1  # the tag of subject 3's k.tif
        np.testing.assert_array_equal(sample.clean, plain[0].clean)


def test_each_validation_neighbour_b_scan_reads_the_stack_training_gives_that_b_scan(tmp_path, fake_duke28):
    # A --neighbours network validated with --val_neighbours must see each neighbour B-scan with its nearest
    # registered B-scans, nearest first, exactly as training stacks the B-scans of a training subject.
    from pathlib import Path
    from utils import context_stack
    root = fake_duke28(tmp_path / "duke", ids=(1, 2, 3, 4), images="tagged", neighbours=(1, 2, 3, 4),
                       splits={"train": ["1", "2", "3", "4"], "test": []})
    _, _, val = datasets.load_unpaired("duke28", root, "train", n_val=1, val_neighbours=True)
    training_stacks = datasets._duke28_noisy(Path(root) / "4", 4)  # 1, 2, test, 3, 4 each at the centre once
    by_id = {s.id: s for s in val}
    order = ["4/1.tif", "4/2.tif", "4", "4/3.tif", "4/4.tif"]
    for name, expected in zip(order, training_stacks):
        for k in (2, 4):
            np.testing.assert_array_equal(context_stack(by_id[name].volume(), 2, k), expected[:1 + k])
    assert all(len(s.volume()) == 5 for s in val)


def test_split_val_with_val_neighbours_scores_the_neighbours_too(tmp_path, fake_duke28):
    from argparse import Namespace
    import scoring
    root = fake_duke28(tmp_path / "duke", ids=(1, 2, 3, 4), images="tagged", neighbours=(1, 2, 3, 4),
                       splits={"train": ["1", "2", "3", "4"], "test": []})
    args = Namespace(dataset="duke28", data_root=root, split="val", val_neighbours=True)
    assert len(scoring.load_scoring_pairs(args)) == 10
    assert len(scoring.load_scoring_pairs(Namespace(dataset="duke28", data_root=root, split="val"))) == 2


# ---------------------------------------------------------------- validation folds (train.py --val_subjects)

def test_val_subjects_hold_back_the_named_subjects_instead_of_the_last(tmp_path, make_duke28):
    make_duke28(tmp_path, splits=SPLITS)
    noisy, clean, val = datasets.load_unpaired("duke28", tmp_path, "train", val_subjects=["1", "3"])
    assert [s.id for s in val] == ["1", "3"]
    assert {tag_of(x) // 10 for x in noisy + clean} == {2, 4}  # the others train; test subjects 5, 6 nowhere
    _, _, val = datasets.load_unpaired("duke28", tmp_path, "train", n_val=1, val_subjects=[2])  # ids as numbers too
    assert [s.id for s in val] == ["2"]
    with raises(tmp_path, "no training subject 5, 9 to hold back (--val_subjects)"):  # a test subject, a missing one
        datasets.load_unpaired("duke28", tmp_path, "train", val_subjects=["5", "9"])
    with raises(tmp_path, "holds back every training subject"):
        datasets.load_unpaired("duke28", tmp_path, "train", val_subjects=["1", "2", "3", "4"])


def test_a_fold_trains_validates_and_evaluates_on_its_own_subjects(tmp_path, fake_duke28, capsys):
    import evaluate
    import train
    root = fake_duke28(tmp_path / "data", ids=range(1, 5), size=(48, 64), splits={"train": [1, 2, 3], "test": [4]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--val_subjects", "1", "--patch_size", "32",
                "--batch_size", "2", "--epoch_size", "2", "--niter", "1", "--ckpt_dir", str(ckpt),
                "--img_dir", str(tmp_path / "img")])
    assert "2 noisy training images, 1 validation pairs" in capsys.readouterr().out  # subjects 2, 3 train
    summary = evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--dataset", "duke28", "--data_root", str(root),
                             "--split", "val", "--out_dir", str(tmp_path / "ev")])
    assert [row["id"] for row in summary["per_image"]] == ["1"]  # the checkpoint's own fold, not the last subjects
    with pytest.raises(DataError, match="--val_subjects names duke28 subjects; --dataset is synthetic"):
        train.parse_args(["--val_subjects", "1"])
