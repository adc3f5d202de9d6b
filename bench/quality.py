"""The project's results table: every method scored alike on one test split, with its cost.

    python bench/quality.py                       # duke28 test split of ../shared/data/duke_bioptigen
    python bench/quality.py --dataset synthetic   # the README's figure, on the built-in data
    python bench/quality.py --quick

Rows: noisy input, the classical baselines (blur.py, BM3D.py, NLM.py, BM4D.py), every shipped
checkpoint (ckpt/*_G.pth; TCFL also with the left-right ensemble) and, on duke28, the published
methods' outputs (../shared/data/published_outputs). Each row says how many B-scans it reads
per output, and carries its mean paired per-image difference to BM3D.py and to the blur floor
with a bootstrap 95 % interval over the images. On duke28 the classical rows, which need no
training data, are also scored on all 15 subjects. Writes bench/results/quality_<dataset>.json
and .md, img/psnr_vs_time.png (duke28) and a figure of one B-scan with each method's output and
a zoomed inset (real scans: git-ignored).
"""
import argparse
import re
import time

import numpy as np

from common import ROOT, SHARED_DATA, machine, save, test_samples

import baselines
import datasets
import models
import scoring
from utils import METRICS, ROI_METRICS

# Published rows that read more than the one noisy B-scan (the published methods' papers).
PUBLISHED_BSCANS = {"3D-SBSDI": "volume", "mmBM4D": "volume", "V-BM4D": "volume", "MSBTD": "volume",
                    "MIFCN": "several"}
BASELINES = ("blur.py", "BM3D.py")  # every row's paired differences are taken to these
PAIRED = ("PSNR", "SSIM")
DIGITS = {"PSNR": 2, "SSIM": 3, "GCMSE": 2, "EPI": 3, "EPI_v": 2, "MSR": 2, "CNR": 2, "ENL": 0}


def timed(denoise, samples, volume=False):
    outputs, seconds = [], []
    for sample in samples:
        image = scoring.denoiser_input(sample, volume)
        start = time.perf_counter()
        outputs.append(np.clip(denoise(image), 0, 1))
        seconds.append(time.perf_counter() - start)
    return outputs, float(np.mean(seconds))


def classical(samples, no_bm3d=False):
    """(row name, denoise, reads the volume) of the classical baselines (the scripts' defaults)."""
    has_volume = all(sample.neighbours for sample in samples)
    return [(f"{spec.name}.py", spec.denoise, spec.volume) for key, spec in baselines.CLASSICAL.items()
            if not (no_bm3d and key in ("bm3d", "bm4d")) and (has_volume or not spec.volume)]


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


def add_paired_differences(summaries):
    """Each row's paired per-image difference to each baseline row, with a bootstrap 95 % interval."""
    by_name = {s["method"]: s for s in summaries}
    for s in summaries:
        s["paired"] = {}
        for base in BASELINES:
            if base in by_name and by_name[base] is not s:
                s["paired"][base] = {k: scoring.paired_difference([r[k] for r in s["per_image"]],
                                                                  [r[k] for r in by_name[base]["per_image"]])
                                     for k in PAIRED}
    return summaries


def _interval(d, digits):
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def markdown(summaries):
    keys = [k for k in (*METRICS, *ROI_METRICS) if k in summaries[0]["mean"]]
    cell = lambda means, stds, k: f"{means[k]:.{DIGITS[k]}f} ± {stds[k]:.{DIGITS[k]}f}"
    lines = ["| method | B-scans | " + " | ".join(keys) + " | s / image |", "|---" * (len(keys) + 3) + "|"]
    noisy = summaries[0]
    lines.append("| noisy input | 1 | " + " | ".join(cell(noisy["noisy_mean"], noisy["noisy_std"], k) for k in keys) + " | |")
    for s in summaries:
        seconds = f"{s['seconds_per_image']:.2f}" if s["seconds_per_image"] else "n/a"
        lines.append(f"| {s['method']} | {s['bscans']} | " + " | ".join(cell(s["mean"], s["std"], k) for k in keys) + f" | {seconds} |")
    lines += ["", "| method | " + " | ".join(f"Δ{k} vs {b} [95 % CI]" for b in BASELINES for k in PAIRED) + " |",
              "|---" * (len(BASELINES) * len(PAIRED) + 1) + "|"]
    for s in summaries:
        cells = [_interval(s["paired"][b][k], DIGITS[k]) if b in s["paired"] else "" for b in BASELINES for k in PAIRED]
        lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_rows(samples, dataset, split, args, networks=True):
    """Every method on samples: (summaries with paired differences, {name: outputs})."""
    outputs, summaries = {}, []

    def add(name, images, seconds, bscans=1):
        outputs[name] = images
        summaries.append(scoring.score(samples, images, name, dataset, split, seconds, bscans=bscans))

    for name, denoise, volume in classical(samples, args.no_bm3d):
        add(name, *timed(denoise, samples, volume), bscans=len(samples[0].volume()) if volume else 1)
    if networks:
        for path in shipped_checkpoints():
            denoiser, state = models.load_checkpoint(path)
            name = f"{state.get('method', 'tcfl')} ({path.name})"
            volume = bool(denoiser.neighbours) and all(sample.neighbours for sample in samples)  # train.py --neighbours
            bscans = 1 + denoiser.neighbours if volume else 1
            add(name, *timed(denoiser, samples, volume), bscans=bscans)
            if not args.quick and state.get("method", "tcfl") == "tcfl":  # 2x the time: only for the main method
                ensemble = denoiser.replace(ensemble="lr")  # the same settings, plus the mirrored pass
                add(name + " ens lr", *timed(ensemble, samples, volume), bscans=bscans)
        if dataset == "duke28":
            for folder in sorted((SHARED_DATA / "published_outputs").iterdir()):
                add(folder.name, scoring.read_outputs(folder, samples), None, PUBLISHED_BSCANS.get(folder.name, 1))
    return add_paired_differences(summaries), outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="duke28", choices=["duke28", "synthetic"])
    parser.add_argument("--quick", action="store_true", help="two test images, no ensemble, no all-subject table")
    parser.add_argument("--no_bm3d", action="store_true", help="skip BM3D and BM4D (the slow rows)")
    parser.add_argument("--no_save", action="store_true", help="print only: no JSON, no figures")
    parser.add_argument("--size", type=int, default=256, help="synthetic image size")
    args = parser.parse_args(argv)
    info = machine()
    args.dataset, samples = test_samples(args.dataset, args.size, args.quick)
    summaries, outputs = score_rows(samples, args.dataset, "test", args)
    table = markdown(summaries)
    print(f"\n{args.dataset} test split, {len(samples)} images, mean ± std\n{table}")
    all_subjects = None
    if args.dataset == "duke28" and not args.quick:  # the classical rows need no training data: all 15 subjects
        every = datasets.load_pairs("duke28", SHARED_DATA / "duke_bioptigen", "all")
        all_subjects, _ = score_rows(every, "duke28", "all", args, networks=False)
        print(f"\nduke28, all {len(every)} subjects, classical rows\n{markdown(all_subjects)}")
    if args.no_save:
        return summaries
    real = args.dataset == "duke28"
    # Figures of real scans stay local (img/ is git-ignored); the synthetic one ships with the README.
    figure(ROOT / "img" / ("quality_duke28_bscan.png" if real else "readme/quality_synthetic_bscan.png"),
           samples[0], {k: v[0] for k, v in outputs.items()}, f"{args.dataset} test image {samples[0].id}")
    scatter(ROOT / "img" / ("psnr_vs_time.png" if real else "readme/psnr_vs_time_synthetic.png"), summaries,
            f"{args.dataset} test split ({len(samples)} images), {info['cpu']}, {info['cores']} cores")
    name = f"quality_{args.dataset}{'_quick' if args.quick else ''}"
    save(name, {"machine": info, "dataset": args.dataset, "n_images": len(samples), "rows": summaries, "markdown": table,
                "all_subjects": all_subjects})
    (ROOT / "bench" / "results" / f"{name}.md").write_text(
        f"{args.dataset} test split, {len(samples)} images, mean ± std; {info['cpu']}, {info['cores']} cores\n\n{table}\n"
        + (f"\nduke28, all {len(all_subjects[0]['per_image'])} subjects, classical rows\n\n{markdown(all_subjects)}\n"
           if all_subjects else ""))
    return summaries


if __name__ == "__main__":
    main()
