"""How much of a PSNR is intensity, not noise (duke28, never the test split).

Each output is scored against its subject's average as usual, and again after the least-squares affine map
(contrast, offset) of the output onto that average: an oracle no denoiser has, since it reads the reference.
Where the oracle gains much, the average differs from its B-scans in brightness or contrast, and plain PSNR
rewards whatever shrinks contrast there; a lever chosen on such subjects need not carry to others. With
--ckpt a --skip_blur / --skip_bm3d checkpoint is also scored as its start alone (its correction zeroed), so
the network's gain over its start splits into the part an affine map gives and the rest.

    python bench/intensity.py                                          # train subjects 1-10 (their test.tif)
    python bench/intensity.py --split val --ckpt ckpt/tcfl_duke28_G.pth  # the 10 validation B-scans (9-10)
"""
import argparse
import copy

import numpy as np
from tqdm import tqdm

from common import SHARED_DATA, machine, save

import baselines
import datasets
import models
from utils import psnr


def calibrated(reference, output):
    """(PSNR, contrast): the PSNR of the best affine map of `output` onto `reference`, and its slope."""
    contrast, offset = np.polyfit(output.ravel().astype(np.float64), reference.ravel().astype(np.float64), 1)
    return psnr(reference, np.clip(contrast * output + offset, 0, 1)), float(contrast)


def start_of(denoiser):
    """The same Denoiser with its FilterSkip generator's correction zeroed: what it starts from."""
    start = denoiser.replace()
    start.net = copy.deepcopy(denoiser.net)
    start.net.zero_correction()
    return start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=str(SHARED_DATA / "duke_bioptigen"))
    parser.add_argument("--split", default="train", choices=["train", "val"],
                        help="train: subjects 1-10's test.tif; val: the held-back subjects' test.tif and neighbours")
    parser.add_argument("--ckpt", help="also score this checkpoint and, for a filter-start generator, its start")
    parser.add_argument("--no_bm3d", action="store_true", help="skip BM3D.py (4 s per B-scan)")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    if args.split == "train":
        samples = datasets.load_pairs("duke28", args.data_root, "train")
    else:  # what train.py --val_neighbours validates on
        samples = datasets.load_unpaired("duke28", args.data_root, "train", val_neighbours=True, neighbours=4)[2]
    methods = {"blur.py": lambda s: baselines.blur_denoise(s.noisy)}
    if not args.no_bm3d:
        methods["BM3D.py"] = lambda s: baselines.CLASSICAL["bm3d"].denoise(s.noisy)
    if args.ckpt:
        denoiser = models.load_checkpoint(args.ckpt)[0]
        methods[args.ckpt] = lambda s: denoiser(s.volume())
        if isinstance(denoiser.net, models.FilterSkip):
            start = start_of(denoiser)
            methods[f"{args.ckpt} start"] = lambda s: start(s.volume())
    rows = {name: [] for name in methods}
    for sample in tqdm(samples, desc="B-scans"):
        for name, denoise in methods.items():
            output = np.clip(denoise(sample), 0, 1)
            oracle, contrast = calibrated(sample.clean, output)
            rows[name].append({"id": sample.id, "mean_offset": float(output.mean() - sample.clean.mean()),
                               "psnr": psnr(sample.clean, output), "calibrated_psnr": oracle, "contrast": contrast})
    summary = {name: {key: float(np.mean([row[key] for row in per_image])) for key in ("psnr", "calibrated_psnr", "contrast")}
               for name, per_image in rows.items()}
    print(f"\nduke28 {args.split}, {len(samples)} B-scans | PSNR | after the oracle's affine map | its contrast")
    for name, values in summary.items():
        print(f"{name:>40} | {values['psnr']:.3f} | {values['calibrated_psnr']:.3f} | {values['contrast']:.3f}")
    print("blur.py per B-scan: output mean - average's, PSNR -> calibrated (contrast)")
    for row in rows["blur.py"]:
        print(f"  {row['id']}: {row['mean_offset']:+.3f}, {row['psnr']:.2f} -> {row['calibrated_psnr']:.2f} ({row['contrast']:.2f})")
    payload = {"machine": info, "split": args.split, "summary": summary, "per_image": rows}
    if not args.no_save:
        save(f"intensity_duke28_{args.split}", payload)
    return payload


if __name__ == "__main__":
    main()
