"""Scoring: every row of the project's results tables goes through score() below.

A library, imported by the scripts (evaluate.py, BM3D.py, NLM.py, blur.py, BM4D.py) and the
benchmarks: the data options they share, scoring a list of outputs against the references
(full-reference metrics, and the ROI metrics where the data root has rois.json), reading
another method's outputs, denoising a split with any denoise(image) function, the grid search
that tunes the classical baselines, and paired differences between methods with bootstrap
intervals.
"""
import argparse
import csv
import functools
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from scipy import stats
from tqdm import tqdm

import datasets
import options
from utils import DataError, METRICS, ROI_METRICS, all_metrics, check_lateral_bin, psnr, roi_metrics



def add_data_args(parser, dataset="synthetic", split="test"):
    parser.add_argument("--dataset", default=dataset, choices=datasets.DATASETS)
    parser.add_argument("--data_root", default=None, help="folder of the data set (not needed for synthetic)")
    parser.add_argument("--split", default=split, help="train | test | all (duke28 reads <data_root>/splits.json) | "
                        "val: the training-split images train.py held back for validation (a checkpoint's own "
                        "split, --n_val, --val_subjects and --seed; without a checkpoint train.py's defaults)")
    parser.add_argument("--val_neighbours", action="store_true",
                        help="with --split val: also the held-back subjects' neighbour B-scans (train.py --val_neighbours)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--out_dir", default=None, help="where denoised images and the CSV go (default img/<method>)")


def load_scoring_pairs(args, train_args=None):
    """The pairs to score. --split val: the validation images of a training run (train_args: the
    checkpoint's options, so a run trained with --n_val 1 is validated on its own held-back subject)."""
    if args.split == "val":
        defaults = options.get_parser().parse_args([])  # what train.py holds back unless the checkpoint says otherwise
        run = {k: (train_args or {}).get(k, getattr(defaults, k)) for k in ("split", "n_val", "seed", "val_subjects")}
        return datasets.load_unpaired(args.dataset, args.data_root, run["split"], n_val=run["n_val"], seed=run["seed"],
                                      val_neighbours=getattr(args, "val_neighbours", False),
                                      val_subjects=run["val_subjects"])[2]
    return datasets.load_pairs(args.dataset, args.data_root, args.split)


def image_scores(sample, image):
    """Every metric of one image: full-reference against sample.clean, ROI metrics where sample.rois."""
    scores = all_metrics(sample.clean, image)
    if sample.rois:
        scores.update(roi_metrics(image, sample.rois))
    return scores


def _mean_std(rows, key):
    values = np.array([row[key] for row in rows], dtype=np.float64)
    return float(values.mean()), float(values.std())


def format_row(name, means, stds):
    return f"{name:<14}" + "  ".join(f"{means[k]:9.3f} +- {stds[k]:7.3f}" for k in means)


def score(samples, outputs, method, dataset, split, seconds_per_image=None, csv_path=None, json_path=None, bscans=1):
    """Score outputs[i] against samples[i].clean; print mean +- std; write CSV/JSON.

    The noisy input is scored the same way, so every table carries its own baseline. bscans: how
    many B-scans of the volume the method read per output (BM4D: 5), recorded beside the scores.
    """
    rows, noisy_rows = [], []
    for sample, output in zip(samples, outputs, strict=True):
        if output.shape != sample.clean.shape:
            raise DataError(f"{method}: output for {sample.id} has size {output.shape}, reference {sample.clean.shape}")
        rows.append({"id": sample.id, **image_scores(sample, np.clip(output, 0, 1))})
        noisy_rows.append({"id": sample.id, **image_scores(sample, sample.noisy)})
    keys = list(METRICS) + (list(ROI_METRICS) if all(sample.rois for sample in samples) else [])
    summary = {
        "method": method, "dataset": dataset, "split": split, "n_images": len(rows), "bscans": bscans,
        "mean": {k: _mean_std(rows, k)[0] for k in keys},
        "std": {k: _mean_std(rows, k)[1] for k in keys},
        "noisy_mean": {k: _mean_std(noisy_rows, k)[0] for k in keys},
        "noisy_std": {k: _mean_std(noisy_rows, k)[1] for k in keys},
        "seconds_per_image": seconds_per_image,
        "per_image": [{k: row[k] for k in ["id", *keys]} for row in rows],
    }
    print(f"\n{dataset} / {split}: {len(rows)} images, mean +- std "
          "(PSNR data range 1; SSIM skimage, 7x7 window, data range 1; GCMSE kappa 0.5"
          f"{'; MSR/CNR/ENL on rois.json' if len(keys) > len(METRICS) else ''})")
    print(f"{'':<14}" + "  ".join(f"{k:^20}" for k in keys))
    print(format_row("noisy", summary["noisy_mean"], summary["noisy_std"]))
    print(format_row(method, summary["mean"], summary["std"]))
    if seconds_per_image is not None:
        print(f"{method}: {seconds_per_image:.3f} s per image" + (f", reads {bscans} B-scans per output" if bscans > 1 else ""))
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "method", *keys, *(f"noisy_{k}" for k in keys)])
            for row, noisy in zip(rows, noisy_rows):
                writer.writerow([row["id"], method, *(f"{row[k]:.6f}" for k in keys), *(f"{noisy[k]:.6f}" for k in keys)])
        print(f"per-image scores: {csv_path}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary: {json_path}")
    return summary


def paired_difference(values, baseline, seed=0, resamples=10_000):
    """Mean of the per-image differences values - baseline, with a bootstrap 95 % interval over the
    images (percentile method; resampling images, so the pairing is kept): {"mean", "low", "high"}."""
    diff = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
    if diff.size < 2 or np.ptp(diff) == 0:  # no spread to resample: the interval is the value itself
        return {"mean": float(diff.mean()), "low": float(diff.mean()), "high": float(diff.mean())}
    interval = stats.bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=resamples,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return {"mean": float(diff.mean()), "low": float(interval.low), "high": float(interval.high)}


def read_outputs(folder, samples):
    """Already-denoised images named <id>.tif|tiff|png, one per sample."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: outputs folder not found")
    outputs = []
    for sample in samples:
        found = [folder / f"{sample.id}{suffix}" for suffix in datasets.IMAGE_SUFFIXES if (folder / f"{sample.id}{suffix}").is_file()]
        if not found:
            raise DataError(f"{folder}: no output for image '{sample.id}' (expected {sample.id}.tif or .png)")
        outputs.append(datasets.read_image(found[0])[0])
    return outputs


def denoiser_input(sample, volume):
    """What a denoiser reads: the B-scan, or (volume=True, BM4D) the B-scan between its neighbours."""
    if not volume:
        return sample.noisy
    if not sample.neighbours:
        raise DataError(f"image '{sample.id}' has no registered neighbouring B-scans "
                        "(duke28: <subject>/1.tif..4.tif beside test.tif), which a volumetric denoiser needs")
    return sample.volume()


def _denoise_one(job):
    denoise, image = job
    start = time.perf_counter()
    output = denoise(image)
    return output, time.perf_counter() - start


def _map(function, jobs, workers, desc):
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(function, jobs), total=len(jobs), desc=desc))
    return [function(job) for job in tqdm(jobs, desc=desc)]


def run_denoiser(denoise, method, args, volume=False):
    """Denoise every sample of --dataset/--split with denoise(image) -> image, save, score.

    Used by the classical baselines; --workers N runs N images at once in processes.
    volume=True hands denoise the B-scan between its neighbours (datasets.Sample.volume).
    seconds_per_image is the mean wall time of one call on one image.
    """
    samples = load_scoring_pairs(args)
    out_dir = Path(args.out_dir or f"img/{method}")
    jobs = [(denoise, denoiser_input(s, volume)) for s in samples]
    results = _map(_denoise_one, jobs, args.workers, method)
    outputs = [np.clip(output, 0, 1).astype(np.float32) for output, _ in results]
    for sample, output in zip(samples, outputs):
        datasets.write_image(out_dir / f"{sample.id}.tif", output, sample.bit_depth)
    seconds = float(np.mean([t for _, t in results]))
    return score(samples, outputs, method, args.dataset, args.split, seconds,
                 out_dir / "scores.csv", args.json, bscans=len(jobs[0][1]) if volume else 1)


def baseline_cli(baseline, description):
    """The main(argv=None) of a classical baseline script: baseline_main with its spec and help text."""
    return functools.partial(baseline_main, baseline, description)


def baseline_main(baseline, description, argv=None):
    """The command line of a classical baseline script (BM3D.py, NLM.py, blur.py, BM4D.py): denoise and
    score --dataset/--split with the tuned defaults or --<param> values, or --tune on a training split."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--workers", type=int, default=1, help="images denoised at once, in processes")
    for name, (default, text) in baseline.params.items():
        parser.add_argument(f"--{name}", type=type(default), default=default, help=f"{text} (default {default})")
    parser.add_argument("--tune", action="store_true", help="grid-search " + " and ".join(baseline.tune_grid) +
                        " on --split (a training split) and print the table")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    cv2.setNumThreads(1)  # one core per image; --workers parallelises across images
    params = {name: getattr(args, name) for name in baseline.params}
    try:
        if "lateral_bin" in params:
            check_lateral_bin(params["lateral_bin"])
        negative = [f"--{name} {value}" for name, value in params.items() if value < 0]
        if negative:
            raise DataError(f"{', '.join(negative)}: must be >= 0")
        if args.tune:
            names, values = zip(*baseline.tune_grid.items())
            grid = [{**dict(zip(names, combo)), **{k: v for k, v in params.items() if k not in names}}
                    for combo in itertools.product(*values)]
            return grid_search(baseline.denoise, grid, baseline.name, args, volume=baseline.volume)
        denoise = functools.partial(baseline.denoise, **params)
        return run_denoiser(denoise, baseline.name, args, volume=baseline.volume)
    except DataError as error:
        sys.exit(f"error: {error}")


def _psnr_of(job):
    denoise, params, sample, image = job
    start = time.perf_counter()
    output = denoise(image, **params)
    return psnr(sample.clean, np.clip(output, 0, 1)), time.perf_counter() - start


def grid_search(denoise, grid, method, args, volume=False):
    """Mean PSNR of denoise(image, **params) for each params in grid, on --dataset/--split.

    For choosing a baseline's parameters, so it refuses any split that holds a test subject.
    """
    if datasets.split_holds_test_subjects(args.dataset, args.data_root, args.split):
        raise DataError(f"--tune chooses parameters, and --split {args.split} of {args.dataset} holds test images: "
                        "tune on --split train (or val)")
    samples = load_scoring_pairs(args)
    jobs = [(denoise, params, sample, denoiser_input(sample, volume)) for params in grid for sample in samples]
    results = _map(_psnr_of, jobs, args.workers, f"{method} --tune")
    names = list(grid[0])
    print(f"\n{args.dataset} / {args.split}: {len(samples)} images")
    print("".join(f"{n:>14}" for n in names) + f"{'mean PSNR':>11}{'s/image':>9}")
    rows = []
    for i, params in enumerate(grid):
        chunk = results[i * len(samples):(i + 1) * len(samples)]
        rows.append((float(np.mean([p for p, _ in chunk])), float(np.mean([s for _, s in chunk])), params))
        print("".join(f"{params[n]:>14}" for n in names) + f"{rows[-1][0]:>11.3f}{rows[-1][1]:>9.3f}")
    best = max(rows, key=lambda row: row[0])
    print("best: " + " ".join(f"--{n} {best[2][n]}" for n in names) + f" ({best[0]:.3f} dB)")
    return rows
