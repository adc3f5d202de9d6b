"""Noise-level robustness: every method scored at several input noise levels, so one sees which
method keeps working on a scanner noisier or quieter than the data it was trained or tuned on.

    python bench/robustness.py                        # duke28 test split, levels k = 0, 1, 2, 4 and s = 1.5, 2
    python bench/robustness.py --dataset synthetic    # speckle strengths s = 0.5, 1.0, 1.5
    python bench/robustness.py --quick                # 2 images; BM3D/BM4D only if --methods names them
    python bench/robustness.py --methods noisy,nlm,tcfl_duke28      # keys: see --help
    python bench/robustness.py --split val --methods noisy,blur,nlm,tcfl_duke28   # validation subjects 9-10
    python bench/robustness.py --split val --methods nlm --ckpt runs/x/epoch_8.pth  # any checkpoint as a row
    python bench/robustness.py --split val --methods tcfl_duke28 --no_noise_adapt  # without --noise_adapt

duke28 (../shared/data/duke_bioptigen): level k is the mean (display domain, [0, 1]) of test.tif
and its k nearest registered neighbours (2.tif, 3.tif, then 1.tif, 4.tif): a quieter scan, as from
averaging k + 1 B-scans; k = 0 is the single B-scan everything was trained and tuned on. Noisier than that, s = 1.5 and 2:
the B-scan's residual against the reference scaled by s, as for synthetic below (the residual also
holds what registration and averaging left, scaled alike).
synthetic: level s scales the display-domain speckle residual, clip(clean + s (noisy - clean), 0, 1);
s = 1 is the training level, 0.5 quieter, 1.5 noisier. Each level is described by its input's
mean PSNR against the reference. BM4D reads the 5-B-scan volume 1, 2, centre, 3, 4 with the
level's input at the centre (duke28: the neighbours as recorded; synthetic: scaled like the centre).

Every cell goes through scoring.score, as every results table does. Writes
bench/results/robustness_<dataset>.json and img/readme/robustness_<dataset>.png (output PSNR
against input PSNR: numbers only, no scan, so it ships); --quick writes *_quick files, the plot
to the git-ignored img/.
"""
import argparse
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import RESULTS, ROOT, machine, save, test_samples
from quality import shipped_checkpoints, timed

import baselines
import models
import scoring

DUKE_LEVELS = (0, 1, 2, 4)             # neighbours averaged with test.tif
DUKE_NOISIER = (1.5, 2.0)              # the residual against the reference scaled by s
NEAREST_FIRST = (1, 2, 0, 3)           # Sample.neighbours = [1, 2, 3, 4].tif; the volume is 1, 2, test, 3, 4
SPECKLE_LEVELS = (0.5, 1.0, 1.5)       # synthetic speckle strength
SLOW = ("bm3d", "bm4d")                # left out by --quick unless --methods names them
NOISY = "noisy input"


@dataclasses.dataclass
class Level:
    name: str
    training: bool  # the noise level the methods were trained / tuned at
    samples: list   # the test samples with .noisy (and .neighbours) at this level


def averaged(sample, k):
    """The B-scan averaged with its k nearest neighbours; the neighbours stay as recorded."""
    stack = [sample.noisy] + [sample.neighbours[i] for i in NEAREST_FIRST[:k]]
    return dataclasses.replace(sample, noisy=np.mean(stack, axis=0).astype(np.float32))


def scaled(sample, s):
    """The speckle residual of the B-scan and of its neighbours scaled by s."""
    def scale(image):
        return np.clip(sample.clean + s * (image - sample.clean), 0, 1).astype(np.float32)
    return dataclasses.replace(sample, noisy=scale(sample.noisy), neighbours=[scale(n) for n in sample.neighbours])


def make_levels(dataset, samples):
    if dataset == "duke28":
        return ([Level(f"k={k}", k == 0, [averaged(x, k) for x in samples]) for k in DUKE_LEVELS]
                + [Level(f"s={s:g}", False, [scaled(x, s) for x in samples]) for s in DUKE_NOISIER])
    return [Level(f"s={s}", s == 1.0, [scaled(x, s) for x in samples]) for s in SPECKLE_LEVELS]


def checkpoint_denoiser(path, noise_adapt=True):
    denoiser = models.load_checkpoint(path)[0]
    if not noise_adapt:  # as evaluate.py / denoise.py --no-noise_adapt
        denoiser.noise_sigma = None
    return denoiser


def method_table(extra_checkpoints=(), noise_adapt=True):
    """key -> (row label, B-scans read per output, loader returning denoise(input); None: the input itself).
    extra_checkpoints: more checkpoint paths (--ckpt), keyed and labelled by their path;
    noise_adapt False: every checkpoint without models.Denoiser's noise adaptation."""
    table = {"noisy": (NOISY, 1, None),
             **{key: (f"{spec.name}.py", 5 if spec.volume else 1, lambda spec=spec: spec.denoise)
                for key, spec in baselines.CLASSICAL.items()}}
    rows = [(p.name.removesuffix("_G.pth"), p.name, p) for p in shipped_checkpoints()]
    rows += [(str(p), str(p), p) for p in extra_checkpoints]
    for key, label, path in rows:
        reads = 1 + models.inference_settings(torch.load(path, map_location="cpu", weights_only=True))["neighbours"]
        table[key] = (label, reads, functools.partial(checkpoint_denoiser, path, noise_adapt))
    return table


def choose(spec, table, quick):
    """--methods: 'all', or keys separated by commas ('ckpt' = every shipped checkpoint)."""
    if spec == "all":
        return [key for key in table if not (quick and key in SLOW)]
    checkpoints = [key for key, (label, _, _) in table.items() if label.endswith("_G.pth")]
    keys = [k for key in map(str.strip, spec.split(",")) for k in (checkpoints if key == "ckpt" else [key])]
    unknown = [key for key in keys if key not in table]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (known: all, ckpt, {', '.join(table)})")
    return list(dict.fromkeys(keys))


def run(levels, keys, table, dataset, split="test"):
    """{row label: {level name: scoring.score summary}}, the noisy input's row scored once per level."""
    inputs = {level.name: scoring.score(level.samples, [s.noisy for s in level.samples], NOISY, dataset, split)
              for level in levels}
    results = {}
    with tqdm(total=len(keys) * len(levels), desc="robustness") as bar:
        for key in keys:
            label, bscans, load = table[key]
            denoise = load() if load else None
            for level in levels:
                bar.set_postfix_str(f"{label}, {level.name}")
                tqdm.write(f"\n--- {label} at {level.name}")
                if denoise is None:
                    summary = inputs[level.name]
                else:
                    outputs, seconds = timed(denoise, level.samples, volume=bscans > 1)  # BM4D: Sample.volume()
                    summary = scoring.score(level.samples, outputs, label, dataset, split, seconds, bscans=bscans)
                results.setdefault(label, {})[level.name] = summary
                bar.update()
    described = [{"name": level.name, "training": level.training,
                  "input": {"mean": inputs[level.name]["mean"], "std": inputs[level.name]["std"]}} for level in levels]
    return described, results


def markdown(levels, results, metric, digits):
    header = [level["name"] + (" (training)" if level["training"] else "") for level in levels]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(levels) + 1) + "|",
             f"| input {metric} | " + " | ".join(f"{level['input']['mean'][metric]:.{digits}f}" for level in levels) + " |"]
    for label, by_level in results.items():
        cells = [f"{by_level[level['name']]['mean'][metric]:.{digits}f} ± {by_level[level['name']]['std'][metric]:.{digits}f}"
                 for level in levels]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path, levels, results, title):
    """Mean output PSNR against the level's input PSNR, one line per method; the input is y = x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = sorted(levels, key=lambda level: level["input"]["mean"]["PSNR"])
    x = [level["input"]["mean"]["PSNR"] for level in levels]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(x, x, color="grey", ls="--", lw=1, marker="o", ms=3, label="noisy input (y = x)")
    for level, xi in zip(levels, x):
        ax.annotate(level["name"], (xi, xi), textcoords="offset points", xytext=(4, -10), color="grey", fontsize=8)
    rows = [(label, by_level) for label, by_level in results.items() if label != NOISY]
    colours = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]  # ten strong colours, then their light tints
    for i, (label, by_level) in enumerate(rows):  # colour and marker both vary: > 10 lines stay apart
        ax.plot(x, [by_level[level["name"]]["mean"]["PSNR"] for level in levels], color=colours[i % 20],
                marker="os^Dv<>ph*X"[i % 11], ms=5, lw=1.2, label=label)
    training = next(xi for level, xi in zip(levels, x) if level["training"])
    ax.axvline(training, color="black", ls=":", lw=1)
    ax.annotate("training level", xy=(training, 0.02), xycoords=("data", "axes fraction"), xytext=(3, 0),
                textcoords="offset points", fontsize=8)
    ax.set_xlabel("input PSNR of the level (dB)")
    ax.set_ylabel("mean output PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.08)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="duke28", choices=["duke28", "synthetic"])
    parser.add_argument("--methods", default="all", help="'all' (default) or comma-separated keys: noisy, blur, bm3d, "
                        "nlm, bm4d, a checkpoint's name without _G.pth (tcfl_duke28, ...), ckpt = every ckpt/*_G.pth")
    parser.add_argument("--quick", action="store_true", help="two test images; no BM3D/BM4D unless --methods names them")
    parser.add_argument("--no_save", action="store_true", help="print only: no JSON, no plot")
    parser.add_argument("--size", type=int, default=256, help="synthetic image size")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="val: train.py's validation subjects (duke28 9-10), for choosing levers without the test split")
    parser.add_argument("--ckpt", action="append", default=[], metavar="PATH",
                        help="also score this checkpoint (train.py's epoch_N.pth or an exported file); repeatable")
    parser.add_argument("--no_noise_adapt", action="store_true",
                        help="checkpoints without their noise adaptation (evaluate.py --no-noise_adapt); print only")
    args = parser.parse_args(argv)
    args.no_save = args.no_save or args.no_noise_adapt
    for path in args.ckpt:
        if not Path(path).is_file():
            raise SystemExit(f"--ckpt: {path}: checkpoint not found")
    table = method_table(args.ckpt, noise_adapt=not args.no_noise_adapt)
    keys = list(dict.fromkeys(choose(args.methods, table, args.quick) + args.ckpt))
    info = machine()
    args.dataset, samples = test_samples(args.dataset, args.size, args.quick, args.split)

    levels, results = run(make_levels(args.dataset, samples), keys, table, args.dataset, args.split)
    name = f"robustness_{args.dataset}{'_val' if args.split == 'val' else ''}{'_quick' if args.quick else ''}"
    path = RESULTS / f"{name}.json"
    earlier = json.loads(path.read_text()) if not args.no_save and path.exists() else None
    if earlier and [level["name"] for level in earlier["levels"]] == [level["name"] for level in levels]:
        # The methods not run this time keep their rows (a method run again replaces its own).
        results = {**earlier["results"], **results}
    tables = {"PSNR": markdown(levels, results, "PSNR", 2), "SSIM": markdown(levels, results, "SSIM", 3)}
    for metric, text in tables.items():
        print(f"\n{args.dataset} {args.split} split, {len(samples)} images: {metric}, mean ± std per noise level\n{text}")
    payload = {"machine": info, "dataset": args.dataset, "split": args.split, "n_images": len(samples), "levels": levels,
               "results": results, "markdown": tables}
    if args.no_save:
        return payload
    plot(ROOT / "img" / (f"{name}.png" if args.quick else f"readme/{name}.png"), levels, results,
         f"noise-level robustness, {args.dataset} {args.split} split ({len(samples)} images)\n{info['cpu']}, {info['cores']} cores, {info['device']}")
    save(name, payload)
    return payload


if __name__ == "__main__":
    main()
