"""The training methods: one Trainer base class, one subclass per --method, TRAINERS maps the name.

TCFL (the default), triplet cross-fusion learning with one noise generator G and one PatchGAN D.
A training triplet is two unrelated noisy images I_A, I_B and one unrelated clean C_C:
    N2P  N_A = G(I_A), N_B = G(I_B),        C_A1 = I_A - N_A,   C_B1 = I_B - N_B
    P2P  I_A' = C_A1 + N_B, I_B' = C_B1 + N_A, C_A2 = I_A' - G(I_A'), C_B2 = I_B' - G(I_B')
    C2P  I_C1 = C_C + N_A, I_C2 = C_C + N_B,   C_C1 = I_C1 - G(I_C1), C_C2 = I_C2 - G(I_C2)
identity = |C_A1 - C_A2| + |C_B1 - C_B2| + |C_C1 - C_C| + |C_C2 - C_C|, and D tells C_C
(real) from the six estimates (fake). The six G calls form two dependent stages, run as two
batched calls (--g_calls per_estimate: six, as published), and D sees all six fakes in one call.

Every method builds its own networks, declares the data it trains on (`data`) and the
method-specific options it reads (`reads`), and implements step(a, b, c) -> dict of floats
(the keys train.py logs). The base owns what they share: the inference module (noisy ->
noise) and its EMA copy, optimisers, the cosine schedule, a private random generator for the
methods' own draws (so a resumed run draws what an uninterrupted one would; TCFL's replay
buffer and noise scales use torch's global generator, whose state every checkpoint keeps too),
the collapse statistics and the checkpoint layout.
"""
import copy
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets
import models
from utils import DataError, use_bf16

# Options only some methods read; a method refuses any of these it does not read when set
# away from its default (unread_options), instead of ignoring it.
METHOD_OPTIONS = ("gan", "lam", "d_fake_weight", "clip", "n_critic", "sigma_tv", "sigma_rep", "zero_mean",
                  "pool_size", "noise_scale", "g_calls", "lr_d", "backbone", "neighbours", "skip_blur", "skip_nlm",
                  "skip_centre_weight", "skip_bm3d", "skip_bm3d_profile", "skip_blur_share", "d_blur", "real_blur",
                  "neighbour_target", "bm3d_target", "ssim_weight", "r2r_alpha", "r2r_passes", "n2n_gamma")


class ReplayBuffer:
    """Past fakes for D (Shrivastava et al. 2017): half of each batch is swapped for old ones."""

    def __init__(self, size):
        self.size, self.images = size, []

    def __call__(self, fakes):
        if self.size == 0:
            return fakes
        out = []
        for fake in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                out.append(fake)
            elif torch.rand(()) < 0.5:
                index = int(torch.randint(self.size, ()))
                out.append(self.images[index].clone())
                self.images[index] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)


def total_variation(images):
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()


def ssim_loss(images, targets, window=7, data_range=1.0):
    """1 - mean SSIM, differentiable, computed as utils.ssim scores (skimage's defaults: a 7x7 uniform
    window, sample covariance, K1 = 0.01, K2 = 0.03), over the valid windows of each image."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    images, targets = images.float(), targets.float()
    stats = F.avg_pool2d(torch.cat([images, targets, images * images, targets * targets, images * targets], 1),
                         window, stride=1)
    mu_x, mu_y, xx, yy, xy = stats.chunk(5, dim=1)
    unbiased = window * window / (window * window - 1)
    var_x, var_y, cov = unbiased * (xx - mu_x ** 2), unbiased * (yy - mu_y ** 2), unbiased * (xy - mu_x * mu_y)
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return 1 - ssim.mean()


def freeze_batchnorm(model):
    """Keep BN on its running statistics (and stop updating them); its affine part still trains.

    Makes G's output for one image independent of what else is in the batch."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def update_ema(ema_model, model, decay, updates):
    """ema <- d * ema + (1 - d) * live, with d warming up as (1 + n) / (10 + n): a short
    run's average must not be dominated by the random initial weights."""
    decay = min(decay, (1 + updates) / (10 + updates))
    for ema, live in zip(ema_model.parameters(), model.parameters()):
        ema.lerp_(live, 1 - decay)
    for ema, live in zip(ema_model.buffers(), model.buffers()):
        ema.copy_(live)


def gan_loss(scores, real, kind):
    """Mean loss of D's scores against the label real/fake, for --gan lsgan | vanilla | wgan."""
    if kind == "lsgan":
        return F.mse_loss(scores, torch.full_like(scores, float(real)))
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(scores, torch.full_like(scores, float(real)))
    if kind == "wgan":  # the critic's estimate of mean(D(real)) - mean(D(fake))
        return -scores.mean() if real else scores.mean()
    raise ValueError(f"unknown GAN loss {kind}")


def collapse_stats(noise, inputs):
    """The collapse guard's numbers for a batch of N >= 2 different inputs and their noise estimates:
    |N_i - N_(i-1)| against |I_i - I_(i-1)| and the spread of the estimates across the batch (a
    constant G makes both zero), and |spatial mean| of the estimates (zero for display-domain speckle)."""
    with torch.no_grad():
        noise, inputs = noise.float(), inputs.float()
        return {"noise_mean": noise.mean(dim=(1, 2, 3)).abs().mean().item(),
                "noise_distance": F.l1_loss(noise, noise.roll(1, 0)).item(),
                "input_distance": F.l1_loss(inputs, inputs.roll(1, 0)).item(),
                "noise_spread": noise.std(dim=0).mean().item()}


def collapse_warning(stats, tolerance=0.01):
    """A message when G's output no longer depends on its input, else None.

    Relative to how different the two inputs are, so it does not depend on the data's scale.
    """
    ratio = stats["noise_distance"] / max(stats["input_distance"], 1e-12)
    if ratio < tolerance or stats["noise_spread"] < tolerance * stats["input_distance"]:
        return (f"WARNING: generator collapse: |N_A - N_B| = {stats['noise_distance']:.2e} "
                f"({ratio:.1%} of |I_A - I_B|), spread across the batch {stats['noise_spread']:.2e}: "
                "the model outputs (nearly) the same noise for every input, a trivial solution of its "
                "losses (TCFL: raise the GAN weight or D's learning rate; docs/training.md 'The collapse').")
    return None


def resolve_for_device(args, device):
    """A copy of the options with the machine settings left to 'auto' (--precision, --channels_last)
    decided for the device; train.py saves it in opt.json, so the log says what ran."""
    args = copy.copy(args)
    args.bf16 = use_bf16(args.precision, device)
    if args.channels_last is None:
        args.channels_last = device.type == "cpu"
    return args


def _rank():
    return int(os.environ.get("RANK", 0))


class Trainer:
    """What every method shares. Subclasses build their networks, then call __init__ with
    model: the inference module (noisy -> noise; what checkpoints ship and evaluate.py loads),
    trained: everything opt_g updates (default: model), discriminator: what opt_d updates (or None)."""

    data = "triplets"  # what step() is fed: "triplets" (I_A, I_B, C_C) or "pairs" (noisy, other noisy, its clean)
    reads = frozenset()  # the METHOD_OPTIONS this method reads
    zero_mean = False  # whether the inference module's noise has its spatial mean removed (TCFL --zero_mean)
    neighbours = 0  # registered B-scans the inference module reads beside the one it denoises (TCFL --neighbours)

    def __init__(self, args, model, trained=None, discriminator=None):
        self.args = resolve_for_device(args, next(model.parameters()).device)
        self.model, self.trained, self.D = model, trained or model, discriminator
        if self.args.channels_last:
            for module in (self.trained, discriminator):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema else None
        self.ema_updates = 0
        self.rng = torch.Generator().manual_seed(args.seed * 1000 + _rank())
        self.opt_g = self.optimizer(self.trained.parameters(), args.lr_g)
        self.opt_d = None if discriminator is None else self.optimizer(discriminator.parameters(), args.lr_d)
        self.schedulers = []

    @classmethod
    def unread_options(cls, args, defaults):
        """The method-specific options set away from their defaults that this method does not read."""
        return [name for name in METHOD_OPTIONS if name not in cls.reads and getattr(args, name) != defaults[name]]

    def optimizer(self, parameters, lr):
        if self.args.gan == "wgan":  # the original WGAN's RMSprop: momentum fights the clipped critic
            return torch.optim.RMSprop(parameters, lr=lr)
        return torch.optim.Adam(parameters, lr=lr, betas=(0.5, 0.999))

    def train_mode(self):
        self.trained.train()
        if self.args.frozen_bn:
            freeze_batchnorm(self.trained)

    def autocast(self, device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def set_cosine_schedule(self, total_steps):
        """Every learning rate follows a half cosine from its start value to 0 over the run."""
        decay = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in (self.opt_g, self.opt_d) if opt]

    @staticmethod
    def update(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def finish_step(self, stats):
        """After the updates: EMA, schedules, and the log's columns (methods without D log 0 for it)."""
        self.update_ema()
        for scheduler in self.schedulers:
            scheduler.step()
        return {"loss_d": 0.0, "adversarial": 0.0, **stats}

    @torch.no_grad()
    def update_ema(self):
        if self.ema is not None:
            self.ema_updates += 1
            update_ema(self.ema, self.model, self.args.ema, self.ema_updates)

    def inference_generator(self):
        """The module to denoise with: the EMA copy when kept (never DDP-wrapped)."""
        return self.ema if self.ema is not None else self.model

    def denoiser(self, lateral_bin=1, noise_sigma=None, quiet_sigma=None, noise_bin=1):
        """The inference module with its settings, as evaluate.py would load it from a checkpoint."""
        return models.Denoiser(self.inference_generator(), lateral_bin=lateral_bin, zero_mean=self.zero_mean,
                               noise_sigma=noise_sigma, quiet_sigma=quiet_sigma, neighbours=self.neighbours,
                               noise_bin=noise_bin)

    def state_dict(self):
        return {
            "generator": self.model.state_dict(),
            "generator_ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema_updates,
            "trained": self.trained.state_dict() if self.trained is not self.model else {},
            "discriminator": self.D.state_dict() if self.D is not None else {},
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict() if self.opt_d else {},
            "schedulers": [s.state_dict() for s in self.schedulers],
            "trainer_rng": self.rng.get_state(),
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["generator"])
        if state.get("trained"):
            self.trained.load_state_dict(state["trained"])
        if self.ema is not None and state.get("generator_ema") is not None:
            self.ema.load_state_dict(state["generator_ema"])
            self.ema_updates = state.get("ema_updates", 0)
        if self.D is not None:
            self.D.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.opt_g.load_state_dict(state["opt_g"])
        for scheduler, saved in zip(self.schedulers, state.get("schedulers", [])):
            scheduler.load_state_dict(saved)
        if "trainer_rng" in state:
            self.rng.set_state(state["trainer_rng"])


# ---------------------------------------------------------------- TCFL

class TCFLTrainer(Trainer):
    """TCFL (module docstring). generator / discriminator: prebuilt networks (tests, benchmarks);
    by default a --backbone generator and the PatchGAN, on `device`."""

    reads = frozenset({"gan", "lam", "d_fake_weight", "clip", "n_critic", "sigma_tv", "sigma_rep", "zero_mean",
                       "pool_size", "noise_scale", "g_calls", "lr_d", "backbone", "neighbours",
                       "skip_blur", "skip_nlm", "skip_centre_weight", "skip_bm3d", "skip_bm3d_profile", "skip_blur_share",
                       "d_blur", "real_blur", "neighbour_target", "bm3d_target", "ssim_weight"})

    def __init__(self, args, device="cpu", noisy_images=None, wrap=lambda module: module, generator=None, discriminator=None):
        generator = generator or models.build_denoiser("tcfl", args.backbone, vars(args))  # as a checkpoint rebuilds it
        generator = generator.to(device)
        discriminator = (discriminator or models.build_discriminator()).to(device)
        if args.sync_bn and torch.distributed.is_initialized():
            generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        super().__init__(args, generator, discriminator=discriminator)
        # self.model / self.D are the bare modules (saved, evaluated); the *_train versions are what a
        # step calls: the same modules, wrapped in DistributedDataParallel under torchrun.
        self.G_train, self.D_train = wrap(generator), wrap(discriminator)
        self.zero_mean, self.neighbours = args.zero_mean, args.neighbours
        self.replay = ReplayBuffer(args.pool_size)
        # Published LSGAN recipe: 0.1 on the fakes. A WGAN critic estimates mean(D(real)) - mean(D(fake)),
        # so there the six fakes together weigh as much as the one real image.
        self.d_fake_weight = args.d_fake_weight if args.d_fake_weight is not None else (1 / 6 if args.gan == "wgan" else 0.1)
        def isotropic_taps(sigma):  # --d_blur / --real_blur for models.separable_blur; None: off
            return [taps.to(device) for taps in models.separable_taps(sigma, sigma)] if sigma else None
        self.d_taps, self.real_taps = isotropic_taps(args.d_blur), isotropic_taps(args.real_blur)

    # -- the cross-fusion flow -------------------------------------------------------
    def noise(self, images, estimates):
        """G's noise for a stack of `estimates` equal parts: one G call per part (--g_calls per_estimate,
        the published flow) or one call for the stack (batched). BatchNorm in training mode normalises
        over what one call sees, so the two differ numerically unless BN is frozen."""
        parts = images.chunk(estimates) if self.args.g_calls == "per_estimate" else [images]
        noise = torch.cat([self.G_train(part) for part in parts])
        if self.zero_mean:  # see models.Denoiser
            noise = noise - noise.mean(dim=(-2, -1), keepdim=True)
        return noise

    def noise_scales(self, like):
        """--noise_scale LO HI: one factor per image, uniform in [LO, HI], for the noise that P2P and C2P
        re-add, so G also learns to remove quieter and stronger speckle than its training scans carry."""
        low, high = self.args.noise_scale
        if low == high == 1.0:
            return 1.0
        return torch.empty(len(like), 1, 1, 1, device=like.device).uniform_(low, high)

    @staticmethod
    def noise_stacks(noisy_a, noisy_b, noise_a, noise_b):
        """The noise P2P/C2P re-add with --neighbours k: for each image its own noise estimate (the B-scan's
        slice), then k estimates of other images of the batch (also mirrored left-right) as its neighbours'
        slices: independent speckle over one clean image, as registered neighbours carry. A stack whose
        neighbours were dropped (copies, datasets.NEIGHBOUR_DROPOUT) gets copies of its own noise.
        Re-adding each neighbour's own residual (neighbour - the B-scan's clean estimate) instead copies the
        stack's slice differences into every pseudo-noisy stack, so G(stack) = slice 0 - slice 1 meets
        every identity loss; G learned that within 60 steps (docs/training.md)."""
        k = noisy_a.shape[1] - 1
        if k == 0:
            return noise_a, noise_b
        own, noisy = torch.cat([noise_a, noise_b]), torch.cat([noisy_a, noisy_b])
        pool = torch.cat([own, own.flip(-1)])
        index = (torch.arange(len(own), device=own.device)[:, None] + torch.arange(1, k + 1, device=own.device)) % len(pool)
        others = pool[index.flatten()].view(len(own), k, *own.shape[-2:])
        dropped = (noisy[:, 1:] == noisy[:, :1]).flatten(1).all(1)
        others = torch.where(dropped[:, None, None, None], own.expand(-1, k, -1, -1), others)
        return torch.cat([own, others], dim=1).chunk(2)

    def fuse(self, noisy_a, noisy_b, clean_c):
        """The six clean estimates and the two stage-1 noises (G called twice, or six times with --g_calls per_estimate).
        With --neighbours, I_A and I_B are stacks, and every pseudo-noisy input is a stack too (noise_stacks)."""
        noise_a, noise_b = self.noise(torch.cat([noisy_a, noisy_b]), 2).chunk(2)
        clean_a1, clean_b1 = noisy_a[:, :1] - noise_a, noisy_b[:, :1] - noise_b
        noise_a, noise_b = self.noise_stacks(noisy_a, noisy_b, noise_a, noise_b)
        mixed_a, mixed_b = noise_a * self.noise_scales(noise_a), noise_b * self.noise_scales(noise_b)
        stage2 = torch.cat([clean_a1 + mixed_b, clean_b1 + mixed_a, clean_c + mixed_a, clean_c + mixed_b])
        clean_a2, clean_b2, clean_c1, clean_c2 = (stage2[:, :1] - self.noise(stage2, 4)).chunk(4)
        return [clean_a1, clean_b1, clean_a2, clean_b2, clean_c1, clean_c2], (noise_a[:, :1], noise_b[:, :1])

    def critic_view(self, images):
        """What D sees of real and fake images: --d_blur SIGMA blurs both, so the critic judges structure
        and not the fine texture the averaged references keep (residual speckle no denoiser should copy)."""
        return images if self.d_taps is None else models.separable_blur(images, *self.d_taps)

    def real_view(self, clean):
        """The references D learns as real: --real_blur SIGMA smooths away their residual speckle, so the
        critic asks for outputs as smooth as that, not for the references' grain."""
        return clean if self.real_taps is None else models.separable_blur(clean, *self.real_taps)

    @staticmethod
    def identity_loss(fakes, clean_c):
        clean_a1, clean_b1, clean_a2, clean_b2, clean_c1, clean_c2 = fakes
        return (F.l1_loss(clean_a1, clean_a2) + F.l1_loss(clean_b1, clean_b2)
                + F.l1_loss(clean_c1, clean_c) + F.l1_loss(clean_c2, clean_c))

    # -- one step ---------------------------------------------------------------------
    def step(self, noisy_a, noisy_b, clean_c):
        """One G update, then --n_critic D updates (G first, as published); floats for the log."""
        fakes, stats = self.generator_step(noisy_a, noisy_b, clean_c)
        stats["loss_d"] = self.discriminator_step(clean_c, fakes)
        for scheduler in self.schedulers:
            scheduler.step()
        return stats

    def generator_loss(self, fakes, clean_c, noise_a, noise_b, targets=None, mask=None):
        """(total, adversarial, identity): the six fakes' GAN term + lam x identity (+ the TV, repulsion and
        --neighbour_target / --bm3d_target terms; targets: I_A's, then I_B's target images, or None; mask:
        a 0/1 weight per target image, or None for all 1)."""
        args = self.args
        with self.autocast(fakes.device):
            # Sum over the six fakes of each one's mean loss = 6 x the mean over all of them.
            adversarial = 6 * gan_loss(self.D(self.critic_view(fakes)).float(), True, args.gan)
        identity = self.identity_loss(fakes.chunk(6), clean_c)
        loss = adversarial + args.lam * identity
        if args.sigma_tv:
            loss = loss + args.sigma_tv * total_variation(fakes)
        if args.ssim_weight:  # the four identity pairs again, scored as the SSIM column scores
            clean_a1, clean_b1, clean_a2, clean_b2, clean_c1, clean_c2 = fakes.chunk(6)
            loss = loss + args.ssim_weight * ssim_loss(torch.cat([clean_a2, clean_b2, clean_c1, clean_c2]),
                                                       torch.cat([clean_a1, clean_b1, clean_c, clean_c]))
        if args.sigma_rep:  # push N_A away from N_B: the trivial solution makes them equal
            loss = loss + args.sigma_rep * (torch.exp(-F.l1_loss(noise_a, noise_b)) - 1)
        if targets is not None:  # Noise2Noise (a neighbour's independent speckle averages out) or BM3D.py's output
            squared = (fakes[:len(targets)] - targets) ** 2
            if mask is not None:
                squared = squared * mask * (len(mask) / mask.sum().clamp(min=1))
            loss = loss + (args.neighbour_target or args.bm3d_target) * squared.mean()
        return loss, adversarial, identity

    @staticmethod
    def hold_out_neighbour(stacks):
        """--neighbour_target with --neighbours k (a masked Noise2Noise): (stacks, targets, mask). Per stack one
        neighbour slice, drawn at random, leaves G's input and becomes the target; its slot takes a copy of the
        neighbour of the same rank on the other side (slots 1-2, 3-4: nearest first), so G cannot copy the
        target and its blend still reads k slices. mask is 0 where the held-out slice is a copy of the B-scan
        (dropped neighbours, datasets.NEIGHBOUR_DROPOUT, or fewer than k, utils.context_stack): that target
        would be the input's own speckle."""
        k = stacks.shape[1] - 1
        rows = torch.arange(len(stacks), device=stacks.device)
        held = torch.randint(1, k + 1, (len(stacks),), device=stacks.device)
        partner = torch.where(held % 2 == 1, held + 1, held - 1)
        partner = torch.where(partner > k, held - 1, partner)  # an odd k's last slot pairs with the one before
        targets = stacks[rows, held][:, None]
        mask = (~(targets == stacks[:, :1]).flatten(1).all(1)).float()[:, None, None, None]
        stacks = stacks.clone()
        stacks[rows, held] = stacks[rows, partner]
        return stacks, targets, mask

    def generator_step(self, noisy_a, noisy_b, clean_c):
        targets = mask = None
        if self.args.neighbour_target and self.neighbours:  # the stacks' own neighbours, one held out as target
            (noisy_a, target_a, mask_a), (noisy_b, target_b, mask_b) = map(self.hold_out_neighbour, (noisy_a, noisy_b))
            targets, mask = torch.cat([target_a, target_b]), torch.cat([mask_a, mask_b])
        elif self.args.neighbour_target or self.args.bm3d_target:  # the data's second slice is a target, not an input
            (noisy_a, target_a), (noisy_b, target_b) = noisy_a.split(1, dim=1), noisy_b.split(1, dim=1)
            targets = torch.cat([target_a, target_b])
        self.train_mode()
        # D's weights are constants here: skip their gradients (and DDP's sync of them).
        self.D.requires_grad_(False)
        with self.autocast(noisy_a.device):
            fakes, (noise_a, noise_b) = self.fuse(noisy_a, noisy_b, clean_c)
        fakes = torch.cat(fakes).float()
        noise_a, noise_b = noise_a.float(), noise_b.float()
        loss_g, adversarial, identity = self.generator_loss(fakes, clean_c, noise_a, noise_b, targets, mask)
        self.update(loss_g, self.opt_g)
        self.update_ema()
        self.D.requires_grad_(True)
        stats = {"loss_g": loss_g.item(), "adversarial": adversarial.item(), "identity": identity.item(),
                 **collapse_stats(torch.cat([noise_a, noise_b]), torch.cat([noisy_a[:, :1], noisy_b[:, :1]]))}
        return fakes, stats

    def discriminator_step(self, clean_c, fakes):
        """C_C is the only real image. Fakes are detached, so nothing here reaches G."""
        args = self.args
        fakes = self.replay(fakes.detach())
        for _ in range(args.n_critic):
            with self.autocast(clean_c.device):
                # Instance norm is per image, so one call on [real; fakes] equals separate calls.
                scores = self.D_train(self.critic_view(torch.cat([self.real_view(clean_c), fakes]))).float()
            loss_real = gan_loss(scores[:len(clean_c)], True, args.gan)
            loss_fake = 6 * gan_loss(scores[len(clean_c):], False, args.gan)
            loss_d = loss_real + self.d_fake_weight * loss_fake
            self.update(loss_d, self.opt_d)
            if args.gan == "wgan":
                with torch.no_grad():
                    for p in self.D.parameters():
                        p.clamp_(-args.clip, args.clip)  # in place: the known reproduction's clamp() was a no-op
        return loss_d.item()

    def state_dict(self):
        return {**super().state_dict(), "replay": list(self.replay.images)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.replay.images = list(state.get("replay", []))


# ---------------------------------------------------------------- R2R's noise model

# 10*log10 of unit-mean exponential speckle: its 90% - 50% quantile spread is 5.21 dB and
# its std 5.57 dB, so std = spread / 0.936 whatever the display's dB range.
SPECKLE_SPREAD_PER_STD = 10 * np.log10(np.log(10) / np.log(2)) / (10 / np.log(10) * np.pi / np.sqrt(6))


def estimate_noise_model(images, size=32, radius=3, max_patches=1000):
    """(sigma, kernel) of the display-domain speckle, measured on background patches.

    sigma: the median over patches of their 90%-50% quantile spread / 0.936, the ratio for
    log-compressed fully developed speckle: the spread ignores the pixels the display clips to
    black in the background, so it measures the unclipped noise level found inside the retina.
    kernel: (2 radius + 1)^2, unit energy, the spectral square root of the patches' mean
    autocorrelation, so white noise through it has the speckle's spatial correlation.
    """
    half = size // 2  # windows overlapping by half at most
    corners = [(i, top, left) for i, image in enumerate(images)
               for top, left in datasets.background_corners(image, size) if top % half == 0 and left % half == 0]
    if not corners:
        raise DataError(f"R2R: no signal-free background patch of {size} x {size} in the noisy training "
                        "images to measure the noise on")
    step = max(1, len(corners) // max_patches)
    patches = np.stack([images[i][top:top + size, left:left + size] for i, top, left in corners[::step]]).astype(np.float64)
    q50, q90 = np.percentile(patches.reshape(len(patches), -1), [50, 90], axis=1)
    sigma = float(np.median(q90 - q50) / SPECKLE_SPREAD_PER_STD)
    centred = patches - patches.mean(axis=(1, 2), keepdims=True)
    spectrum = np.fft.rfft2(centred, s=(2 * size, 2 * size))  # zero padding: no wrap-around
    autocorr = np.fft.fftshift(np.fft.irfft2(np.abs(spectrum) ** 2, s=(2 * size, 2 * size)).mean(0))
    c = size
    window = autocorr[c - radius:c + radius + 1, c - radius:c + radius + 1] / autocorr[c, c]
    # Spectral factorisation: power spectrum of the windowed autocorrelation, its square root, back.
    grid = 8 * (2 * radius + 1)
    padded = np.zeros((grid, grid))
    padded[:2 * radius + 1, :2 * radius + 1] = window
    padded = np.roll(padded, (-radius, -radius), axis=(0, 1))
    kernel = np.fft.fftshift(np.fft.ifft2(np.sqrt(np.clip(np.fft.fft2(padded).real, 0, None))).real)
    kernel = kernel[grid // 2 - radius:grid // 2 + radius + 1, grid // 2 - radius:grid // 2 + radius + 1]
    kernel /= np.sqrt((kernel ** 2).sum())
    return sigma, torch.tensor(kernel, dtype=torch.float32)[None, None]



# ---------------------------------------------------------------- R2R

class R2RTrainer(Trainer):
    """Recorrupted-to-recorrupted (Pang et al., CVPR 2021), self-supervised on noisy images only:

        loss = | f(y + alpha z) - (y - z / alpha) |^2,  f(v) = v - G(v),  z ~ N(0, Sigma_n),

    and at test time noise = y - mean_k f(y + alpha z_k) (--r2r_passes recorruptions).

    Noise model: additive, signal-independent noise in the display (log-intensity) domain with
    the std and the spatial correlation of the speckle, Gaussian z. Why: log compression turns
    multiplicative speckle into additive noise whose std does not depend on the signal (5.57 dB
    for fully developed speckle), which is what R2R needs; Gaussian z then makes the input and
    target noises uncorrelated (Cov = Sigma_n - Sigma_z = 0), R2R's condition, exactly for
    Gaussian n and to second order for the skewed log-speckle. A std alone is not enough: with
    white z the speckle's neighbour correlation survives in both input and target and the net
    learns to keep the speckle grain. Both are measured on the signal-free background of the
    noisy training images (estimate_noise_model), not assumed; sigma and the kernel are saved in
    the checkpoint with the weights. Dark background clips part of the speckle to black, which
    is why sigma comes from upper quantiles, not the std.
    """

    reads = frozenset({"r2r_alpha", "r2r_passes", "backbone"})

    def __init__(self, args, device="cpu", noisy_images=None, wrap=lambda module: module):
        if noisy_images is None:
            raise ValueError("R2RTrainer needs the noisy training images to measure the noise on")
        generator = models.build_generator(args.backbone).to(device)
        model = models.R2RDenoiser(generator, alpha=args.r2r_alpha, passes=args.r2r_passes, seed=args.seed).to(device)
        sigma, kernel = estimate_noise_model(noisy_images)
        model.sigma.fill_(sigma)
        model.kernel.copy_(kernel.to(model.kernel.device))
        super().__init__(args, model)
        self.G_train = wrap(generator)

    def step(self, noisy_a, noisy_b, clean_c):
        self.train_mode()
        alpha, y = self.args.r2r_alpha, torch.cat([noisy_a, noisy_b])  # both noisy crops are training data
        z = self.model.sample_noise(y.shape, self.rng, "cpu")
        source, target = y + alpha * z, y - z / alpha
        with self.autocast(y.device):
            noise = self.G_train(source).float()
        loss = F.mse_loss(source - noise, target)
        self.update(loss, self.opt_g)
        return self.finish_step({"loss_g": loss.item(), "identity": loss.item(), **collapse_stats(noise, source)})


# ---------------------------------------------------------------- Neighbor2Neighbor

# The 8 ordered pairs of 4-neighbours in a 2 x 2 cell (0 1 / 2 3); diagonals are not neighbours.
NEIGHBOUR_PAIRS = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3], [1, 0], [2, 0], [3, 1], [3, 2]])


def neighbour_masks(shape, generator):
    """For each 2 x 2 cell of an (N, 1, H, W) batch, the cell positions (0..3) of the two sub-images."""
    n, _, height, width = shape
    choice = torch.randint(len(NEIGHBOUR_PAIRS), (n, height // 2, width // 2), generator=generator)
    return NEIGHBOUR_PAIRS[choice].unbind(-1)


def subsample(images, positions):
    """The (N, 1, H/2, W/2) sub-image taking, in each 2 x 2 cell, the pixel at `positions`."""
    n, c, height, width = images.shape
    cells = F.pixel_unshuffle(images, 2)  # (N, 4, H/2, W/2): channel k = cell position k
    return cells.gather(1, positions.to(images.device)[:, None].expand(n, c, -1, -1))


class N2NTrainer(Trainer):
    """Neighbor2Neighbor (Huang et al., CVPR 2021), self-supervised on noisy images only:
    a random neighbour sub-sampler (g1, g2) splits y into two half-size images of the same
    scene with independent noise, f(v) = v - G(v), and

        loss = |f(g1(y)) - g2(y)|^2 + gamma_t |f(g1(y)) - g2(y) - (g1(f(y)) - g2(f(y)))|^2,

    f(y) without gradient; gamma_t ramps linearly from 0 to --n2n_gamma over the planned run
    (--niter epochs), as the authors' code does per epoch. OCT caveat: the estimate is unbiased
    only where neighbouring pixels' noise is independent; measured lag-1 speckle correlation on
    the Duke scans is ~0.09 axially and ~0 laterally, on the synthetic set 0.6 laterally.
    """

    reads = frozenset({"n2n_gamma", "backbone"})

    def __init__(self, args, device="cpu", noisy_images=None, wrap=lambda module: module):
        if args.patch_size % 2:
            raise DataError(f"--method n2n halves the crops: --patch_size must be even, got {args.patch_size}")
        generator = models.build_generator(args.backbone).to(device)
        super().__init__(args, generator)
        self.G_train = wrap(generator)
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.total_steps = max(1, args.niter * (args.epoch_size // (args.batch_size * world)))
        self.steps = 0

    def step(self, noisy_a, noisy_b, clean_c):
        self.train_mode()
        y = torch.cat([noisy_a, noisy_b])
        first, second = neighbour_masks(y.shape, self.rng)
        sub1, sub2 = subsample(y, first), subsample(y, second)
        with torch.no_grad(), self.autocast(y.device):
            denoised = y - self.model(y).float()  # bare module: one DDP forward per backward
        with self.autocast(y.device):
            noise = self.G_train(sub1).float()
        diff = sub1 - noise - sub2
        reconstruction = (diff ** 2).mean()
        regulariser = ((diff - (subsample(denoised, first) - subsample(denoised, second))) ** 2).mean()
        self.steps += 1
        gamma = self.args.n2n_gamma * min(1.0, self.steps / self.total_steps)
        loss = reconstruction + gamma * regulariser
        self.update(loss, self.opt_g)
        return self.finish_step({"loss_g": loss.item(), "identity": reconstruction.item(), **collapse_stats(noise, sub1)})

    def state_dict(self):
        return {**super().state_dict(), "n2n_steps": self.steps}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps = state.get("n2n_steps", 0)


def _check_gan(args, method):
    if args.gan not in ("lsgan", "vanilla"):
        raise DataError(f"--method {method} supports --gan lsgan or vanilla, not {args.gan}")


def _guard_pair(estimate, noisy, noisy_other, model):
    """The collapse guard needs two different inputs: with a batch of one, add the other noisy crop."""
    if len(noisy) > 1:
        return estimate, noisy
    with torch.no_grad():
        return torch.cat([estimate, model(noisy_other)]), torch.cat([noisy, noisy_other])


# ---------------------------------------------------------------- CNCL (paired)

class Branches(nn.Module):
    """CNCLNet.branches as a forward: DDP synchronises the gradients of forward() calls only."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.branches(x)


class CNCLTrainer(Trainer):
    """Content-noise complementary learning (Geng et al., TMI 2022), supervised by registered pairs
    (x noisy, y clean): a content branch C (x -> y) and a noise branch N (x -> x - y), both
    --backbone nets (two UNets in the paper), fused by a 1x1 conv F of [C(x), x - N(x)]; a
    conditional PatchGAN D judges (x, image) pairs:

        loss_G = GAN(D(x, F)) + 100 (|C(x) - y| + |N(x) - (x - y)| + |F - y|),
        loss_D = (GAN(D(x, y), real) + GAN(D(x, F.detach()), fake)) / 2.

    The 100 x L1 and cGAN are the paper's; the per-branch L1 terms are how each branch learns
    its own target. lr: --lr_g/--lr_d (2e-4, ten times the paper's 2e-5, for short runs).
    """

    data = "pairs"
    reads = frozenset({"gan", "lr_d", "backbone"})
    l1_weight = 100.0

    def __init__(self, args, device="cpu", noisy_images=None, wrap=lambda module: module):
        _check_gan(args, "cncl")
        model, D = models.CNCLNet(args.backbone).to(device), models.ConditionalPatchGAN().to(device)
        if args.sync_bn and torch.distributed.is_initialized():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        D.apply(models.init_weights)
        super().__init__(args, model, discriminator=D)
        self.branches_train, self.D_train = wrap(Branches(model)), wrap(D)

    def step(self, noisy, noisy_other, clean):
        self.train_mode()
        kind = self.args.gan
        with self.autocast(noisy.device):
            content, noise, fused = (t.float() for t in self.branches_train(noisy))
        self.D.requires_grad_(False)
        with self.autocast(noisy.device):
            adversarial = gan_loss(self.D(torch.cat([noisy, fused], dim=1)).float(), True, kind)
        identity = F.l1_loss(content, clean) + F.l1_loss(noise, noisy - clean) + F.l1_loss(fused, clean)
        loss_g = adversarial + self.l1_weight * identity
        self.update(loss_g, self.opt_g)
        self.D.requires_grad_(True)
        with self.autocast(noisy.device):
            scores = self.D_train(torch.cat([torch.cat([noisy, clean], 1), torch.cat([noisy, fused.detach()], 1)])).float()
        loss_d = 0.5 * (gan_loss(scores[:len(noisy)], True, kind) + gan_loss(scores[len(noisy):], False, kind))
        self.update(loss_d, self.opt_d)
        estimate, inputs = _guard_pair((noisy - fused).detach(), noisy, noisy_other, self.model)
        return self.finish_step({"loss_g": loss_g.item(), "loss_d": loss_d.item(), "adversarial": adversarial.item(),
                                 "identity": identity.item(), **collapse_stats(estimate, inputs)})


# ---------------------------------------------------------------- DRGAN

class DRGANTrainer(Trainer):
    """Disentangled-representation GAN for unpaired OCT (Huang et al., TMI 2021, "noise-powered
    disentangled representation"). X noisy, Y an unrelated clean image, P pure-noise patches
    (see models.DRGAN for the encoders/decoders and the six images of a step):

        loss_G = GAN_C(clean_x) + GAN_N(noisy_y) + 10 (|cycle_x - X| + |cycle_y - Y|)
                 + 10 (|recon_x - X| + |recon_y - Y|) + GAN_P(X - clean_x) + GAN_P(noisy_y - Y),

    D_C: Y real, clean_x fake; D_N: X real, noisy_y fake; D_P: P real, the two residuals fake
    (each D: (real + fake) / 2, LSGAN). Inference: noise = X - G_C(E_C(X)).
    P: random patches of --patch_size from the signal-free background of the noisy training
    images, above or below the retina (background_corners), each minus its own mean.
    --backbone does not apply: DRGAN has its own encoders and decoders.
    """

    reads = frozenset({"gan", "lr_d"})
    cycle_weight, recon_weight, noise_weight = 10.0, 10.0, 1.0

    def __init__(self, args, device="cpu", noisy_images=None, wrap=lambda module: module):
        if noisy_images is None:
            raise ValueError("DRGANTrainer needs the noisy training images to cut noise patches from")
        _check_gan(args, "drgan")
        if args.patch_size % 4:
            raise DataError(f"--method drgan downsamples by 4: --patch_size must be a multiple of 4, got {args.patch_size}")
        self.noise_patches = datasets.NoisePatches(noisy_images, args.patch_size)
        networks = models.DRGAN().to(device)
        D = models.Discriminators(["clean", "noisy", "noise"]).to(device)
        super().__init__(args, networks.denoiser, trained=networks, discriminator=D)
        self.networks_train, self.D_train = wrap(networks), wrap(D)

    def discriminator_loss(self, batches):
        """All three Ds in one call through the (DDP-wrapped) container; each: ([real; fake]) -> (real + fake) / 2."""
        with self.autocast(next(iter(batches.values()))[0].device):
            scores = self.D_train({name: torch.cat([real, fake.detach()]) for name, (real, fake) in batches.items()})
        loss = 0.0
        for name, (real, _) in batches.items():
            s = scores[name].float()
            loss = loss + 0.5 * (gan_loss(s[:len(real)], True, self.args.gan) + gan_loss(s[len(real):], False, self.args.gan))
        return loss

    def step(self, noisy, noisy_other, clean):
        self.train_mode()
        kind = self.args.gan
        gan = lambda name, images: gan_loss(self.D[name](images).float(), True, kind)
        patches = self.noise_patches.sample(len(noisy), self.rng).to(noisy.device)
        with self.autocast(noisy.device):
            out = {k: v.float() for k, v in self.networks_train(noisy, clean).items()}
        residual_x, residual_y = noisy - out["clean_x"], out["noisy_y"] - clean
        self.D.requires_grad_(False)
        with self.autocast(noisy.device):
            adversarial = gan("clean", out["clean_x"]) + gan("noisy", out["noisy_y"])
            noise_gan = 2 * gan("noise", torch.cat([residual_x, residual_y]))  # the sum of the two terms
        cycle = F.l1_loss(out["cycle_x"], noisy) + F.l1_loss(out["cycle_y"], clean)
        recon = F.l1_loss(out["recon_x"], noisy) + F.l1_loss(out["recon_y"], clean)
        loss_g = adversarial + self.cycle_weight * cycle + self.recon_weight * recon + self.noise_weight * noise_gan
        self.update(loss_g, self.opt_g)
        self.D.requires_grad_(True)
        loss_d = self.discriminator_loss({"clean": (clean, out["clean_x"]), "noisy": (noisy, out["noisy_y"]),
                                          "noise": (patches, torch.cat([residual_x, residual_y]))})
        self.update(loss_d, self.opt_d)
        estimate, inputs = _guard_pair(residual_x.detach(), noisy, noisy_other, self.model)
        return self.finish_step({"loss_g": loss_g.item(), "loss_d": loss_d.item(), "adversarial": (adversarial + noise_gan).item(),
                                 "identity": (cycle + recon).item(), **collapse_stats(estimate, inputs)})


TRAINERS = {"tcfl": TCFLTrainer, "r2r": R2RTrainer, "n2n": N2NTrainer, "cncl": CNCLTrainer, "drgan": DRGANTrainer}
