"""What a filter-start generator's trained correction adds on subjects it never saw (duke28, never the test split).

For each training run (its --ckpt_dir), its start (a checkpoint with the correction zeroed: the same filter for
every epoch) and each epoch_N.pth are scored on the run's held-back subjects' test.tif B-scans (train.py's
--val_subjects or --n_val). Their neighbour B-scans are left out, unlike --val_neighbours: they are scored against
an average registered to test.tif, which favours outputs that lean on the neighbours (docs/training.md).

    python bench/correction.py runs/six_s0 runs/six_s1     # the runs of docs/training.md's held-out table
    python bench/correction.py runs/x --data_root PATH     # the data elsewhere than the run recorded
    python bench/correction.py runs/six_s0 --classical     # also blur.py, NLM.py, BM3D.py, BM4D.py on those B-scans
"""
import argparse
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import machine, save
from intensity import start_of

import baselines
import models
import scoring
from utils import DataError, psnr, ssim


def epochs_of(run):
    """The run's epoch_N.pth files in epoch order (epoch_10 after epoch_9)."""
    paths = [p for p in Path(run).glob("epoch_*.pth") if re.fullmatch(r"epoch_\d+\.pth", p.name)]
    if not paths:
        raise DataError(f"{run}: no epoch_N.pth checkpoints (a train.py --ckpt_dir)")
    return sorted(paths, key=lambda p: int(p.stem.split("_")[1]))


def held_out_bscans(state, data_root=None):
    """The held-back subjects' test.tif B-scans of the run that saved `state` (its own split and fold)."""
    train_args = state["args"]
    if train_args.get("dataset") != "duke28":
        raise DataError(f"this benchmark reads duke28's held-back subjects; the run trained on {train_args.get('dataset')}")
    args = argparse.Namespace(dataset="duke28", data_root=data_root or train_args["data_root"], split="val",
                              val_neighbours=False)
    return scoring.load_scoring_pairs(args, train_args)


def scores(denoiser, samples, volume=True):
    """{"psnr", "ssim"}: per-B-scan lists; denoiser reads each sample's 5-B-scan volume, or with volume False its B-scan."""
    outputs = [denoiser(sample.volume() if volume else sample.noisy) for sample in samples]
    return {"psnr": [psnr(s.clean, o) for s, o in zip(samples, outputs)],
            "ssim": [ssim(s.clean, o) for s, o in zip(samples, outputs)]}


def _loaded(path):
    denoiser, state = models.load_checkpoint(path)
    return denoiser, state["step"]


def score_run(run, data_root=None):
    """{"subjects", "rows": [{"step", "psnr", "ssim", "per_subject_psnr"}]}: the start (step 0), then each epoch."""
    paths = epochs_of(run)
    first, state = models.load_checkpoint(paths[0])
    if not isinstance(first.net, models.FilterSkip):
        raise DataError(f"{paths[0]}: not a filter-start generator (--skip_blur, --skip_nlm, --skip_bm3d): it has no start to compare with")
    samples = held_out_bscans(state, data_root)
    rows = []
    for path in tqdm([None] + paths, desc=str(run)):
        denoiser, step = (start_of(first), 0) if path is None else _loaded(path)
        result = scores(denoiser, samples)
        rows.append({"step": step, "psnr": float(np.mean(result["psnr"])), "ssim": float(np.mean(result["ssim"])),
                     "per_subject_psnr": dict(zip((s.id for s in samples), result["psnr"]))})
    return {"subjects": [s.id for s in samples], "rows": rows}


def score_classical(run, data_root=None):
    """{method: {"psnr", "ssim"}}: each classical baseline (BM4D.py on the 5 B-scans) on the run's held-back test.tif."""
    samples = held_out_bscans(models.load_checkpoint(epochs_of(run)[0])[1], data_root)
    rows = {}
    for key, spec in tqdm(baselines.CLASSICAL.items(), desc="classical"):
        result = scores(lambda image, spec=spec: spec.denoise(image), samples, volume=spec.volume)
        rows[f"{spec.name}.py"] = {metric: float(np.mean(values)) for metric, values in result.items()}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.py --ckpt_dir folders")
    parser.add_argument("--data_root", default=None, help="the duke28 folder (default: the one each run recorded)")
    parser.add_argument("--classical", action="store_true",
                        help="also score the classical baselines on the first run's held-back B-scans (BM3D.py: ~4 s each)")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    results = {}
    for run in args.runs:
        try:
            results[run] = score_run(run, args.data_root)
        except DataError as error:
            raise SystemExit(f"error: {error}")
    classical = score_classical(args.runs[0], args.data_root) if args.classical else None
    print("\nmean PSNR / SSIM on each run's held-back subjects' test.tif; step 0 is the start, its correction zeroed")
    for run, result in results.items():
        cells = "  ".join(f"{row['step']}: {row['psnr']:.2f} / {row['ssim']:.3f}" for row in result["rows"])
        print(f"{run} (subjects {', '.join(result['subjects'])})  {cells}")
    for name, values in (classical or {}).items():
        print(f"{name} on {args.runs[0]}'s held-back B-scans: {values['psnr']:.2f} / {values['ssim']:.3f}")
    payload = {"machine": info, "runs": results, **({"classical": {"run": args.runs[0], "rows": classical}} if classical else {})}
    if not args.no_save:
        save("correction_duke28", payload, gather=("runs",))  # the runs scored before stay in the file
    return payload


if __name__ == "__main__":
    main()
