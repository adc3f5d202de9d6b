"""How coarsely should a checkpoint bin B-scans laterally at inference? Validation images only.

Scores a checkpoint at several inference binnings (--lateral_bin N of evaluate.py / denoise.py) on
train.py's validation images with their registered neighbours (duke28 subjects 9-10: 10 B-scans;
never the test split), beside blur.py, NLM.py and BM3D.py on the same images, with each binning's
paired per-image difference to them (bootstrap 95 % interval over the 10 B-scans, which come from
2 subjects, so read the intervals as optimistic). How the shipped checkpoint's 8:1 was chosen:

    python bench/inference_bin.py --ckpt ckpt/tcfl_duke28_G.pth
    python bench/inference_bin.py --ckpt ckpt/tcfl_duke28_G.pth --decimate 2 --bins 4 8   # and --decimate 3

--decimate N keeps every N-th A-scan of the B-scans and references (as a scanner with N times
fewer A-scans per millimetre would record them), to see whether a binning holds on coarser scans.
"""
import argparse
import contextlib
import dataclasses
import io
from pathlib import Path

from tqdm import tqdm

from common import SHARED_DATA, machine, save

import baselines
import datasets
import models
import scoring

BINS = (4, 6, 8, 10, 12, 16)
CLASSICAL = ("blur", "nlm", "bm3d")


def score_quietly(samples, outputs, label, bscans=1):
    """scoring.score without its printed table (this script prints one table of its own)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return scoring.score(samples, outputs, label, "duke28", "val", bscans=bscans)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data_root", default=str(SHARED_DATA / "duke_bioptigen"))
    parser.add_argument("--bins", type=int, nargs="+", default=list(BINS))
    parser.add_argument("--classical", default=",".join(CLASSICAL), help="baselines to compare with (keys of baselines.CLASSICAL)")
    parser.add_argument("--decimate", type=int, default=1, help="keep every N-th A-scan (1: the B-scans as recorded)")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    if args.decimate < 1:
        raise SystemExit(f"--decimate must be >= 1, got {args.decimate}")
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"{args.data_root}: not found (this benchmark needs the real Duke scans)")
    info = machine()
    samples = datasets.load_unpaired("duke28", args.data_root, "train", val_neighbours=True)[2]
    if args.decimate > 1:  # the ROIs (CNR, ...) are in full-size pixels: dropped
        samples = [dataclasses.replace(s, noisy=s.noisy[:, ::args.decimate], clean=s.clean[:, ::args.decimate],
                                       neighbours=[], rois=None) for s in samples]
    denoiser, state = models.load_checkpoint(args.ckpt)
    classical = [name.strip() for name in args.classical.split(",")]
    unknown = [name for name in classical if name not in baselines.CLASSICAL or baselines.CLASSICAL[name].volume]
    if unknown:
        raise SystemExit(f"--classical: unknown or volume method {', '.join(unknown)} (use blur, nlm, bm3d)")
    rows = {}
    # The baselines read each B-scan alone; the network reads it with its neighbours where it was trained
    # to (--neighbours; models.Denoiser takes the B-scan alone otherwise), as evaluate.py feeds it.
    jobs = [(f"{baselines.CLASSICAL[name].name}.py", baselines.CLASSICAL[name].denoise, False) for name in classical]
    reads = 1 + denoiser.neighbours if any(s.neighbours for s in samples) else 1
    uses = f" (uses {reads} B-scans)" if reads > 1 else ""
    jobs += [(f"{Path(args.ckpt).name} at {b}:1{uses}", denoiser.replace(lateral_bin=b), True) for b in args.bins]
    for label, denoise, reads_volume in tqdm(jobs, desc="inference binning"):
        outputs = [denoise(s.volume() if reads_volume else s.noisy) for s in samples]
        rows[label] = score_quietly(samples, outputs, label, bscans=reads if reads_volume else 1)
    per_image = {label: {k: [r[k] for r in row["per_image"]] for k in ("PSNR", "SSIM")} for label, row in rows.items()}
    names = [f"{baselines.CLASSICAL[name].name}.py" for name in classical]
    lines = ["| method | PSNR | SSIM | " + " | ".join(f"ΔPSNR vs {n} [95 % CI]" for n in names) + " |",
             "|---" * (3 + len(names)) + "|"]
    for label, row in rows.items():
        cells = []
        for name in names:
            d = scoring.paired_difference(per_image[label]["PSNR"], per_image[name]["PSNR"])
            row.setdefault("vs", {})[name] = d
            cells.append("" if label == name else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
        lines.append(f"| {label} | {row['mean']['PSNR']:.2f} | {row['mean']['SSIM']:.3f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nduke28 validation subjects 9-10 with their neighbours, {len(samples)} B-scans"
          f"{f', 1 A-scan in {args.decimate} kept' if args.decimate > 1 else ''} "
          f"(trained binned {state.get('args', {}).get('lateral_bin', '?')}:1):\n{table}")
    payload = {"machine": info, "ckpt": str(args.ckpt), "decimate": args.decimate, "n_images": len(samples),
               "rows": rows, "markdown": table}
    if not args.no_save:
        save(f"inference_bin_{Path(args.ckpt).name.removesuffix('.pth')}"
             f"{f'_decimate{args.decimate}' if args.decimate > 1 else ''}", payload)
    return payload


if __name__ == "__main__":
    main()
