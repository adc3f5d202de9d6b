"""How far out of register may a --neighbours checkpoint's neighbour B-scans be? Validation images only.

A 2.5-D checkpoint (train.py --neighbours) was trained on registered neighbours. A volume from another scanner
may have eye motion between B-scans, or B-scans far enough apart that the anatomy moves. Here each of the 4
neighbours is shifted by a random whole number of pixels, uniform in [-d, d], axially (motion) or laterally,
before the checkpoint reads the stack; the last row reads the B-scan alone (denoise.py --lone_bscan). Each level
is drawn with --draws seeds and the paired difference to the registered reading is over B-scans x draws.

    python bench/misregistration.py                                   # shipped checkpoint, duke28 subjects 9-10
    python bench/misregistration.py --ckpt runs/x/epoch_1.pth --dataset synthetic
"""
import argparse

import cv2
import numpy as np
from tqdm import tqdm

from common import ROOT, machine, save, test_samples

import models
import scoring
from utils import DataError, psnr, ssim

AXIAL = (2, 5, 10, 20)   # largest shift, pixels of the full-size B-scan
LATERAL = (8, 32)


def shifted(image, axial, lateral):
    """The image moved by (axial, lateral) pixels, the uncovered border mirrored."""
    matrix = np.float32([[1, 0, lateral], [0, 1, axial]])
    return cv2.warpAffine(image, matrix, image.shape[::-1], flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)


def misregistered(volume, centre, axial, lateral, rng):
    """The volume with every page but the centre shifted by uniform integers in [-axial, axial], [-lateral, lateral]."""
    out = volume.copy()
    for page in range(len(volume)):
        if page != centre:
            out[page] = shifted(volume[page], int(rng.integers(-axial, axial + 1)), int(rng.integers(-lateral, lateral + 1)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(ROOT / "ckpt" / "tcfl_duke28_G.pth"))
    parser.add_argument("--dataset", default="duke28", choices=["duke28", "synthetic"])
    parser.add_argument("--draws", type=int, default=5, help="random shifts drawn per level and B-scan")
    parser.add_argument("--size", type=int, default=256, help="synthetic image size")
    parser.add_argument("--quick", action="store_true", help="two B-scans, one draw")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    try:
        denoiser = models.load_checkpoint(args.ckpt)[0]
    except DataError as error:
        raise SystemExit(f"error: {error}")
    if not denoiser.neighbours:
        raise SystemExit(f"error: {args.ckpt} reads one B-scan (trained without --neighbours): nothing to misregister")
    args.draws = 1 if args.quick else args.draws
    dataset, samples = test_samples(args.dataset, args.size, args.quick, split="val")
    volumes = [np.asarray(sample.volume(), np.float32) for sample in samples]
    centre = len(volumes[0]) // 2
    levels = [("registered", 0, 0)] + [(f"axial ±{d}", d, 0) for d in AXIAL] + [(f"lateral ±{d}", 0, d) for d in LATERAL]
    rows = {}
    for name, axial, lateral in tqdm(levels + [("lone B-scan", None, None)], desc="levels"):
        draws = 1 if not (axial or lateral) else args.draws
        scores = {"psnr": [], "ssim": []}
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            for sample, volume in zip(samples, volumes):
                stack = volume[centre] if axial is None else misregistered(volume, centre, axial, lateral, rng)
                output = denoiser(stack) if axial is None else denoiser(stack, centre)
                scores["psnr"].append(psnr(sample.clean, output))
                scores["ssim"].append(ssim(sample.clean, output))
        rows[name] = {"psnr": float(np.mean(scores["psnr"])), "ssim": float(np.mean(scores["ssim"])), "draws": draws,
                      "per_image_psnr": scores["psnr"]}
    registered = rows["registered"]["per_image_psnr"]
    print(f"\n{args.ckpt} on {dataset} validation ({len(samples)} B-scans; shifts in full-size pixels, {args.draws} draws)")
    print("neighbours | PSNR | SSIM | vs registered [95 % CI]")
    for name, row in rows.items():
        reference = np.tile(registered, row["draws"])
        row["vs_registered"] = scoring.paired_difference(row["per_image_psnr"], reference)
        d = row["vs_registered"]
        print(f"{name:>12} | {row['psnr']:.2f} | {row['ssim']:.4f} | {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
    if not (args.no_save or args.quick):
        save(f"misregistration_{dataset}_val", {"machine": machine(), "ckpt": args.ckpt, "dataset": dataset,
                                                 "ids": [s.id for s in samples], "rows": rows})
    return rows


if __name__ == "__main__":
    main()
