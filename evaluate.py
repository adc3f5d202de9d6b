"""Score denoised OCT B-scans against their references: one table, one CSV, one JSON.

    python evaluate.py --epoch 600                        # a trained checkpoint, synthetic test set
    python evaluate.py --epoch 12 --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test
    python evaluate.py --outputs ../shared/data/published_outputs/MIFCN \
        --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test

Every row of the project's results table (our checkpoints, BM3D.py, NLM.py and the
published methods' outputs) goes through score() below, so all are measured alike.
"""
import argparse
import csv
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
import models
from datasets import DataError
from utils import METRICS, all_metrics, psnr


def add_data_args(parser, dataset="synthetic", split="test"):
    parser.add_argument("--dataset", default=dataset, choices=datasets.DATASETS)
    parser.add_argument("--data_root", default=None, help="folder of the data set (not needed for synthetic)")
    parser.add_argument("--split", default=split, help="train | test | all (duke28 reads <data_root>/splits.json) | "
                        "val: the training split's images train.py holds back for validation (--n_val 2)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--out_dir", default=None, help="where denoised images and the CSV go (default img/<method>)")


def _mean_std(rows, key):
    values = np.array([row[key] for row in rows], dtype=np.float64)
    return float(values.mean()), float(values.std())


def format_row(name, means, stds):
    cells = [f"{means[k]:8.3f} +- {stds[k]:6.3f}" for k in METRICS]
    return f"{name:<14}" + "  ".join(cells)


def score(samples, outputs, method, dataset, split, seconds_per_image=None, csv_path=None, json_path=None):
    """Score outputs[i] against samples[i].clean; print mean +- std; write CSV/JSON.

    The noisy input is scored the same way, so every table carries its own baseline.
    """
    rows, noisy_rows = [], []
    for sample, output in zip(samples, outputs, strict=True):
        if output.shape != sample.clean.shape:
            raise DataError(f"{method}: output for {sample.id} has size {output.shape}, reference {sample.clean.shape}")
        rows.append({"id": sample.id, **all_metrics(sample.clean, np.clip(output, 0, 1))})
        noisy_rows.append({"id": sample.id, **all_metrics(sample.clean, sample.noisy)})
    summary = {
        "method": method, "dataset": dataset, "split": split, "n_images": len(rows),
        "mean": {k: _mean_std(rows, k)[0] for k in METRICS},
        "std": {k: _mean_std(rows, k)[1] for k in METRICS},
        "noisy_mean": {k: _mean_std(noisy_rows, k)[0] for k in METRICS},
        "noisy_std": {k: _mean_std(noisy_rows, k)[1] for k in METRICS},
        "seconds_per_image": seconds_per_image,
    }
    print(f"\n{dataset} / {split}: {len(rows)} images, mean +- std "
          "(PSNR data range 1; SSIM skimage, 7x7 window, data range 1; GCMSE kappa 0.5)")
    print(f"{'':<14}" + "  ".join(f"{k:^18}" for k in METRICS))
    print(format_row("noisy", summary["noisy_mean"], summary["noisy_std"]))
    print(format_row(method, summary["mean"], summary["std"]))
    if seconds_per_image is not None:
        print(f"{method}: {seconds_per_image:.3f} s per image")
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "method", *METRICS, *(f"noisy_{k}" for k in METRICS)])
            for row, noisy in zip(rows, noisy_rows):
                writer.writerow([row["id"], method, *(f"{row[k]:.6f}" for k in METRICS),
                                 *(f"{noisy[k]:.6f}" for k in METRICS)])
        print(f"per-image scores: {csv_path}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary: {json_path}")
    return summary


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


def _denoise_one(job):
    denoise, image = job
    start = time.perf_counter()
    output = denoise(image)
    return output, time.perf_counter() - start


def load_scoring_pairs(args):
    """The pairs to score. --split val: train.py's validation images (the held-back part of the
    training split that --epoch best and the choice of --ensemble were judged on)."""
    if args.split == "val":
        return datasets.load_unpaired(args.dataset, args.data_root, "train", n_val=2)[2]
    return datasets.load_pairs(args.dataset, args.data_root, args.split)


def run_denoiser(denoise, method, args):
    """Denoise every sample of --dataset/--split with denoise(image) -> image, save, score.

    Used by BM3D.py and NLM.py; --workers N runs N images at once in processes.
    seconds_per_image is the mean wall time of one call on one image.
    """
    samples = load_scoring_pairs(args)
    out_dir = Path(args.out_dir or f"img/{method}")
    jobs = [(denoise, s.noisy) for s in samples]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(tqdm(pool.map(_denoise_one, jobs), total=len(jobs), desc=method))
    else:
        results = [_denoise_one(job) for job in tqdm(jobs, desc=method)]
    outputs = [np.clip(output, 0, 1).astype(np.float32) for output, _ in results]
    for sample, output in zip(samples, outputs):
        datasets.write_image(out_dir / f"{sample.id}.tif", output, sample.bit_depth)
    seconds = float(np.mean([t for _, t in results]))
    return score(samples, outputs, method, args.dataset, args.split, seconds,
                 out_dir / "scores.csv", args.json)


def load_generator(path, device="cpu"):
    """The generator of a checkpoint (train.py's epoch_N.pth or a shipped generator-only file).

    Returns (generator in eval mode, checkpoint metadata). The EMA weights are used when saved.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(f"{path}: not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or "generator" not in state or "backbone" not in state:
        raise DataError(f"{path}: not a checkpoint of this project (no generator/backbone entries)")
    if state["backbone"] not in models.GENERATORS:
        raise DataError(f"{path}: unknown backbone '{state['backbone']}'")
    # Each training method saves its own inference module (noisy -> noise); rebuild it from the run's options.
    method = state.get("method", "tcfl")
    if method not in models.METHODS:
        raise DataError(f"{path}: unknown training method '{method}' (known: {', '.join(models.METHODS)})")
    generator = models.build_denoiser(method, state["backbone"], state.get("args") or {})
    weights = state.get("generator_ema") or state["generator"]
    name = state["backbone"] if method == "tcfl" else f"{method} ({state['backbone']})"
    try:
        generator.load_state_dict(weights)
    except RuntimeError as error:
        raise DataError(f"{path}: weights do not fit a {name} generator "
                        f"({str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error})") from None
    # Only TCFL trains with the zero-mean projection (train.py --zero_mean), so only it uses it here.
    generator.zero_mean = method == "tcfl" and bool((state.get("args") or {}).get("zero_mean", False))
    # A generator trained on laterally binned B-scans (train.py --lateral_bin) denoises at that scale.
    generator.lateral_bin = int((state.get("args") or {}).get("lateral_bin", 1))
    generator = generator.to(device).eval()
    if torch.device(device).type == "cpu":
        # oneDNN's convolutions run 1.5x faster in channels_last on CPU at no PSNR cost
        # (bench/infer_speed.py); a 1-channel B-scan is already laid out that way.
        generator = generator.to(memory_format=torch.channels_last)
    return generator, state


def set_lateral_bin(generator, lateral_bin):
    """--lateral_bin N: denoise at N:1 lateral binning instead of the checkpoint's own (None: keep it)."""
    if lateral_bin is not None:
        if lateral_bin < 1:
            raise DataError(f"--lateral_bin must be >= 1 (1: full resolution), got {lateral_bin}")
        generator.lateral_bin = lateral_bin
    return generator


def export_generator(path, out):
    """Write the inference weights of a training checkpoint as a small shippable file."""
    _, state = load_generator(path)
    weights = state.get("generator_ema") or state["generator"]
    keep = {k: state[k] for k in ("method", "backbone", "args", "epoch", "step", "history") if k in state}
    torch.save({**keep, "generator": weights, "source": Path(path).name}, out)
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB): {keep.get('method', 'tcfl')} / {keep['backbone']}, "
          f"epoch {keep.get('epoch')}, step {keep.get('step')}")


def checkpoint_path(args):
    """--ckpt PATH, or --epoch N inside --ckpt_dir, with the available epochs named when missing."""
    if args.ckpt:
        return Path(args.ckpt)
    epoch = best_epoch(args.ckpt_dir) if args.epoch == "best" else args.epoch
    path = Path(args.ckpt_dir) / f"epoch_{epoch}.pth"
    if not path.is_file():
        epochs = sorted(int(p.stem.split("_")[1]) for p in Path(args.ckpt_dir).glob("epoch_*.pth") if p.stem.split("_")[1].isdigit())
        available = f"available epochs: {', '.join(map(str, epochs))}" if epochs else "no epoch_N.pth there (train first)"
        raise DataError(f"{path}: checkpoint not found; {available}")
    return path


def epoch_arg(value):
    """--epoch N, or --epoch best: the epoch with the highest validation PSNR."""
    if value == "best":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number or 'best', got '{value}'") from None


def best_epoch(ckpt_dir):
    """The epoch whose validation PSNR (held-back training images, never the test split) is highest."""
    log = Path(ckpt_dir) / "log.csv"
    if not log.is_file():
        raise DataError(f"{log}: no training log, so no validation scores to pick the best epoch from")
    with open(log) as f:
        scored = [(float(r["val_psnr"]), int(r["epoch"])) for r in csv.DictReader(f) if r.get("val_psnr")]
    if not scored:
        raise DataError(f"{log}: no validation PSNR recorded (trained without validation images?)")
    value, epoch = max(scored)
    print(f"best validation PSNR {value:.2f} dB at epoch {epoch} ({log})")
    return epoch


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


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


def _psnr_of(job):
    denoise, params, sample = job
    start = time.perf_counter()
    output = denoise(sample.noisy, **params)
    return psnr(sample.clean, np.clip(output, 0, 1)), time.perf_counter() - start


def grid_search(denoise, grid, method, args):
    """Mean PSNR of denoise(image, **params) for each params in grid, on --dataset/--split.

    For choosing a baseline's parameters; refuses the test split, which only reports.
    """
    if args.split == "test":
        raise DataError("--tune chooses parameters: run it on --split train, never on the test split")
    samples = load_scoring_pairs(args)
    jobs = [(denoise, params, sample) for params in grid for sample in samples]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(tqdm(pool.map(_psnr_of, jobs), total=len(jobs), desc=f"{method} --tune"))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--outputs", default=None, help="score a folder of already-denoised <id>.tif|png")
    parser.add_argument("--method", default=None, help="name of the scored method (default: folder / checkpoint)")
    parser.add_argument("--epoch", type=epoch_arg, default=None,
                        help="evaluate <ckpt_dir>/epoch_N.pth; 'best': the best validation epoch")
    parser.add_argument("--ckpt", default=None, help="evaluate this checkpoint file")
    parser.add_argument("--ckpt_dir", default="ckpt")
    parser.add_argument("--ensemble", action="store_true", help="average the 8 flips/rotations")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (see bench/infer_speed.py)")
    parser.add_argument("--tile", type=int, default=512, help="tile size for large images (bounded memory)")
    parser.add_argument("--lateral_bin", type=int, default=None,
                        help="denoise B-scans binned N:1 laterally (default: as the checkpoint was trained, train.py --lateral_bin)")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="write the checkpoint's inference weights to PATH (generator only) and exit")
    args = parser.parse_args(argv)
    if args.export:
        if args.epoch is None and not args.ckpt:
            parser.error("--export needs --epoch N or --ckpt PATH")
        if Path(args.export).exists():
            raise DataError(f"{args.export} exists; remove it first (nothing is overwritten)")
        return export_generator(checkpoint_path(args), args.export)
    if not args.outputs and args.epoch is None and not args.ckpt:
        parser.error("give --epoch N or --ckpt PATH (a trained model), or --outputs DIR (denoised images)")
    samples = load_scoring_pairs(args)
    if args.outputs:
        method = args.method or Path(args.outputs).name
        outputs = read_outputs(args.outputs, samples)
        out_dir = Path(args.out_dir or f"img/{method}")
        return score(samples, outputs, method, args.dataset, args.split, None, out_dir / "scores.csv", args.json)

    path = checkpoint_path(args)
    device = resolve_device(args.device)
    generator, state = load_generator(path, device)
    set_lateral_bin(generator, args.lateral_bin)
    method = args.method or f"{state.get('method', 'tcfl')}-{state['backbone']}{'-ens' if args.ensemble else ''}"
    out_dir = Path(args.out_dir or f"img/{method}_{args.dataset}_{args.split}")
    outputs, seconds = [], []
    for sample in tqdm(samples, desc=f"denoise ({path.name})"):
        start = time.perf_counter()
        outputs.append(models.denoise_array(generator, sample.noisy, device, args.ensemble, args.bf16, args.tile))
        seconds.append(time.perf_counter() - start)
    for sample, output in zip(samples, outputs):
        datasets.write_image(out_dir / f"{sample.id}.tif", output, sample.bit_depth)
    save_comparison(out_dir / "comparison.png", samples[0], outputs[0], method)
    print(f"denoised images and comparison figure: {out_dir}/")
    return score(samples, outputs, method, args.dataset, args.split, float(np.mean(seconds)),
                 out_dir / "scores.csv", args.json)


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
