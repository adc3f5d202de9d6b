"""Denoise your own OCT scans: image files, folders, or multi-page TIFF stacks (volumes).

    python denoise.py scan.tif --out denoised/                      # the shipped checkpoint
    python denoise.py scans/ volume.tif --out denoised/ --epoch 40  # your own ckpt/epoch_40.pth
    python denoise.py scans/ --out denoised_bm3d/ --method bm3d     # classical baselines too

Each output keeps its input's file name, pixel type and bit depth (uint16 stays uint16 with
its full range) and a stack stays a stack. Nothing is overwritten without --overwrite.
A checkpoint trained with --neighbours K reads each page of a stack with its K nearest pages
(registered B-scans of one volume; --lone_bscan: each page alone); a single image is denoised alone.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from tqdm import tqdm

import baselines
import datasets
import models
from utils import DataError

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "ckpt" / "tcfl_duke28_G.pth"
# The single-B-scan baselines (BM4D needs registered neighbours, which a folder of files does not give).
CLASSICAL = {key: spec for key, spec in baselines.CLASSICAL.items() if not spec.volume}


def expand_inputs(inputs):
    """Files given directly, plus the images inside folders given."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in datasets.IMAGE_SUFFIXES]
        else:
            files.append(path)  # a missing or odd file is reported when it is read
    return files


def read_slices(path):
    """(list of 2-D float images, source dtype, is_stack) of an image file or a TIFF stack."""
    array = datasets.read_raw(path)
    if array.ndim == 3 and array.shape[-1] not in (3, 4):  # pages x height x width
        slices = [datasets.to_float(page, path) for page in array]
        return [image for image, _ in slices], array.dtype, True
    image, _ = datasets.read_image(path)
    return [image], datasets.to_grey(array, path).dtype, False


def write_slices(path, images, dtype, is_stack):
    bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(np.dtype(dtype), 32)
    if is_stack:
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, np.stack([datasets.from_float(image, bit_depth) for image in images]),
                         photometric="minisblack", compression="zlib")
    else:
        datasets.write_image(path, images[0], bit_depth)


def make_denoiser(args):
    """A function image -> denoised image for --method / --ckpt / --epoch."""
    if args.method != "model":  # a classical baseline with its tuned parameters
        return CLASSICAL[args.method].denoise
    if args.ckpt is None and args.epoch is None:
        args.ckpt = str(SHIPPED_CHECKPOINT)
    return models.load_for_options(args, models.checkpoint_path(args.ckpt, args.epoch, args.ckpt_dir))[0]


def peak_memory():
    """This process's peak resident memory (and the GPU's peak allocation when it ran there)."""
    try:
        import resource  # Unix only
    except ImportError:
        return "not measured on this system"
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    text = f"{kilobytes / 1024:.0f} MB"
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        text += f" (GPU {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB)"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or multi-page TIFF stacks")
    parser.add_argument("--out", required=True, help="output folder (not an input's own folder)")
    parser.add_argument("--method", default="model", choices=["model", *CLASSICAL],
                        help="model: a trained checkpoint (default: the shipped one); or a classical baseline")
    models.add_checkpoint_args(parser)  # default checkpoint: the shipped ckpt/tcfl_duke28_G.pth
    parser.add_argument("--lone_bscan", action="store_true",
                        help="read each page of a stack alone, as a single image, not with its nearest pages: for "
                             "stacks whose pages are not registered neighbouring B-scans (a sparse raster, uncorrected "
                             "motion; README)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)

    out_dir = Path(args.out).resolve()
    files = expand_inputs(args.inputs)
    if not files:
        raise DataError(f"no .tif/.tiff/.png images in {', '.join(args.inputs)}")
    for path in files:
        if path.resolve().parent == out_dir:
            raise DataError(f"--out {args.out} is the folder of input {path}: refusing to write next to the inputs")
    taken = [out_dir / p.name for p in files if (out_dir / p.name).exists()]
    if taken and not args.overwrite:
        raise DataError(f"{taken[0]} exists ({len(taken)} output file(s) would be replaced); use --overwrite")
    names = [p.name for p in files]
    if len(set(names)) < len(names):
        raise DataError("two inputs share a file name, so their outputs would collide; denoise them separately")
    denoise = make_denoiser(args)

    failed, bscans, gains, scales, lone, start = [], 0, [], [], [], time.perf_counter()
    for path in tqdm(files, desc="files", disable=len(files) == 1):
        try:
            images, dtype, is_stack = read_slices(path)
            outputs = []
            # a --neighbours checkpoint's models.Denoiser reads each page with its nearest pages
            volume = np.stack(images) if getattr(denoise, "neighbours", 0) and not args.lone_bscan else None
            for i, image in enumerate(tqdm(images, desc=path.name, unit="B-scan", disable=len(images) == 1)):
                outputs.append(denoise(image) if volume is None else denoise(volume, centre=i))
                gains.append(getattr(denoise, "last_gain", 1.0))  # models.Denoiser's --noise_adapt
                scales.append(getattr(denoise, "last_start_scale", 1.0))
                lone.append(getattr(denoise, "last_lone_gain", 1.0))
            write_slices(out_dir / path.name, outputs, dtype, is_stack)
            bscans += len(outputs)
        except DataError as error:
            tqdm.write(f"skipped: {error}")
            failed.append(str(path))
    seconds = time.perf_counter() - start
    print(f"denoised {len(files) - len(failed)} of {len(files)} file(s) into {out_dir}: {bscans} B-scan(s) in "
          f"{seconds:.1f} s ({bscans / seconds:.2f} B-scans/s, reading and writing included), peak memory {peak_memory()}")
    adapted = [g for g in gains if g < 1]
    if adapted:
        print(f"noise adaptation: {len(adapted)} of {len(gains)} B-scan(s) noisier than the training scans, contrast "
              f"compressed x{min(adapted):.2f}-x{max(adapted):.2f} before the network (--no-noise_adapt: off)")
    narrowed = [s for s in scales if s < 1]
    if narrowed:
        print(f"noise adaptation: {len(narrowed)} of {len(scales)} B-scan(s) from a scan quieter than the training scans, "
              f"the blur start's width x{min(narrowed):.2f}-x{max(narrowed):.2f} (--no-noise_adapt: off)")
    alone = [g for g in lone if g < 1]
    if alone:
        print(f"lone B-scans: {len(alone)} of {len(lone)} read without neighbours, as their own blend: contrast "
              f"compressed x{min(alone):.2f} more for the network's NLM or BM3D start")
    if failed:
        print(f"failed ({len(failed)}): " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as error:
        sys.exit(f"error: {error}")
