"""Train an unpaired OCT denoiser (TCFL by default) and write one checkpoint per epoch.

    python train.py --batch_size 2                               # built-in synthetic set
    python train.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train \
        --gan wgan --lateral_bin 4                               # the shipped checkpoint's recipe (README)
    torchrun --standalone --nproc_per_node=4 train.py ...         # DDP, --batch_size per process

The story, top to bottom: options (options.py; printed, saved as <ckpt_dir>/opt.txt|json) -> device (and
torchrun's processes) -> data (triplets, or pairs for CNCL) -> the method's trainer (it builds its
own networks, trainers.py) -> the loop: step, log, and at every epoch's end validation PSNR/SSIM on
images held back from the training split (never the test split), <ckpt_dir>/epoch_N.pth
(everything needed to resume exactly), a figure <img_dir>/epoch_N.png and a log row.
"""
import csv
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import baselines
import datasets
import trainers
from options import parse_args
from utils import DataError, bin_laterally, noise_sigma, psnr, resolve_device, ssim


class TrainingStopped(Exception):
    """The run stopped before its end (a non-finite loss, Ctrl-C / SIGTERM, DDP out of sync); the last checkpoint is kept."""


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def setup_device(args):
    """(ddp, rank, world, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; a plain `python train.py` does not."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = resolve_device(args.device)
        return False, 0, 1, device
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return True, rank, world, device


def checkpoints(ckpt_dir):
    """{epoch: path} of the epoch_N.pth files in ckpt_dir."""
    found = {}
    for path in Path(ckpt_dir).glob("epoch_*.pth"):
        match = re.fullmatch(r"epoch_(\d+)\.pth", path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def prepare_output(args, master):
    """The run's existing checkpoints; refuses to touch them without --resume or --overwrite."""
    ckpt_dir, existing = Path(args.ckpt_dir), checkpoints(args.ckpt_dir)
    if existing and not (args.resume or args.overwrite):
        raise DataError(f"{ckpt_dir} already holds checkpoints (epochs {', '.join(map(str, existing))}); "
                        "use --resume to continue or --overwrite to start over")
    if args.resume and not existing:
        raise DataError(f"--resume: no epoch_N.pth checkpoint in {ckpt_dir}")
    if master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        Path(args.img_dir).mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume:
            for path in existing.values():
                path.unlink()
            (ckpt_dir / "log.csv").unlink(missing_ok=True)
    return existing


def load_training_data(args, data_kind):
    """(dataset of triplets or registered pairs, the noisy training images, validation pairs, the noisy images'
    noise levels), all laterally binned by --lateral_bin: G learns at the binned scale and
    denoises there; validation scores at full size."""
    noisy, clean, val_samples = datasets.load_unpaired(args.dataset, args.data_root, args.split, args.n_val, seed=args.seed,
                                                       val_neighbours=args.val_neighbours,
                                                       neighbours=args.neighbours or (4 if args.neighbour_target else 0),
                                                       val_subjects=args.val_subjects)
    binned = lambda images: [bin_laterally(image, args.lateral_bin) for image in images]
    noisy, clean = binned(noisy), binned(clean)
    # models.Denoiser's --noise_adapt levels: the median and the lowest over (at most ~100 of) the noisy training
    # B-scans, estimated at the scale G denoises at (noise_bin)
    levels = [noise_sigma(image if image.ndim == 2 else image[0]) for image in noisy[::max(1, len(noisy) // 100)]]
    noise_levels = {"noise_sigma": float(np.median(levels)), "quiet_sigma": float(np.min(levels)),
                    "noise_bin": args.lateral_bin}
    narrowest = min(image.shape[-1] for image in noisy + clean)
    if args.lateral_bin > 1 and narrowest < args.patch_size:
        raise DataError(f"--lateral_bin {args.lateral_bin} leaves training images {narrowest} px wide, "
                        f"narrower than --patch_size {args.patch_size}")
    if data_kind == "pairs":  # supervised (CNCL): registered (noisy, clean) crops of the training subjects only
        pairs = datasets.paired_training_data(args.dataset, args.data_root, args.split, val_samples, seed=args.seed)
        dataset = datasets.PairedCropDataset([tuple(binned(pair)) for pair in pairs], args.patch_size, args.epoch_size, seed=args.seed)
    else:
        noisy, targets = training_targets(args, noisy)
        dataset = datasets.TripletDataset(noisy, clean, args.patch_size, args.epoch_size, seed=args.seed, targets=targets)
    return dataset, noisy, val_samples, noise_levels


def training_targets(args, noisy):
    """(noisy B-scans, a target per B-scan or None) for TCFL's extra squared-error term: the mean of each
    B-scan's registered neighbours (--neighbour_target; noisy holds the binned stacks) or BM3D.py's output
    of it (--bm3d_target; computed once here, on the binned B-scans binned further to BM3D.py's own 4:1
    overall where --lateral_bin is finer than that)."""
    if args.neighbour_target and not args.neighbours:  # with --neighbours the trainer holds one out per step
        return [stack[0] for stack in noisy], [datasets.neighbour_mean(stack, f"noisy training image {i}")
                                               for i, stack in enumerate(noisy)]
    if args.bm3d_target:
        bm3d_bin = max(1, baselines.BM3D_LATERAL_BIN // args.lateral_bin)
        return noisy, [baselines.bm3d_denoise(image, lateral_bin=bm3d_bin)
                       for image in tqdm(noisy, desc="BM3D.py targets", disable=int(os.environ.get("RANK", 0)) > 0)]
    return noisy, None


def print_options(args, summary):
    """CycleGAN's habit: every option printed at start and saved beside the checkpoints."""
    options = "\n".join(f"{k:>16}: {v}" for k, v in sorted(vars(args).items()))
    print(f"----------------- options -----------------\n{options}\n{summary}")
    (Path(args.ckpt_dir) / "opt.txt").write_text(options + "\n")
    (Path(args.ckpt_dir) / "opt.json").write_text(json.dumps(vars(args), indent=2) + "\n")


def validate(denoiser, samples):
    """Mean (PSNR, SSIM) of the denoised held-back training images (the Denoiser runs BN on running statistics)."""
    scores = [(psnr(s.clean, out), ssim(s.clean, out)) for s in samples for out in [denoiser(s.volume())]]
    return tuple(float(v) for v in np.mean(scores, axis=0)) if scores else (float("nan"), float("nan"))


def save_figure(path, denoiser, sample):
    """noisy | denoised | estimated noise | reference (where known), one row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    denoised = denoiser(sample.volume())
    panels = [("noisy", sample.noisy), ("denoised", denoised), ("estimated noise", sample.noisy - denoised)]
    if sample.clean is not None:
        panels.append(("reference", sample.clean))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4 * sample.noisy.shape[0] / sample.noisy.shape[1] + 0.6))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, cmap="gray", vmin=-0.5 if title == "estimated noise" else 0, vmax=0.5 if title == "estimated noise" else 1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_loss_curves(log_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for key in ("loss_g", "loss_d", "identity"):
        axes[0].plot(steps, [float(r[key]) for r in rows], label=key)
    axes[0].set_yscale("log"); axes[0].legend(); axes[0].set_xlabel("step")
    axes[1].plot(steps, [float(r["noise_distance"]) for r in rows], label="|N_A - N_B|")
    axes[1].plot(steps, [float(r["noise_spread"]) for r in rows], label="spread of G(x)")
    axes[1].legend(); axes[1].set_xlabel("step"); axes[1].set_title("collapse guard (near 0 = collapsed)")
    val = [(int(r["step"]), float(r["val_psnr"])) for r in rows if r.get("val_psnr")]
    if val:
        axes[2].plot(*zip(*val), "o-", color="C0")
    val_ssim = [(int(r["step"]), float(r["val_ssim"])) for r in rows if r.get("val_ssim")]
    if val_ssim:
        axes[2].twinx().plot(*zip(*val_ssim), "s--", color="C1")
    axes[2].set_xlabel("step"); axes[2].set_title("validation PSNR (dB, o) and SSIM (s)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


LOG_FIELDS = ["epoch", "step", "loss_g", "loss_d", "adversarial", "identity", "noise_mean", "noise_distance",
              "input_distance", "noise_spread", "val_psnr", "val_ssim", "seconds"]


class Run:
    """A training run's state beyond the trainer: step, validation history, the log, checkpoints (rank 0 writes)."""

    def __init__(self, args, trainer, val_samples, ddp, rank, world, steps_per_epoch, noise_levels=None):
        self.args, self.trainer, self.val_samples = args, trainer, val_samples
        self.noise_levels = noise_levels or {}  # the training scans' noise levels: models.Denoiser's --noise_adapt
        self.ddp, self.rank, self.world, self.master = ddp, rank, world, rank == 0
        self.steps_per_epoch, self.step, self.history, self.window = steps_per_epoch, 0, [], []
        self.log_path, self.start = Path(args.ckpt_dir) / "log.csv", time.time()
        self.log_fields = LOG_FIELDS
        if args.resume and self.log_path.exists():  # a log begun before val_ssim was recorded keeps its columns
            with open(self.log_path) as f:
                self.log_fields = next(csv.reader(f), None) or LOG_FIELDS

    def resume(self, path, device):
        state = torch.load(path, map_location=device, weights_only=True)
        self.trainer.load_state_dict(state)
        torch.set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        self.step, self.history = state["step"], state["history"]
        if self.master:
            print(f"resuming from {path} (step {self.step})")

    def denoiser(self):
        """What evaluate.py will load from this run's checkpoint."""
        return self.trainer.denoiser(self.args.lateral_bin, **self.noise_levels)

    def save_checkpoint(self, epoch):
        """One dict of plain types and tensors per epoch (loads with weights_only=True); every rank's RNG state."""
        rng = [torch.get_rng_state()]
        if self.ddp:
            rng = [None] * self.world
            torch.distributed.all_gather_object(rng, torch.get_rng_state())
        if not self.master:
            return
        args = self.args
        state = {**self.trainer.state_dict(), "epoch": epoch, "step": self.step, "steps_per_epoch": self.steps_per_epoch,
                 "world_size": self.world, "method": args.method, "backbone": args.backbone, "args": vars(args),
                 "inference": {"lateral_bin": args.lateral_bin, "zero_mean": self.trainer.zero_mean,
                               **self.noise_levels, "neighbours": self.trainer.neighbours},
                 "history": self.history, "rng": rng}
        tmp = Path(args.ckpt_dir) / f"epoch_{epoch}.pth.tmp"
        torch.save(state, tmp)
        tmp.replace(Path(args.ckpt_dir) / f"epoch_{epoch}.pth")  # never leave a half-written checkpoint

    def log(self, stats, epoch_done, last):
        """Rank 0: every --log_every steps a row of log.csv (means since the last row) and the collapse check;
        at an epoch's end also the validation scores."""
        self.window.append(stats)
        if not self.master or not (self.step % self.args.log_every == 0 or epoch_done or last):
            return
        mean = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
        self.window = []
        warning = trainers.collapse_warning(mean, self.args.collapse_tol)
        if warning:
            tqdm.write(warning)
        epoch = (self.step - 1) // self.steps_per_epoch + 1
        row = {"epoch": epoch, "step": self.step, **mean, "val_psnr": "", "val_ssim": "", "seconds": round(time.time() - self.start, 1)}
        if (epoch_done or last) and self.val_samples:
            row["val_psnr"], row["val_ssim"] = validate(self.denoiser(), self.val_samples)
            self.history.append({"epoch": epoch, "step": self.step, "val_psnr": row["val_psnr"], "val_ssim": row["val_ssim"],
                                 "loss_g": mean["loss_g"], "identity": mean["identity"]})
            tqdm.write(f"epoch {epoch} step {self.step}: validation PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.3f}")
        new_file = not self.log_path.exists()
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.log_fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def end_of_epoch(self, epoch, sample):
        self.save_checkpoint(epoch)
        if self.master:
            img_dir = Path(self.args.img_dir)
            save_figure(img_dir / f"epoch_{epoch}.png", self.denoiser(), sample)
            save_loss_curves(self.log_path, img_dir / "loss_curves.png")


def all_finite(stats, device, ddp):
    """Whether both losses are finite on every rank (so all ranks stop together)."""
    finite = torch.tensor(float(math.isfinite(stats["loss_g"]) and math.isfinite(stats["loss_d"])), device=device)
    if ddp:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.item() == 1


def train(run, dataset, device, total_steps, figure_sample):
    """The loop: epochs of --epoch_size triplets, each rank taking its share; a checkpoint per epoch."""
    args, per_epoch = run.args, run.steps_per_epoch
    progress = tqdm(total=total_steps, initial=run.step, disable=not run.master, desc="train", dynamic_ncols=True)
    while run.step < total_steps:
        epoch = run.step // per_epoch  # 0-based epoch being trained
        dataset.set_epoch(epoch)
        # Ranks take interleaved triplets (the job of a DistributedSampler); a resumed run skips what it did.
        indices = list(range(args.epoch_size))[run.rank::run.world][: per_epoch * args.batch_size]
        indices = indices[(run.step % per_epoch) * args.batch_size:]
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=indices,
                                             drop_last=True, num_workers=args.workers)
        for batch in loader:
            memory = torch.channels_last if args.channels_last else torch.contiguous_format
            stats = run.trainer.step(*(t.to(device).contiguous(memory_format=memory) for t in batch))
            run.step += 1
            if not all_finite(stats, device, run.ddp):
                raise TrainingStopped(f"non-finite loss at step {run.step} (loss_g {stats['loss_g']}, loss_d {stats['loss_d']}); "
                                      f"stopped, the last good checkpoint in {args.ckpt_dir} is kept. Lower --lr_g/--lr_d.")
            progress.update(1)
            progress.set_postfix(g=f"{stats['loss_g']:.3f}", d=f"{stats['loss_d']:.3f}", id=f"{stats['identity']:.4f}")
            epoch_done, last = run.step % per_epoch == 0, run.step >= total_steps
            run.log(stats, epoch_done, last)
            if epoch_done or last:
                run.end_of_epoch(epoch + 1, figure_sample)
            if last:
                break
    progress.close()


def replicas_agree(run):
    """DDP keeps replicas in lockstep; rank 0 prints each rank's weight hash, so a broken setup cannot go unnoticed."""
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in run.trainer.trained.parameters())
    digests = [None] * run.world
    torch.distributed.all_gather_object(digests, hashlib.sha1(weights).hexdigest())
    if run.master:
        for rank, digest in enumerate(digests):
            print(f"rank {rank} generator sha1 {digest}")
    torch.distributed.barrier()
    destroy_process_group()
    return len(set(digests)) == 1


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, device = setup_device(args)
    args = trainers.resolve_for_device(args, device)  # --precision / --channels_last auto
    torch.manual_seed(args.seed + rank)
    existing = prepare_output(args, master=rank == 0)

    method = trainers.TRAINERS[args.method]
    dataset, noisy, val_samples, noise_levels = load_training_data(args, method.data)
    steps_per_epoch = args.epoch_size // (args.batch_size * world)
    if steps_per_epoch == 0:
        raise DataError(f"--epoch_size {args.epoch_size} is smaller than one global batch ({args.batch_size} x {world})")
    # Under torchrun the trainer updates through DDP wrappers; it keeps the bare modules for saving.
    wrap = (lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)) if ddp else (lambda m: m)
    trainer = method(args, device, noisy_images=noisy, wrap=wrap)
    total_steps = args.niter * steps_per_epoch if not args.max_steps else min(args.max_steps, args.niter * steps_per_epoch)
    if args.cosine:
        trainer.set_cosine_schedule(args.niter * steps_per_epoch)

    run = Run(args, trainer, val_samples, ddp, rank, world, steps_per_epoch, noise_levels)
    if args.resume:
        run.resume(existing[max(existing)], device)
    if run.master:
        print_options(args, f"device {device}, world size {world}, {len(noisy)} noisy training images, "
                            f"{len(val_samples)} validation pairs, {steps_per_epoch} steps per epoch")

    # Ctrl-C and a scheduler's SIGTERM (or `kill`) both stop the run the same way: checkpoint, then
    # exit. SIGINT gets Python's handler back because shells start background jobs with it ignored.
    handlers = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, raise_keyboard_interrupt))}
    stop = None
    try:
        train(run, dataset, device, total_steps, val_samples[0] if val_samples else datasets.Sample("train_0", noisy[0]))
    except KeyboardInterrupt:
        run.save_checkpoint(run.step // steps_per_epoch + 1)
        stop = TrainingStopped(f"interrupted at step {run.step}; checkpoint saved in {args.ckpt_dir}, continue with --resume")
    except TrainingStopped as error:
        stop = error
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if ddp and not replicas_agree(run):
        stop = stop or TrainingStopped("generator weights differ between ranks (DDP out of sync)")
    if stop:
        raise stop
    if run.master:
        print(f"done: {run.step} steps in {time.time() - run.start:.0f} s; checkpoints in {args.ckpt_dir}")


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
    except TrainingStopped as stop:
        sys.exit(f"stopped: {stop}")
    if "RANK" in os.environ:
        # Gloo's threads can abort the interpreter's shutdown ("terminate called without an
        # active exception") after a finished run; everything is saved by now, so leave at once.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
