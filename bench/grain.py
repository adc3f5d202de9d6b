"""Does a checkpoint leave a fine grain the references do not have? Validation images only.

Scores the checkpoint's output on train.py's validation images (never the test split)
as it is and after a light Gaussian blur, with the output's total variation beside the
references'. If blurring raises PSNR and SSIM, what the generator leaves at the finest
scale is noise, not structure: the reason the shipped checkpoints train and denoise
binned 4:1 laterally (README, "What we changed").

    python bench/grain.py --ckpt ckpt/tcfl_fullres_duke28_G.pth
    python bench/grain.py --ckpt ckpt/tcfl_duke28_G.pth
"""
import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from common import SHARED_DATA, save

import models
import scoring
import trainers
from utils import psnr, ssim


def total_variation(image):
    return trainers.total_variation(torch.from_numpy(image)).item()  # the --sigma_tv term


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--dataset", default="duke28", choices=["duke28", "synthetic"])
    parser.add_argument("--data_root", default=str(SHARED_DATA / "duke_bioptigen"))
    parser.add_argument("--lateral_bin", type=int, default=None, help="override the checkpoint's (evaluate.py --lateral_bin)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.8, 1.2], help="Gaussian blur sigmas (px)")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    denoiser, state = models.load_checkpoint(args.ckpt)
    samples = scoring.load_scoring_pairs(argparse.Namespace(dataset=args.dataset, data_root=args.data_root, split="val"),
                                         state.get("args"))
    if args.lateral_bin is not None:
        denoiser = denoiser.replace(lateral_bin=args.lateral_bin, noise_sigma=None)
    outputs = [denoiser(s.volume()) for s in samples]  # a --neighbours network reads them; others take the B-scan
    rows = []
    for sigma in [0.0, *args.sigmas]:
        blurred = [cv2.GaussianBlur(o, (0, 0), sigma) if sigma else o for o in outputs]
        rows.append({"blur_sigma": sigma,
                     "psnr": float(np.mean([psnr(s.clean, b) for s, b in zip(samples, blurred)])),
                     "ssim": float(np.mean([ssim(s.clean, b) for s, b in zip(samples, blurred)])),
                     "output_tv": float(np.mean([total_variation(b) for b in blurred]))})
        print(f"blur sigma {sigma:.1f} px: PSNR {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.3f}, "
              f"output TV {rows[-1]['output_tv']:.4f}")
    reference_tv = float(np.mean([total_variation(s.clean) for s in samples]))
    print(f"{len(samples)} validation images of {args.dataset}, lateral_bin {denoiser.lateral_bin}; reference TV {reference_tv:.4f}")
    if not args.no_save:
        save(f"grain_{Path(args.ckpt).stem}", {"ckpt": Path(args.ckpt).name, "lateral_bin": denoiser.lateral_bin,
                                               "reference_tv": reference_tv, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
