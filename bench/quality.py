"""The project's results table: every method scored alike on one test split, with its cost.

    python bench/quality.py                       # duke28 test split of ../shared/data/duke_bioptigen
    python bench/quality.py --dataset synthetic   # the README's figure, on the built-in data
    python bench/quality.py --quick

Rows: noisy input, BM3D.py, NLM.py, every shipped checkpoint (ckpt/*_G.pth) and, on duke28,
the published methods' outputs (../shared/data/published_outputs). Writes
bench/results/quality_<dataset>.json, img/psnr_vs_time.png (duke28) and a figure of one
B-scan with each method's output and a zoomed inset (real scans: git-ignored).
"""
import argparse
import re
import time

import numpy as np

from common import ROOT, SHARED_DATA, machine, save

import BM3D
import NLM
import datasets
import evaluate
import models
from utils import METRICS


def timed(denoise, samples):
    outputs, seconds = [], []
    for sample in samples:
        start = time.perf_counter()
        outputs.append(np.clip(denoise(sample.noisy), 0, 1))
        seconds.append(time.perf_counter() - start)
    return outputs, float(np.mean(seconds))


def shipped_checkpoints():
    return sorted((ROOT / "ckpt").glob("*_G.pth"))


def figure(path, sample, outputs, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("noisy", sample.noisy), ("reference", sample.clean)] + list(outputs.items())
    columns = 3
    rows = -(-len(panels) // columns)
    height, width = sample.noisy.shape
    zoom = (slice(height // 3, height // 3 + height // 5), slice(width // 2, width // 2 + width // 5))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 5 * rows * height / width + 0.5 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, image) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
        inset = ax.inset_axes([0.64, 0.0, 0.36, 0.36])
        inset.imshow(image[zoom], cmap="gray", vmin=0, vmax=1)
        inset.set_xticks([]), inset.set_yticks([])
        for side in inset.spines.values():
            side.set_color("yellow")
        ax.add_patch(plt.Rectangle((zoom[1].start, zoom[0].start), width // 5, height // 5, fill=False, color="yellow", lw=1))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"figure: {path}")


def scatter(path, summaries, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    timed_rows = sorted((s for s in summaries if s["seconds_per_image"]), key=lambda s: s["mean"]["PSNR"])
    for i, s in enumerate(timed_rows):
        label = re.sub(r"^\w+ \((\w+?)(_duke28)?_G\.pth\)", r"\1", s["method"])  # "tcfl (tcfl_lsgan_duke28_G.pth) ens" -> "tcfl_lsgan ens"
        ax.scatter(s["seconds_per_image"], s["mean"]["PSNR"], s=30)
        ax.annotate(label, (s["seconds_per_image"], s["mean"]["PSNR"]), textcoords="offset points",
                    xytext=(6, 4 if i % 2 else -11), fontsize=8)  # alternate sides: close points stay readable
    noisy = summaries[0]["noisy_mean"]["PSNR"]
    ax.axhline(noisy, color="grey", ls="--", lw=1)
    ax.annotate("noisy input", xy=(0.01, noisy), xycoords=("axes fraction", "data"), xytext=(0, 3),
                textcoords="offset points", color="grey", fontsize=8)
    published = [s for s in summaries if s["seconds_per_image"] is None]
    for s in published:
        ax.axhline(s["mean"]["PSNR"], color="tab:purple", lw=0.5, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per B-scan (log scale)")
    ax.set_ylabel("mean PSNR (dB)")
    ax.set_title(title + ("\nthin lines: published outputs (time unknown)" if published else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


def markdown(summaries):
    lines = ["| method | " + " | ".join(METRICS) + " | s / image |", "|---" * (len(METRICS) + 2) + "|"]
    noisy = summaries[0]
    lines.append("| noisy | " + " | ".join(f"{noisy['noisy_mean'][k]:.3f} ± {noisy['noisy_std'][k]:.3f}" for k in METRICS) + " | |")
    for s in summaries:
        seconds = f"{s['seconds_per_image']:.2f}" if s["seconds_per_image"] else "n/a"
        lines.append(f"| {s['method']} | " + " | ".join(f"{s['mean'][k]:.3f} ± {s['std'][k]:.3f}" for k in METRICS) + f" | {seconds} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="duke28", choices=["duke28", "synthetic"])
    parser.add_argument("--quick", action="store_true", help="two test images, no ensemble")
    parser.add_argument("--no_bm3d", action="store_true", help="skip BM3D (the slow row)")
    parser.add_argument("--no_save", action="store_true", help="print only: no JSON, no figures")
    parser.add_argument("--size", type=int, default=256, help="synthetic image size")
    args = parser.parse_args(argv)
    info = machine()
    data = SHARED_DATA / "duke_bioptigen"
    if args.dataset == "duke28" and not data.is_dir():
        print(f"{data} not found: running on the synthetic set instead")
        args.dataset = "synthetic"
    samples = datasets.load_pairs(args.dataset, data if args.dataset == "duke28" else None, "test", synthetic_size=args.size)
    if args.quick:
        samples = samples[:2]

    outputs, summaries = {}, []

    def add(name, images, seconds):
        outputs[name] = images
        summaries.append(scoring.score(samples, images, name, args.dataset, "test", seconds))

    if not args.no_bm3d:
        add("BM3D.py", *timed(BM3D.denoise, samples))
    add("NLM.py", *timed(NLM.denoise, samples))
    for path in shipped_checkpoints():
        generator, state = evaluate.load_generator(path)
        name = f"{state.get('method', 'tcfl')} ({path.name})"
        add(name, *timed(lambda x: models.denoise_array(generator, x), samples))
        if not args.quick and state.get("method", "tcfl") == "tcfl":  # 8x the time: only for the main method
            add(name + " ens", *timed(lambda x: models.denoise_array(generator, x, ensemble=True), samples))
    if args.dataset == "duke28":
        for folder in sorted((SHARED_DATA / "published_outputs").iterdir()):
            add(folder.name, scoring.read_outputs(folder, samples), None)

    table = markdown(summaries)
    print(f"\n{args.dataset} test split, {len(samples)} images, mean ± std\n{table}")
    if args.no_save:
        return summaries
    real = args.dataset == "duke28"
    # Figures of real scans stay local (img/ is git-ignored); the synthetic one ships with the README.
    figure(ROOT / "img" / ("quality_duke28_bscan.png" if real else "readme/quality_synthetic_bscan.png"),
           samples[0], {k: v[0] for k, v in outputs.items()}, f"{args.dataset} test image {samples[0].id}")
    scatter(ROOT / "img" / ("psnr_vs_time.png" if real else "readme/psnr_vs_time_synthetic.png"), summaries,
            f"{args.dataset} test split ({len(samples)} images), {info['cpu']}, {info['cores']} cores")
    save(f"quality_{args.dataset}{'_quick' if args.quick else ''}",
         {"machine": info, "dataset": args.dataset, "n_images": len(samples), "rows": summaries, "markdown": table})
    return summaries


if __name__ == "__main__":
    main()
