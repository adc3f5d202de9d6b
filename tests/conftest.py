"""Shared test setup: the repository root and bench/ on sys.path (once, for every test file), the
`slow` marker, and two fixtures: `fake_duke28` (a tiny duke28 tree on disk) and `trainer_args`
(train.py's options with overrides)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "bench", ROOT):  # the root ends up first: its modules win over bench/'s
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import synthetic  # noqa: E402
import options  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a test of many seconds (subprocesses, torchrun); still part of the default run, "
                   "deselect with -m 'not slow' for a quick pass")


# ---------------------------------------------------------------- a fake duke28 tree

# rois=True: three rectangles per subject, [x, y, width, height]; the first (the top-left corner,
# vitreous in the synthetic phantom) is the background. They need images of at least 38 x 80.
ROI_RECTS = [[0, 0, 20, 6], [10, 20, 30, 8], [50, 30, 30, 8]]


def tagged_image(tag, shape, dtype=np.uint8):
    """Random grey image whose top-left pixel is `tag`, so a test can tell which file a loader read."""
    top = np.iinfo(dtype).max
    array = np.random.default_rng(tag).integers(0, top, size=shape, endpoint=True).astype(dtype)
    array[0, 0] = tag
    return array


def _synthetic_subject(n, size):
    """Subject n of the synthetic kind: {name: uint8 image}, name "test", "average" or neighbour k (1..4):
    synthetic.noisy_clean_pair(n), and further independent speckle of the same phantom as neighbours."""
    noisy, clean = synthetic.noisy_clean_pair(n, *size)
    reflectivity = synthetic.phantom(np.random.default_rng(n), *size)  # the phantom behind noisy_clean_pair(n)
    as_uint8 = lambda image: np.round(image * 255).astype(np.uint8)
    images = {"test": as_uint8(noisy), "average": as_uint8(clean)}
    for k in range(1, 5):
        images[k] = as_uint8(synthetic.speckle_image(reflectivity, np.random.default_rng((n, k))))
    return images


def write_duke28(root, ids=(1, 2, 3), *, images="synthetic", size=(48, 96), neighbours=(), splits=None, rois=False):
    """A tiny duke28 tree: <root>/<n>/test.tif + average.tif (+ <k>.tif for k in `neighbours`) for n in `ids`,
    [<root>/splits.json], [<root>/rois.json]; returns root.

    images: "synthetic": subject n is synthetic.noisy_clean_pair(n, *size) as uint8 (something a
                denoiser improves and the metrics can score), neighbours more speckle of the same phantom;
            "tagged": random uint8 images whose top-left pixel tells the file: test.tif 10n, neighbour
                k.tif 10n + k, average.tif 10n + 9;
            or a function (n, name) -> 2-D array, name "test", "average" or the neighbour number k.
    splits: {split: [ids]} for splits.json (None: no file, only --split all works).
    rois: True: ROI_RECTS for every subject, the first the background; a dict: written as rois.json; False: none.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    import tifffile
    for n in ids:
        if images == "synthetic":
            subject = _synthetic_subject(n, size)
            picture = lambda name: subject[name]
        elif images == "tagged":
            picture = lambda name: tagged_image(10 * n + {"test": 0, "average": 9}.get(name, name), size)
        else:
            picture = lambda name: images(n, name)
        folder = root / str(n)
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "test.tif", picture("test"))
        tifffile.imwrite(folder / "average.tif", picture("average"))
        for k in neighbours:
            tifffile.imwrite(folder / f"{k}.tif", picture(k))
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    if rois is True:
        rois = {"subjects": {str(n): {"background": [1], "rects_xywh": ROI_RECTS} for n in ids}}
    if rois:
        (root / "rois.json").write_text(json.dumps(rois))
    return root


@pytest.fixture
def fake_duke28():
    """The builder write_duke28(root, ids=(1, 2, 3), *, images=..., size=..., neighbours=..., splits=..., rois=...)."""
    return write_duke28


# ---------------------------------------------------------------- train.py's options

def make_trainer_args(*argv, **overrides):
    """options.parse_args(argv + overrides): overrides by option name (lam=3, frozen_bn=True, zero_mean=False,
    noise_scale=[0.5, 2]) go through the parser, so they are checked against the method and the
    learning rates' defaults follow --gan, as on the command line."""
    actions = {action.dest: action for action in options.get_parser()._actions}
    argv = list(argv)
    for name, value in overrides.items():
        action = actions[name]  # KeyError: not an option of train.py
        flag = f"--{name}"
        if action.nargs == 0:  # store_true, or --x / --no-x
            if value:
                argv.append(flag)
            elif flag in action.option_strings and f"--no-{name}" in action.option_strings:
                argv.append(f"--no-{name}")
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return options.parse_args(argv)


@pytest.fixture
def trainer_args():
    """make_trainer_args(*argv, **overrides) -> train.py's parsed options."""
    return make_trainer_args


@pytest.fixture(autouse=True)
def fp32_where_auto(monkeypatch):
    """--precision auto resolves to fp32 in the suite, on every CPU: the tests compare outputs against
    fp32 references, and on a CPU with native bf16 (AVX512-BF16 / AMX) auto would pick bf16."""
    import utils
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: False)
