"""train.py's options: one place, as in CycleGAN's options/ (printed at start and saved beside the
checkpoints as opt.txt / opt.json by train.py). parse_args() also checks them against the method.
"""
import argparse

import models
import trainers
from utils import DataError, check_lateral_bin


def parse_args(argv=None):
    """The options, checked against the method, with the learning rates' defaults filled in for the chosen loss."""
    parser = get_parser()
    args = parser.parse_args(argv)
    unread = trainers.TRAINERS[args.method].unread_options(args, vars(parser.parse_args([])))
    if unread:
        raise DataError(f"--method {args.method} does not read {', '.join('--' + name for name in unread)}: "
                        "drop the option(s) or pick the method that uses them")
    low, high = args.noise_scale
    if not 0 <= low <= high:
        raise DataError(f"--noise_scale needs 0 <= LO <= HI, got {low} {high}")
    check_lateral_bin(args.lateral_bin)
    if min(args.skip_blur) < 0:
        raise DataError(f"--skip_blur needs sigmas >= 0, got {args.skip_blur[0]} {args.skip_blur[1]}")
    for name in ("d_blur", "real_blur"):
        if getattr(args, name) < 0:
            raise DataError(f"--{name} needs a sigma >= 0, got {getattr(args, name)}")
    if not 0 <= args.skip_centre_weight <= 1:
        raise DataError(f"--skip_centre_weight needs a weight in [0, 1], got {args.skip_centre_weight}")
    if args.skip_centre_weight < 1 and not (args.neighbours and (any(args.skip_blur) or args.skip_nlm or args.skip_bm3d)):
        raise DataError("--skip_centre_weight blends the neighbours into the filter G starts from: it needs "
                        "--neighbours K and --skip_blur, --skip_nlm or --skip_bm3d")
    if args.ssim_weight < 0:
        raise DataError(f"--ssim_weight needs a weight >= 0, got {args.ssim_weight}")
    if args.skip_nlm < 0:
        raise DataError(f"--skip_nlm needs h >= 0, got {args.skip_nlm}")
    if args.skip_bm3d < 0:
        raise DataError(f"--skip_bm3d needs a sigma factor >= 0, got {args.skip_bm3d}")
    if not 0 <= args.skip_blur_share < 1:
        raise DataError(f"--skip_blur_share needs a share in [0, 1), got {args.skip_blur_share}")
    if args.skip_blur_share and not (args.skip_nlm or args.skip_bm3d):
        raise DataError("--skip_blur_share mixes the Gaussian into an NLM or BM3D start: it needs --skip_nlm or --skip_bm3d")
    if any(args.skip_blur) and (args.skip_nlm or args.skip_bm3d):
        raise DataError("--skip_blur names the filter G starts from, as --skip_nlm and --skip_bm3d do: give the Gaussian "
                        "or NLM and/or BM3D")
    if args.skip_bm3d_profile != "hard" and not args.skip_bm3d:
        raise DataError("--skip_bm3d_profile picks the BM3D of a BM3D start: it needs --skip_bm3d")
    if args.val_subjects and args.dataset != "duke28":
        raise DataError(f"--val_subjects names duke28 subjects; --dataset is {args.dataset}")
    if args.neighbour_target < 0:
        raise DataError(f"--neighbour_target needs a weight >= 0, got {args.neighbour_target}")
    if args.neighbour_target and args.dataset != "duke28":
        raise DataError(f"--neighbour_target needs registered neighbour B-scans: --dataset duke28, not {args.dataset}")
    if args.bm3d_target < 0:
        raise DataError(f"--bm3d_target needs a weight >= 0, got {args.bm3d_target}")
    if args.bm3d_target and args.neighbour_target:
        raise DataError("--bm3d_target and --neighbour_target both name the target of G's squared-error term: give one")
    if args.bm3d_target and args.neighbours:
        raise DataError("--bm3d_target denoises single B-scans: not with --neighbours")
    if args.neighbour_target and args.neighbours == 1:
        raise DataError("--neighbour_target with --neighbours holds one neighbour out of G's input as its target: "
                        "it needs --neighbours >= 2")
    # The original WGAN's RMSprop lr suits the clipped critic; Adam with LSGAN trains at 2e-4 in
    # short runs (docs/training.md: the WGAN sweep). Filled in here so that opt.json records the value used.
    default_lr = 5e-5 if args.gan == "wgan" else 2e-4
    args.lr_g = default_lr if args.lr_g is None else args.lr_g
    args.lr_d = default_lr if args.lr_d is None else args.lr_d
    return args


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    add_model_options(p)
    add_optimisation_options(p)
    g = p.add_argument_group("other methods (--method; see trainers.py)")
    g.add_argument("--r2r_alpha", type=float, default=0.5, help="r2r: recorruption strength alpha (input y + alpha z, target y - z / alpha)")
    g.add_argument("--r2r_passes", type=int, default=8, help="r2r: recorrupted passes averaged at test time")
    g.add_argument("--n2n_gamma", type=float, default=2.0, help="n2n: final weight of the consistency regulariser (ramped from 0)")
    add_machine_and_output_options(p)
    return p


def add_data_options(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", "pku37", "duke28"])
    g.add_argument("--data_root", default=None)
    g.add_argument("--split", default="train", help="split of duke28's splits.json to train on")
    g.add_argument("--n_val", type=int, default=2, help="training-split images held back for validation")
    g.add_argument("--val_subjects", nargs="+", default=None, metavar="ID",
                   help="duke28: the training-split subjects held back for validation instead of the last --n_val "
                        "(another fold: does a lever's validation gain hold on other subjects?)")
    g.add_argument("--val_neighbours", action="store_true",
                   help="also validate on the held-back subjects' registered neighbour B-scans (duke28: 1..4.tif, "
                        "scored against the subject's average): 5x the validation images for --epoch best; with --neighbours "
                        "each reads the other 4 B-scans as its neighbours. The average is registered to test.tif, so "
                        "these scores favour outputs that lean on the neighbours (docs/training.md)")
    g.add_argument("--neighbours", type=int, default=0, choices=range(0, 5), metavar="K",
                   help="tcfl, duke28: G reads each B-scan with its K nearest registered B-scans (2.5-D input, "
                        "0-4; 0: the B-scan alone); evaluate.py/denoise.py then read them too")
    g.add_argument("--patch_size", type=int, default=64)
    g.add_argument("--lateral_bin", type=int, default=1,
                   help="train on B-scans binned N:1 along the lateral axis, as BM3D.py/NLM.py denoise (OCT speckle "
                        "grain is longer laterally); saved in the checkpoint, so evaluate.py/denoise.py bin the same way")
    g.add_argument("--epoch_size", type=int, default=100, help="triplets drawn per epoch")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")


def add_model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--method", default="tcfl", choices=list(trainers.TRAINERS))
    g.add_argument("--backbone", default="dncnn", choices=list(models.GENERATORS))
    g.add_argument("--frozen_bn", action="store_true", help="BatchNorm on running statistics only")
    g.add_argument("--skip_blur", type=float, nargs=2, default=[0.0, 0.0], metavar=("AXIAL", "LATERAL"),
                   help="tcfl: G starts as a Gaussian blur of these sigmas (pixels of the --lateral_bin-binned B-scans) "
                        "and learns a correction to it (models.BlurSkip); 0 0: off")
    g.add_argument("--skip_centre_weight", type=float, default=1.0, metavar="W",
                   help="tcfl with --neighbours and --skip_blur, --skip_nlm or --skip_bm3d: the start filters W x the "
                        "B-scan + (1 - W) x the mean of its neighbours; 1: the B-scan alone")
    g.add_argument("--skip_nlm", type=float, default=0.0, metavar="H",
                   help="tcfl: G starts as NLM.py's non-local means of strength H (8-bit grey levels, on the "
                        "--lateral_bin-binned B-scans; with --skip_centre_weight of the neighbour blend) and learns a "
                        "correction to it (models.NLMSkip); 0: off")
    g.add_argument("--skip_bm3d", type=float, default=0.0, metavar="F",
                   help="tcfl: G starts as BM3D.py's hard-thresholding BM3D, threshold F x the noise estimate (on the "
                        "--lateral_bin-binned B-scans; with --skip_centre_weight of the neighbour blend) and learns a "
                        "correction to it (models.BM3DSkip); with --skip_nlm the start is the mean of the two "
                        "(models.NLMBM3DSkip); 0: off")
    g.add_argument("--skip_bm3d_profile", default="hard", choices=list(models.BM3D_PROFILES),
                   help="tcfl with --skip_bm3d: hard, BM3D.py's hard-thresholding stage; lc, both BM3D stages (hard "
                        "thresholding, then Wiener) in the bm3d package's low-complexity profile")
    g.add_argument("--skip_blur_share", type=float, default=0.0, metavar="S",
                   help="tcfl with --skip_nlm or --skip_bm3d: the start is S x the Gaussian 1.0 x 3 px (pixels of the "
                        "binned B-scans) + (1 - S) x that filter, both of the same blend; 0: the filter alone")


def add_optimisation_options(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--niter", type=int, default=5, help="epochs")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    g.add_argument("--batch_size", type=int, default=4, help="triplets per step (per process under torchrun)")
    g.add_argument("--lr_g", type=float, default=None, help="default: 5e-5 for tcfl with --gan wgan, else 2e-4")
    g.add_argument("--lr_d", type=float, default=None, help="default: as --lr_g")
    g.add_argument("--gan", default="lsgan", choices=["lsgan", "wgan", "vanilla"],
                   help="lsgan: the published loss (Adam); wgan: a critic with weight clipping (RMSprop), see README")
    g.add_argument("--lam", type=float, default=6.0, help="identity loss weight")
    g.add_argument("--d_fake_weight", type=float, default=None,
                   help="weight of the six fakes in D's loss (default: 0.1 as published; 1/6 for wgan)")
    g.add_argument("--clip", type=float, default=0.01, help="WGAN critic weight clipping")
    g.add_argument("--n_critic", type=int, default=1, help="D updates per G update")
    g.add_argument("--sigma_tv", type=float, default=0.0, help="total-variation weight on the six estimates")
    g.add_argument("--ssim_weight", type=float, default=0.0, metavar="W",
                   help="tcfl: weight of 1 - SSIM over the identity loss's four pairs (SSIM as scored: 7x7 "
                        "window), an edge- and contrast-keeping term beside its L1; 0: off")
    g.add_argument("--d_blur", type=float, default=0.0, metavar="SIGMA",
                   help="tcfl: D sees real and fake images through a Gaussian of this sigma (pixels of the binned "
                        "B-scans), so it judges structure, not the references' residual speckle texture; 0: off")
    g.add_argument("--real_blur", type=float, default=0.0, metavar="SIGMA",
                   help="tcfl: D's real images (the clean references) through a Gaussian of this sigma (pixels of the "
                        "binned B-scans), fakes unchanged, so D asks for outputs that smooth; 0: off")
    g.add_argument("--neighbour_target", type=float, default=0.0, metavar="W",
                   help="tcfl, duke28: weight of a Noise2Noise term, the mean squared difference between G's clean "
                        "estimate of a training B-scan and the mean of its registered neighbour B-scans (the same "
                        "place scanned again, their speckle independent of its); G still denoises one B-scan. With "
                        "--neighbours K (>= 2): per stack one neighbour, at random, leaves G's input (its slot takes "
                        "the other neighbour of its rank) and is the target, a masked Noise2Noise; 0: off")
    g.add_argument("--bm3d_target", type=float, default=0.0, metavar="W",
                   help="tcfl: weight of a distillation term, the mean squared difference between G's clean estimate "
                        "of a training B-scan and BM3D.py's output of it (computed once at start); 0: off")
    g.add_argument("--sigma_rep", type=float, default=0.0, help="N_A/N_B repulsion weight")
    g.add_argument("--noise_scale", type=float, nargs=2, default=[1.0, 1.0], metavar=("LO", "HI"),
                   help="scale the noise re-added in P2P/C2P by a factor per image, uniform in [LO, HI] "
                        "(1 1: the published flow); teaches G quieter and stronger speckle than the training scans'")
    g.add_argument("--zero_mean", action=argparse.BooleanOptionalAction, default=True,
                   help="remove the spatial mean of G's noise estimate (zero-mean speckle prior; "
                        "--no-zero_mean: the published recipe)")
    g.add_argument("--pool_size", type=int, default=0, help="replay buffer of past fakes for D (0: off)")
    g.add_argument("--cosine", action="store_true", help="decay both learning rates to 0 over the run (half cosine)")
    g.add_argument("--ema", type=float, default=0.99, help="EMA decay of G's weights for inference (0: off)")


def add_machine_and_output_options(p):
    g = p.add_argument_group("machine")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16: bfloat16 autocast; auto: bf16 where the hardware computes in it (Ampere+ GPUs, "
                        "AVX512-BF16/AMX CPUs; elsewhere it is emulated and slower), else fp32")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="networks and batches in channels_last memory (default: on CPU, where oneDNN's "
                        "convolutions run faster that way; bench/train_speed.py)")
    g.add_argument("--g_calls", default="batched", choices=["batched", "per_estimate"],
                   help="TCFL's six G evaluations per step: batched (two calls, of 2x and 4x the batch) or "
                        "per_estimate (six calls, as published: BatchNorm statistics per estimate; 0.4 dB lower "
                        "on validation in two seeds, docs/training.md)")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes under torchrun")
    g = p.add_argument_group("output")
    g.add_argument("--ckpt_dir", default="ckpt")
    g.add_argument("--img_dir", default="img")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt_dir")
    g.add_argument("--overwrite", action="store_true", help="start over even if --ckpt_dir holds checkpoints")
    g.add_argument("--log_every", type=int, default=10, help="steps between log rows / collapse checks")
    g.add_argument("--collapse_tol", type=float, default=0.01)
