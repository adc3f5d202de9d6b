"""Where a filter-start generator starts: an untrained generator (its correction starts at zero, so it
denoises as its start filter alone) on the train subjects' B-scans, for each start the options allow.

A start AXIAL,LATERAL,W is (--skip_blur AXIAL LATERAL, --skip_centre_weight W): the Gaussian (sigmas in
pixels of the 4:1 B-scans) of W x the B-scan + (1 - W) x the mean of its 4 registered neighbours; W = 1
reads the B-scan alone, the single-B-scan recipe's start. nlm:H,W and bm3d:F,W filter the same blend with
NLM.py's non-local means of strength H (--skip_nlm) or BM3D.py's BM3D with threshold factor F (--skip_bm3d);
bm3dlc:F,W runs both BM3D stages in the low-complexity profile (--skip_bm3d_profile lc); nlm+bm3d:H,F,W and
nlm+bm3dlc:H,F,W take the mean of NLM and that BM3D (--skip_nlm H --skip_bm3d F). A trailing ,S mixes S x the
Gaussian 1.0 x 3 of the blend into that filter (--skip_blur_share S).
Each start is scored as a trained checkpoint is (4:1,
zero-mean noise map), on the subjects' test.tif B-scans against their averages, with the mean paired
difference to the first start and to blur.py. It measures what training starts from; it chose the
shipped recipe's start (docs/training.md) and never reads the test split.

    python bench/blur_start.py                              # duke28 train subjects 1-10
    python bench/blur_start.py --starts 1.25,4,1 1.0,3,0.6  # AXIAL,LATERAL,W each
    python bench/blur_start.py --starts 1.0,3,0.6 nlm:8,0.6 nlm:12,0.6 nlm:16,0.6 bm3d:2.5,0.6
    python bench/blur_start.py --starts 1.0,3,0.6 nlm:12,0.6,0.3 nlm:12,0.5,0.3 nlm:10,0.6,0.3 nlm:14,0.6,0.3
"""
import argparse

import numpy as np
import torch
from tqdm import tqdm

from common import SHARED_DATA, machine, save

import baselines
import datasets
import models
import scoring
from utils import psnr, ssim

STARTS = ("1.25,4,1", "1.0,3,1", "1.0,3,0.7", "1.0,3,0.6", "1.0,3,0.5", "1.0,3,0.4", "1.0,2,0.6", "1.0,4,0.6", "1.5,3,0.6",
          "1.25,4,0.6")


def start_denoiser(start, neighbours=4, lateral_bin=4):
    """An untrained TCFL generator with this start (parse_start's options), as a Denoiser reading 1 + neighbours B-scans."""
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=1 + neighbours, **start).eval()
    return models.Denoiser(net, lateral_bin=lateral_bin, zero_mean=True, neighbours=neighbours)


FILTER_KINDS = {"nlm": ("skip_nlm",), "bm3d": ("skip_bm3d",), "bm3dlc": ("skip_bm3d",),
                "nlm+bm3d": ("skip_nlm", "skip_bm3d"), "nlm+bm3dlc": ("skip_nlm", "skip_bm3d")}


def parse_start(text):
    """'AXIAL,LATERAL,W', 'nlm:H,W[,S]', 'bm3d:F,W[,S]', 'bm3dlc:F,W[,S]' or 'nlm+bm3d[lc]:H,F,W[,S]' ->
    build_generator's start options (lc: --skip_bm3d_profile lc)."""
    kind, _, values = text.rpartition(":")
    shape = "AXIAL,LATERAL,W, nlm:H,W[,S], bm3d[lc]:F,W[,S] or nlm+bm3d[lc]:H,F,W[,S] (e.g. 1.0,3,0.6 or nlm:12,0.6)"
    names = FILTER_KINDS.get(kind, ("skip_blur",) if kind == "" else None)
    try:
        numbers = [float(value) for value in values.split(",")]
        if names is None or len(numbers) not in ((3,) if kind == "" else (len(names) + 1, len(names) + 2)):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--starts: '{text}' is not {shape}") from None
    weight = numbers[-1] if kind == "" else numbers[len(names)]
    if not 0 <= weight <= 1:
        raise SystemExit(f"--starts: '{text}': W must be in [0, 1]")
    if kind == "":
        return {"skip_blur": tuple(numbers[:2]), "skip_centre_weight": weight}
    start = {**dict(zip(names, numbers)), "skip_centre_weight": weight}
    if len(numbers) == len(names) + 2:
        if not 0 <= numbers[-1] < 1:
            raise SystemExit(f"--starts: '{text}': S must be in [0, 1)")
        start["skip_blur_share"] = numbers[-1]
    if kind.endswith("lc"):
        start["skip_bm3d_profile"] = "lc"
    return start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="duke28", choices=["duke28", "synthetic"])
    parser.add_argument("--data_root", default=str(SHARED_DATA / "duke_bioptigen"))
    parser.add_argument("--starts", nargs="+", default=list(STARTS), metavar="AXIAL,LATERAL,W|nlm:H,W|bm3d:F,W|...")
    parser.add_argument("--size", type=int, default=256, help="synthetic image size")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    # duke28: the train subjects only; synthetic (a quick check, the tests): its phantoms, which carry neighbours
    args.split = "train" if args.dataset == "duke28" else "test"
    samples = datasets.load_pairs(args.dataset, args.data_root if args.dataset == "duke28" else None, args.split,
                                  synthetic_size=args.size)
    if not all(sample.neighbours for sample in samples):
        raise SystemExit(f"{args.dataset} {args.split}: every B-scan needs registered neighbours")
    blur = [psnr(s.clean, np.clip(baselines.blur_denoise(s.noisy), 0, 1)) for s in samples]
    rows, ssims = {}, {}
    with torch.no_grad():
        for text in tqdm(args.starts, desc="starts"):
            denoiser = start_denoiser(parse_start(text))
            outputs = [np.clip(denoiser(s.volume()), 0, 1) for s in samples]
            rows[text] = [psnr(s.clean, out) for s, out in zip(samples, outputs)]
            ssims[text] = [ssim(s.clean, out) for s, out in zip(samples, outputs)]
    first = next(iter(rows.values()))
    results = {}
    print(f"\n{args.dataset} {args.split}, {len(samples)} B-scans; blur.py {np.mean(blur):.3f} dB")
    print("start | PSNR | SSIM | vs first start [95 % CI] | ahead of it | vs blur.py [95 % CI]")
    for text, values in rows.items():
        vs_first, vs_blur = scoring.paired_difference(values, first), scoring.paired_difference(values, blur)
        ahead = int(np.sum(np.array(values) > np.array(first)))
        results[text] = {"psnr": float(np.mean(values)), "ssim": float(np.mean(ssims[text])), "per_image": values,
                         "ssim_per_image": ssims[text], "first": args.starts[0], "vs_first": vs_first,
                         "ahead_of_first": ahead, "vs_blur_py": vs_blur}
        interval = lambda d: f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        print(f"{text:>23} | {np.mean(values):.3f} | {np.mean(ssims[text]):.4f} | {interval(vs_first)}"
              f" | {ahead} of {len(values)} | {interval(vs_blur)}")
    payload = {"machine": info, "dataset": args.dataset, "split": args.split, "ids": [s.id for s in samples],
               "blur_py": {"psnr": float(np.mean(blur)), "per_image": blur}, "starts": results}
    if not args.no_save:
        save(f"blur_start_{args.dataset}_{args.split}", payload, gather=("starts",))  # earlier starts stay
    return payload


if __name__ == "__main__":
    main()
