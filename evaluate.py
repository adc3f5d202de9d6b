"""Score denoised OCT B-scans against their references: one table, one CSV, one JSON.

    python evaluate.py --epoch 600                        # a trained checkpoint, synthetic test set
    python evaluate.py --epoch 12 --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test
    python evaluate.py --outputs ../shared/data/published_outputs/MIFCN \
        --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test

Every row of the project's results table (our checkpoints, the classical baselines and the
published methods' outputs) goes through scoring.score(), so all are measured alike.
"""
import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
import models
import scoring
from datasets import DataError


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scoring.add_data_args(parser)
    parser.add_argument("--outputs", default=None, help="score a folder of already-denoised <id>.tif|png")
    parser.add_argument("--method", default=None, help="name of the scored method (default: folder / checkpoint)")
    parser.add_argument("--epoch", type=epoch_arg, default=None,
                        help="evaluate <ckpt_dir>/epoch_N.pth; 'best': the best validation epoch")
    parser.add_argument("--ckpt", default=None, help="evaluate this checkpoint file")
    parser.add_argument("--ckpt_dir", default="ckpt")
    parser.add_argument("--ensemble", nargs="?", const="lr", default=None, choices=list(models.ENSEMBLES),
                        help="average flipped passes: 'lr' (the default with a bare --ensemble): the B-scan and its "
                             "left-right mirror, the only flip training uses; 'all': the 8 flips/rotations")
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
    if args.outputs:
        samples = scoring.load_scoring_pairs(args)
        method = args.method or Path(args.outputs).name
        outputs = scoring.read_outputs(args.outputs, samples)
        out_dir = Path(args.out_dir or f"img/{method}")
        return scoring.score(samples, outputs, method, args.dataset, args.split, None, out_dir / "scores.csv", args.json)

    path = checkpoint_path(args)
    device = resolve_device(args.device)
    generator, state = load_generator(path, device)
    set_lateral_bin(generator, args.lateral_bin)
    samples = scoring.load_scoring_pairs(args, state.get("args"))
    method = args.method or f"{state.get('method', 'tcfl')}-{state['backbone']}{f'-ens_{args.ensemble}' if args.ensemble else ''}"
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
    return scoring.score(samples, outputs, method, args.dataset, args.split, float(np.mean(seconds)),
                         out_dir / "scores.csv", args.json)


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
