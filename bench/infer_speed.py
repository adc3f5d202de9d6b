"""Seconds per 450 x 900 B-scan for each backbone, fp32 vs channels_last vs bf16; the shipped
checkpoint end to end as evaluate.py/denoise.py run it (lateral binning, BatchNorm folded)
against NLM.py on the same 5 duke28 test B-scans, with both outputs' PSNR; and what bf16
costs in PSNR on the duke28 test split with the shipped checkpoint.

Where bf16 is emulated (CPUs without AVX512-BF16/AMX: ~180x slower than fp32) the bf16
timings are skipped (--force_bf16 runs them) and the PSNR comparison uses a central
--crop of each test image for every variant, so that it still answers whether bf16 costs
accuracy.

    python bench/infer_speed.py
    python bench/infer_speed.py --quick
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from common import SHARED_DATA, ROOT, bf16_probe, machine, save, timeit

import baselines
import datasets
import models
import scoring
from utils import bf16_is_native, psnr, resolve_device

VARIANTS = {"fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"bf16": True},
            "channels_last+bf16": {"channels_last": True, "bf16": True}}


def run(generator, image, channels_last=False, bf16=False):
    x = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    with torch.no_grad():
        return models.predict_noise(generator, x, tile=4096, bf16=bf16)


def backbone_timings(backbone, image, device, emulated, repeats):
    """{variant: seconds per image} of an untrained backbone at full resolution (None: bf16 skipped where emulated)."""
    timings = {}
    for name, switches in VARIANTS.items():
        if switches.get("bf16") and emulated:
            timings[name] = None
            print(f"{backbone:<11} {name:<20} skipped: bf16 is emulated here (see above)")
            continue
        generator = models.build_generator(backbone).to(device).eval()
        if switches.get("channels_last"):
            generator = generator.to(memory_format=torch.channels_last)
        timings[name] = timeit(lambda: run(generator, image, **switches), repeats, device=device.type)
        print(f"{backbone:<11} {name:<20} {timings[name]:7.3f} s per {image.shape[-2]} x {image.shape[-1]} B-scan")
    return timings


def versus_nlm(ckpt, device, repeats):
    """Seconds per duke28 test B-scan (mean over the 5, end to end from the float image) and PSNR of the
    shipped checkpoint, with BatchNorm folded (as loaded) and unfolded, and of NLM.py; None without the data."""
    data = SHARED_DATA / "duke_bioptigen"
    if not data.is_dir() or not Path(ckpt).is_file():
        print(f"skipping the comparison with NLM.py on test B-scans: needs {data} and {ckpt}")
        return None
    samples = datasets.load_pairs("duke28", data, "test")
    folded, unfolded = models.load_checkpoint(ckpt, device)[0], models.load_checkpoint(ckpt, device, fold_bn=False)[0]
    rows = {}
    for name, denoise in (("shipped checkpoint", folded), ("shipped checkpoint, BatchNorm unfolded", unfolded),
                          ("NLM.py", baselines.NLM.denoise)):
        inputs = [network_input(denoise, s) for s in samples]
        outputs = [denoise(x) for x in inputs]  # also the warm-up
        seconds = timeit(lambda: [denoise(x) for x in inputs], repeats, warmup=0, device=device.type) / len(samples)
        scores = [psnr(s.clean, out) for s, out in zip(samples, outputs)]
        rows[name] = {"seconds_per_bscan": seconds, "psnr": float(np.mean(scores))}
        print(f"{name:<40} {seconds:.3f} s per test B-scan, PSNR {rows[name]['psnr']:.3f} dB ({len(samples)} duke28 test B-scans)")
    ratio = rows["shipped checkpoint"]["seconds_per_bscan"] / rows["NLM.py"]["seconds_per_bscan"]
    print(f"shipped checkpoint / NLM.py time per B-scan: {ratio:.2f}x (target <= 1)")
    return {"rows": rows, "ratio_to_nlm": ratio, "n_bscans": len(samples), "threads": torch.get_num_threads()}


def network_input(denoise, sample, region=(slice(None), slice(None))):
    """What evaluate.py feeds, cropped to region: a --neighbours checkpoint the B-scan with its neighbours,
    anything else the B-scan alone (scoring.denoiser_input)."""
    return scoring.denoiser_input(sample, volume=bool(getattr(denoise, "neighbours", 0)))[(Ellipsis, *region)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ckpt", default=str(ROOT / "ckpt" / "tcfl_duke28_G.pth"))
    parser.add_argument("--height", type=int, default=450)
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--force_bf16", action="store_true", help="time bf16 even where it is emulated")
    parser.add_argument("--crop", type=int, nargs=2, default=[64, 128], help="PSNR region where bf16 is emulated")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    info = machine()
    repeats = 2 if args.quick else 3
    emulated = not bf16_is_native(device) and not args.force_bf16
    probe = bf16_probe(device) if emulated else None
    image = torch.rand(1, 1, args.height, args.width, device=device)

    timings = {backbone: backbone_timings(backbone, image, device, emulated, repeats) for backbone in models.GENERATORS}

    shipped = None
    if Path(args.ckpt).is_file():
        denoiser, _ = models.load_checkpoint(args.ckpt, device)
        # a --neighbours checkpoint reads the B-scan between its neighbours: a volume of 1 + neighbours B-scans
        shape = (1 + denoiser.neighbours, args.height, args.width) if denoiser.neighbours else (args.height, args.width)
        bscan = np.random.default_rng(0).random(shape, dtype=np.float32)
        seconds = timeit(lambda: denoiser(bscan), repeats, device=device.type)
        shipped = {"checkpoint": Path(args.ckpt).name, "lateral_bin": denoiser.lateral_bin,
                   "bscans_read": 1 + denoiser.neighbours, "seconds_per_bscan": seconds}
        print(f"shipped checkpoint end to end (models.Denoiser, lateral_bin {denoiser.lateral_bin}, "
              f"channels_last on CPU): {seconds:.3f} s per {args.height} x {args.width} B-scan")

    versus = versus_nlm(args.ckpt, device, repeats)
    precision, psnr_region = None, None
    data = SHARED_DATA / "duke_bioptigen"
    if not data.is_dir() or not Path(args.ckpt).is_file():
        print(f"skipping the PSNR comparison: needs {data} and {args.ckpt}")
    else:
        denoiser, _ = models.load_checkpoint(args.ckpt, device)
        samples = datasets.load_pairs("duke28", data, "test")[: 2 if args.quick else None]
        region = (slice(None), slice(None))
        if emulated:
            h, w = args.crop
            top, left = (samples[0].noisy.shape[0] - h) // 2, (samples[0].noisy.shape[1] - w) // 2
            region = (slice(top, top + h), slice(left, left + w))
        where = f"central {args.crop[0]} x {args.crop[1]} crops of " if emulated else ""
        psnr_region = f"{where}{len(samples)} test images"
        precision = {}
        for name, switches in VARIANTS.items():
            layout = torch.channels_last if switches.get("channels_last") else torch.contiguous_format
            # as evaluate.py denoises (the checkpoint's lateral binning); a 1-channel input is channels_last already
            denoiser.net.to(memory_format=layout)
            variant = denoiser.replace(tile=4096, bf16=switches.get("bf16", False), noise_sigma=None)
            scores = []
            for sample in samples:
                out = variant(network_input(variant, sample, region))
                scores.append(psnr(sample.clean[region], out))
            precision[name] = float(np.mean(scores))
        base = precision["fp32"]
        for name, value in precision.items():
            print(f"shipped checkpoint, {name:<20} PSNR {value:.3f} dB ({value - base:+.3f} vs fp32, {psnr_region})")
    if not args.no_save:
        save("infer_speed_quick" if args.quick else "infer_speed",
             {"machine": info, "image": [args.height, args.width], "seconds_per_bscan": timings,
              "shipped_checkpoint": shipped, "test_bscans_vs_nlm": versus,
              "bf16_probe": probe, "psnr_region": psnr_region, "test_psnr": precision})
    return timings, precision


if __name__ == "__main__":
    main()
