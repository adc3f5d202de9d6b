"""TCFL: triplet cross-fusion learning with one noise generator G and one PatchGAN D.

A training triplet is two unrelated noisy images I_A, I_B and one unrelated clean C_C:
    N2P  N_A = G(I_A), N_B = G(I_B),        C_A1 = I_A - N_A,   C_B1 = I_B - N_B
    P2P  I_A' = C_A1 + N_B, I_B' = C_B1 + N_A, C_A2 = I_A' - G(I_A'), C_B2 = I_B' - G(I_B')
    C2P  I_C1 = C_C + N_A, I_C2 = C_C + N_B,   C_C1 = I_C1 - G(I_C1), C_C2 = I_C2 - G(I_C2)
identity = |C_A1 - C_A2| + |C_B1 - C_B2| + |C_C1 - C_C| + |C_C2 - C_C|, and D tells C_C
(real) from the six estimates (fake). The six G calls are two dependent stages, so they
run as two batched calls, and D sees all six fakes in one call.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def freeze_batchnorm(model):
    """Keep BN on its running statistics (and stop updating them); its affine part still trains.

    Makes G's output for one image independent of what else is in the batch."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class TCFLTrainer:
    """Owns G, D, their optimisers, the GAN loss and one training step."""

    def __init__(self, generator, discriminator, args, wrap=lambda module: module):
        # self.G / self.D are the bare modules (saved, evaluated); the *_train versions are what a
        # step calls: the same modules, wrapped in DistributedDataParallel under torchrun.
        self.G, self.D, self.args = generator, discriminator, args
        self.G_train, self.D_train = wrap(generator), wrap(discriminator)
        self.G_ema = copy.deepcopy(generator).eval().requires_grad_(False) if args.ema else None
        if args.gan == "wgan":
            # The original WGAN used RMSprop: momentum fights the clipped critic.
            self.opt_g = torch.optim.RMSprop(generator.parameters(), lr=args.lr_g)
            self.opt_d = torch.optim.RMSprop(discriminator.parameters(), lr=args.lr_d)
        else:
            self.opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
            self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr_d, betas=(0.5, 0.999))
        self.replay = ReplayBuffer(args.pool_size)
        # Published LSGAN recipe: 0.1 on the fakes. A WGAN critic estimates mean(D(real)) - mean(D(fake)),
        # so there the six fakes together weigh as much as the one real image.
        self.d_fake_weight = args.d_fake_weight if args.d_fake_weight is not None else (1 / 6 if args.gan == "wgan" else 0.1)

    # -- the cross-fusion flow -------------------------------------------------------
    def fuse(self, noisy_a, noisy_b, clean_c):
        """The six clean estimates and the two stage-1 noises, with G called twice."""
        noise_a, noise_b = self.G_train(torch.cat([noisy_a, noisy_b])).chunk(2)
        clean_a1, clean_b1 = noisy_a - noise_a, noisy_b - noise_b
        stage2 = torch.cat([clean_a1 + noise_b, clean_b1 + noise_a, clean_c + noise_a, clean_c + noise_b])
        clean_a2, clean_b2, clean_c1, clean_c2 = (stage2 - self.G_train(stage2)).chunk(4)
        return [clean_a1, clean_b1, clean_a2, clean_b2, clean_c1, clean_c2], (noise_a, noise_b)

    def identity_loss(self, fakes, clean_c):
        clean_a1, clean_b1, clean_a2, clean_b2, clean_c1, clean_c2 = fakes
        return (F.l1_loss(clean_a1, clean_a2) + F.l1_loss(clean_b1, clean_b2)
                + F.l1_loss(clean_c1, clean_c) + F.l1_loss(clean_c2, clean_c))

    # -- GAN losses -------------------------------------------------------------------
    def gan_loss(self, scores, real):
        """Mean loss of D's scores against the label real/fake, for --gan lsgan|vanilla|wgan."""
        if self.args.gan == "lsgan":
            return F.mse_loss(scores, torch.full_like(scores, float(real)))
        if self.args.gan == "vanilla":
            return F.binary_cross_entropy_with_logits(scores, torch.full_like(scores, float(real)))
        return -scores.mean() if real else scores.mean()  # wgan critic

    # -- one step ---------------------------------------------------------------------
    def step(self, noisy_a, noisy_b, clean_c):
        """One G update, then --n_critic D updates (G first, as published); floats for the log."""
        fakes, stats = self.generator_step(noisy_a, noisy_b, clean_c)
        stats["loss_d"] = self.discriminator_step(clean_c, fakes)
        return stats

    def autocast(self, device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def generator_step(self, noisy_a, noisy_b, clean_c):
        args = self.args
        self.G_train.train()
        if args.frozen_bn:
            freeze_batchnorm(self.G)
        # D's weights are constants here: skip their gradients (and DDP's sync of them).
        self.D.requires_grad_(False)
        with self.autocast(noisy_a.device):
            fakes, (noise_a, noise_b) = self.fuse(noisy_a, noisy_b, clean_c)
            fakes = torch.cat(fakes).float()
            # Sum over the six fakes of each one's mean loss = 6 x the mean over all of them.
            adversarial = 6 * self.gan_loss(self.D(fakes).float(), real=True)
        noise_a, noise_b = noise_a.float(), noise_b.float()
        identity = self.identity_loss(fakes.chunk(6), clean_c)
        loss_g = adversarial + args.lam * identity
        if args.sigma_tv:
            loss_g = loss_g + args.sigma_tv * total_variation(fakes)
        noise_distance = F.l1_loss(noise_a, noise_b)
        if args.sigma_rep:
            loss_g = loss_g + args.sigma_rep * (torch.exp(-noise_distance) - 1)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.update_ema()
        self.D.requires_grad_(True)
        with torch.no_grad():
            noises = torch.cat([noise_a, noise_b])
            stats = {
                "loss_g": loss_g.item(), "adversarial": adversarial.item(), "identity": identity.item(),
                # Collapse guard: a constant G makes both of these exactly zero.
                "noise_distance": noise_distance.item(),
                "input_distance": F.l1_loss(noisy_a, noisy_b).item(),
                "noise_spread": noises.std(dim=0).mean().item(),
            }
        return fakes, stats

    def discriminator_step(self, clean_c, fakes):
        """C_C is the only real image. Fakes are detached, so nothing here reaches G."""
        args = self.args
        fakes = self.replay(fakes.detach())
        for _ in range(args.n_critic):
            with self.autocast(clean_c.device):
                # Instance norm is per image, so one call on [real; fakes] equals separate calls.
                scores = self.D_train(torch.cat([clean_c, fakes])).float()
            loss_real = self.gan_loss(scores[:len(clean_c)], real=True)
            loss_fake = 6 * self.gan_loss(scores[len(clean_c):], real=False)
            loss_d = loss_real + self.d_fake_weight * loss_fake
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            if args.gan == "wgan":
                with torch.no_grad():
                    for p in self.D.parameters():
                        p.clamp_(-args.clip, args.clip)  # in place: the known reproduction's clamp() was a no-op
        return loss_d.item()

    @torch.no_grad()
    def update_ema(self):
        if self.G_ema is None:
            return
        for ema, live in zip(self.G_ema.parameters(), self.G.parameters()):
            ema.lerp_(live, 1 - self.args.ema)
        for ema, live in zip(self.G_ema.buffers(), self.G.buffers()):
            ema.copy_(live)

    def inference_generator(self):
        """The generator to denoise with: the EMA copy when kept (never DDP-wrapped)."""
        return self.G_ema if self.G_ema is not None else self.G

    def state_dict(self):
        return {
            "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
            "generator_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "replay": list(self.replay.images),
        }

    def load_state_dict(self, state):
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        if self.G_ema is not None and state.get("generator_ema") is not None:
            self.G_ema.load_state_dict(state["generator_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.replay.images = list(state.get("replay", []))


def collapse_warning(stats, tolerance=0.01):
    """A message when G's output no longer depends on its input, else None.

    Relative to how different the two inputs are, so it does not depend on the data's scale.
    """
    ratio = stats["noise_distance"] / max(stats["input_distance"], 1e-12)
    if ratio < tolerance or stats["noise_spread"] < tolerance * stats["input_distance"]:
        return (f"WARNING: generator collapse: |N_A - N_B| = {stats['noise_distance']:.2e} "
                f"({ratio:.1%} of |I_A - I_B|), spread across the batch {stats['noise_spread']:.2e}: "
                "G outputs (nearly) the same tensor for every input, the trivial solution of the "
                "identity losses. Raise the GAN weight / D learning rate, or see README 'Collapse'.")
    return None


TRAINERS = {"tcfl": TCFLTrainer}
