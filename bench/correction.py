"""What a filter-start generator's trained correction adds on subjects it never saw (duke28, never the test split).

For each training run (its --ckpt_dir), its start (a checkpoint with the correction zeroed: the same filter for
every epoch) and each epoch_N.pth are scored on the run's held-back subjects' test.tif B-scans (train.py's
--val_subjects or --n_val). Their neighbour B-scans are left out, unlike --val_neighbours: they are scored against
an average registered to test.tif, which favours outputs that lean on the neighbours (docs/training.md).

    python bench/correction.py runs/six_s0 runs/six_s1     # the runs of docs/training.md's held-out table
    python bench/correction.py runs/x --data_root PATH     # the data elsewhere than the run recorded
"""
import argparse
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import machine, save
from intensity import start_of

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


def scores(denoiser, samples):
    outputs = [denoiser(sample.volume()) for sample in samples]
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
        raise DataError(f"{paths[0]}: not a filter-start generator (--skip_blur, --skip_bm3d): it has no start to compare with")
    samples = held_out_bscans(state, data_root)
    rows = []
    for path in tqdm([None] + paths, desc=str(run)):
        denoiser, step = (start_of(first), 0) if path is None else _loaded(path)
        result = scores(denoiser, samples)
        rows.append({"step": step, "psnr": float(np.mean(result["psnr"])), "ssim": float(np.mean(result["ssim"])),
                     "per_subject_psnr": dict(zip((s.id for s in samples), result["psnr"]))})
    return {"subjects": [s.id for s in samples], "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.py --ckpt_dir folders")
    parser.add_argument("--data_root", default=None, help="the duke28 folder (default: the one each run recorded)")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    results = {}
    for run in args.runs:
        try:
            results[run] = score_run(run, args.data_root)
        except DataError as error:
            raise SystemExit(f"error: {error}")
    print("\nmean PSNR / SSIM on each run's held-back subjects' test.tif; step 0 is the start, its correction zeroed")
    for run, result in results.items():
        cells = "  ".join(f"{row['step']}: {row['psnr']:.2f} / {row['ssim']:.3f}" for row in result["rows"])
        print(f"{run} (subjects {', '.join(result['subjects'])})  {cells}")
    payload = {"machine": info, "runs": results}
    if not args.no_save:
        save("correction_duke28", payload)
    return payload


if __name__ == "__main__":
    main()
