"""OCT image I/O and the data sets the project reads.

Every image leaves this module as a 2-D float32 array in [0, 1]; the bit depth it
came with is kept beside it so outputs can be written back at that depth.

Layouts accepted (exactly as the public releases ship them):
    synthetic  built in (synthetic.py), no files needed
    pku37      <root>/noisy/*.tif + <root>/clean/*.tif, unpaired
               (also <root>/PKU37_OCT_Denoising/PKU37_OCT_Denoising/{noisy,clean})
    duke17     <root>/<n>/<n>_Raw Image.tif + <root>/<n>/<n>_Averaged Image.tif
    duke28     <root>/<n>/test.tif + average.tif (+ optional 1.tif..4.tif, the
               neighbouring noisy B-scans) and an optional <root>/splits.json
"""
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

import synthetic
from utils import DataError, context_stack

DATASETS = ("synthetic", "pku37", "duke17", "duke28")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")




# ---------------------------------------------------------------- image I/O

def to_grey(array, path):
    """A 2-D grey array from a read image (singleton or equal colour channels dropped), else a DataError."""
    if array.ndim == 3 and array.shape[-1] == 1:  # some writers keep a singleton sample axis
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{path}: colour image (channels differ); expected a grey OCT B-scan")
        array = rgb[..., 0]
    if array.ndim != 2 or array.size == 0:
        empty = ", empty" if array.size == 0 else ""
        raise DataError(f"{path}: not a 2-D grey image (shape {tuple(array.shape)}{empty})")
    return array


def to_float(array, path="image"):
    """uint8/uint16/float array -> (float32 image in [0, 1], bit depth 8/16/32)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0, 8
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0, 16
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
        if array.size == 0:
            raise DataError(f"{path}: empty image")
        if not np.isfinite(array).all():
            raise DataError(f"{path}: floating-point image holds NaN or infinite values; expected finite values in [0, 1]")
        # Float TIFFs written by other tools can overshoot [0, 1] by a rounding error.
        tolerance = 1e-5
        if array.min() < -tolerance or array.max() > 1 + tolerance:
            raise DataError(f"{path}: floating-point image must hold values in [0, 1] "
                            f"(holds {float(array.min()):g}..{float(array.max()):g})")
        return np.clip(array, 0.0, 1.0), 32
    raise DataError(f"{path}: unsupported pixel type {array.dtype} (use 8- or 16-bit grey)")


def from_float(image, bit_depth):
    """Inverse of to_float: clip to [0, 1] and round back to the source depth."""
    if bit_depth not in (8, 16, 32):
        raise ValueError(f"bit depth must be 8, 16 or 32, got {bit_depth}")
    # A diverged network emits NaN; casting NaN to an integer type is undefined.
    image = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0), 0.0, 1.0)
    if bit_depth == 8:
        return np.round(image * 255.0).astype(np.uint8)
    if bit_depth == 16:
        return np.round(image * 65535.0).astype(np.uint16)
    return image


def read_raw(path):
    """Read a TIFF (any page count) or PNG as stored, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                # A bad first-page offset only logs a warning in tifffile and yields an empty array.
                if not tif.series:
                    raise ValueError("no image pages")
                return tif.asarray()  # needs imagecodecs: real scans are LZW/PackBits compressed
        # imdecode on the bytes: cv2.imread cannot open non-ASCII paths on Windows.
        array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError("OpenCV could not decode it")
        if array.ndim == 3:  # OpenCV is BGR; only grey is accepted, but keep order honest
            array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[-1] == 4 else cv2.COLOR_BGR2RGB)
        return array
    except Exception as error:  # tifffile/imagecodecs raise many types for a corrupt file
        raise DataError(f"{path}: unreadable or corrupt image ({type(error).__name__}: {error})") from None


def read_image(path):
    """Read one grey B-scan -> (float32 image in [0, 1], source bit depth)."""
    return to_float(to_grey(read_raw(path), path), path)


def write_image(path, image, bit_depth=8):
    """Write a [0, 1] float image as TIFF or PNG at the given bit depth."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: unsupported output format (use {', '.join(IMAGE_SUFFIXES)})")
    if suffix == ".png" and bit_depth == 32:
        raise DataError(f"{path}: PNG cannot hold float images; use .tif")
    array = from_float(image, bit_depth)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".png":
            ok, encoded = cv2.imencode(".png", array)
            if not ok:
                raise ValueError("OpenCV could not encode it")
            encoded.tofile(path)
        else:
            tifffile.imwrite(path, array, compression="zlib")
    except Exception as error:
        raise DataError(f"{path}: could not write image ({type(error).__name__}: {error})") from None


def list_images(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    # Dot files are macOS AppleDouble "._x.tif" ghosts that unzipped releases often carry.
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise DataError(f"{folder}: no .tif/.tiff/.png images in folder")
    return files


def is_blank(image):
    """All-white or all-black images (the PKU37 release has some) carry no signal."""
    return float(image.max() - image.min()) < 1e-3


# ---------------------------------------------------------------- data sets

@dataclass
class Sample:
    id: str
    noisy: np.ndarray
    clean: np.ndarray = None  # registered reference, when the data set has one
    bit_depth: int = 8
    path: str = ""
    neighbours: list = field(default_factory=list)  # registered adjacent noisy B-scans (duke28: 1..4.tif)
    rois: dict = None  # {"foreground": [(x, y, w, h), ...], "background": [...]} from <root>/rois.json

    def volume(self):
        """The noisy B-scan between its neighbours, (1 + n, H, W): 1, 2, test, 3, 4 for duke28; what BM4D and a
        --neighbours network read (models.Denoiser takes the middle slice alone for a single-B-scan network)."""
        half = len(self.neighbours) // 2
        return np.stack(self.neighbours[:half] + [self.noisy] + self.neighbours[half:])


def _id_order(subject_id):
    return len(subject_id), subject_id  # numeric order for digit strings, no int() on odd ids


def _numeric_dirs(root):
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _check_dataset(dataset):
    # Before the root check, so a typo is not reported as a missing --data_root.
    if dataset not in DATASETS:
        raise DataError(f"unknown --dataset {dataset} (choose from {', '.join(DATASETS)})")


def _check_root(root, dataset):
    if root is None:
        raise DataError(f"--dataset {dataset} needs --data_root")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    return root


def _pair(sample_id, noisy_path, clean_path, neighbour_paths=()):
    noisy, depth = read_image(noisy_path)
    clean, _ = read_image(clean_path)
    if noisy.shape != clean.shape:
        raise DataError(f"{noisy_path}: size {noisy.shape} differs from its reference {clean_path} {clean.shape}")
    neighbours = [read_image(path)[0] for path in neighbour_paths]
    for path, image in zip(neighbour_paths, neighbours):
        if image.shape != noisy.shape:
            raise DataError(f"{path}: size {image.shape} differs from its B-scan {noisy_path} {noisy.shape}")
    return Sample(sample_id, noisy, clean, depth, str(noisy_path), neighbours)


def _duke28_pair(subject):
    """test.tif + average.tif of a duke28 subject folder, with 1..4.tif as neighbours when all four exist."""
    neighbours = [subject / f"{k}.tif" for k in range(1, 5)]
    return _pair(subject.name, subject / "test.tif", subject / "average.tif",
                 neighbours if all(p.is_file() for p in neighbours) else ())


def read_rois(root):
    """<root>/rois.json as {subject id: {"foreground": [(x, y, w, h)...], "background": [...]}}, or {} when absent.

    The format of the OCT literature's regions (Abbasi et al.): per subject "rects_xywh" (0-based
    [x, y, width, height]) and "background", the 1-based indices of the background rectangles.
    """
    path = Path(root) / "rois.json"
    if not path.is_file():
        return {}
    try:
        subjects = json.loads(path.read_text())["subjects"]
        rois = {}
        for subject_id, entry in subjects.items():
            rects = [tuple(int(v) for v in rect) for rect in entry["rects_xywh"]]
            background = {int(i) - 1 for i in entry["background"]}
            if not background or not background < set(range(len(rects))):
                raise ValueError(f"subject {subject_id}: background indices {sorted(i + 1 for i in background)} "
                                 f"do not name some but not all of its {len(rects)} rectangles")
            rois[str(subject_id)] = {"foreground": [r for i, r in enumerate(rects) if i not in background],
                                     "background": [r for i, r in enumerate(rects) if i in background]}
        return rois
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a regions file of this project's format ({type(error).__name__}: {error})") from None


def _read_splits(root):
    """<root>/splits.json as {split name: [subject id strings]}, or None when absent."""
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        return None
    try:
        splits = json.loads(splits_file.read_text())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{splits_file}: not readable JSON ({type(error).__name__}: {error})") from None
    if not isinstance(splits, dict) or not all(isinstance(ids, list) for ids in splits.values()):
        raise DataError(f"{splits_file}: expected an object of id lists, e.g. {{\"train\": [1, 2], \"test\": [3]}}")
    return {name: [str(i) for i in ids] for name, ids in splits.items()}


def duke28_subjects(root, split):
    """Subject folders of a duke28-layout root for split train|test|all (splits.json)."""
    root = Path(root)
    subjects = {p.name: p for p in _numeric_dirs(root)} if root.is_dir() else {}
    if not subjects:
        raise DataError(f"{root}: no subject folders <n>/ with test.tif + average.tif")
    if split == "all":
        return list(subjects.values())
    splits = _read_splits(root)
    splits_file = root / "splits.json"
    if splits is None:
        raise DataError(f"{root}: --split {split} needs {splits_file} (or use --split all)")
    if split not in splits:
        raise DataError(f"{splits_file}: no split '{split}' (has: {', '.join(splits)}, or use all)")
    missing = [i for i in splits[split] if i not in subjects]
    if missing:
        raise DataError(f"{splits_file}: split '{split}' lists subject id(s) {', '.join(missing)} "
                        f"with no folder in {root}")
    # Numeric order makes "the last n_val subjects" independent of how the JSON was typed.
    return sorted({subjects[i] for i in splits[split]}, key=lambda p: int(p.name))


def _pku37_root(root):
    for candidate in (root, root / "PKU37_OCT_Denoising", root / "PKU37_OCT_Denoising" / "PKU37_OCT_Denoising"):
        if (candidate / "noisy").is_dir() and (candidate / "clean").is_dir():
            return candidate
    raise DataError(f"{root}: expected noisy/ and clean/ folders here or under "
                    f"PKU37_OCT_Denoising/PKU37_OCT_Denoising/ (PKU37 layout)")


def _read_clean_folder(folder):
    images = []
    for path in list_images(folder):
        image, _ = read_image(path)
        if is_blank(image):
            warnings.warn(f"{path}: blank clean image (all {'white' if image.mean() > 0.5 else 'black'}), skipped",
                          stacklevel=2)
            continue
        images.append(image)
    if not images:
        raise DataError(f"{folder}: every clean image is blank")
    return images


def load_pairs(dataset, root=None, split="test", synthetic_size=256, seed=0):
    """Registered noisy/reference pairs for scoring: a list of Sample."""
    _check_dataset(dataset)
    if dataset == "synthetic":
        data = synthetic.SyntheticOCT(height=synthetic_size, width=synthetic_size, seed=seed)
        if split not in ("test", "all"):
            raise DataError("--dataset synthetic scores its test pairs: use --split test")
        return [Sample(f"synthetic_{i}", *data.test_pair(i), 8, "", data.test_neighbours(i)) for i in range(data.n_test)]
    if dataset == "pku37":
        raise DataError(f"--dataset {dataset} has no registered references to score against")
    root = _check_root(root, dataset)
    if dataset == "duke28":
        samples = [_duke28_pair(d) for d in duke28_subjects(root, split)]
    elif dataset == "duke17":
        dirs = _numeric_dirs(root)
        if not dirs:
            raise DataError(f"{root}: no subject folders <n>/ with '<n>_Raw Image.tif' (DUKE17 layout)")
        samples = [_pair(d.name, d / f"{d.name}_Raw Image.tif", d / f"{d.name}_Averaged Image.tif") for d in dirs]
    else:
        raise AssertionError(dataset)
    return _with_rois(samples, root)


def _with_rois(samples, root):
    rois = read_rois(root)
    for sample in samples:
        sample.rois = rois.get(sample.id)
    return samples


def split_holds_test_subjects(dataset, root, split):
    """True when scoring --split would touch a test subject (so it must not choose parameters)."""
    if split == "test":
        return True
    if dataset == "duke28" and split != "val":
        test_ids = set((_read_splits(Path(root)) or {}).get("test", []))
        return bool(test_ids & {d.name for d in duke28_subjects(root, split)})
    # synthetic "all" is its test set; duke17 has no split, every subject is a test subject
    return dataset == "duke17" or (dataset == "synthetic" and split == "all")


def neighbours_as_samples(samples):
    """samples followed by each sample's registered neighbour B-scans as pairs of their own, scored
    against the same reference: 5x the images to validate on for duke28, from the same subjects. Each
    neighbour B-scan keeps the others as its neighbours (centred_neighbours), so a --neighbours network
    reads it as it read the training subjects' B-scans."""
    extra = []
    for s in samples:
        volume = list(s.volume())
        positions = [i for i in range(len(volume)) if i != len(s.neighbours) // 2]  # where 1..4.tif sit
        for k, (neighbour, i) in enumerate(zip(s.neighbours, positions), 1):
            extra.append(Sample(f"{s.id}/{k}.tif", neighbour, s.clean, s.bit_depth, s.path,
                                centred_neighbours(volume, i)))
    return samples + extra


def centred_neighbours(volume, i):
    """The neighbours to give volume[i] so that Sample(volume[i], neighbours=them).volume(), read around its
    middle (utils.context_stack), gives the network volume[i] with its nearest slices of the volume, nearest
    first, as training stacks it (_duke28_noisy): the nearest ones sit next to it, the farther ones outside."""
    others = sorted((j for j in range(len(volume)) if j != i), key=lambda j: (abs(j - i), j))
    middle = len(others) // 2
    slots = sorted((p for p in range(len(volume)) if p != middle), key=lambda p: (abs(p - middle), p))
    arranged = [None] * len(volume)
    for slot, j in zip(slots, others):
        arranged[slot] = volume[j]
    return arranged[:middle] + arranged[middle + 1:]


def load_unpaired(dataset, root=None, split="train", n_val=2, synthetic_size=256, seed=0, val_neighbours=False,
                  neighbours=0, val_subjects=None):
    """Unpaired training data: (noisy images, clean images, validation pairs).

    Validation pairs are held back from training (never taken from the test split):
    the last n_val subjects of duke28's train split (or the subjects val_subjects names), fresh phantoms
    for synthetic;
    val_neighbours: also their registered neighbour B-scans (neighbours_as_samples).
    neighbours > 0 (train.py --neighbours, duke28 only): each noisy image is a (1 + neighbours, H, W)
    stack, the B-scan then its nearest registered B-scans (utils.context_stack); every B-scan of a
    subject's 1, 2, test, 3, 4 takes the centre once.
    """
    if neighbours and dataset != "duke28":
        raise DataError(f"--neighbours {neighbours} needs registered neighbouring B-scans: --dataset duke28, not {dataset}")
    noisy, clean, val = _load_unpaired(dataset, root, split, n_val, synthetic_size, seed, neighbours, val_subjects)
    return noisy, clean, neighbours_as_samples(val) if val_neighbours else val


def _duke28_noisy(subject, neighbours):
    """A training subject's noisy images: test.tif then 1..4.tif (those present), or their context stacks."""
    present = [subject / f"{k}.tif" for k in range(1, 5) if (subject / f"{k}.tif").is_file()]
    images = [read_image(subject / "test.tif")[0]] + [read_image(p)[0] for p in present]
    if not neighbours:
        return images
    volume = Sample(subject.name, images[0], neighbours=images[1:]).volume()  # 1, 2, test, 3, 4: the scanning order
    return [context_stack(volume, i, neighbours) for i in range(len(volume))]


def _hold_back(subjects, n_val, val_subjects, where):
    """(training subjects, validation subjects): the ones val_subjects names, else the last n_val."""
    if val_subjects:
        names = [str(name) for name in val_subjects]
        unknown = [name for name in names if name not in {d.name for d in subjects}]
        if unknown:
            raise DataError(f"{where} has no training subject {', '.join(unknown)} to hold back (--val_subjects)")
        held_back = [d for d in subjects if d.name in names]
        train = [d for d in subjects if d.name not in names]
    else:
        if len(subjects) <= n_val:
            raise DataError(f"{where} has {len(subjects)} training subjects, too few to hold back {n_val} for validation")
        train, held_back = subjects[:len(subjects) - n_val], subjects[len(subjects) - n_val:]
    if not train:
        raise DataError(f"{where}: --val_subjects holds back every training subject")
    return train, held_back


def _load_unpaired(dataset, root, split, n_val, synthetic_size, seed, neighbours=0, val_subjects=None):
    _check_dataset(dataset)
    if n_val < 0:
        raise DataError(f"--n_val must be >= 0, got {n_val}")
    if dataset == "synthetic":
        data = synthetic.SyntheticOCT(height=synthetic_size, width=synthetic_size, seed=seed)
        val = synthetic.SyntheticOCT(n_test=max(n_val, 1), height=synthetic_size, width=synthetic_size,
                                     seed=seed + 10_000)
        noisy = [data.noisy_train(i) for i in range(data.n_train)]
        clean = [data.clean_train(i) for i in range(data.n_train)]
        # with further B-scans of each phantom, as the test phantoms carry, for --neighbours networks
        return noisy, clean, [Sample(f"val_{i}", *val.test_pair(i), 8, "", val.test_neighbours(i)) for i in range(n_val)]
    if dataset == "duke17":
        raise DataError(f"--dataset {dataset} is not an unpaired training set (use synthetic, pku37 or duke28)")
    root = _check_root(root, dataset)
    if dataset == "duke28":
        if split == "test":
            raise DataError(f"{root}: refusing to train on the test split (use --split train)")
        subjects = duke28_subjects(root, split)
        test_ids = set((_read_splits(root) or {}).get("test", []))
        if split == "all" and test_ids:
            warnings.warn(f"{root}: --split all trains without the test subjects {', '.join(sorted(test_ids, key=_id_order))}")
        elif test_ids & {d.name for d in subjects}:
            overlap = sorted(test_ids & {d.name for d in subjects}, key=_id_order)
            raise DataError(f"{root / 'splits.json'}: split '{split}' shares subject(s) {', '.join(overlap)} with the test split")
        subjects = [d for d in subjects if d.name not in test_ids]
        train, held_back = _hold_back(subjects, n_val, val_subjects, f"{root}: split '{split}'")
        noisy, clean = [], []
        for d in train:
            # test.tif is the subject's own noisy scan (required); 1..4.tif are optional neighbours.
            noisy += _duke28_noisy(d, neighbours)
            clean.append(read_image(d / "average.tif")[0])
        return noisy, clean, _with_rois([_duke28_pair(d) for d in held_back], root)
    if dataset == "pku37":
        folder = _pku37_root(root)
        noisy = [read_image(p)[0] for p in list_images(folder / "noisy")]
        return noisy, _read_clean_folder(folder / "clean"), []
    raise AssertionError(dataset)


# ---------------------------------------------------------------- training triplets

def random_crop(image, size, rng):
    """A size x size crop of an (H, W) image or a (C, H, W) stack, left-right flipped half the time."""
    height, width = image.shape[-2:]
    if height < size or width < size:
        raise DataError(f"image of size {height}x{width} is smaller than --patch_size {size}")
    top = rng.randrange(height - size + 1)
    left = rng.randrange(width - size + 1)
    crop = image[..., top:top + size, left:left + size]
    # Only left-right flips: up-down would put the vitreous below the retina.
    return crop[..., ::-1] if rng.random() < 0.5 else crop


# The share of training stacks (train.py --neighbours) whose neighbours are replaced by copies of the
# B-scan: what the network sees at inference where a B-scan has no neighbours (utils.context_stack).
NEIGHBOUR_DROPOUT = 0.1


def as_tensor(crop, rng):
    """(1, h, w) float32 for an image crop; (C, h, w) for a stack crop, its neighbours dropped (NEIGHBOUR_DROPOUT)."""
    crop = np.ascontiguousarray(crop, dtype=np.float32)  # float32 whatever the caller's arrays hold
    if crop.ndim == 2:
        return torch.from_numpy(crop)[None]
    if rng.random() < NEIGHBOUR_DROPOUT:
        crop = np.repeat(crop[:1], len(crop), axis=0)
    return torch.from_numpy(crop)


def neighbour_mean(stack, name="image"):
    """(H, W): the mean of the registered neighbours of a (1 + k, H, W) stack's B-scan (train.py
    --neighbour_target: the same place scanned again, its speckle independent and, averaged over the
    neighbours, weaker), never counting utils.context_stack's copies of the B-scan."""
    genuine = [other for other in stack[1:] if not np.array_equal(other, stack[0])] if stack.ndim == 3 else []
    if not genuine:
        raise DataError(f"{name} has no registered neighbour B-scan for --neighbour_target")
    return np.mean(genuine, axis=0)


class TripletDataset(torch.utils.data.Dataset):
    """(I_A, I_B, C_C): two different noisy crops and one unrelated clean crop.

    The published recipe crosses every unordered noisy pair with every clean image;
    that set is huge, so an epoch draws `length` triplets from it at random,
    reproducibly from (seed, epoch, index).

    targets: one (H, W) image per noisy image (the --neighbour_target and --bm3d_target terms), cropped at
    the same place as it: I_A and I_B then come as (2, h, w) crops, the image and its target.
    """

    def __init__(self, noisy, clean, patch_size, length, seed=0, targets=None):
        if len(noisy) < 2:
            raise DataError(f"TCFL needs at least 2 noisy training images, got {len(noisy)}")
        if not clean:
            raise DataError("TCFL needs at least 1 clean training image")
        # Checked here: inside a DataLoader worker the error would surface mid-epoch, wrapped.
        for kind, images in (("noisy", noisy), ("clean", clean)):
            for i, image in enumerate(images):
                if min(image.shape[-2:]) < patch_size:
                    raise DataError(f"{kind} training image {i} is {image.shape[-2]}x{image.shape[-1]}, "
                                    f"smaller than --patch_size {patch_size}")
        if targets is not None:  # stacked once: a crop of (image, target) is the pair of their crops
            if len(targets) != len(noisy):
                raise ValueError(f"{len(targets)} targets for {len(noisy)} noisy training images")
            noisy = [np.stack([image, target]) for image, target in zip(noisy, targets)]
        self.noisy, self.clean, self.with_targets = noisy, clean, targets is not None
        self.patch_size, self.length, self.seed = patch_size, length, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        a, b = rng.sample(range(len(self.noisy)), 2)
        c = rng.randrange(len(self.clean))
        crops = [random_crop(image, self.patch_size, rng) for image in (self.noisy[a], self.noisy[b], self.clean[c])]
        if self.with_targets:  # no neighbour dropout: the second slice is a target, not an input
            return tuple(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32)) for crop in (*crops[:2], crops[2][None]))
        return tuple(as_tensor(crop, rng) for crop in crops)


# ---------------------------------------------------------------- patches for the other methods

# background (pure-noise) patches: DRGAN's noise discriminator, R2R's noise model

def background_corners(image, size, margin=16):
    """(top, left) of every size x size window of `image` that is signal-free background.

    How: the speckle is smoothed away with a Gaussian of 4 px axially and 16 px laterally (layer
    boundaries are nearly horizontal). A pixel holds signal where that smooth image is brighter
    than a third of the way from the background level (its 20th percentile: vitreous and the
    region below the choroid fill far more than a fifth of a B-scan) to the Otsu threshold of
    the bright layers; the low threshold keeps the fading choroid out. In each column the
    retina spans from its first to its last signal pixel (the dark nuclear layers lie in
    between); a window is background when it lies at least `margin` px above or below that
    span in every one of its columns. On the synthetic scans no accepted 32 px window holds
    reference structure above 0.016 std; on Duke's, 0.03 apart from the averaging's dark edge.
    """
    height, width = image.shape
    if height < size or width < size:
        return np.zeros((0, 2), dtype=np.int64)
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), (4, 16))
    low = float(np.percentile(smooth, 20))
    try:
        threshold = low + (threshold_otsu(smooth) - low) / 3
    except ValueError:  # a constant image: nothing to tell apart, no retina
        threshold = np.inf
    signal = smooth > threshold
    has_signal = signal.any(axis=0)
    first = np.where(has_signal, signal.argmax(axis=0), height)
    last = np.where(has_signal, height - 1 - signal[::-1].argmax(axis=0), -1)
    rows = np.arange(height)[:, None]
    tissue = (rows >= first - margin) & (rows <= last + margin)
    # Windows holding no tissue pixel: a zero box sum over the integral image.
    integral = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    box = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    return np.argwhere(box == 0)


class NoisePatches:
    """Pure-noise patches cut at random from the background of the noisy training images.

    Each patch has its own mean subtracted: the background is speckle on a constant level,
    and what DRGAN's noise discriminator compares it with is a residual x - clean(x).
    """

    def __init__(self, images, size):
        self.images, self.size = images, size
        found = [np.column_stack([np.full(len(c), i), c]) for i, image in enumerate(images)
                 if len(c := background_corners(image, size))]
        if not found:
            raise DataError(f"no signal-free background patch of --patch_size {size} above or below the retina "
                            f"in the {len(images)} noisy training images; use a smaller --patch_size")
        self.corners = np.concatenate(found)

    def sample(self, count, generator):
        picks = torch.randint(len(self.corners), (count,), generator=generator).tolist()
        flips = torch.rand(count, generator=generator).tolist()
        patches = []
        for pick, flip in zip(picks, flips):
            i, top, left = self.corners[pick]
            patch = self.images[i][top:top + self.size, left:left + self.size]
            patch = patch[:, ::-1] if flip < 0.5 else patch
            patches.append(torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32)))
        patches = torch.stack(patches)[:, None]
        return patches - patches.mean(dim=(-2, -1), keepdim=True)



class PairedCropDataset(TripletDataset):
    """(noisy_i, noisy_j, clean_i): a registered noisy/clean pair cropped at the same place
    (same left-right flip) and, as TCFL's I_B, a crop of another pair's noisy image (used by
    the collapse guard only). Reproducible from (seed, epoch, index) like TripletDataset."""

    def __init__(self, pairs, patch_size, length, seed=0):
        if not pairs:
            raise DataError("--method cncl: no registered noisy/clean training pairs")
        for noisy, clean in pairs:
            if noisy.shape != clean.shape:
                raise DataError(f"--method cncl: a training pair's noisy {noisy.shape} and clean {clean.shape} sizes differ")
            if min(noisy.shape) < patch_size:
                raise DataError(f"--method cncl: training pair of size {noisy.shape[0]}x{noisy.shape[1]} "
                                f"is smaller than --patch_size {patch_size}")
        self.pairs, self.patch_size, self.length, self.seed, self.epoch = pairs, patch_size, length, seed, 0

    def __getitem__(self, index):
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        i = rng.randrange(len(self.pairs))
        j = rng.choice([k for k in range(len(self.pairs)) if k != i] or [i])
        noisy, clean = self.pairs[i]
        size = self.patch_size
        top, left = rng.randrange(noisy.shape[0] - size + 1), rng.randrange(noisy.shape[1] - size + 1)
        crops = [noisy[top:top + size, left:left + size], clean[top:top + size, left:left + size]]
        if rng.random() < 0.5:  # left-right only: up-down would put the vitreous below the retina
            crops = [crop[:, ::-1] for crop in crops]
        other = self.pairs[j][0]
        top, left = rng.randrange(other.shape[0] - size + 1), rng.randrange(other.shape[1] - size + 1)
        crops.insert(1, other[top:top + size, left:left + size])
        return tuple(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None] for crop in crops)


def paired_training_data(dataset, root, split, val_samples, seed=0, n_synthetic=64, synthetic_size=256):
    """Registered (noisy, clean) training pairs for CNCL: duke28's test.tif + average.tif of the
    training subjects, minus the validation subjects held back and any test subject; for the
    synthetic set, fresh noisy_clean_pair phantoms (none shared with its test or validation sets)."""
    if dataset == "synthetic":
        # Integer seeds: SyntheticOCT's own images use (seed, split, index) tuples, a different stream.
        return [synthetic.noisy_clean_pair(10**6 * (seed + 1) + i, synthetic_size, synthetic_size) for i in range(n_synthetic)]
    if dataset != "duke28":
        raise DataError(f"--method cncl trains on registered noisy/clean pairs; --dataset {dataset} is unpaired "
                        "(use duke28, whose test.tif/average.tif are registered, or synthetic)")
    held_back = {sample.id for sample in val_samples}
    test_ids = set((_read_splits(Path(root)) or {}).get("test", []))
    pairs = [(s.noisy, s.clean) for s in load_pairs("duke28", root, split) if s.id not in held_back | test_ids]
    if not pairs:
        raise DataError(f"{root}: split '{split}' leaves no training subject for --method cncl after holding back "
                        f"{len(held_back)} for validation")
    return pairs
