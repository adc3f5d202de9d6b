"""Score denoised OCT B-scans against their references: one table, one CSV, one JSON.

    python evaluate.py --epoch 600                        # a trained checkpoint, synthetic test set
    python evaluate.py --epoch 12 --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test
    python evaluate.py --outputs ../shared/data/published_outputs/MIFCN \
        --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test

Every row of the project's results table (our checkpoints, the classical baselines and the
published methods' outputs) goes through scoring.score(), so all are measured alike.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import datasets
import models
import scoring
from utils import DataError


def save_comparison(path, sample, output, title):
    """noisy | method | reference of one image, with a zoomed inset row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    height, width = sample.noisy.shape
    zoom = (slice(height // 3, height // 3 + height // 4), slice(width // 3, width // 3 + width // 4))
    panels = [("noisy", sample.noisy), (title, output), ("reference", sample.clean)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8 * height / width + 1), gridspec_kw={"height_ratios": [1, 1]})
    for column, (name, image) in enumerate(panels):
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[0, column].set_title(name)
        axes[1, column].imshow(image[zoom], cmap="gray", vmin=0, vmax=1)
        axes[1, column].set_title(f"{name} (zoom)")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate_checkpoint(args):
    path = models.checkpoint_path(args.ckpt, args.epoch, args.ckpt_dir)
    denoiser, state = models.load_for_options(args, path)
    samples = scoring.load_scoring_pairs(args, state.get("args"))
    suffix = (f"-ens_{args.ensemble}" if args.ensemble else "") + ("-lone" if args.lone_bscan else "")
    method = args.method or f"{state.get('method', 'tcfl')}-{state['backbone']}{suffix}"
    out_dir = Path(args.out_dir or f"img/{method}_{args.dataset}_{args.split}")
    outputs, seconds = [], []
    for sample in tqdm(samples, desc=f"denoise ({path.name})"):
        start = time.perf_counter()
        # a --neighbours net reads the B-scan's neighbours too
        outputs.append(denoiser(sample.noisy if args.lone_bscan else sample.volume()))
        seconds.append(time.perf_counter() - start)
    for sample, output in zip(samples, outputs):
        datasets.write_image(out_dir / f"{sample.id}.tif", output, sample.bit_depth)
    save_comparison(out_dir / "comparison.png", samples[0], outputs[0], method)
    print(f"denoised images and comparison figure: {out_dir}/")
    lone = sum(not s.neighbours for s in samples) if denoiser.neighbours and not args.lone_bscan else 0
    if lone:
        print(f"note: {lone} of {len(samples)} images have no registered neighbouring B-scans; "
              "the network reads copies of the B-scan for them (its single-B-scan fallback)")
    bscans = 1 if args.lone_bscan else 1 + min(denoiser.neighbours, min(len(s.neighbours) for s in samples))
    return scoring.score(samples, outputs, method, args.dataset, args.split, float(np.mean(seconds)),
                         out_dir / "scores.csv", args.json, bscans=bscans)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scoring.add_data_args(parser)
    parser.add_argument("--outputs", default=None, help="score a folder of already-denoised <id>.tif|png")
    parser.add_argument("--method", default=None, help="name of the scored method (default: folder / checkpoint)")
    models.add_checkpoint_args(parser)
    parser.add_argument("--lone_bscan", action="store_true",
                        help="a --neighbours checkpoint reads each B-scan without its neighbours (copies of itself), "
                             "as denoise.py reads a single 2-D image: its single-B-scan fallback")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="write the checkpoint's inference weights to PATH (generator only) and exit")
    args = parser.parse_args(argv)
    if args.export:
        if args.epoch is None and not args.ckpt:
            parser.error("--export needs --epoch N or --ckpt PATH")
        if Path(args.export).exists():
            raise DataError(f"{args.export} exists; remove it first (nothing is overwritten)")
        return models.export_checkpoint(models.checkpoint_path(args.ckpt, args.epoch, args.ckpt_dir), args.export,
                                        lateral_bin=args.lateral_bin, lone_blur=args.lone_blur)
    if args.outputs:
        samples = scoring.load_scoring_pairs(args)
        method = args.method or Path(args.outputs).name
        outputs = scoring.read_outputs(args.outputs, samples)
        out_dir = Path(args.out_dir or f"img/{method}")
        return scoring.score(samples, outputs, method, args.dataset, args.split, None, out_dir / "scores.csv", args.json)
    if args.epoch is None and not args.ckpt:
        parser.error("give --epoch N or --ckpt PATH (a trained model), or --outputs DIR (denoised images)")
    return evaluate_checkpoint(args)


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
