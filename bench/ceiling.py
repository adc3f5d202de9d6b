"""What the classical filters leave to gain, on the train subjects (never the test split).

Two bounds behind the levers of docs/training.md, with no training involved:

1. Would a noise-adaptive blur help? For every train B-scan (the subjects' `test.tif` and, with
   --neighbours, their registered neighbours, each against its subject's average) the wavelet noise
   estimate, and the best Gaussian of a grid for that B-scan alone: if the best width followed the
   noise, a start that sets it from the noise estimate would gain up to the oracle's margin.
2. What combining the classical outputs gives: blur.py, NLM.py, BM3D.py and their plain averages on
   the subjects' `test.tif` B-scans, at each method's tuned defaults; and the three on each pair of
   subjects with their neighbours, the images a `train.py --val_subjects A B --val_neighbours` fold
   validates on.

    python bench/ceiling.py                  # duke28 train subjects 1-10 with their neighbours: 50 B-scans
"""
import argparse
import itertools

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from common import SHARED_DATA, machine, save

import baselines
import datasets
from utils import noise_sigma, psnr

AXIAL = (0.75, 1.0, 1.25, 1.5, 2.0)       # Gaussian sigmas at full size, pixels
LATERAL = (8.0, 12.0, 16.0, 20.0, 24.0, 32.0)


def best_gaussian(sample):
    """(noise estimate, best (axial, lateral) sigma, its PSNR, blur.py's PSNR) of one B-scan."""
    scores = {(a, l): psnr(sample.clean, np.clip(ndimage.gaussian_filter(sample.noisy, (a, l), mode="reflect"), 0, 1))
              for a, l in itertools.product(AXIAL, LATERAL)}
    best = max(scores, key=scores.get)
    return {"id": sample.id, "noise": noise_sigma(sample.noisy), "best_axial": best[0], "best_lateral": best[1],
            "best_psnr": scores[best], "blur_py_psnr": psnr(sample.clean, baselines.blur_denoise(sample.noisy))}


def classical_mix(samples):
    """{B-scan id: {output: PSNR}} for blur.py, NLM.py, BM3D.py and their plain averages."""
    names = ("blur", "nlm", "bm3d")
    rows = {}
    for sample in tqdm(samples, desc="classical"):
        out = {name: baselines.CLASSICAL[name].denoise(sample.noisy) for name in names}
        combos = {**out, "(blur+bm3d)/2": (out["blur"] + out["bm3d"]) / 2, "(blur+nlm)/2": (out["blur"] + out["nlm"]) / 2,
                  "(nlm+bm3d)/2": (out["nlm"] + out["bm3d"]) / 2, "(blur+nlm+bm3d)/3": sum(out.values()) / 3}
        rows[sample.id] = {name: psnr(sample.clean, image) for name, image in combos.items()}
    return rows


def mean_over(rows, ids):
    return {name: float(np.mean([rows[i][name] for i in ids])) for name in rows[ids[0]]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=str(SHARED_DATA / "duke_bioptigen"))
    parser.add_argument("--no_neighbours", action="store_true", help="part 1 on the subjects' test.tif B-scans only")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    samples = datasets.load_pairs("duke28", args.data_root, "train")
    scans = samples if args.no_neighbours else datasets.neighbours_as_samples(samples)
    per_scan = [best_gaussian(sample) for sample in tqdm(scans, desc="best Gaussian per B-scan")]
    column = lambda key: np.array([row[key] for row in per_scan], float)
    with np.errstate(invalid="ignore", divide="ignore"):  # nan where the best sigma is the same for every B-scan
        corr = lambda key: float(np.corrcoef(column("noise"), column(key))[0, 1])
        summary = {"corr_noise_best_axial": corr("best_axial"), "corr_noise_best_lateral": corr("best_lateral")}
    summary = {"noise_range": [float(column("noise").min()), float(column("noise").max())], **summary,
               "oracle_gain_db": float((column("best_psnr") - column("blur_py_psnr")).mean())}
    print(f"{len(per_scan)} B-scans: noise estimate {summary['noise_range'][0]:.3f}-{summary['noise_range'][1]:.3f}; "
          f"correlation with the best axial / lateral sigma {summary['corr_noise_best_axial']:+.2f} / "
          f"{summary['corr_noise_best_lateral']:+.2f}; per-B-scan best Gaussian vs blur.py {summary['oracle_gain_db']:+.2f} dB")
    rows = classical_mix(scans)
    mix = mean_over(rows, [sample.id for sample in samples])
    print(f"the subjects' own B-scans ({len(samples)}): " + ", ".join(f"{name} {value:.2f}" for name, value in mix.items()))
    subjects = [sample.id for sample in samples]
    folds = {}
    for fold in zip(subjects[::2], subjects[1::2]):  # train.py --val_subjects A B --val_neighbours scores these
        ids, name = [i for i in rows if i.split("/")[0] in fold], "-".join(fold)
        folds[name] = {"n_images": len(ids), **mean_over(rows, ids)}
        print(f"subjects {name} ({len(ids)} B-scans): blur / NLM / BM3D " +
              " / ".join(f"{folds[name][method]:.2f}" for method in ("blur", "nlm", "bm3d")))
    payload = {"machine": info, "per_scan": per_scan, "summary": summary, "classical_mix": mix,
               "classical_per_scan": rows, "folds": folds}
    if not args.no_save:
        save("ceiling_duke28_train", payload)
    return payload


if __name__ == "__main__":
    main()
